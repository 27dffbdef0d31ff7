"""Atelier Mini loader: the tiny families with the weights trained on the Atelier world.

The weights ship with the pack (``weights/atelier_mini_<family>.safetensors``, written by
``tools/train_mini.py`` in the format of ``models/mini_format.py``). The classes are the tiny
families of ``tiny_family.py``, so every Atelier node runs on Mini unchanged.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.supported_models
from comfy_api.latest import io

from ..models import mini_format
from . import tiny_family
from .glue import register_vae_scale

log = logging.getLogger("atelier.mini")

WEIGHTS_DIR = Path(__file__).resolve().parent.parent / "weights"
FAMILIES = ("sd15", "sdxl", "pixart")

# ----------------------------------------------------------------------------- Mini PixArt-Σ (a DiT)
# ComfyUI's PixArt (comfy/ldm/pixart/pixartms.py) needs a latent of at least 33 px (tiny_family.TinyPixArtSigma
# says why). Mini PixArt is 288 px native (36 x 36 latent), patch 3 (12 x 12 tokens of 24 px), wider and deeper
# than the tiny pixart; SDXL latent format with Mini sdxl's own VAE (the two Minis share a latent space), the
# tiny pixart's T5-shaped text encoder (real T5 tokenizer). Trained by tools/train_mini.py --family pixart.

MINI_PIXART_PX = 288


class MiniPixArtSigma(comfy.supported_models.PixArtSigma):
    atelier_native_px = MINI_PIXART_PX
    unet_config = {
        "image_model": "pixart_sigma", "input_size": MINI_PIXART_PX // 8, "patch_size": 3, "in_channels": 4,
        "hidden_size": 128, "depth": 6, "num_heads": 2, "mlp_ratio": 4.0,
        "caption_channels": tiny_family.T5_WIDTH, "model_max_length": 16, "micro_condition": False,
        "pe_interpolation": None, "pred_sigma": False, "learn_sigma": False,
    }
    unet_extra_config = {}
    #: what the network predicts: "eps" (as PixArt-Σ) or "v" (ComfyUI's V_PREDICTION on the same
    #: schedule). Mini-DiT is trained for v: on PixArt's schedule (sigma_max 157) an eps model's error
    #: is multiplied by sigma in its clean estimate (x0 = x - sigma * eps), so an eps error of 0.02 at
    #: the first steps paints blobs 3 std tall all over the latent; a v model's error is not.
    prediction = "eps"

    def get_model(self, state_dict, prefix="", device=None):  # core PixArtAlpha.get_model is EPS only
        import comfy.model_base as mb
        kind = mb.ModelType.V_PREDICTION if self.prediction == "v" else mb.ModelType.EPS
        return mb.PixArt(self, model_type=kind, device=device).eval()


PREDICTIONS = ("eps", "v")


def build_model(family: str, seed: int = 0, prediction: str = "v"):
    """The MODEL a Mini file of ``family`` loads into (seeded random weights until it does); pixart:
    ``prediction`` "eps" or "v" (the file's ``param`` metadata)."""
    if family != "pixart":
        return tiny_family.build_model(family, seed)
    if prediction not in PREDICTIONS:
        raise MiniWeightsError(f"Atelier Mini pixart: unknown prediction {prediction!r}; one of {list(PREDICTIONS)}.")
    from ..models.seeded_init import seeded_init_
    cfg = MiniPixArtSigma(MiniPixArtSigma.unet_config)
    cfg.prediction = prediction
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    seeded_init_(model.diffusion_model, seed)
    tiny_family._init_buffers_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip(family: str, seed: int = 0):
    """The CLIP (text encoder + its real tokenizer) of a Mini ``family``: the tiny family's."""
    return tiny_family.build_clip(family, seed)


def native_px(family: str) -> int:
    return MINI_PIXART_PX if family == "pixart" else tiny_family.FAMILIES[family]["native_px"]


class MiniWeightsError(RuntimeError):
    """The shipped Mini weights are missing, unreadable or do not fit the family."""


def weights_path(family: str) -> Path:
    return WEIGHTS_DIR / f"atelier_mini_{family}.safetensors"


def _fix(family: str) -> str:
    retrain = "train_mini_knn.py" if family == KNN_FAMILY else f"train_mini.py --family {family}"
    return (f"restore it with `git checkout -- weights/{weights_path(family).name}` in the Atelier folder "
            f"(or reinstall the pack), or retrain it with `python tools/{retrain}`")


def read_weights(family: str, path: str | Path | None = None,
                 required: tuple[str, ...] = mini_format.REQUIRED) -> tuple[dict, dict]:
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
        parts = mini_format.unpack(flat, required=required)
    except mini_format.MiniFormatError as e:
        raise MiniWeightsError(f"Atelier Mini: {path} is incomplete: {e}. Fix: {_fix(family)}.") from e
    return parts, meta


def load_mini(family: str, path: str | Path | None = None):
    """(MODEL, CLIP, VAE) of Atelier Mini ``family``, as ComfyUI objects."""
    if family not in FAMILIES:
        raise MiniWeightsError(f"Atelier Mini: unknown family {family!r}; choose one of {list(FAMILIES)}.")
    parts, meta = read_weights(family, path)
    model = build_model(family, 0, meta.get("param") or "eps") if family == "pixart" else build_model(family, 0)
    clip = build_clip(family, 0)
    try:
        model.model.diffusion_model.load_state_dict(parts["unet"], strict=True)
        clip.cond_stage_model.load_state_dict(parts["clip"], strict=True)
        vae = comfy.sd.VAE(sd=parts["vae"])
        # pixart draws with Mini sdxl's VAE: the VAE belongs to the sdxl latent space
        register_vae_scale(tiny_family.FAMILIES[family].get("vae_family", family),
                           float(vae.first_stage_model.vae_scale.detach()), f"Atelier Mini {family}")
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
                "the pack: no download. Same block layout and latent format as real SD1.5 / SDXL / "
                "PixArt-Σ, so every node that works on those works here."
            ),
            inputs=[
                io.Combo.Input("family", options=list(FAMILIES), default="sd15",
                               tooltip="sd15: SD1.5 topology and latent format, 64 px native. "
                                       "sdxl: SDXL topology and latent format, 128 px native. "
                                       "pixart: a PixArt-Σ DiT (T5 text encoder) in SDXL's latent format "
                                       "with Mini sdxl's VAE, 288 px native."),
            ],
            outputs=[
                io.Model.Output(tooltip="The Atelier Mini diffusion model."),
                io.Clip.Output(tooltip="Its text encoder (real CLIP tokenizer; T5 for pixart; world vocabulary)."),
                io.Vae.Output(tooltip="Its TAESD-type VAE (8x downscale, 4 latent channels)."),
            ],
        )

    @classmethod
    def execute(cls, family: str) -> io.NodeOutput:
        return io.NodeOutput(*load_mini(family))


