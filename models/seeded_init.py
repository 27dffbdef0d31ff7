"""Deterministic, seeded initialisation of any torch module.

ComfyUI's layer classes skip weight init (a fresh module holds garbage), so every tiny model
Atelier builds is filled here: same seed, same weights, on any machine.
"""
from __future__ import annotations

import math

import torch

_NORM_HINTS = ("norm", "ln_", "layer_norm", "final_layer_norm", "ln")


def _is_norm(name: str) -> bool:
    leaf = name.rsplit(".", 2)
    owner = leaf[-2] if len(leaf) > 1 else ""
    return any(h in owner.lower() for h in _NORM_HINTS)


@torch.no_grad()
def seeded_init_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter of ``module`` from a generator seeded with ``seed``.

    Weights of rank >= 2 get N(0, gain/sqrt(fan_in)) (embeddings N(0, 0.02)); norm scales 1,
    biases and other vectors 0; scalar parameters are left alone (e.g. TAESD's vae_scale).
    """
    gen = torch.Generator().manual_seed(int(seed))
    for name, p in module.named_parameters():
        if p.ndim == 0:
            continue
        if p.ndim == 1:
            fill = torch.ones if (name.endswith("weight") and _is_norm(name)) else torch.zeros
            p.copy_(fill(p.shape, dtype=p.dtype))
            continue
        if "embedding" in name:
            std = 0.02
        else:
            fan_in = p[0].numel()
            std = gain / math.sqrt(max(1, fan_in))
        p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
    return module
