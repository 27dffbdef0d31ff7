"""Embedders for the kNN retriever: open_clip checkpoints from local safetensors files, and a
callable adapter that a ComfyUI ``CLIP_VISION`` model (or anything else) plugs into.

An embedder is any object with::

    name: str          stable id of the weights (stored in the index; queries must match it)
    dim: int           embedding width
    image_size: int    square input side; images are resized (shortest side) and centre-cropped
    has_text: bool     whether `embed_texts` works (a CLIP_VISION model has no text tower)
    embed_images(list[PIL.Image | tensor | ndarray]) -> (N, dim) float32, *not* normalised
    embed_texts(list[str]) -> (N, dim) float32, *not* normalised

Raw (unnormalised) outputs are kept because the unCLIP path consumes the model's own scale;
the index normalises for cosine similarity itself.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
import struct
from collections.abc import Callable, Sequence
from copy import deepcopy
from pathlib import Path
from typing import Protocol, runtime_checkable

import numpy as np
import torch
from PIL import Image

from .knn_common import KNNError, bad_file

log = logging.getLogger(__name__)

OPENAI_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_STD = (0.26862954, 0.26130258, 0.27577711)


@runtime_checkable
class Embedder(Protocol):
    name: str
    dim: int
    image_size: int
    has_text: bool

    def embed_images(self, images: Sequence) -> np.ndarray: ...

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray: ...


def describe(embedder) -> dict:
    """The metadata an index stores about the embedder that built it."""
    return {
        "name": str(embedder.name),
        "dim": int(embedder.dim),
        "image_size": int(embedder.image_size),
        "has_text": bool(embedder.has_text),
        "kind": getattr(embedder, "kind", type(embedder).__name__),
    }


# ----------------------------------------------------------------------------- images

def _pil_square(img: Image.Image, size: int) -> np.ndarray:
    img = img.convert("RGB")
    w, h = img.size
    scale = size / min(w, h)
    nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
    img = img.resize((nw, nh), Image.Resampling.BICUBIC)
    left, top = (nw - size) // 2, (nh - size) // 2
    img = img.crop((left, top, left + size, top + size))
    return np.asarray(img, dtype=np.float32) / 255.0


def _tensor_square(t: torch.Tensor, size: int) -> torch.Tensor:
    """(B, H, W, C) float in [0, 1] -> (B, size, size, 3)."""
    t = t.float()
    if t.shape[-1] == 1:
        t = t.expand(*t.shape[:-1], 3)
    t = t[..., :3].movedim(-1, 1)
    h, w = t.shape[-2:]
    if (h, w) != (size, size):
        scale = size / min(h, w)
        nh, nw = max(size, round(h * scale)), max(size, round(w * scale))
        t = torch.nn.functional.interpolate(t, size=(nh, nw), mode="bicubic", antialias=True, align_corners=False)
        top, left = (nh - size) // 2, (nw - size) // 2
        t = t[:, :, top:top + size, left:left + size]
    return t.clamp(0, 1).movedim(1, -1)


def to_square_batch(images: Sequence, size: int) -> torch.Tensor:
    """PIL images, (H,W,C)/(B,H,W,C) tensors or arrays in [0,1] -> (N, size, size, 3) float32 tensor
    (shortest side resized to `size`, centre crop), the layout of a ComfyUI IMAGE."""
    out = []
    for im in images:
        if isinstance(im, Image.Image):
            out.append(torch.from_numpy(_pil_square(im, size))[None])
            continue
        t = torch.as_tensor(im)
        if t.ndim == 3:
            t = t[None]
        if t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
            raise KNNError(f"Expected an image as (H, W, C) or (B, H, W, C) with C in 1/3/4, got shape {tuple(t.shape)}.")
        out.append(_tensor_square(t, size))
    if not out:
        raise KNNError("No images were given to embed.")
    return torch.cat(out, 0)


def _as_float32(x, n: int, dim: int, what: str) -> np.ndarray:
    if isinstance(x, torch.Tensor):
        x = x.detach().float().cpu().numpy()
    x = np.asarray(x, dtype=np.float32)
    if x.shape != (n, dim):
        raise KNNError(f"The embedder returned {what} embeddings of shape {x.shape}; expected ({n}, {dim}). "
                       "Is the embedding model the one the index expects?")
    if not np.isfinite(x).all():
        raise KNNError(f"The embedder returned NaN/inf {what} embeddings; its weights look broken. "
                       "Re-download or re-convert the model file.")
    return np.ascontiguousarray(x)


# ----------------------------------------------------------------------------- callable adapter

class CallableEmbedder:
    """Wraps plain functions: `image_fn((N, S, S, 3) float tensor in [0,1]) -> (N, D)` and optionally
    `text_fn(list[str]) -> (N, D)`. The node layer wraps ComfyUI's ClipVisionModel with this."""

    kind = "callable"

    def __init__(self, name: str, dim: int, image_size: int, image_fn: Callable,
                 text_fn: Callable | None = None, kind: str | None = None):
        self.name, self.dim, self.image_size = str(name), int(dim), int(image_size)
        self._image_fn, self._text_fn = image_fn, text_fn
        self.has_text = text_fn is not None
        if kind:
            self.kind = kind

    def embed_images(self, images: Sequence) -> np.ndarray:
        batch = to_square_batch(images, self.image_size)
        return _as_float32(self._image_fn(batch), len(batch), self.dim, "image")

    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self._text_fn is None:
            raise KNNError(f"The embedding model {self.name} has no text tower, so it cannot embed a text query. "
                           "Query with an image, or build the index with an open_clip checkpoint (it has both towers).")
        return _as_float32(self._text_fn(list(texts)), len(texts), self.dim, "text")