NODES = [AtelierMiniCheckpointLoader]


# ----------------------------------------------------------------------------- Atelier Mini kNN (issue 20.5)
# An image-embedding path on Mini, as SD2.1 unCLIP reads CLIP's: an unCLIP model (the SD2.1-unCLIP topology of
# tiny_family.TinySD21UnCLIP, trained on Mini sd15's latents and text encoder and conditioned on the image
# embedding of the same picture) and the open_clip whose embeddings a kNN index holds and the model reads
# (trained contrastively on world images and captions). Both in weights/atelier_mini_knn.safetensors
# (tools/train_mini_knn.py); the text encoder and the VAE are Mini sd15's, which it was trained against.

KNN_FAMILY = "knn"
KNN_PARTS = ("unet", "open_clip")
KNN_NATIVE_PX = 64


def _check_knn_base(meta: dict, path: Path) -> None:
    import hashlib
    base = weights_path("sd15")
    want = meta.get("base_sha256")
    if want and base.is_file() and hashlib.sha256(base.read_bytes()).hexdigest() != want:
        raise MiniWeightsError(
            f"Atelier Mini kNN: {path} was trained against another {base.name} (its text encoder and VAE) than "
            f"the one installed. Fix: restore both files from the pack, or retrain it with "
            f"`python tools/train_mini_knn.py`.")


