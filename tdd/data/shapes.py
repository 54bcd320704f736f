"""The procedural "shapes" world: captioned 32x32 scenes of one or two textured objects.

A scene is a :class:`SceneSpec` (what the caption says) plus a variation seed (what it does not
say: position jitter, rotation, size within its class, texture phase, colour jitter). Everything is
a pure function of integer seeds, so training streams and held-out sets are reproducible.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, replace

import numpy as np
import torch
import torch.nn.functional as F
from torch.utils.data import DataLoader, Dataset

from tdd.data.samplers import ResumableData

SHAPES = ("circle", "square", "triangle")
COLOURS = {
    "red": (0.90, 0.12, 0.10), "green": (0.12, 0.72, 0.20), "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10), "purple": (0.60, 0.20, 0.80),
}
SIZES = {"small": (3.6, 4.6), "large": (6.2, 7.4)}  # radius range in pixels at 32x32
TEXTURES = ("plain", "striped", "dotted")
# Stripe/dot period and dot radius in pixels at 32x32. The period stays above the 4-pixel cell of
# the teacher's 8x8 latent grid, so an autoencoder can carry a texture rather than alias it.
TEXTURE_PERIOD = (5.2, 6.2)
DOT_RADIUS = 1.7
BACKGROUNDS = {"black": 0.05, "white": 0.95, "gray": 0.50}
SINGLE_POSITIONS = {  # phrase -> centre (x, y) in units of the image side
    "top left": (0.25, 0.25), "top right": (0.75, 0.25), "bottom left": (0.25, 0.75),
    "bottom right": (0.75, 0.75), "center": (0.5, 0.5),
}
PAIR_POSITIONS = {"left": (0.25, 0.5), "right": (0.75, 0.5), "top": (0.5, 0.25),
                  "bottom": (0.5, 0.75)}
LAYOUTS = (("left", "right"), ("right", "left"), ("top", "bottom"), ("bottom", "top"))
ATTRIBUTES = ("shape", "colour", "size", "texture", "position", "background")
SPLITS = {"val": 1, "test": 2}  # held-out seed namespaces; training uses namespace 0


@dataclass(frozen=True)
class ObjectSpec:
    shape: str
    colour: str
    size: str
    texture: str
    position: str

    def phrase(self) -> str:
        texture = "" if self.texture == "plain" else f" {self.texture}"
        return f"a {self.size} {self.colour}{texture} {self.shape}"


@dataclass(frozen=True)
class SceneSpec:
    """The captioned attributes of a scene: one or two objects on a background."""

    objects: tuple[ObjectSpec, ...]
    background: str

    @property
    def caption(self) -> str:
        if len(self.objects) == 1:
            obj = self.objects[0]
            where = "in the center" if obj.position == "center" else f"at the {obj.position}"
            body = f"{obj.phrase()} {where}"
        else:
            body = " and ".join(
                f"{o.phrase()} {'on' if o.position in ('left', 'right') else 'at'} the "
                f"{o.position}" for o in self.objects)
        return f"{body} on a {self.background} background"


_OBJECT = (r"a (?P<size{i}>small|large) (?P<colour{i}>\w+)(?: (?P<texture{i}>striped|dotted))? "
           r"(?P<shape{i}>\w+) (?:at the |in the |on the )(?P<position{i}>{where})")
_ONE = re.compile("^" + _OBJECT.format(i=0, where="|".join(SINGLE_POSITIONS))
                  + r" on a (?P<background>\w+) background$")
_TWO = re.compile("^" + " and ".join(_OBJECT.format(i=i, where="|".join(PAIR_POSITIONS))
                                     for i in range(2)) + r" on a (?P<background>\w+) background$")


def parse_caption(caption: str) -> SceneSpec:
    """Inverse of :attr:`SceneSpec.caption`; raises ``ValueError`` on text outside the grammar."""
    match = _ONE.match(caption) or _TWO.match(caption)
    if match is None:
        raise ValueError(f"not a shapes caption: {caption!r}")
    count = 2 if match.groupdict().get("shape1") else 1
    objects = tuple(ObjectSpec(
        match[f"shape{i}"], match[f"colour{i}"], match[f"size{i}"],
        match[f"texture{i}"] or "plain", match[f"position{i}"]) for i in range(count))
    spec = SceneSpec(objects, match["background"])
    if spec.caption != caption or not _valid(spec):
        raise ValueError(f"not a shapes caption: {caption!r}")
    return spec


def _valid(spec: SceneSpec) -> bool:
    positions = SINGLE_POSITIONS if len(spec.objects) == 1 else PAIR_POSITIONS
    return spec.background in BACKGROUNDS and all(
        o.shape in SHAPES and o.colour in COLOURS and o.texture in TEXTURES
        and o.position in positions for o in spec.objects)


def sample_spec(rng: np.random.Generator, p_two: float = 0.5) -> SceneSpec:
    """Draw the captioned attributes of one scene (uniform over each attribute)."""
    def pick(options):
        return options[int(rng.integers(len(options)))]

    def obj(position: str) -> ObjectSpec:
        return ObjectSpec(pick(SHAPES), pick(list(COLOURS)), pick(list(SIZES)),
                          pick(TEXTURES), position)

    if rng.random() < p_two:
        objects = tuple(obj(p) for p in pick(LAYOUTS))
    else:
        objects = (obj(pick(list(SINGLE_POSITIONS))),)
    return SceneSpec(objects, pick(list(BACKGROUNDS)))


def alternatives(spec: SceneSpec, attribute: str) -> list[SceneSpec]:
    """Every scene that differs from ``spec`` in one ``attribute`` (of one object)."""
    if attribute == "background":
        return [replace(spec, background=b) for b in BACKGROUNDS if b != spec.background]
    if attribute == "position" and len(spec.objects) == 2:
        current = tuple(o.position for o in spec.objects)
        return [replace(spec, objects=tuple(replace(o, position=p)
                                            for o, p in zip(spec.objects, layout)))
                for layout in LAYOUTS if layout != current]
    options = {"shape": SHAPES, "colour": tuple(COLOURS), "size": tuple(SIZES),
               "texture": TEXTURES, "position": tuple(SINGLE_POSITIONS)}[attribute]
    out = []
    for i, obj in enumerate(spec.objects):
        for value in options:
            if value != getattr(obj, attribute):
                objects = list(spec.objects)
                objects[i] = replace(obj, **{attribute: value})
                out.append(replace(spec, objects=tuple(objects)))
    return out


def scene_rng(*key: int) -> np.random.Generator:
    return np.random.default_rng([int(k) for k in key])


def _object_params(obj: ObjectSpec, two: bool, rng: np.random.Generator, res: int) -> list:
    centres = PAIR_POSITIONS if two else SINGLE_POSITIONS
    jitter = (1.0 if two else 1.5) * res / 32
    cx, cy = (c * res + rng.uniform(-jitter, jitter) for c in centres[obj.position])
    radius = rng.uniform(*SIZES[obj.size]) * res / 32
    colour = np.clip(np.array(COLOURS[obj.colour]) + rng.uniform(-0.05, 0.05, 3), 0, 1)
    period = rng.uniform(*TEXTURE_PERIOD) * res / 32
    return [cx, cy, radius, math.radians(rng.uniform(-20, 20)), *colour, period,
            *rng.uniform(0, period, 2), SHAPES.index(obj.shape), TEXTURES.index(obj.texture)]


def _coverage(params: torch.Tensor, res: int, ss: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Shape and texture masks (N, S, S) of N objects on a supersampled grid."""
    grid = (torch.arange(res * ss, dtype=torch.float32) + 0.5) / ss
    p = params[:, :, None, None]
    dx, dy = grid[None, None, :] - p[:, 0], grid[None, :, None] - p[:, 1]
    cos, sin = torch.cos(p[:, 3]), torch.sin(p[:, 3])
    u, v = cos * dx + sin * dy, -sin * dx + cos * dy
    un, vn = u / p[:, 2], v / p[:, 2]
    circle = un**2 + vn**2 <= 1.0
    square = torch.maximum(un.abs(), vn.abs()) <= 0.82
    triangle = (vn <= 0.65) & (0.866 * un - 0.5 * vn <= 0.65) & (-0.866 * un - 0.5 * vn <= 0.65)
    shape = torch.stack([circle, square, triangle])  # (3, N, S, S)
    inside = shape.gather(0, p[:, 10].long().expand_as(circle)[None]).squeeze(0)
    fu, fv = torch.frac((u + p[:, 8]) / p[:, 7]), torch.frac((v + p[:, 9]) / p[:, 7])
    stripes = fu < 0.4
    dots = ((fu - 0.5) ** 2 + (fv - 0.5) ** 2) * p[:, 7] ** 2 <= (DOT_RADIUS * res / 32) ** 2
    texture = torch.stack([torch.zeros_like(stripes), stripes, dots])
    marked = texture.gather(0, p[:, 11].long().expand_as(circle)[None]).squeeze(0)
    return inside.float(), marked.float()


