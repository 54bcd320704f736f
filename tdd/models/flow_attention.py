"""Attention over the SD3 pipeline's padding without computing it: without T5 the pipeline
appends ``max_sequence_length`` (256) identical zero tokens after the CLIP tokens; attention
over them equals attention over one of them whose logit is raised by ``log(256)``.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from diffusers import SD3Transformer2DModel

T5_LENGTH = 256  # the zero tokens StableDiffusion3Pipeline appends without a T5 encoder


class RepeatedTokenJointAttention:
    """SD3 joint attention in which the last context token stands for ``repeats`` copies.

    Softmax attention over ``r`` identical keys and values equals attention over one of them
    with its logit raised by ``log r``, and identical queries give identical outputs; so a
    context of k tokens plus one zero token gives what k tokens plus ``r`` zero tokens give.
    """

    def __init__(self, repeats: int):
        self.log_repeats = math.log(repeats)

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None,
                 **kwargs):
        b, n = hidden_states.shape[:2]

        def heads(x):
            return x.view(b, -1, attn.heads, x.shape[-1] // attn.heads).transpose(1, 2)

        q, k, v = (heads(f(hidden_states)) for f in (attn.to_q, attn.to_k, attn.to_v))
        cq, ck, cv = (heads(f(encoder_hidden_states))
                      for f in (attn.add_q_proj, attn.add_k_proj, attn.add_v_proj))
        if attn.norm_q is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if attn.norm_added_q is not None:
            cq, ck = attn.norm_added_q(cq), attn.norm_added_k(ck)
        q, k, v = torch.cat([q, cq], 2), torch.cat([k, ck], 2), torch.cat([v, cv], 2)
        bias = torch.zeros(k.shape[2], dtype=q.dtype, device=q.device)
        bias[-1] = self.log_repeats
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=bias.expand(q.shape[2], -1))
        out = out.transpose(1, 2).reshape(b, -1, q.shape[1] * q.shape[3]).to(q.dtype)
        image, context = out[:, :n], out[:, n:]
        if not attn.context_pre_only:
            context = attn.to_add_out(context)
        return attn.to_out[1](attn.to_out[0](image)), context


def collapse_padding(model: SD3Transformer2DModel, repeats: int = T5_LENGTH) -> None:
    """Let ``model`` take one zero token in place of ``repeats`` (see the module docstring)."""
    model.set_attn_processor(RepeatedTokenJointAttention(repeats))