# ----------------------------------------------------------------------------- open_clip

class OpenClipEmbedder:
    kind = "open_clip"

    def __init__(self, model: torch.nn.Module, tokenizer, name: str, dim: int, image_size: int,
                 mean=OPENAI_MEAN, std=OPENAI_STD, device: str | torch.device = "cpu"):
        self.model = model.eval().to(device)
        self.tokenizer = tokenizer
        self.name, self.dim, self.image_size = name, int(dim), int(image_size)
        self.has_text = tokenizer is not None
        self.device = torch.device(device)
        self._mean = torch.tensor(mean, dtype=torch.float32).view(1, 3, 1, 1)
        self._std = torch.tensor(std, dtype=torch.float32).view(1, 3, 1, 1)

    @torch.inference_mode()
    def embed_images(self, images: Sequence) -> np.ndarray:
        batch = to_square_batch(images, self.image_size).movedim(-1, 1)
        batch = ((batch - self._mean) / self._std).to(self.device)
        dtype = next(self.model.parameters()).dtype
        return _as_float32(self.model.encode_image(batch.to(dtype)), len(batch), self.dim, "image")

    @torch.inference_mode()
    def embed_texts(self, texts: Sequence[str]) -> np.ndarray:
        if self.tokenizer is None:
            raise KNNError(f"No tokenizer is available for {self.name}; query with an image instead.")
        tokens = self.tokenizer(list(texts)).to(self.device)
        return _as_float32(self.model.encode_text(tokens), len(texts), self.dim, "text")