def render(specs: list[SceneSpec], seeds: list[int], resolution: int = 32,
           supersample: int = 4) -> torch.Tensor:
    """Render scenes (B, 3, H, W) in [0, 1]; ``seeds`` fix what the captions leave open."""
    rows, owner, backgrounds = [], [], []
    for b, (spec, seed) in enumerate(zip(specs, seeds)):
        rng = scene_rng(7, seed)
        level = BACKGROUNDS[spec.background] + rng.uniform(-0.04, 0.04, 3)
        backgrounds.append(np.clip(level, 0, 1))
        for obj in spec.objects:
            rows.append(_object_params(obj, len(spec.objects) == 2, rng, resolution))
            owner.append(b)
    size = resolution * supersample
    image = torch.tensor(np.array(backgrounds), dtype=torch.float32)[:, :, None, None]
    image = image.expand(len(specs), 3, size, size).clone()
    params = torch.tensor(rows, dtype=torch.float32)
    inside, marked = _coverage(params, resolution, supersample)
    base = params[:, 4:7, None, None]
    colour = base * (1 - 0.6 * marked[:, None])  # texture marks: the colour darkened to 40%
    for i, b in enumerate(owner):  # objects in caption order; a later one covers an earlier one
        alpha = inside[i][None]
        image[b] = image[b] * (1 - alpha) + colour[i] * alpha
    return F.avg_pool2d(image, supersample)


