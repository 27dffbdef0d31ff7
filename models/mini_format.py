"""The Atelier Mini weights format: a compact safetensors layout, pure torch (no ComfyUI).

A Mini file holds three state dicts under the prefixes ``unet.``, ``clip.`` and ``vae.`` (the
keys of ComfyUI's own diffusion_model, CLIP cond_stage_model and TAESD modules); the Mini kNN
file holds ``unet.`` (an unCLIP diffusion_model) and ``open_clip.`` (an open_clip CLIP). To stay small:

* **8-bit weights**: every floating tensor of rank >= 2 with at least ``QUANT_MIN`` elements is
  stored as int8 with one fp16 scale per output channel (symmetric absmax): ``<key>.q8`` and
  ``<key>.q8scale``. Everything else is fp16 (``<key>``), scalars fp32.
* **Used token rows only**: a text encoder's token-embedding table (49408 rows) keeps only the
  rows of the token ids the world's captions use: ``<key>.rows`` (fp16) and ``<key>.ids``
  (int32), plus ``<key>.nrows``. On load the table is expanded; unused rows get the mean of the
  kept rows, so an unknown word acts as a neutral token rather than random noise.

``pack`` and ``unpack`` are inverse up to the quantisation error; ``unpack`` checks what it reads
and raises ``MiniFormatError`` naming what is wrong.
"""
from __future__ import annotations

import torch

from .errors import AtelierError

FORMAT = "atelier-mini/1"
QUANT_MIN = 4096
PREFIXES = ("unet.", "clip.", "vae.", "open_clip.")
REQUIRED = ("unet", "clip", "vae")  # a Mini checkpoint; the Mini kNN file holds ("unet", "open_clip")


class MiniFormatError(AtelierError):
    """A Mini weights file is incomplete or inconsistent."""


def _quantise(t: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    flat = t.detach().float().reshape(t.shape[0], -1)
    scale = flat.abs().amax(dim=1).clamp_min(1e-12) / 127.0
    q = torch.round(flat / scale[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.reshape(t.shape).contiguous(), scale.half()


def pack(parts: dict[str, dict[str, torch.Tensor]], token_ids: torch.Tensor | None = None,
         embedding_keys: tuple[str, ...] = ()) -> dict[str, torch.Tensor]:
    """``parts``: {"unet": sd, "clip": sd, "vae": sd} -> one flat dict for safetensors.

    ``embedding_keys``: full keys (with prefix) of token-embedding tables to trim to
    ``token_ids``."""
    out: dict[str, torch.Tensor] = {}
    ids = None if token_ids is None else torch.as_tensor(token_ids).long().unique()
    for part, sd in parts.items():
        for key, t in sd.items():
            full = f"{part}.{key}"
            t = t.detach().cpu()
            if full in embedding_keys and ids is not None:
                out[full + ".rows"] = t[ids].half().contiguous()
                out[full + ".ids"] = ids.int()
                out[full + ".nrows"] = torch.tensor(t.shape[0], dtype=torch.int64)
            elif not t.is_floating_point():
                out[full] = t.contiguous()
            elif t.ndim == 0:
                out[full] = t.float().reshape(())
            elif t.ndim >= 2 and t.numel() >= QUANT_MIN:
                out[full + ".q8"], out[full + ".q8scale"] = _quantise(t)
            else:
                out[full] = t.half().contiguous()
    return out


def unpack(flat: dict[str, torch.Tensor], dtype=torch.float32,
           required: tuple[str, ...] = REQUIRED) -> dict[str, dict[str, torch.Tensor]]:
    """Inverse of :func:`pack`: {"unet": sd, "clip": sd, "vae": sd} in ``dtype``; every part in
    ``required`` must be there, other known parts are returned only when present."""
    parts: dict[str, dict[str, torch.Tensor]] = {p[:-1]: {} for p in PREFIXES}
    for full, t in flat.items():
        if full.endswith((".q8scale", ".ids", ".nrows")):
            continue
        part, _, key = full.partition(".")
        if part not in parts or not key:
            raise MiniFormatError(f"unexpected tensor {full!r} (keys start with {', '.join(PREFIXES)})")
        if key.endswith(".q8"):
            key = key[:-3]
            scale = flat.get(full + "scale")
            if scale is None or scale.shape != (t.shape[0],):
                raise MiniFormatError(f"{full}: missing or misshapen per-channel scale")
            t = t.float() * scale.float().reshape((-1,) + (1,) * (t.ndim - 1))
        elif key.endswith(".rows"):
            key = key[:-5]
            base = full[:-5]
            ids, nrows = flat.get(base + ".ids"), flat.get(base + ".nrows")
            if ids is None or nrows is None or ids.shape[0] != t.shape[0]:
                raise MiniFormatError(f"{full}: missing or misshapen token ids")
            rows = t.float()
            table = rows.mean(dim=0, keepdim=True).repeat(int(nrows), 1)
            table[ids.long()] = rows
            t = table
        if t.is_floating_point():
            t = t.to(dtype)
        parts[part][key] = t
    for part in required:
        if not parts[part]:
            raise MiniFormatError(f"no '{part}.' tensors")
    return {part: sd for part, sd in parts.items() if sd or part in required}
