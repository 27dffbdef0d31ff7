"""Point a workflow's checkpoint loaders at Atelier's tiny seeded models (pure Python).

Used by the headless runner's ``--tiny`` and by the server-side tiny mode (``ATELIER_TINY_MODELS=1``,
for demos and browser tests): every ``CheckpointLoaderSimple`` becomes an
``AtelierTinyCheckpointLoader`` with the same outputs (MODEL, CLIP, VAE), and empty latents are
shrunk to the tiny models' native scale.
"""
from __future__ import annotations

import zlib


def tiny_family_for(ckpt_name: str) -> str:
    return "sdxl" if "xl" in ckpt_name.lower() else "sd15"


def tiny_seed_for(ckpt_name: str) -> int:
    """Stable per-name seed: two different checkpoint names become two different tiny experts."""
    return zlib.crc32(ckpt_name.encode("utf-8")) & 0x7FFFFFFF


# Size inputs that --tiny divides by TINY_SCALE: the tiny families' native sizes (64/128 px) are
# SD1.5's and SDXL's (512/1024 px) divided by 8, so ratios between families and stages hold.
TINY_SCALE = 8
TINY_SCALED_INPUTS = {"EmptyLatentImage": ("width", "height")}


def substitute_tiny(prompt: dict) -> dict:
    """Point checkpoint loaders at the tiny seeded models (same outputs: MODEL, CLIP, VAE) and
    shrink empty latents to the tiny models' native scale (1/8, at least 64 px)."""
    out = {}
    for nid, node in prompt.items():
        scaled = TINY_SCALED_INPUTS.get(node["class_type"], ())
        if scaled:
            node = {**node, "inputs": dict(node["inputs"])}
            for key in scaled:
                value = node["inputs"].get(key)
                if isinstance(value, int):
                    node["inputs"][key] = max(64, (value // TINY_SCALE) // 8 * 8)
        if node["class_type"] == "CheckpointLoaderSimple":
            name = str(node["inputs"].get("ckpt_name", ""))
            node = {"class_type": "AtelierTinyCheckpointLoader",
                    "inputs": {"family": tiny_family_for(name), "seed": tiny_seed_for(name)},
                    "_meta": {"title": f"tiny stand-in for {name}"}}
        out[nid] = node
    return out
