"""Point a workflow's checkpoint loaders at Atelier's tiny seeded models (pure Python).

Used by the headless runner's ``--tiny`` and by the server-side tiny mode (``ATELIER_TINY_MODELS=1``,
for demos and browser tests): every ``CheckpointLoaderSimple`` becomes an
``AtelierTinyCheckpointLoader`` with the same outputs (MODEL, CLIP, VAE), and empty latents are
shrunk to the tiny models' native scale.

kNN retriever (issue 8): ``unCLIPCheckpointLoader`` becomes ``AtelierTinyUnCLIPCheckpointLoader`` (MODEL,
CLIP, VAE, CLIP_VISION; reads 32-d image embeddings), ``AtelierKNNOpenCLIPLoader`` becomes
``AtelierKNNTinyOpenCLIPLoader`` (a random open_clip embedding into the same 32 dimensions), and index
names get a ``_tiny`` suffix so a tiny run never touches (or trips over) an index built with real weights.

Mini mode (``mini=True``; the demo, the gallery, ``ATELIER_TINY_MODELS=mini``): checkpoint loaders become
``AtelierMiniCheckpointLoader`` of the same family instead, so the workflows draw with Atelier Mini, the
model trained on the generated world (issue 3); names written or read get a ``_mini`` suffix (a LEP
trained on Mini's features is never reused on the random tiny model, or the reverse).
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
SCALED_MARK = "atelier_tiny_scaled"


def substitute_tiny(prompt: dict, mini: bool = False) -> dict:
    """Point checkpoint loaders at the tiny seeded models (same outputs: MODEL, CLIP, VAE), or at
    Atelier Mini with ``mini``, and shrink empty latents to the tiny models' native scale (1/8, at
    least 64 px)."""
    suffix = MINI_INDEX_SUFFIX if mini else TINY_INDEX_SUFFIX
    out = {}
    for nid, node in prompt.items():
        scaled = TINY_SCALED_INPUTS.get(node["class_type"], ())
        if scaled and not node.get("_meta", {}).get(SCALED_MARK):  # scaled once, even if substituted twice
            node = {**node, "inputs": dict(node["inputs"]), "_meta": {**node.get("_meta", {}), SCALED_MARK: True}}
            for key in scaled:
                value = node["inputs"].get(key)
                if isinstance(value, int):
                    node["inputs"][key] = max(64, (value // TINY_SCALE) // 8 * 8)
        if node["class_type"] == "CheckpointLoaderSimple":
            name = str(node["inputs"].get("ckpt_name", ""))
            if mini:
                node = {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": tiny_family_for(name)},
                        "_meta": {"title": f"Atelier Mini stand-in for {name}"}}
            else:
                node = {"class_type": "AtelierTinyCheckpointLoader",
                        "inputs": {"family": tiny_family_for(name), "seed": tiny_seed_for(name)},
                        "_meta": {"title": f"tiny stand-in for {name}"}}
        elif node["class_type"] == "unCLIPCheckpointLoader":
            name = str(node["inputs"].get("ckpt_name", ""))
            node = {"class_type": "AtelierTinyUnCLIPCheckpointLoader", "inputs": {"seed": tiny_seed_for(name)},
                    "_meta": {"title": f"tiny stand-in for {name}"}}
        elif node["class_type"] == "AtelierKNNOpenCLIPLoader":
            name = str(node["inputs"].get("clip_name", ""))
            node = {"class_type": "AtelierKNNTinyOpenCLIPLoader", "inputs": {"seed": tiny_seed_for(name)},
                    "_meta": {"title": f"tiny stand-in for {name}"}}
        else:
            for key in TINY_INDEX_NAMES.get(node["class_type"], ()):
                value = node["inputs"].get(key)
                if isinstance(value, str) and not value.endswith((TINY_INDEX_SUFFIX, MINI_INDEX_SUFFIX)):
                    node = {**node, "inputs": {**node["inputs"], key: value + suffix}}
        out[nid] = node
    return out


# Names of things a workflow writes or reads under the models dir (kNN indexes, trained LEPs) that
# tiny mode keeps apart from the user's real ones, so a demo never overwrites or loads them.
TINY_INDEX_SUFFIX = "_tiny"
MINI_INDEX_SUFFIX = "_mini"
TINY_INDEX_NAMES = {"AtelierKNNBuildIndex": ("index_name",), "AtelierKNNIndexLoader": ("database",),
                    "AtelierTrainLEP": ("name",)}
