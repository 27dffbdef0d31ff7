"""Deterministic, seeded initialisation of any torch module.

ComfyUI's layer classes skip weight init (a fresh module holds garbage), so every tiny model
Atelier builds is filled here: same seed, same weights, on any machine.
"""
from __future__ import annotations

import math

import torch

NORM_TYPES = (torch.nn.GroupNorm, torch.nn.LayerNorm, torch.nn.modules.batchnorm._NormBase)


@torch.no_grad()
def seeded_init_(module: torch.nn.Module, seed: int, gain: float = 1.0) -> torch.nn.Module:
    """Fill every parameter of ``module`` from a generator seeded with ``seed``.

    Norm layers (found by type, ComfyUI's subclasses included, or by a class name ending in "Norm": the
    RMSNorm / T5LayerNorm classes of the DiT families and T5, whose 1-D ``weight``/``scale`` would
    otherwise be 0 and silence q/k or a whole text encoder) get scale 1 and shift 0; other
    weights of rank >= 2 get N(0, gain/sqrt(fan_in)) (embeddings N(0, 0.02)); other vectors
    (biases) 0; scalar parameters are left alone (e.g. TAESD's vae_scale).
    """
    gen = torch.Generator().manual_seed(int(seed))
    for mod_name, mod in module.named_modules():
        is_norm = isinstance(mod, NORM_TYPES) or type(mod).__name__.endswith("Norm")
        for p_name, p in mod.named_parameters(recurse=False):
            name = f"{mod_name}.{p_name}" if mod_name else p_name
            if p.ndim == 0:
                continue
            if is_norm or p.ndim == 1:
                fill = torch.ones if (is_norm and p_name in ("weight", "scale")) else torch.zeros
                p.copy_(fill(p.shape, dtype=p.dtype))
                continue
            std = 0.02 if "embedding" in name else gain / math.sqrt(max(1, p[0].numel()))
            p.copy_(torch.randn(p.shape, generator=gen, dtype=torch.float32).mul_(std).to(p.dtype))
    return module
