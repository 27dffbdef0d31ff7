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
model trained on the generated world (issue 3); ``unCLIPCheckpointLoader`` becomes
``AtelierMiniUnCLIPCheckpointLoader`` and ``AtelierKNNOpenCLIPLoader`` ``AtelierMiniKNNOpenCLIPLoader`` (Atelier
Mini kNN: a trained open_clip and an unCLIP model reading its image embeddings, issue 20.5); names written or
read get a ``_mini`` suffix (a LEP trained on Mini's features is never reused on the random tiny model, or the
reverse; an index of tiny embeddings is never queried with Mini's).

Image encoders (issue 18.4): ``StyleModelLoader`` becomes ``AtelierTinyReduxLoader``, ``CLIPVisionLoader``
``AtelierTinyCLIPVisionLoader`` of the kind its file name tells (SigLIP, CLIP-G, CLIP), and an SDXL checkpoint in a
workflow that feeds image embeddings the tiny SDXL revision model (see ``IMAGE_ENCODER_LOADERS`` below).

DiT and flow families (issue 17): Flux, SD3.5 and PixArt workflows load the diffusion model, the text
encoders and the VAE with separate nodes (``UNETLoader``, ``CLIPLoader`` / ``DualCLIPLoader`` /
``TripleCLIPLoader``, ``VAELoader``) or an SD3 checkpoint. Each becomes a tiny (or Mini) loader of the family
read from the workflow -- file names (``flux1-dev``, ``flux1-schnell``, ``sd3.5_medium``, ``PixArt-Sigma``,
``ae.safetensors``) and text-encoder types (``flux``, ``sd3``, ``pixart``) -- whose MODEL, CLIP or VAE output the
links are moved to. The text encoders and VAE take the seed of the workflow's diffusion model of their family,
so one tiny model is built and ComfyUI's cache shares it. A loader whose family cannot be read stays as it is:
the run then fails naming that input and its file, as it would without the files; nothing is guessed. Mini
mode uses Atelier Mini where its weights for the family ship (``weights/atelier_mini_<family>.safetensors``),
else the tiny model of that family, and says so in the log and the node's title.
"""
from __future__ import annotations

import logging
import re
import zlib
from pathlib import Path

log = logging.getLogger("atelier.tiny")


def family_from_name(name: str) -> str | None:
    """The tiny family a model file name names as users have them ('flux1-dev', 'flux1-schnell',
    'sd3.5_large', 'PixArt-Sigma-XL-2-1024-MS', 'sd_xl_base_1.0', 'ae', 'taef1'), or None."""
    n = str(name).lower()
    if "pixart" in n:
        return "pixart"
    if "schnell" in n:
        return "flux_schnell"
    if "flux" in n or "taef1" in n or Path(n).stem == "ae":
        return "flux"
    if re.search(r"sd3|sd_3|stable[-_ ]?diffusion[-_ ]?3", n):
        return "sd3"
    if "xl" in n:
        return "sdxl"
    return None


def tiny_family_for(ckpt_name: str) -> str:
    """The family of a checkpoint file (SD1.5 unless its name says otherwise)."""
    return family_from_name(ckpt_name) or "sd15"


def tiny_seed_for(ckpt_name: str) -> int:
    """Stable per-name seed: two different checkpoint names become two different tiny experts."""
    return zlib.crc32(ckpt_name.encode("utf-8")) & 0x7FFFFFFF


# Size inputs that --tiny divides by TINY_SCALE: the tiny families' native sizes (64/128 px) are
# SD1.5's and SDXL's (512/1024 px) divided by 8, so ratios between families and stages hold.
TINY_SCALE = 8
TINY_SCALED_INPUTS = {"EmptyLatentImage": ("width", "height"), "EmptySD3LatentImage": ("width", "height"),
                      "ModelSamplingFlux": ("width", "height")}
SCALED_MARK = "atelier_tiny_scaled"
# Families whose stand-in is not the real model / TINY_SCALE: (real native px, stand-in native px), the
# smallest side kept at the stand-in's native size. ComfyUI's PixArt divides by zero under 264 px, so tiny
# pixart is 320 px and Mini pixart 288 px (tests/test_dit_substitution.py checks these against the models).
DIT_SIZES = {("pixart", False): (1024, 320), ("pixart", True): (1024, 288)}


def substitute_tiny(prompt: dict, mini: bool = False) -> dict:
    """Point checkpoint loaders at the tiny seeded models (same outputs: MODEL, CLIP, VAE), or at
    Atelier Mini with ``mini``, and shrink empty latents to the tiny models' native scale (1/8, at
    least 64 px)."""
    suffix = MINI_INDEX_SUFFIX if mini else TINY_INDEX_SUFFIX
    split, size_family = _plan_split_loaders(prompt)
    revision = any(n.get("class_type") in IMAGE_EMBEDDING_READERS for n in prompt.values())
    out = {}
    for nid, node in prompt.items():
        scaled = TINY_SCALED_INPUTS.get(node["class_type"], ())
        if scaled and not node.get("_meta", {}).get(SCALED_MARK):  # scaled once, even if substituted twice
            node = {**node, "inputs": dict(node["inputs"]), "_meta": {**node.get("_meta", {}), SCALED_MARK: True}}
            _scale_sizes(node["inputs"], scaled, DIT_SIZES.get((size_family, mini and mini_has(size_family))))
        if node["class_type"] == "CheckpointLoaderSimple":
            name = str(node["inputs"].get("ckpt_name", ""))
            if tiny_family_for(name) == "sdxl" and revision:
                node = _revision_stand_in(name, mini)
            else:
                node = _stand_in(tiny_family_for(name), tiny_seed_for(name), name, mini)
        elif nid in split:
            node = _stand_in(*split[nid], mini)
        elif node["class_type"] == "unCLIPCheckpointLoader":
            name = str(node["inputs"].get("ckpt_name", ""))
            if mini:
                node = {"class_type": "AtelierMiniUnCLIPCheckpointLoader", "inputs": {},
                        "_meta": {"title": f"Atelier Mini stand-in for {name}"}}
            else:
                node = {"class_type": "AtelierTinyUnCLIPCheckpointLoader", "inputs": {"seed": tiny_seed_for(name)},
                        "_meta": {"title": f"tiny stand-in for {name}"}}
        elif node["class_type"] in IMAGE_ENCODER_LOADERS:
            node = _image_encoder_stand_in(node, mini)
        elif node["class_type"] == "AtelierKNNOpenCLIPLoader":
            name = str(node["inputs"].get("clip_name", ""))
            if mini:
                node = {"class_type": "AtelierMiniKNNOpenCLIPLoader", "inputs": {},
                        "_meta": {"title": f"Atelier Mini stand-in for {name}"}}
            else:
                node = {"class_type": "AtelierKNNTinyOpenCLIPLoader", "inputs": {"seed": tiny_seed_for(name)},
                        "_meta": {"title": f"tiny stand-in for {name}"}}
        else:
            for key in TINY_INDEX_NAMES.get(node["class_type"], ()):
                value = node["inputs"].get(key)
                if isinstance(value, str) and not value.endswith((TINY_INDEX_SUFFIX, MINI_INDEX_SUFFIX)):
                    node = {**node, "inputs": {**node["inputs"], key: value + suffix}}
        out[nid] = node
    return _move_links(out, {nid: SPLIT_LOADERS[prompt[nid]["class_type"]][0] for nid in split})


# ----------------------------------------------------------------------------- DiT / flow workflows
# Loaders that give one part each: (the output they give, the inputs naming their files).
SPLIT_LOADERS = {
    "UNETLoader": ("MODEL", ("unet_name",)),
    "CLIPLoader": ("CLIP", ("clip_name",)),
    "DualCLIPLoader": ("CLIP", ("clip_name1", "clip_name2")),
    "TripleCLIPLoader": ("CLIP", ("clip_name1", "clip_name2", "clip_name3")),
    "VAELoader": ("VAE", ("vae_name",)),
}
# The stand-ins (tiny / Mini checkpoint loaders) give MODEL, CLIP, VAE in these slots.
STAND_IN_SLOT = {"MODEL": 0, "CLIP": 1, "VAE": 2}
# Text-encoder types of core CLIPLoader / DualCLIPLoader that name a tiny family (TripleCLIPLoader is SD3's).
CLIP_TYPE_FAMILY = {"stable_diffusion": "sd15", "sdxl": "sdxl", "sd3": "sd3", "flux": "flux", "pixart": "pixart"}
# A part some families share: PixArt-Σ draws with the SDXL VAE, Flux schnell with Flux's text encoders and VAE.
SHARED_PART = {("VAE", "pixart"): "sdxl", ("VAE", "flux_schnell"): "flux", ("CLIP", "flux_schnell"): "flux"}
MINI_WEIGHTS = Path(__file__).resolve().parent.parent / "weights"
_said: set = set()


def mini_has(family: str | None) -> bool:
    """Whether Atelier Mini ships weights for ``family`` (the Mini loader's own file, nodes/mini.weights_path)."""
    return bool(family) and (MINI_WEIGHTS / f"atelier_mini_{family}.safetensors").is_file()


def _stand_in(family: str, seed: int, name: str, mini: bool) -> dict:
    if mini and mini_has(family):
        return {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": family},
                "_meta": {"title": f"Atelier Mini stand-in for {name}"}}
    title = f"tiny stand-in for {name}"
    if mini:
        title += f" (Atelier Mini has no {family} model)"
        if family not in _said:
            _said.add(family)
            log.warning("[Atelier] Atelier Mini has no %s model: %s runs on the tiny seeded %s model "
                        "(random weights, noise-like pictures) instead.", family, name, family)
    return {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": family, "seed": seed},
            "_meta": {"title": title}}


def _own_family(node: dict) -> str | None:
    """The family a split loader names by itself: its CLIP type, else its file names."""
    ctype, inputs = node["class_type"], node.get("inputs") or {}
    if ctype == "TripleCLIPLoader":
        return "sd3"
    if ctype in ("CLIPLoader", "DualCLIPLoader"):
        return CLIP_TYPE_FAMILY.get(str(inputs.get("type", "stable_diffusion" if ctype == "CLIPLoader" else "")))
    names = [inputs.get(k) for k in SPLIT_LOADERS[ctype][1]]
    return next((f for f in map(family_from_name, names) if f), None)


def _plan_split_loaders(prompt: dict) -> tuple[dict, str | None]:
    """({node id: (family, seed, title name)} for every split loader that can be stood in for, the family
    whose sizes the empty latents take: the workflow's one diffusion-model family, or None)."""
    models: dict[str, int] = {}  # family -> seed of its first diffusion-model loader
    for nid in sorted(prompt, key=lambda k: (len(k), k)):
        node = prompt[nid]
        if node.get("class_type") == "CheckpointLoaderSimple":
            name = str((node.get("inputs") or {}).get("ckpt_name", ""))
            models.setdefault(tiny_family_for(name), tiny_seed_for(name))
        elif node.get("class_type") == "UNETLoader":
            fam = _own_family(node)
            if fam:
                models.setdefault(fam, tiny_seed_for(str(node["inputs"].get("unet_name", ""))))
    if not any(n.get("class_type") == "UNETLoader" and _own_family(n) for n in prompt.values()):
        # a diffusion model named otherwise ('my_finetune.safetensors'): the text encoders tell the family
        clip_fams = {_own_family(n) for n in prompt.values() if n.get("class_type") in SPLIT_LOADERS
                     and SPLIT_LOADERS[n["class_type"]][0] == "CLIP"} - {None}
        if len(clip_fams) == 1:
            for nid in sorted(prompt, key=lambda k: (len(k), k)):
                if prompt[nid].get("class_type") == "UNETLoader":
                    models.setdefault(next(iter(clip_fams)), tiny_seed_for(str(prompt[nid]["inputs"].get("unet_name", ""))))
                    break
    plan = {}
    for nid, node in prompt.items():
        if node.get("class_type") not in SPLIT_LOADERS:
            continue
        part, keys = SPLIT_LOADERS[node["class_type"]]
        inputs = node.get("inputs") or {}
        names = ", ".join(str(inputs.get(k)) for k in keys if inputs.get(k) is not None) or node["class_type"]
        own = _own_family(node)
        if part == "MODEL":
            fam = own or (next(iter(models)) if len(models) == 1 else None)
        elif part == "CLIP" and own is None:  # a text-encoder type no tiny family has: never a guess
            fam = None
        else:  # a text encoder or VAE: the workflow's model of the same family (or one sharing this part)
            fam = next((m for m in models if own in (m, SHARED_PART.get((part, m))) or (own is None and len(models) == 1)), own)
        if fam is None:
            log.warning("[Atelier] tiny mode cannot tell which model family %s (%s) belongs to; it is left as it is.",
                        node["class_type"], names)
            continue
        seed = tiny_seed_for(names) if part == "MODEL" else models.get(fam, tiny_seed_for(names))
        plan[nid] = (fam, seed, names)
    return plan, (next(iter(models)) if len(models) == 1 else None)


def _scale_sizes(inputs: dict, keys: tuple, dit_sizes: tuple | None) -> None:
    """Shrink width/height inputs to the stand-in's scale: 1/TINY_SCALE (at least 64 px), or for a family of
    DIT_SIZES real px -> stand-in px with the shorter side at least the stand-in's native size."""
    sides = {k: inputs[k] for k in keys if isinstance(inputs.get(k), int)}
    if not sides:
        return
    if dit_sizes is None:
        for k, v in sides.items():
            inputs[k] = max(64, (v // TINY_SCALE) // 8 * 8)
        return
    real, native = dit_sizes
    factor = max(native / real, native / min(sides.values()))
    for k, v in sides.items():
        inputs[k] = max(8, round(v * factor / 8) * 8)


def _move_links(prompt: dict, parts: dict) -> dict:
    """Point every link from a replaced split loader (``parts``: node id -> the part it gave, at slot 0) at
    that part's slot on its stand-in."""
    if not parts:
        return prompt
    out = {}
    for nid, node in prompt.items():
        inputs = node.get("inputs") or {}
        moved = {k: [v[0], STAND_IN_SLOT[parts[v[0]]]] for k, v in inputs.items()
                 if isinstance(v, list) and len(v) == 2 and v[0] in parts and v[1] == 0}
        out[nid] = {**node, "inputs": {**inputs, **moved}} if moved else node
    return out


# Names of things a workflow writes or reads under the models dir (kNN indexes, trained LEPs) that
# tiny mode keeps apart from the user's real ones, so a demo never overwrites or loads them.
TINY_INDEX_SUFFIX = "_tiny"
MINI_INDEX_SUFFIX = "_mini"
TINY_INDEX_NAMES = {"AtelierKNNBuildIndex": ("index_name",), "AtelierKNNIndexLoader": ("database",),
                    "AtelierTrainLEP": ("name",)}


# ----------------------------------------------------------------------------- image encoders (issue 18.4)
# Load Style Model (flux1-redux-dev) becomes the tiny Flux Redux, Load CLIP Vision the tiny CLIP vision model of
# the kind its file name tells: SigLIP (sigclip_vision_patch14_384, siglip-so400m: what Redux reads), CLIP-G
# (clip_vision_g, ViT-bigG: what SDXL revision reads, 1280-d) or CLIP ViT (clip_vision_h / ViT-L / ViT-H: the tiny
# unCLIP's). A CLIP vision file whose kind the name does not tell is left for core validation to name. An SDXL
# checkpoint in a workflow that feeds image embeddings (unCLIP Conditioning, Atelier kNN Conditioning) becomes the
# tiny SDXL revision model (1280-wide pooled vector; the tiny sdxl's is 32 wide). Mini ships none of these: Mini
# mode uses the tiny ones and says so in the title.
IMAGE_ENCODER_LOADERS = {"StyleModelLoader": "style_model_name", "CLIPVisionLoader": "clip_name"}


def vision_kind_from_name(name: str) -> str | None:
    """'siglip' / 'clip_g' / 'clip' for a CLIP vision file name as users have them, or None."""
    n = str(name).lower()
    if "siglip" in n or "sigclip" in n:
        return "siglip"
    if re.search(r"(clip[-_ ]?vision|vit)[-_ ]?g(?![a-z0-9])|bigg", n):
        return "clip_g"
    if re.search(r"clip[-_ ]?vision|vit[-_ ]?[lhg]|clip[-_ ]?vit", n):
        return "clip"
    return None


def _image_encoder_stand_in(node: dict, mini: bool) -> dict:
    ctype = node["class_type"]
    name = str((node.get("inputs") or {}).get(IMAGE_ENCODER_LOADERS[ctype], ""))
    title = f"tiny stand-in for {name}" + (" (Atelier Mini has none)" if mini else "")
    if ctype == "StyleModelLoader":
        return {"class_type": "AtelierTinyReduxLoader", "inputs": {"seed": tiny_seed_for(name)},
                "_meta": {"title": title}}
    kind = vision_kind_from_name(name)
    if kind is None:
        log.warning("[Atelier] tiny mode cannot tell which kind of CLIP vision model %s is; it is left as it is.", name)
        return node
    return {"class_type": "AtelierTinyCLIPVisionLoader", "inputs": {"kind": kind, "seed": tiny_seed_for(name)},
            "_meta": {"title": title}}


IMAGE_EMBEDDING_READERS = ("unCLIPConditioning", "AtelierKNNConditioning")


def _revision_stand_in(name: str, mini: bool) -> dict:
    return {"class_type": "AtelierTinyUnCLIPCheckpointLoader", "inputs": {"seed": tiny_seed_for(name), "family": "sdxl"},
            "_meta": {"title": f"tiny SDXL revision stand-in for {name}" + (" (Atelier Mini has none)" if mini else "")}}