def read_knn_weights(path: str | Path | None = None) -> tuple[dict, dict]:
    """(parts, metadata) of the Mini kNN file, checked against the Mini sd15 file it reads."""
    path = Path(path) if path else weights_path(KNN_FAMILY)
    parts, meta = read_weights(KNN_FAMILY, path, KNN_PARTS)
    if "open_clip_config" not in meta:
        raise MiniWeightsError(f"Atelier Mini kNN: {path} lacks its open_clip config. Fix: {_fix(KNN_FAMILY)}.")
    _check_knn_base(meta, path)
    return parts, meta


def _open_clip(parts: dict, meta: dict, path: Path):
    from ..models import knn_embed
    cfg = json.loads(meta["open_clip_config"])
    model = knn_embed.random_open_clip(cfg, 0)
    try:
        model.load_state_dict(parts["open_clip"], strict=True)
    except RuntimeError as e:
        raise MiniWeightsError(f"Atelier Mini kNN: {path} does not fit its open_clip config ({str(e)[:300]}). "
                               f"Fix: {_fix(KNN_FAMILY)}.") from e
    return model.eval(), cfg


def load_mini_knn_embedder(path: str | Path | None = None):
    """The Mini kNN open_clip as a kNN embedder (both towers, 32-d)."""
    import comfy.model_management as mm
    from ..models import knn_embed
    path = Path(path) if path else weights_path(KNN_FAMILY)
    parts, meta = read_knn_weights(path)
    model, cfg = _open_clip(parts, meta, path)
    name = f"open_clip:atelier-mini-knn:{knn_embed.file_fingerprint(path)[:16]}"
    return knn_embed.OpenClipEmbedder(model, knn_embed._make_tokenizer(cfg), name, cfg["embed_dim"],
                                      cfg["vision_cfg"]["image_size"], device=mm.text_encoder_device())


def clip_vision_from_open_clip(model, cfg: dict):
    """A ComfyUI ClipVisionModel (what Load CLIP Vision returns) holding ``model``'s image tower: the same
    image embeddings, so core CLIP Vision Encode + unCLIP Conditioning work on Mini kNN too."""
    import os
    import tempfile

    import comfy.clip_vision
    vis = cfg["vision_cfg"]
    width = int(vis["width"])
    config = {"attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "gelu", "hidden_size": width,
              "image_size": int(vis["image_size"]), "initializer_factor": 1.0, "initializer_range": 0.02,
              "intermediate_size": int(width * vis.get("mlp_ratio", 4.0)), "layer_norm_eps": 1e-05,
              "model_type": "clip_vision_model", "num_attention_heads": width // int(vis.get("head_width", 64)),
              "num_channels": 3, "num_hidden_layers": int(vis["layers"]), "patch_size": int(vis["patch_size"]),
              "projection_dim": int(cfg["embed_dim"]), "torch_dtype": "float32"}
    fd, tmp = tempfile.mkstemp(suffix=".json", prefix="atelier_mini_clip_vision_")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(config, f)
        cv = comfy.clip_vision.ClipVisionModel(tmp)
    finally:
        os.unlink(tmp)
    sd = {k: v.detach().clone() for k, v in model.state_dict().items() if k.startswith("visual.")}
    missing, _ = cv.load_sd(comfy.clip_vision.convert_to_transformers(sd, "visual."))
    if missing:
        raise MiniWeightsError(f"Atelier Mini kNN: its image tower does not convert to a CLIP vision model "
                               f"(missing {missing[:4]}). Fix: {_fix(KNN_FAMILY)}.")
    return cv


