"""The distillation LightningModule: one training step shared by every strategy and guidance."""

from __future__ import annotations

import os
import warnings
from collections.abc import Callable

import lightning as L
import torch

from tdd.adversarial import Adversarial, NoAdversarial
from tdd.distributed import gather_objects, rank_seed
from tdd.guidance import Guidance, combine
from tdd.models.conditioning import Conditioning
from tdd.models.flow import check_guidance
from tdd.models.students import Student
from tdd.models.teacher import Teacher
from tdd.models.text_cache import TextCache
from tdd.prediction import ddim_map, to_x0_eps
from tdd.strategies import TargetStrategy


class DistillationModule(L.LightningModule):
    """Consistency distillation of ``teacher`` into a student (docs/methods.md section 0).

    Random draws, all from ``self.generator`` in this order: source index i, target timestep s,
    empty-prompt mask, guidance scale w, VAE latent sample, forward noise (then, with an
    adversarial term, its own draws). Under DDP each rank has its own stream, seeded from
    (seed, global rank); rank 0's is the single-process one.

    Precision: the frozen networks run in the teacher's dtype, the trainable ones in theirs
    (fp32); latents and conditions are cast where they meet a UNet, and the loss is fp32.
    """

    def __init__(
        self,
        teacher: Teacher,
        student: Callable[..., Student],
        strategy: TargetStrategy,
        guidance: Guidance,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor],
        optimizer: Callable[..., torch.optim.Optimizer],
        lr_scheduler: Callable | None = None,
        seed: int = 0,
        loss_buckets: int = 4,
        cache_text: int = 0,
        adversarial: Callable[..., Adversarial] | None = None,
    ):
        super().__init__()
        self.schedule = teacher.noise_schedule()  # VP or flow: the step below is the same
        check_guidance(dict(teacher.unet.config), guidance)
        if self.schedule.num_train_timesteps != strategy.grid.num_train_timesteps:
            raise ValueError(
                f"strategy.num_train_timesteps={strategy.grid.num_train_timesteps} differs from "
                f"the teacher scheduler's {self.schedule.num_train_timesteps}"
            )
        self.student = student(unet=teacher.unet, guidance_embedding_dim=guidance.condition_dim)
        self.adversarial = (adversarial or NoAdversarial)(unet=teacher.unet)
        self.vae, self.text = teacher.vae, teacher.text
        self.teacher = teacher  # the frozen bundle: its VAE, text encoder and noise schedule
        self.text_cache = TextCache(self.text, cache_text) if cache_text else None
        self.strategy, self.guidance, self.loss_fn = strategy, guidance, loss_fn
        self.optimizer_factory, self.lr_scheduler_factory = optimizer, lr_scheduler
        self.seed = seed
        self.generator = torch.Generator().manual_seed(seed)
        self.loss_buckets = loss_buckets
        self.strict_loading = False  # checkpoints hold trainable state only: checked below
        self._empty: Conditioning | None = None
        self._bucket_sums = torch.zeros(loss_buckets, dtype=torch.float64)
        self._bucket_counts = torch.zeros(loss_buckets, dtype=torch.float64)

    # -- the algorithm -------------------------------------------------------------------------
    def training_step(self, batch: dict, batch_idx: int) -> torch.Tensor:
        g, grid = self.generator, self.strategy.grid
        # 1. source index i, t = grid[i], t_prev = max(t - k, 0); the strategy's target s
        i = grid.sample_index(len(batch["caption"]), g)
        t, t_prev, s = grid[i], grid.previous(i), self.strategy.sample(i, generator=g)
        t, t_prev, s = t.to(self.device), t_prev.to(self.device), s.to(self.device)
        cond, w = self.encode_prompts(batch["caption"], batch.get("original_size"),
                                      batch.get("crop_top_left"))
        # 2. x_t = a_t * x0 + s_t * noise
        x0 = self.encode_images(batch["pixel_values"])
        x_t = self.schedule.add_noise(x0, self.randn_like(x0), t)
        # 3. guided teacher (cond + uncond in one call), one DDIM step to t_prev
        x_prev = self.teacher_step(x_t, t, t_prev, cond, w)
        # 4. student at (x_t, t) with gradient (not on discriminator steps); target at
        #    (x_prev, t_prev) without
        w_cond = self.guidance.student_condition(w.to(self.device))
        with self.adversarial.student_grad(self.global_step):
            pred = self.predict(self.student.online, x_t, t, cond, w_cond)
        with torch.no_grad():
            target = self.predict(self.student.target, x_prev, t_prev, cond, w_cond)
        # 5. both mapped to s; per-sample loss
        pred_s = self.strategy.project(x_t, t, *pred, s, self.schedule)
        target_s = self.strategy.project_target(x_prev, t_prev, *target, s, self.schedule)
        loss = self.loss_fn(pred_s, target_s)
        self.log_loss(loss, t)
        # 6. the adversarial term (section 1.2), if any: on discriminator steps its hinge
        #    loss, on student steps the consistency loss plus the weighted generator loss
        return self.adversarial.objective(self, loss.mean(), pred_s, target_s, s, cond)

    # -- the pieces it calls ---------------------------------------------------------------------
    def encode_prompts(self, captions: list[str], original_size=None, crop_top_left=None
                       ) -> tuple[Conditioning, torch.Tensor]:
        """Drop a share of captions to "" and encode (with the images' size conditioning where
        the teacher takes it, SDXL); draw the teacher's guidance scale w."""
        captions = self.guidance.drop_captions(list(captions), self.generator)
        w = self.guidance.sample_w(len(captions), self.generator)
        if self.text_cache is not None and original_size is None and crop_top_left is None:
            cond = self.text_cache(captions)  # no per-image size conditioning to encode
        else:
            cond = self.text(captions, original_size, crop_top_left)
        return self.guidance.attach(cond, w), w

    @torch.no_grad()
    def encode_images(self, pixel_values: torch.Tensor) -> torch.Tensor:
        """VAE latent sample, shifted (SD3, FLUX) and scaled: the teacher's x0."""
        posterior = self.vae.encode(pixel_values.to(self.device, self.vae.dtype)).latent_dist
        mean, std = posterior.mean.float(), posterior.std.float()
        latent = mean + std * self.randn_like(mean)
        if self.teacher.shift_factor:
            latent = latent - self.teacher.shift_factor
        return latent * self.teacher.scaling_factor

    @torch.no_grad()
    def teacher_step(self, x_t, t, t_prev, cond: Conditioning, w) -> torch.Tensor:
        """``x_prev``: DDIM step to t_prev along ``p_c + w (p_c - p_u)`` for x0 and eps."""
        if not self.guidance.uses_uncond:
            x0, eps = self.predict(self.student.teacher, x_t, t, cond)
            return ddim_map(x0, eps, t_prev, self.schedule)
        uncond = self.guidance.unconditional(cond, self.empty_conditioning).with_sizes_of(cond)
        x0, eps = self.predict(self.student.teacher, x_t.repeat(2, 1, 1, 1), t.repeat(2),
                               cond.cat(uncond))
        (x0_c, x0_u), (eps_c, eps_u) = x0.chunk(2), eps.chunk(2)
        w = w.to(self.device)
        return ddim_map(combine(x0_c, x0_u, w), combine(eps_c, eps_u, w), t_prev, self.schedule)

    def predict(self, network, x, t, cond: Conditioning, *timestep_cond):
        """Run ``network`` at the timestep it takes for t and convert its output to (x0, eps)."""
        output = network(x, self.schedule.model_timestep(t), cond, *timestep_cond)
        alpha, sigma = self.schedule.coefficients(t, x)
        return to_x0_eps(output.to(x.dtype), x, alpha, sigma, self.teacher.prediction_type)

    def empty_conditioning(self, batch_size: int) -> Conditioning:
        """The encoded empty prompt, computed once (the text encoder is frozen)."""
        if self._empty is None or self._empty.hidden.device != self.device:
            self._empty = self.text([""])
        added = {k: v.expand(batch_size, *v.shape[1:]) for k, v in self._empty.added.items()}
        return Conditioning(self._empty.hidden.expand(batch_size, -1, -1), added)

    def randn_like(self, x: torch.Tensor) -> torch.Tensor:
        """Standard normal noise from the module's generator (on CPU, so CPU and GPU agree)."""
        return torch.randn(x.shape, generator=self.generator, dtype=x.dtype).to(x.device)

    def log_loss(self, loss: torch.Tensor, t: torch.Tensor) -> None:
        """Log the loss every step, and per timestep bucket its mean over the log interval."""
        if not torch.isfinite(loss).all():
            raise FloatingPointError(
                f"non-finite distillation loss at step {self.global_step}: stopping; "
                f"{self._newest_checkpoint()}"
            )
        self.log("train/loss", loss.mean(), prog_bar=True, batch_size=len(loss))
        bucket = (t * self.loss_buckets // self.schedule.num_train_timesteps).cpu()
        self._bucket_sums.index_add_(0, bucket, loss.detach().double().cpu())
        self._bucket_counts.index_add_(0, bucket, torch.ones_like(bucket, dtype=torch.float64))
        interval = self.trainer.log_every_n_steps if self._trainer is not None else 1
        if (self.global_step + 1) % max(interval, 1) == 0:
            width = self.schedule.num_train_timesteps // self.loss_buckets
            means = self._bucket_sums / self._bucket_counts  # NaN for an empty bucket
            self.log_dict({f"train/loss_t{b * width}-{(b + 1) * width - 1}": float(m)
                           for b, m in enumerate(means)}, batch_size=len(loss))
            self._bucket_sums.zero_(), self._bucket_counts.zero_()

    # -- Lightning plumbing ----------------------------------------------------------------------
    def setup(self, stage: str) -> None:
        """Seed this rank's stream now that the rank is known (before a checkpoint restores it)."""
        self.generator.manual_seed(rank_seed(self.seed, self.global_rank))
        self.adversarial.setup(self.trainer)

    def configure_optimizers(self):
        self.adversarial.configure_optimizer()  # its own, stepped in optimizer_step
        optimizer = self.optimizer_factory(params=list(self.student.trainable_parameters()))
        if self.lr_scheduler_factory is None:
            return optimizer
        scheduler = self.lr_scheduler_factory(optimizer=optimizer)
        schedule = {"scheduler": scheduler, "interval": "step"}
        return {"optimizer": optimizer, "lr_scheduler": schedule}

    def optimizer_step(self, *args, **kwargs) -> None:
        """Step, then move the EMA target: inside the step, so that checkpoint and evaluation
        callbacks (whose ``on_train_batch_end`` runs before the module's) see the moved EMA.
        On an adversarial term's own steps the student has no gradient: its optimizer does
        nothing, the EMA stays and the term steps its discriminator instead."""
        trains_student = self.adversarial.trains_student(self.global_step)
        super().optimizer_step(*args, **kwargs)
        if trains_student:
            self.student.update_target()
        else:
            self.adversarial.step()

    def lr_scheduler_step(self, scheduler, metric) -> None:
        """The lr schedule counts student updates (discriminator steps leave it)."""
        if self.adversarial.trains_student(self.global_step - 1):  # the step just taken
            super().lr_scheduler_step(scheduler, metric)

    def on_train_start(self) -> None:
        """Apply the configured optimizer settings (lr, betas, ...) over those a resumed
        checkpoint restored, so that a resume with ``optimizer.lr=...`` runs with that value."""
        configured = self.optimizer_factory(params=[torch.zeros(1, requires_grad=True)])
        settings = {k: v for k, v in configured.param_groups[0].items() if k != "params"}
        for optimizer in self.trainer.optimizers:
            for group in optimizer.param_groups:
                changed = {k: (group[k], v) for k, v in settings.items()
                           if k in group and _differs(group[k], v)}
                group.update({k: new for k, (_, new) in changed.items()})
                if "lr" in changed and "initial_lr" in group:
                    group["initial_lr"] = settings["lr"]
                for key, (old, new) in changed.items() if self.trainer.is_global_zero else ():
                    print(f"optimizer.{key}: {new} (the checkpoint had {old})", flush=True)
        for config in self.trainer.lr_scheduler_configs:
            if hasattr(config.scheduler, "base_lrs"):
                config.scheduler.base_lrs = [settings["lr"]] * len(config.scheduler.base_lrs)

    def _newest_checkpoint(self) -> str:
        """What the non-finite message says about the checkpoints (never a non-finite state)."""
        callback = self.trainer.checkpoint_callback if self._trainer is not None else None
        path = getattr(callback, "last_model_path", "") or ""
        if not path or not os.path.isfile(path):
            return "no checkpoint was saved"
        step = getattr(callback, "last_saved_step", None)
        at = f" (step {step})" if step is not None else ""
        return f"the newest checkpoint is {path}{at}, saved with finite weights"

    def trainable_state_dict(self) -> dict[str, torch.Tensor]:
        """What a checkpoint keeps: the student's trainable tensors and the adversarial
        term's (discriminator heads), keyed like ``self.state_dict()``."""
        state = {f"student.{k}": v for k, v in self.student.trainable_state_dict().items()}
        return state | {f"adversarial.{k}": v for k, v in self.adversarial.state_dict().items()}

    def on_save_checkpoint(self, checkpoint: dict) -> None:
        checkpoint["state_dict"] = self.trainable_state_dict()
        checkpoint["generator_states"] = gather_objects(self.generator.get_state())  # by rank
        checkpoint["recipe"] = self.recipe()
        if (optimizer_state := self.adversarial.optimizer_state()) is not None:
            checkpoint["adversarial_optimizer"] = optimizer_state

    def recipe(self) -> dict:
        """What a checkpoint records about the run that wrote it (to explain a mismatch)."""
        return {"student": type(self.student).__name__, "strategy": type(self.strategy).__name__,
                "guidance": type(self.guidance).__name__,
                "guidance_embedding_dim": self.guidance.condition_dim,
                "adversarial": type(self.adversarial).__name__}

    def on_load_checkpoint(self, checkpoint: dict) -> None:
        check_trainable_state(checkpoint["state_dict"], self.trainable_state_dict(),
                              checkpoint.get("recipe", {}), self.recipe())
        self.restore_generator(checkpoint)
        self.adversarial.load_optimizer_state(checkpoint.get("adversarial_optimizer"))

    def restore_generator(self, checkpoint: dict) -> None:
        """Continue this rank's saved stream; a checkpoint of another world size starts fresh
        streams seeded from (seed, rank, step), since its streams cannot be continued."""
        states = checkpoint.get("generator_states", [])
        world_size = self.trainer.world_size if self._trainer is not None else 1
        if len(states) == world_size:
            self.generator.set_state(states[self.global_rank])
        elif states:
            step = int(checkpoint.get("global_step", 0))
            warnings.warn(f"the checkpoint holds the random streams of {len(states)} ranks, this "
                          f"run has {world_size}: new streams from (seed, rank, step {step})",
                          stacklevel=2)
            self.generator.manual_seed(rank_seed(self.seed, self.global_rank, step + 1))


def _differs(a, b) -> bool:
    return (list(a) != list(b)) if isinstance(a, (tuple, list)) else a != b


def check_trainable_state(saved: dict, expected: dict, saved_recipe: dict, recipe: dict) -> None:
    """A checkpoint must hold exactly the model's trainable tensors, with the same shapes; the
    error names the tensors and the likely config difference."""
    missing = sorted(expected.keys() - saved.keys())
    unexpected = sorted(saved.keys() - expected.keys())
    reshaped = sorted(k for k in expected.keys() & saved.keys()
                      if tuple(saved[k].shape) != tuple(expected[k].shape))
    if not (missing or unexpected or reshaped):
        return
    parts = [f"{len(names)} {what} (e.g. {names[:3]})" for names, what in (
        (missing, "trainable tensors of this model are missing"),
        (unexpected, "tensors this model lacks are present"),
        (reshaped, "tensors have another shape")) if names]
    likely = [f"{key} {saved_recipe[key]!r} in the checkpoint, {value!r} now"
              for key, value in recipe.items()
              if key in saved_recipe and saved_recipe[key] != value]
    names = missing + unexpected
    if any("lora_" in k for k in reshaped):
        likely.append("another student.rank")
    if any("lora_" in k for k in names) and not likely:
        likely.append("another student (lora/full) or LoRA target modules")
    if any(k.startswith("student.ema") for k in names):
        likely.append("another student.ema_decay (EMA on or off)")
    if any("cond_proj" in k for k in names + reshaped):
        likely.append("another guidance (w_embed adds a guidance projection)")
    if any(k.startswith("adversarial.") for k in names + reshaped):
        likely.append("another adversarial (hinge adds discriminator heads)")
    raise CheckpointMismatch(
        f"the checkpoint does not fit this model: {'; '.join(parts)}. Likely another student "
        f"config: {'; '.join(likely) or 'compare the student settings'}"
    )


class CheckpointMismatch(KeyError):
    """A checkpoint whose trainable tensors do not match the model's (message unquoted)."""

    def __str__(self) -> str:
        return str(self.args[0])
