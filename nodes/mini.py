"""Atelier Mini loader: the tiny families with the weights trained on the Atelier world.

The weights ship with the pack (``weights/atelier_mini_<family>.safetensors``, written by
``tools/train_mini.py`` in the format of ``models/mini_format.py``). The classes are the tiny
families of ``tiny_family.py``, so every Atelier node runs on Mini unchanged.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import comfy.sd
from comfy_api.latest import io

from ..models import mini_format
from . import tiny_family
from .glue import register_vae_scale

log = logging.getLogger("atelier.mini")

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
FAMILIES = ("sd15", "sdxl")


class MiniWeightsError(RuntimeError):
    """The shipped Mini weights are missing, unreadable or do not fit the family."""


def weights_path(family: str) -> Path:
    return WEIGHTS_DIR / f"atelier_mini_{family}.safetensors"


def _fix(family: str) -> str:
    return (f"restore it with `git checkout -- weights/{weights_path(family).name}` in the Atelier folder "
            f"(or reinstall the pack), or retrain it with `python tools/train_mini.py --family {family}`")


def read_weights(family: str, path: str | Path | None = None) -> tuple[dict, dict]:
    """(parts, metadata) of a Mini file; clear MiniWeightsError when it is missing or corrupt."""
    from safetensors import safe_open
    path = Path(path) if path else weights_path(family)
    if not path.is_file():
        raise MiniWeightsError(f"Atelier Mini: weights file not found: {path}. Fix: {_fix(family)}.")
    try:
        with safe_open(str(path), "pt") as f:
            meta = dict(f.metadata() or {})
            flat = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for bad headers/data
        raise MiniWeightsError(f"Atelier Mini: weights file {path} is corrupt or not a safetensors file "
                               f"({type(e).__name__}: {e}). Fix: {_fix(family)}.") from e
    if meta.get("format") != mini_format.FORMAT or meta.get("family") != family:
        raise MiniWeightsError(f"Atelier Mini: {path} is not an Atelier Mini {family} file (format "
                               f"{meta.get('format')!r}, family {meta.get('family')!r}). Fix: {_fix(family)}.")
    try:
        parts = mini_format.unpack(flat)
    except mini_format.MiniFormatError as e:
        raise MiniWeightsError(f"Atelier Mini: {path} is incomplete: {e}. Fix: {_fix(family)}.") from e
    return parts, meta


def load_mini(family: str, path: str | Path | None = None):
    """(MODEL, CLIP, VAE) of Atelier Mini ``family``, as ComfyUI objects."""
    if family not in FAMILIES:
        raise MiniWeightsError(f"Atelier Mini: unknown family {family!r}; choose one of {list(FAMILIES)}.")
    parts, meta = read_weights(family, path)
    model = tiny_family.build_model(family, 0)
    clip = tiny_family.build_clip(family, 0)
    try:
        model.model.diffusion_model.load_state_dict(parts["unet"], strict=True)
        clip.cond_stage_model.load_state_dict(parts["clip"], strict=True)
        vae = comfy.sd.VAE(sd=parts["vae"])
        register_vae_scale(family, float(vae.first_stage_model.vae_scale.detach()), f"Atelier Mini {family}")
    except (RuntimeError, KeyError) as e:
        raise MiniWeightsError(f"Atelier Mini: {path or weights_path(family)} does not fit the {family} "
                               f"family ({str(e)[:300]}). Fix: {_fix(family)}.") from e
    log.info("Atelier Mini %s loaded (trained %s steps, seed %s)", family, meta.get("steps"), meta.get("seed"))
    return model, clip, vae


def describe(meta: dict) -> str:
    vocab = json.loads(meta.get("vocabulary", "[]"))
    return (f"Atelier Mini {meta.get('family')}: {meta.get('steps')} steps, seed {meta.get('seed')}, "
            f"{float(meta.get('train_seconds', 0)) / 60:.0f} min on {meta.get('hardware')}; "
            f"{len(vocab)}-word vocabulary")


class AtelierMiniCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierMiniCheckpointLoader",
            display_name="Atelier Mini Checkpoint",
            category="atelier/loaders",
            description=(
                "Loads Atelier Mini, a tiny text-to-image model trained on Atelier's generated world of "
                "coloured shapes (circle, square, triangle, star, cross, ring in eight colours). Prompts "
                "like 'a red circle left of a blue square' work; other words are unknown to it. Ships with "
                "the pack: no download. Same block layout and latent format as real SD1.5 / SDXL, so "
                "every node that works on those works here."
            ),
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="sd15",
                               tooltip="sd15: SD1.5 topology and latent format, 64 px native. "
                                       "sdxl: SDXL topology and latent format, 128 px native."),
            ],
            outputs=[
                io.Model.Output(tooltip="The Atelier Mini diffusion model."),
                io.Clip.Output(tooltip="Its text encoder (real CLIP tokenizer, world vocabulary)."),
                io.Vae.Output(tooltip="Its TAESD-type VAE (8x downscale, 4 latent channels)."),
            ],
        )

    @classmethod
    def execute(cls, family: str) -> io.NodeOutput:
        return io.NodeOutput(*load_mini(family))


NODES = [AtelierMiniCheckpointLoader]