def load_mini_unclip(path: str | Path | None = None):
    """(MODEL, CLIP, VAE, CLIP_VISION) of Atelier Mini kNN: the outputs of core unCLIPCheckpointLoader."""
    path = Path(path) if path else weights_path(KNN_FAMILY)
    parts, meta = read_knn_weights(path)
    base_parts, _ = read_weights("sd15")
    model = tiny_family.build_unclip_model(0)
    clip = tiny_family.build_clip("sd15", 0)
    try:
        model.model.diffusion_model.load_state_dict(parts["unet"], strict=True)
        clip.cond_stage_model.load_state_dict(base_parts["clip"], strict=True)
        vae = comfy.sd.VAE(sd=base_parts["vae"])
        register_vae_scale("sd15", float(vae.first_stage_model.vae_scale.detach()), "Atelier Mini sd15")
    except (RuntimeError, KeyError) as e:
        raise MiniWeightsError(f"Atelier Mini kNN: {path} does not fit the tiny SD2.1-unCLIP model "
                               f"({str(e)[:300]}). Fix: {_fix(KNN_FAMILY)}.") from e
    model.model.model_config.atelier_native_px = KNN_NATIVE_PX
    oc, cfg = _open_clip(parts, meta, path)
    log.info("Atelier Mini kNN loaded (trained %s steps, seed %s)", meta.get("steps"), meta.get("seed"))
    return model, clip, vae, clip_vision_from_open_clip(oc, cfg)


class AtelierMiniUnCLIPCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierMiniUnCLIPCheckpointLoader",
            display_name="Atelier Mini unCLIP Checkpoint",
            category="atelier/loaders",
            description=(
                "Atelier Mini's image-embedding model, the stand-in for unCLIP Checkpoint Loader (SD2.1 unCLIP): "
                "trained on the generated world to draw what a 32-d image embedding of Atelier Mini kNN open_clip "
                "shows (its colours above all), next to the text. Feed it kNN neighbours through Atelier kNN "
                "Conditioning, or an image through CLIP Vision Encode + unCLIP Conditioning. Ships with the pack."
            ),
            inputs=[],
            outputs=[
                io.Model.Output(tooltip="The Mini unCLIP diffusion model (reads unclip_conditioning, 32-d)."),
                io.Clip.Output(tooltip="Its text encoder (Atelier Mini sd15's)."),
                io.Vae.Output(tooltip="Its VAE (Atelier Mini sd15's)."),
                io.ClipVision.Output(tooltip="The image tower of Atelier Mini kNN open_clip as a CLIP vision model."),
            ],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(*load_mini_unclip())


class AtelierMiniKNNOpenCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        Embedder = io.Custom("ATELIER_KNN_EMBEDDER")  # the kNN nodes' embedder type (nodes/knn.py)
        return io.Schema(
            node_id="AtelierMiniKNNOpenCLIPLoader",
            display_name="Atelier Mini kNN open_clip",
            category="atelier/loaders",
            description="A toy open_clip (both towers, 32-d) trained on the generated world: text queries find "
                        "images of the colours and shapes they name, and its image embeddings are what Atelier Mini "
                        "unCLIP reads. Mini mode puts it in place of Atelier kNN open_clip Loader. Ships with the pack.",
            inputs=[],
            outputs=[Embedder.Output("embedder", display_name="embedder",
                                     tooltip="Embedding model for the kNN nodes.")],
        )

    @classmethod
    def execute(cls) -> io.NodeOutput:
        return io.NodeOutput(load_mini_knn_embedder())


NODES += [AtelierMiniUnCLIPCheckpointLoader, AtelierMiniKNNOpenCLIPLoader]