def file_fingerprint(path: str | os.PathLike, samples: int = 32, chunk: int = 1 << 16) -> str:
    """sha256 over the size, the safetensors header and `samples` evenly spaced chunks: identifies a
    weights file in well under a second, even for multi-GB checkpoints."""
    size = os.path.getsize(path)
    h = hashlib.sha256(str(size).encode())
    with open(path, "rb") as f:
        head = f.read(8)
        h.update(head)
        if len(head) == 8:
            n = struct.unpack("<Q", head)[0]
            h.update(f.read(min(n, 1 << 24)))
        for i in range(samples):
            f.seek(size * i // samples)
            h.update(f.read(chunk))
    return h.hexdigest()


OPEN_CLIP_FIX = "replace the file: download it again, or re-save the model with safetensors"


def check_safetensors(path: Path, input_name: str = "clip_name") -> None:
    """Refuse pickle checkpoints (with the one-line conversion) and files that do not start like safetensors."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            head = f.read(9)
    except OSError as e:
        raise bad_file(path, input_name, "open_clip safetensors", e, OPEN_CLIP_FIX) from e
    if head[:2] == b"PK" or head[:1] == b"\x80":
        raise KNNError(
            f"{input_name}: {path.name} is a pickle checkpoint (.pt/.bin/.pth). Atelier only loads .safetensors "
            "files, because pickle can run code. Convert it once with: python -c \"import torch, "
            f"safetensors.torch as s; s.save_file(torch.load('{path.name}', weights_only=True), "
            f"'{path.stem}.safetensors')\"", input_name)
    if len(head) < 9 or head[8:9] != b"{":
        raise bad_file(path, input_name, "open_clip safetensors", "bad header: not a safetensors file",
                       OPEN_CLIP_FIX)


def _read_json_config(src) -> dict:
    if isinstance(src, dict):
        return deepcopy(src)
    try:
        return json.loads(Path(src).read_text(encoding="utf-8"))
    except (OSError, ValueError) as e:
        raise KNNError(f"Cannot read the open_clip config {src}: {e}") from e


def _split_config(cfg: dict) -> tuple[dict, dict]:
    """Accepts open_clip's HF layout ({"model_cfg", "preprocess_cfg"}) or a bare model config."""
    if "model_cfg" in cfg:
        return deepcopy(cfg["model_cfg"]), dict(cfg.get("preprocess_cfg") or {})
    if "embed_dim" in cfg:
        return deepcopy(cfg), {}
    raise KNNError("An open_clip config needs 'embed_dim', 'vision_cfg' and 'text_cfg' (or a 'model_cfg' holding them).")


def resolve_open_clip_config(weights: Path, arch: str | None, config, metadata: dict) -> tuple[dict, dict, str]:
    """Where the architecture comes from, first hit wins: `config` (dict or JSON path), `arch` (an open_clip
    built-in name), the file's own safetensors metadata, `<weights>.json` or `open_clip_config.json` beside it."""
    import open_clip

    if config is not None:
        return (*_split_config(_read_json_config(config)), "custom")
    if arch:
        cfg = open_clip.get_model_config(arch)
        if cfg is None:
            raise KNNError(f"Unknown open_clip architecture {arch!r}. Known ones include "
                           f"{', '.join(open_clip.list_models()[:12])}, …; or pass a config JSON.")
        return cfg, {}, arch
    if metadata.get("open_clip_config"):
        try:
            cfg = json.loads(metadata["open_clip_config"])
            return (*_split_config(cfg), metadata.get("open_clip_arch", "custom"))
        except (ValueError, TypeError, KNNError) as e:
            raise bad_file(weights, "clip_name", "open_clip safetensors",
                           f"its open_clip_config metadata is unreadable: {e}",
                           "pick the architecture instead of 'from file', or replace the file") from e
    if metadata.get("open_clip_arch"):
        return resolve_open_clip_config(weights, metadata["open_clip_arch"], None, {})
    for side in (weights.with_suffix(".json"), weights.parent / "open_clip_config.json"):
        if side.is_file():
            return (*_split_config(_read_json_config(side)), "custom")
    raise KNNError(
        f"Cannot tell the open_clip architecture of {weights.name}. Pick it (e.g. 'ViT-L-14', 'ViT-H-14'), or put "
        f"the model's open_clip_config.json next to the file (as {weights.stem}.json).")


def _build_model(model_cfg: dict) -> torch.nn.Module:
    from open_clip.model import CLIP, CustomTextCLIP

    cfg = deepcopy(model_cfg)
    vision, text = cfg.get("vision_cfg", {}), cfg.get("text_cfg", {})
    if "timm_model_name" in vision:
        vision["timm_model_pretrained"] = False  # weights come from our file, never from the hub
    if "hf_model_name" in text:
        text["hf_model_pretrained"] = False
    custom = cfg.pop("custom_text", False) or "hf_model_name" in text
    if "multimodal_cfg" in cfg:
        raise KNNError("CoCa checkpoints are not supported for retrieval; use a plain CLIP checkpoint.")
    try:
        return (CustomTextCLIP if custom else CLIP)(**cfg)
    except Exception as e:  # missing optional deps (timm, transformers) or a malformed config
        raise KNNError(f"Could not build the open_clip model from its config: {e}") from e


def _make_tokenizer(model_cfg: dict):
    from open_clip.tokenizer import SimpleTokenizer

    text = model_cfg.get("text_cfg", {})
    if "hf_tokenizer_name" in text:
        log.warning("open_clip config asks for the HF tokenizer %s, which needs a download; text queries are "
                    "disabled for this model.", text["hf_tokenizer_name"])
        return None
    return SimpleTokenizer(context_length=text.get("context_length", 77), **text.get("tokenizer_kwargs", {}))


def load_open_clip(weights: str | os.PathLike, arch: str | None = None, config=None,
                   device: str | torch.device = "cpu", input_name: str = "clip_name",
                   tensors: dict | None = None, metadata: dict | None = None) -> OpenClipEmbedder:
    """An open_clip model from a local .safetensors file (pickle is refused). See
    `resolve_open_clip_config` for where the architecture comes from. `tensors` / `metadata`: the file's
    contents when the caller already read them (the node reads them through the glue). A damaged file gives
    an error naming it (`input_name` is the input or option it came from)."""
    from safetensors import safe_open
    from safetensors.torch import load_file

    weights = Path(weights)
    if not weights.is_file():
        raise KNNError(f"{input_name}: open_clip weights not found: {weights}; put the file in "
                       "models/atelier/open_clip and refresh (R)", input_name)
    check_safetensors(weights, input_name)
    if metadata is None:
        try:
            with safe_open(str(weights), framework="pt") as f:
                metadata = f.metadata() or {}
        except Exception as e:  # SafetensorError (corrupt header), OSError
            raise bad_file(weights, input_name, "open_clip safetensors", e, OPEN_CLIP_FIX) from e
    model_cfg, pre_cfg, arch_name = resolve_open_clip_config(weights, arch, config, metadata)
    model = _build_model(model_cfg)
    if tensors is None:
        try:
            tensors = load_file(str(weights))
        except Exception as e:  # truncated data, bad offsets
            raise bad_file(weights, input_name, "open_clip safetensors", e, OPEN_CLIP_FIX) from e
    sd = tensors
    sd = {k.removeprefix("module."): v for k, v in sd.items()}
    try:
        model.load_state_dict(sd, strict=True)
    except RuntimeError as e:
        missing = sorted(set(model.state_dict()) - set(sd))[:4]
        unexpected = sorted(set(sd) - set(model.state_dict()))[:4]
        hint = f" missing keys {missing}, unexpected keys {unexpected};" if missing or unexpected else ""
        raise KNNError(f"{input_name}: {weights.name} does not match the open_clip architecture {arch_name!r}:"
                       f"{hint} pick the architecture the file was trained with. "
                       f"({str(e).splitlines()[-1].strip()})", input_name) from e
    vision = model_cfg.get("vision_cfg", {})
    size = pre_cfg.get("size") or vision.get("image_size", 224)
    size = size[0] if isinstance(size, (list, tuple)) else size
    mean = pre_cfg.get("mean") or vision.get("image_mean") or OPENAI_MEAN
    std = pre_cfg.get("std") or vision.get("image_std") or OPENAI_STD
    name = f"open_clip:{arch_name}:{file_fingerprint(weights)[:16]}"
    log.info("Loaded open_clip %s (%d-d) from %s", arch_name, model_cfg["embed_dim"], weights)
    return OpenClipEmbedder(model, _make_tokenizer(model_cfg), name, model_cfg["embed_dim"], size, mean, std, device)


def random_open_clip(model_cfg: dict, seed: int = 0) -> torch.nn.Module:
    """An open_clip model with seeded random weights (tests, benchmarks): same seed, same weights."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _build_model(model_cfg).eval()


def save_open_clip(model: torch.nn.Module, model_cfg: dict, path: str | os.PathLike, arch: str = "custom",
                   preprocess_cfg: dict | None = None) -> Path:
    """Save as .safetensors with the architecture in the file's metadata, so `load_open_clip` needs
    nothing else to rebuild it."""
    from safetensors.torch import save_file

    path = Path(path)
    cfg = {"model_cfg": model_cfg, "preprocess_cfg": preprocess_cfg or {}}
    sd = {k: v.detach().contiguous().cpu() for k, v in model.state_dict().items()}
    save_file(sd, str(path), metadata={"open_clip_config": json.dumps(cfg), "open_clip_arch": arch})
    return path


def random_open_clip_embedder(model_cfg: dict, seed: int = 0, device: str | torch.device = "cpu") -> OpenClipEmbedder:
    """An embedder over `random_open_clip` (both towers, real tokenizer): what the tiny demo loader returns.
    Named by config and seed, so an index built with it is only queried with the same random model."""
    model = random_open_clip(model_cfg, seed)
    size = model_cfg.get("vision_cfg", {}).get("image_size", 224)
    cfg_hash = hashlib.sha256(json.dumps(model_cfg, sort_keys=True).encode()).hexdigest()[:8]
    return OpenClipEmbedder(model, _make_tokenizer(model_cfg), f"open_clip:random-{cfg_hash}:seed{int(seed)}",
                            model_cfg["embed_dim"], size, device=device)