def training_scene(seed: int, index: int) -> tuple[SceneSpec, int]:
    """Scene ``index`` of the unlimited training stream of ``seed``."""
    rng = scene_rng(0, seed, index)
    return sample_spec(rng), int(rng.integers(2**62))


def eval_scenes(split: str = "val", n: int = 2000) -> tuple[list[SceneSpec], list[int]]:
    """The fixed held-out prompt set ``split`` (its own seed namespace) and render seeds."""
    if split not in SPLITS:
        raise ValueError(f"split={split!r}; expected one of {sorted(SPLITS)}")
    specs, seeds = [], []
    for i in range(n):
        rng = scene_rng(SPLITS[split], i)
        specs.append(sample_spec(rng))
        seeds.append(int(rng.integers(2**62)))
    return specs, seeds


def reference_renders(split: str = "val", n: int = 2000, variant: int = 0,
                      resolution: int = 32, batch: int = 500) -> torch.Tensor:
    """Real renders of the held-out prompts; ``variant`` > 0 re-draws everything uncaptioned."""
    specs, seeds = eval_scenes(split, n)
    if variant:
        seeds = [int(scene_rng(9, variant, s).integers(2**62)) for s in seeds]
    return torch.cat([render(specs[i:i + batch], seeds[i:i + batch], resolution)
                      for i in range(0, n, batch)])


class ShapesDataset(Dataset):
    """Map-style view of the training stream (a very large virtual index, deterministic)."""

    def __init__(self, seed: int = 0, length: int = 2**31 - 1, resolution: int = 32):
        if length <= 0 or resolution <= 0:
            raise ValueError(f"data: length ({length}) and resolution ({resolution}) must be > 0")
        self.seed, self.length, self.resolution = seed, length, resolution

    def __len__(self) -> int:
        return self.length

    def __getitem__(self, index: int) -> dict:
        spec, seed = training_scene(self.seed, index)
        image = render([spec], [seed], self.resolution)[0]
        return {"pixel_values": image * 2 - 1, "caption": spec.caption}


class HeldOutShapes(Dataset):
    """The held-out prompt set ``split`` with its reference renders."""

    def __init__(self, split: str = "val", size: int = 2000, resolution: int = 32):
        self.specs, self.seeds = eval_scenes(split, size)
        self.resolution = resolution

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index: int) -> dict:
        image = render([self.specs[index]], [self.seeds[index]], self.resolution)[0]
        return {"pixel_values": image * 2 - 1, "caption": self.specs[index].caption}


class ShapesDataModule(ResumableData):
    """``data=shapes``: the unlimited training stream plus a held-out validation prompt set."""

    def __init__(self, batch_size: int = 32, seed: int = 0, num_workers: int = 0,
                 resolution: int = 32, val_size: int = 256, length: int = 2**31 - 1):
        super().__init__()
        if batch_size <= 0 or val_size <= 0:
            raise ValueError(f"data.batch_size ({batch_size}) and data.val_size ({val_size}) "
                             "must be positive")
        self.batch_size, self.num_workers = batch_size, num_workers
        self.dataset = ShapesDataset(seed, length, resolution)
        self.val_dataset = HeldOutShapes("val", val_size, resolution)

    def _loader(self, dataset: Dataset, sampler=None, drop_last: bool = False) -> DataLoader:
        return DataLoader(dataset, batch_size=self.batch_size, sampler=sampler,
                          num_workers=self.num_workers, drop_last=drop_last,
                          persistent_workers=self.num_workers > 0)

    def train_dataloader(self) -> DataLoader:
        """The stream in order, from where a resumed run stopped, split by rank."""
        sampler = self.train_sampler(len(self.dataset), self.dataset.seed, shuffle=False)
        return self._loader(self.dataset, sampler, drop_last=True)

    def evaluation_set(self, n: int) -> tuple[list[str], torch.Tensor]:
        """The first ``n`` held-out "val" prompts and their reference renders in [0, 1]."""
        specs, _ = eval_scenes("val", n)
        images = reference_renders("val", n, resolution=self.dataset.resolution)
        return [spec.caption for spec in specs], images

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_dataset)
