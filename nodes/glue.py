"""Atelier's one glue layer between ComfyUI and the techniques: what every node needs to know about
models, folders, files and bad input, written once.

* Errors: ``AtelierError`` (models/errors.py) — every message names the node input and the fix.
* Float inputs: every registered node's FLOAT inputs are checked for finiteness before it runs
  (``guard_node``, applied to every class in ``nodes/__init__.collect_nodes``): NaN passes ComfyUI's
  own min/max validation, so it is refused here, once, for all nodes.
* Model families (``FAMILIES``, data): latent format, channels, the VAEs that belong to a family (by
  structure: latent channels, downscale and, for TAESD-type VAEs, their recorded latent scale).
  ``family_of``, ``check_vae``, ``check_same_family`` are what techniques call; the tiny and Mini
  families register their VAEs here like any other (``register_vae_scale``).
* User paths: ``resolve_user_folder`` resolves symlinks and refuses anything whose real path leaves
  ComfyUI's input/output/temp folders and model folders (including those listed in
  ``extra_model_paths.yaml``); ``list_files`` never follows a link out of the folder it lists.
* Writes: ``WrittenFiles`` keeps a manifest of the files the pack wrote into a user folder, and
  only those (unchanged since) are ever replaced or deleted; ``refuse_overwrite`` is the one
  wording for "this name holds another file".
* Files the pack loads: ``open_safetensors`` / ``load_safetensors`` / ``open_image`` turn a corrupt
  or unreadable file into an error naming the file, what is wrong and what to do.
* Long work: ``check_interrupt`` and ``interruptible`` (Cancel acts inside a model forward, not only
  between steps), ``check_memory`` (refuse sizes the machine cannot hold, with the estimate).
"""
from __future__ import annotations

import contextlib
import functools
import hashlib
import inspect
import json
import logging
import math
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch

import comfy.latent_formats
import comfy.model_base
import comfy.model_management as mm
import folder_paths

from ..models.errors import AtelierError, fail
from ..models.lep import LAYERS as LEP_LAYERS
from ..models.knn_common import IMAGE_EXTENSIONS, atomic_write_bytes

log = logging.getLogger("atelier")

__all__ = ["AtelierError", "fail", "guard_node", "FAMILIES", "Family", "family_of", "family_row", "native_px",
           "check_vae", "vae_family", "vae_families", "vae_downscale", "register_vae_scale", "check_same_family",
           "conditioning_problem", "check_conditioning", "allowed_roots", "resolve_user_folder",
           "list_files", "WrittenFiles", "refuse_overwrite", "open_safetensors", "load_safetensors", "open_image",
           "check_interrupt", "interruptible", "check_memory", "available_memory", "deprecated", "hook_key",
           "cond_rows", "SigmaWindow", "percent_of", "StepCounter", "register_run_state", "reset_run_states",
           "register_model_folder"]


# ============================================================================ float inputs

def _float_inputs(cls) -> list[str]:
    schema = cls.GET_SCHEMA()
    return [i.id for i in (schema.inputs or []) if str(getattr(i, "io_type", "")) == "FLOAT"]


def _check_finite(names: list[str], kwargs: dict) -> None:
    for name in names:
        v = kwargs.get(name)
        if v is None or isinstance(v, bool):
            continue
        try:
            ok = math.isfinite(float(v))
        except (TypeError, ValueError):
            continue  # not a plain number (ComfyUI's own type check speaks for it)
        if not ok:
            raise fail(name, f"{v} is not a finite number", "type a number within the widget's range")


def guard_node(cls):
    """Wrap ``cls.execute`` so every FLOAT input is checked for finiteness first (sync or async).

    The names come from the registered class's schema, read once: ComfyUI runs ``execute`` on a
    locked clone of the class, on which ``GET_SCHEMA`` cannot cache its result."""
    if getattr(cls, "_atelier_guarded", False):
        return cls
    func = inspect.getattr_static(cls, "execute").__func__
    names: list[str] = []

    def float_names() -> list[str]:
        if not names:
            names.extend(_float_inputs(cls) or [""])
        return names

    if inspect.iscoroutinefunction(func):
        @functools.wraps(func)
        async def execute(klass, *args, **kwargs):
            _check_finite(float_names(), kwargs)
            return await func(klass, *args, **kwargs)
    else:
        @functools.wraps(func)
        def execute(klass, *args, **kwargs):
            _check_finite(float_names(), kwargs)
            return func(klass, *args, **kwargs)
    cls.execute = classmethod(execute)
    cls._atelier_guarded = True
    return cls


# ============================================================================ model families

@dataclass
class Family:
    """One row of the family table: what every technique may know about a model family."""
    name: str
    latent_format: type
    channels: int
    #: latent scales recorded by TAESD-type VAEs of this family (ComfyUI's taesd loaders, Atelier's own)
    vae_scales: dict[float, str] = field(default_factory=dict)
    label: str = ""
    #: the side in pixels the family was trained at (a model_config may declare its own: ``atelier_native_px``)
    native_px: int = 512
    #: where a technique reads or steers text→image attention: "unet-cross" (SD1.5/SDXL: UNet attn2
    #: cross-attention, attn2 patches); "dit-cross" (PixArt: a DiT whose blocks cross-attend to T5 tokens,
    #: ``diffusion_model.blocks[i].cross_attn``); "mmdit-joint" (Flux, SD3: text and image tokens in one
    #: joint attention, Flux double/single blocks, SD3 joint_blocks); None: not supported yet
    attention: str | None = None
    #: the denoiser layers whose activations feed the latent edge predictor (models/lep.LAYERS: UNet blocks, or
    #: DiT blocks by relative depth, nodes/dit_hooks.py), or ()
    lep_layers: tuple = ()
    #: ComfyUI model classes (``comfy.model_base``) that tell this family from another one sharing its latent
    #: format (PixArt-Σ draws in SDXL's latent space); () matches any model of the latent format
    model_types: tuple = ()
    #: pixels per latent pixel of the family's image VAEs (full KL and TAESD-type alike)
    vae_downscale: int = 8
    #: the tokenizer streams (keys of ``clip.tokenize``) whose tokens make the model's text context, in their
    #: order along the token axis (set for the DiT rows in ``_TEXT_ATTENTION`` below)
    text_streams: tuple = ("l",)
    #: DiT/MMDiT blocks whose text attention makes the token -> region maps: (block kind of nodes/dit_hooks,
    #: from, to) windows of relative depth ((i + 0.5) / n of that kind); () = the UNet rule (blocks at 1/2 and
    #: 1/4 of the latent size)
    map_blocks: tuple = ()


FAMILIES: dict[str, Family] = {
    "sd15": Family("sd15", comfy.latent_formats.SD15, 4, {0.18215: "TAESD"}, "SD1.5", 512, "unet-cross",
                   LEP_LAYERS["sd15"]),
    "sdxl": Family("sdxl", comfy.latent_formats.SDXL, 4, {0.13025: "TAESDXL"}, "SDXL", 1024, "unet-cross",
                   LEP_LAYERS["sdxl"]),
    "pixart": Family("pixart", comfy.latent_formats.SDXL, 4, {}, "PixArt-Σ", 1024, "dit-cross", LEP_LAYERS["pixart"],
                     (comfy.model_base.PixArt,)),
    "sd3": Family("sd3", comfy.latent_formats.SD3, 16, {1.5305: "TAESD3"}, "SD3", 1024, "mmdit-joint",
                  LEP_LAYERS["sd3"]),
    "flux": Family("flux", comfy.latent_formats.Flux, 16, {0.3611: "TAEF1"}, "Flux", 1024, "mmdit-joint",
                   LEP_LAYERS["flux"]),
}


#: Text context and map blocks of the DiT rows (space experts, paint-with-words). Streams: SD1.5/SDXL read the
#: CLIP BPE tokens ("l"; SDXL's "g" lies on the same positions); PixArt and Flux the T5 sentencepiece pieces only
#: (Flux's CLIP-L gives the pooled vector alone); SD3 the CLIP-L/G tokens, then the T5 pieces. Map blocks, from
#: the blocks' roles (not measured on real weights: none can be downloaded here): PixArt the middle half of its
#: blocks (the first ones place the layout coarsely, the last ones refine texture); Flux every double-stream block
#: (separate text and image streams: the cleanest image->text maps) and the first half of the single-stream ones
#: (later ones attend mostly image->image); SD3 every joint block but the last quarter (the last block ends the
#: text stream).
_TEXT_ATTENTION = {
    "pixart": (("t5xxl",), (("block", 0.25, 0.75),)),
    "flux": (("t5xxl",), (("double", 0.0, 1.0), ("single", 0.0, 0.5))),
    "sd3": (("l", "t5xxl"), (("joint", 0.0, 0.75),)),
}
for _name, (_streams, _blocks) in _TEXT_ATTENTION.items():
    FAMILIES[_name].text_streams, FAMILIES[_name].map_blocks = _streams, _blocks


def native_px(model) -> int | None:
    """The side in pixels ``model`` was trained at: what its model_config declares (Atelier's tiny and Mini
    families do), else its family's."""
    cfg = getattr(getattr(model, "model", None), "model_config", None)
    px = getattr(cfg, "atelier_native_px", None)
    if px:
        return int(px)
    row = family_row(model)
    return row.native_px if row else None


def register_vae_scale(family: str, scale: float, source: str) -> None:
    """Record that a TAESD-type VAE with latent scale ``scale`` belongs to ``family`` (Atelier's tiny
    and Mini VAEs register theirs when they are built)."""
    FAMILIES[family].vae_scales[round(float(scale), 4)] = source


def family_row(model) -> Family | None:
    """The family of a MODEL, from its latent format (exact class, so subclasses such as SDXL's
    Playground format are not mistaken for SDXL) and, where two families share a latent format
    (SDXL, PixArt-Σ), the row whose ``model_types`` the model's ComfyUI class is; or None."""
    base = getattr(model, "model", None)
    fmt = getattr(base, "latent_format", None)
    generic = None
    for fam in FAMILIES.values():
        if type(fmt) is not fam.latent_format:
            continue
        if fam.model_types and isinstance(base, fam.model_types):
            return fam
        if not fam.model_types and generic is None:
            generic = fam
    return generic


def family_of(model) -> str | None:
    """'sd15' / 'sdxl' / 'pixart' / 'sd3' / 'flux' / None for a MODEL (real files, tiny and Mini alike)."""
    row = family_row(model)
    return row.name if row else None


def vae_downscale(vae) -> int | None:
    r = getattr(vae, "downscale_ratio", 8)
    return r if isinstance(r, int) else None


def vae_family(vae) -> str | None:
    """The family a VAE belongs to, where its structure tells (TAESD-type VAEs record their latent
    scale); None for full AutoencoderKL VAEs, which are the same network for SD1.5 and SDXL."""
    scale = getattr(getattr(vae, "first_stage_model", None), "vae_scale", None)
    if scale is None or not torch.is_tensor(scale) or scale.numel() != 1:
        return None
    v = float(scale.detach().float())
    for fam in FAMILIES.values():
        if any(abs(v - k) < 1e-4 for k in fam.vae_scales):
            return fam.name
    return None


def vae_families(vae) -> tuple[str, ...]:
    """The families a VAE can belong to, by its structure: a TAESD-type VAE by its recorded latent scale (every
    family of that latent space); a full image VAE (AutoencoderKL) by its latent channels and downscale factor: a
    16-channel one at 1/8 is SD3's or Flux's (one network, two trainings), a 4-channel one SD1.5's, SDXL's or
    PixArt-Σ's; () for a video/audio VAE or one no family uses (Stable Cascade's 16-channel coder at 1/32)."""
    fam = vae_family(vae)
    if fam is not None:
        fmt = FAMILIES[fam].latent_format
        return tuple(f.name for f in FAMILIES.values() if f.latent_format is fmt)
    if getattr(vae, "latent_dim", 2) != 2:
        return ()
    ds, ch = vae_downscale(vae), getattr(vae, "latent_channels", None)
    return tuple(f.name for f in FAMILIES.values() if f.channels == ch and f.vae_downscale == ds)


def _vae_kind(vae) -> str:
    labels = list(dict.fromkeys(FAMILIES[f].label for f in vae_families(vae)))
    return f" ({'/'.join(labels)})" if labels else ""


def check_vae(model, vae, model_input: str = "model", vae_input: str = "vae") -> None:
    """Refuse a VAE that cannot be ``model``'s: latent channels, a fixed downscale factor and, where the
    VAE's structure tells its family, the family."""
    if model is None or not hasattr(model, "model"):
        raise fail(model_input, "expected a MODEL", "connect a model loader's MODEL output")
    if vae is None or not hasattr(vae, "first_stage_model"):
        raise fail(vae_input, "expected a VAE", "connect a VAE (Load Checkpoint's VAE output or Load VAE)")
    fmt = model.model.latent_format
    row = family_row(model)
    label = row.label if row else type(fmt).__name__
    if getattr(fmt, "latent_dimensions", 2) != 2:
        raise fail(model_input, "video/audio latents are not supported", "use an image model")
    if getattr(vae, "latent_channels", None) != fmt.latent_channels:
        raise fail(vae_input, f"this VAE makes {getattr(vae, 'latent_channels', '?')}-channel latents{_vae_kind(vae)} "
                              f"but {model_input} ({label}) works on {fmt.latent_channels} channels",
                   f"connect the VAE that belongs to {model_input}'s checkpoint")
    if vae_downscale(vae) is None or getattr(vae, "latent_dim", 2) != 2:
        raise fail(vae_input, "not an image VAE with a fixed downscale factor", "connect an image VAE")
    if row is not None and vae_downscale(vae) != row.vae_downscale:
        raise fail(vae_input, f"this VAE maps {vae_downscale(vae)} pixels to one latent pixel, {label} VAEs "
                              f"{row.vae_downscale} (another model family's VAE with {fmt.latent_channels} channels)",
                   f"connect the VAE that belongs to {model_input}'s checkpoint")
    fam_v = vae_family(vae)
    # a VAE belongs to a latent space: families sharing one (sdxl, pixart) share their VAEs
    if fam_v is not None and row is not None and FAMILIES[fam_v].latent_format is not row.latent_format:
        raise fail(vae_input, f"this is a {FAMILIES[fam_v].label} VAE but {model_input} is {label}",
                   f"connect the VAE of {model_input}'s own checkpoint (mixed up two models?)")


def check_same_family(base, other, base_input: str, other_input: str, why: str = "") -> None:
    """Refuse ``other`` when its latent family or conditioning width differs from ``base``'s."""
    fa, fb = family_row(base), family_row(other)
    la = fa.label if fa else type(base.model.latent_format).__name__
    lb = fb.label if fb else type(other.model.latent_format).__name__
    if type(base.model.latent_format) is not type(other.model.latent_format) or (fa and fb and fa is not fb):
        raise fail(other_input, f"its model family ({lb}) differs from {base_input}'s ({la})",
                   why or f"use a model of the {la} family")
    ca, cb = _context_dim(base), _context_dim(other)
    if ca is not None and cb is not None and ca != cb:
        raise fail(other_input, f"it takes {cb}-wide text conditioning, {base_input} takes {ca}",
                   why or f"use a model of the same family as {base_input}")


def conditioning_problem(model, conditioning, model_input: str) -> tuple[str, str] | None:
    """(problem, fix) when ``model`` cannot take ``conditioning``, else None: text width (cross-attention
    context) and, for models with a pooled/ADM input (SDXL), the pooled embedding's width, so a prompt
    encoded with another family's CLIP is refused up front instead of failing inside the UNet with a
    shape error."""
    fix = f"encode it with {model_input}'s own CLIP (mixed up two models' prompts?)"
    if not isinstance(conditioning, list):
        return "not a CONDITIONING", "connect a CLIP Text Encode output"
    unet = getattr(getattr(model.model, "model_config", None), "unet_config", None) or {}
    dim, adm = _context_dim(model), unet.get("adm_in_channels")
    for item in conditioning:
        if not (isinstance(item, (list, tuple)) and len(item) >= 2 and torch.is_tensor(item[0])):
            return "not a CONDITIONING", "connect a CLIP Text Encode output"
        cond, extras = item[0], item[1] if isinstance(item[1], dict) else {}
        if dim is not None and cond.shape[-1] != dim:
            return f"it is {cond.shape[-1]}-wide text conditioning but {model_input} takes {dim}-wide text", fix
        if adm is None or "unclip_conditioning" in extras:
            continue
        pooled = extras.get("pooled_output")
        if pooled is None:
            return f"it has no pooled text embedding, which {model_input} needs", fix
        try:
            width = model.model.encode_adm(pooled_output=pooled, device=pooled.device).shape[-1]
        except Exception:  # noqa: BLE001  an ADM that needs more than the pooled output: not ours to judge
            continue
        if width != adm:
            return f"its pooled text embedding ({pooled.shape[-1]} wide) does not fit {model_input}", fix
    return None


def check_conditioning(model, conditioning, model_input: str, cond_input: str) -> None:
    """AtelierError naming ``cond_input`` when ``model`` cannot take ``conditioning`` (see conditioning_problem)."""
    bad = conditioning_problem(model, conditioning, model_input)
    if bad is not None:
        raise fail(cond_input, *bad)


def _context_dim(model):
    """The text width a MODEL reads: UNet ``context_dim``, PixArt ``caption_channels``, Flux ``context_in_dim``,
    SD3 ``context_embedder_config``'s in_features (ComfyUI's own unet_config keys)."""
    cfg = getattr(model.model, "model_config", None)
    unet = getattr(cfg, "unet_config", None) or {}
    for key in ("context_dim", "caption_channels", "context_in_dim"):
        if unet.get(key) is not None:
            return unet[key]
    if unet.get("image_model") == "pixart_sigma" or unet.get("image_model") == "pixart_alpha":
        return 4096  # PixArtMS's default caption width, which ComfyUI's detection leaves unset
    return ((unet.get("context_embedder_config") or {}).get("params") or {}).get("in_features")


# ============================================================================ user paths

_NOT_ROOTS = {"custom_nodes", "configs"}


def _real(p) -> Path:
    return Path(os.path.realpath(os.path.abspath(os.path.expanduser(str(p)))))


def allowed_roots(folder_names: list[str] | None = None) -> list[Path]:
    """Real paths of ComfyUI's input, output and temp folders and of every model folder (the
    defaults and what extra_model_paths.yaml adds), or of just ``folder_names``' folders."""
    if folder_names is None:
        dirs = [folder_paths.get_input_directory(), folder_paths.get_output_directory(),
                folder_paths.get_temp_directory()]
        for name, (paths, _) in list(folder_paths.folder_names_and_paths.items()):
            if name not in _NOT_ROOTS:
                dirs.extend(paths)
    else:
        dirs = [p for n in folder_names for p in folder_paths.get_folder_paths(n)]
    out: list[Path] = []
    for d in dirs:
        r = _real(d)
        if r not in out:
            out.append(r)
    return out


def _inside(path: Path, root: Path) -> bool:
    return path == root or root in path.parents


def resolve_user_folder(text: str, input_name: str, extra_folders: tuple[str, ...] = (), must_exist: bool = True,
                        create: bool = False, example: str = "my_images") -> Path:
    """A folder typed into a widget: relative to ComfyUI's input folder, or absolute inside the input folder
    or one of ``extra_folders`` (folder_paths names, e.g. listed in extra_model_paths.yaml). Symlinks are
    resolved and must stay inside those folders. Returns the real path."""
    text = (text or "").strip().strip('"')
    if not text:
        raise fail(input_name, "empty", f"type a folder relative to ComfyUI's input folder (e.g. '{example}')")
    input_dir = Path(os.path.abspath(folder_paths.get_input_directory()))
    roots = [_real(input_dir)] + allowed_roots(list(extra_folders)) if extra_folders else [_real(input_dir)]
    p = Path(text).expanduser()
    candidate = Path(os.path.normpath(p if p.is_absolute() else input_dir / p))
    real = _real(candidate)
    if not any(_inside(real, r) for r in roots):
        where = f" (it really points to {real})" if real != candidate else ""
        listed = (" or list its folder under " + ", ".join(f"'{f}:'" for f in extra_folders) +
                  " in extra_model_paths.yaml") if extra_folders else ""
        raise fail(input_name, f"{text} is outside the folders Atelier may use{where}",
                   f"put the files under ComfyUI's input folder ({input_dir}){listed}; symlinks that lead out of "
                   "these folders are not followed")
    if create:
        real.mkdir(parents=True, exist_ok=True)
    elif must_exist and not real.is_dir():
        raise fail(input_name, f"{text} does not exist under ComfyUI's input folder ({input_dir})",
                   "create it and put the files there")
    return real


def list_files(root: Path, exts=IMAGE_EXTENSIONS, recursive: bool = True) -> tuple[list[Path], list[tuple[str, str]]]:
    """Files under ``root`` with these extensions (sorted, hidden entries skipped). A symlink (file or
    folder) whose real path leaves ``root`` is not followed: it is returned in the skipped list."""
    root = _real(root)
    files, skipped = [], []
    for dirpath, dirnames, filenames in os.walk(root, followlinks=False):
        here = Path(dirpath)
        keep = []
        for d in sorted(dirnames):
            if d.startswith("."):
                continue
            sub = here / d
            if sub.is_symlink():
                real = _real(sub)
                if not _inside(real, root):
                    skipped.append((sub.relative_to(root).as_posix(), "links outside the folder"))
                    continue
            keep.append(d)
        dirnames[:] = keep if recursive else []
        for name in sorted(filenames):
            if name.startswith(".") or (exts is not None and Path(name).suffix.lower() not in exts):
                continue
            f = here / name
            rel = f.relative_to(root).as_posix()
            if not _inside(_real(f), root):
                skipped.append((rel, "links outside the folder"))
                continue
            if not f.is_file():
                skipped.append((rel, "not a regular file"))
                continue
            files.append(f)
    return files, skipped


# ============================================================================ writes

class WrittenFiles:
    """The manifest of files Atelier wrote into a user folder (``.atelier_written.json``: name -> sha256).
    Only a listed file whose content is still what Atelier wrote may be replaced or deleted."""

    NAME = ".atelier_written.json"

    def __init__(self, folder: Path):
        self.folder = Path(folder)
        self.path = self.folder / self.NAME
        try:
            data = json.loads(self.path.read_text(encoding="utf-8")) if self.path.is_file() else {}
            self.files: dict[str, str] = {str(k): str(v) for k, v in dict(data.get("files", {})).items()}
        except (OSError, ValueError, AttributeError):
            self.files = {}

    @staticmethod
    def _hash(data: bytes) -> str:
        return hashlib.sha256(data).hexdigest()

    def owns(self, name: str) -> bool:
        """True when ``name`` is a regular file (no link) Atelier wrote and nobody changed since."""
        p = self.folder / name
        if name not in self.files or p.is_symlink() or not p.is_file():
            return False
        try:
            return self._hash(p.read_bytes()) == self.files[name]
        except OSError:
            return False

    def write(self, name: str, data: bytes) -> None:
        """Write ``name`` atomically (never through a symlink) and record it."""
        p = self.folder / name
        if p.is_symlink() or (p.exists() and not self.owns(name)):
            raise fail("folder", f"{p} exists and was not written by Atelier",
                       "move that file away, or pick another folder")
        atomic_write_bytes(p, data)
        self.files[name] = self._hash(data)

    def remove(self, name: str) -> bool:
        """Delete ``name`` if Atelier wrote it and it is unchanged; returns whether it was deleted."""
        if not self.owns(name):
            return False
        (self.folder / name).unlink()
        self.files.pop(name, None)
        return True

    def save(self) -> None:
        self.files = {k: v for k, v in self.files.items() if (self.folder / k).is_file()}
        atomic_write_bytes(self.path, json.dumps({"atelier": "written-files", "files": self.files}, indent=0,
                                                 sort_keys=True).encode("utf-8"))


def refuse_overwrite(path, differences: list[str], name_input: str = "name", switch: str = "overwrite") -> AtelierError:
    """The one wording for 'this name already holds a different finished file'."""
    return fail(name_input, f"{path} already holds a different file ({'; '.join(differences)}); it was left "
                            "untouched", f"pick a new name, or turn '{switch}' on to replace it")


# ============================================================================ files the pack loads

def _bad_file(path, input_name: str, what: str, e: BaseException, fix: str) -> AtelierError:
    reason = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    return fail(input_name, f"{os.path.basename(str(path))} ({path}) is not a readable {what} file ({reason})", fix)


@contextlib.contextmanager
def open_safetensors(path, input_name: str, what: str = "safetensors", fix: str = "replace or re-create the file"):
    """``safe_open(path)`` whose failures (corrupt header, truncated file, missing file) name the file."""
    from safetensors import safe_open
    try:
        f = safe_open(str(path), framework="pt")
    except Exception as e:  # SafetensorError, OSError, ...
        raise _bad_file(path, input_name, what, e, fix) from e
    with f:
        yield f


def load_safetensors(path, input_name: str, what: str = "safetensors",
                     fix: str = "replace or re-create the file") -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors, metadata) of a safetensors file; a corrupt one gives an error naming the file."""
    from safetensors.torch import load_file
    with open_safetensors(path, input_name, what, fix) as f:
        meta = dict(f.metadata() or {})
    try:
        return load_file(str(path)), meta
    except Exception as e:
        raise _bad_file(path, input_name, what, e, fix) from e


def open_image(path, input_name: str = "folder"):
    """A PIL image in RGB, fully decoded; unreadable, truncated or oversized files give an AtelierError
    naming the file (callers that go through many files catch it, skip the file and list it)."""
    from PIL import Image
    try:
        with Image.open(path) as im:
            im.load()
            return im.convert("RGB")
    except (OSError, ValueError, SyntaxError, Image.DecompressionBombError) as e:
        raise _bad_file(path, input_name, "image", e, "remove or replace that image") from e


# ============================================================================ long work

def check_interrupt() -> None:
    """Raise ComfyUI's interruption when the user pressed Cancel."""
    mm.throw_exception_if_processing_interrupted()


@contextlib.contextmanager
def interruptible(module: torch.nn.Module, depth: int = 2):
    """Check for Cancel before each child module (to ``depth`` levels) runs, so a long forward stops within
    one block instead of at the end of the step."""
    handles = []

    def hook(_m, _args):
        check_interrupt()

    def add(m, d):
        for c in m.children():
            handles.append(c.register_forward_pre_hook(hook))
            if d > 1:
                add(c, d - 1)
    add(module, depth)
    try:
        yield module
    finally:
        for h in handles:
            h.remove()


def available_memory(device=None) -> int:
    """Bytes free for a new allocation on ``device`` (ComfyUI's own estimate)."""
    try:
        return int(mm.get_free_memory(device or mm.get_torch_device()))
    except Exception:
        return 0


def check_memory(need_bytes: float, inputs: str, what: str, device=None, fraction: float = 0.9) -> None:
    """Refuse up front when ``need_bytes`` exceeds what the device has (with the estimate and the fix)."""
    free = available_memory(device)
    if free and need_bytes > fraction * free:
        raise fail(inputs, f"{what} needs about {need_bytes / 2**30:.1f} GiB, the machine has {free / 2**30:.1f} GiB "
                           "free", "lower these inputs")


# ============================================================================ node ids are forever

def deprecated(use_instead: str, since: str):
    """Class decorator for a node that is replaced: it stays registered (saved workflows keep running),
    its schema is marked deprecated (the frontend hides it from search and badges it) and its
    description says what to use instead. Never delete or rename a registered node id."""
    def deco(cls):
        define = inspect.getattr_static(cls, "define_schema").__func__

        @functools.wraps(define)
        def define_schema(klass):
            schema = define(klass)
            schema.is_deprecated = True
            schema.description = f"Deprecated since {since}: use {use_instead}. " + (schema.description or "")
            return schema
        cls.define_schema = classmethod(define_schema)
        cls.atelier_use_instead = use_instead
        return cls
    return deco


# ============================================================================ sampling-time glue

def hook_key(technique: str) -> str:
    """The one key convention for everything Atelier hangs on a MODEL (wrappers, callbacks, additional
    models, transformer_options entries): ``atelier.<technique>``."""
    return f"atelier.{technique}"


def cond_rows(cond_or_uncond, batch: int) -> list[int]:
    """Row indices of the positive (cond) branch in a CFG batch: ComfyUI stacks one chunk per entry of
    ``transformer_options["cond_or_uncond"]`` (0 = cond, 1 = uncond), each ``batch / len(...)`` rows."""
    cou = list(cond_or_uncond or [0])
    per = batch // len(cou)
    return [j * per + r for j, kind in enumerate(cou) if kind == 0 for r in range(per)]


class SigmaWindow:
    """Where in the schedule a technique acts: ``start``/``end`` in percent of the model's own noise
    schedule (0 = pure noise, 1 = clean; the convention of core ConditioningSetTimestepRange and of
    diffusers' guider start/stop), and ``every`` = k to act on every k-th step inside it.

    The window is a noise-level range, so it means the same thing whatever the sampler, the step count
    or the model's parameterisation (read through its own ``model_sampling``)."""

    def __init__(self, start: float = 0.0, end: float = 1.0, every: int = 1, start_input: str = "start_percent",
                 end_input: str = "end_percent", every_input: str = "every"):
        self.start, self.end, self.every = float(start), float(end), int(every)
        self.start_input, self.end_input = start_input, end_input
        if not 0.0 <= self.start <= 1.0:
            raise fail(start_input, f"{start} is outside [0, 1]", "0 = the first (noisiest) step, 1 = the end")
        if not 0.0 <= self.end <= 1.0:
            raise fail(end_input, f"{end} is outside [0, 1]", "0 = the first (noisiest) step, 1 = the end")
        if self.end < self.start:
            raise fail(end_input, f"{end} is before {start_input} {start}; the window would be empty",
                       f"make {end_input} at least {start_input}")
        if self.every < 1:
            raise fail(every_input, f"{every} must be 1 or more", "1 = every step of the window")

    top_sigma: float | None = None  # set by for_run when the window starts exactly at a run's first step

    def sigmas(self, model_sampling) -> tuple[float, float]:
        """(sigma at start, sigma at end): the window is ``end <= sigma <= start``."""
        hi = self.top_sigma if self.top_sigma is not None else float(model_sampling.percent_to_sigma(self.start))
        return hi, float(model_sampling.percent_to_sigma(self.end))

    def for_run(self, model_sampling, sigmas) -> "SigmaWindow":
        """This window measured on one sampler run's own noise range. A full run (first sigma = the top of the
        model's schedule) keeps it as given; a run that starts lower (img2img, denoise < 1; a second-pass
        sampler) maps 0 to its first step's noise level and 1 to the end, so 0-50 % is the first half of *its*
        noise range (and a start of 0 includes that first step's exact sigma)."""
        s = [float(v) for v in sigmas]
        if len(s) < 2 or s[0] >= float(model_sampling.sigma_max) * (1 - 1e-4):
            return self
        p0 = percent_of(model_sampling, s[0])
        if p0 <= 0.0:
            return self

        def remap(p):
            return min(1.0, p0 + p * (1.0 - p0))
        w = SigmaWindow(remap(self.start), remap(self.end), self.every, self.start_input, self.end_input)
        if self.start == 0.0:
            w.top_sigma = s[0]
        return w

    def contains(self, model_sampling, sigma: float) -> bool:
        hi, lo = self.sigmas(model_sampling)
        return lo <= float(sigma) <= hi

    def steps(self, model_sampling, sigmas) -> list[int]:
        """Indices of the steps of a schedule (``sigmas``, last = the end) whose sigma lies in the window."""
        hi, lo = self.sigmas(model_sampling)
        s = [float(v) for v in sigmas]
        return [i for i, v in enumerate(s[:-1]) if lo <= v <= hi]

    def chosen_steps(self, model_sampling, sigmas) -> set[int]:
        """The steps the technique acts on: every ``every``-th step of the window, from its first."""
        return set(self.steps(model_sampling, sigmas)[::self.every])


def percent_of(model_sampling, sigma: float) -> float:
    """The schedule percent (0 = top, 1 = clean) of a noise level: the inverse of ``percent_to_sigma``, by
    bisection on it (works for any model_sampling, discrete or flow)."""
    lo, hi = 0.0, 1.0
    for _ in range(60):
        mid = (lo + hi) / 2
        if float(model_sampling.percent_to_sigma(mid)) > sigma:
            lo = mid
        else:
            hi = mid
    return (lo + hi) / 2


class StepCounter:
    """For hooks that see one sigma at a time: the index of a step among the distinct sigmas seen this
    run (a repeated call at the same sigma, e.g. a second pass of the same step, gets the same index)."""

    def __init__(self):
        self.seen: list[float] = []

    def index(self, sigma: float) -> int:
        sigma = float(sigma)
        if sigma not in self.seen:
            self.seen.append(sigma)
        return self.seen.index(sigma)

    def reset(self) -> None:
        self.seen = []


RUN_STATE = hook_key("run_state")


def register_run_state(model_patcher, key: str, reset) -> None:
    """Declare per-run state that ``reset()`` clears, on a (cloned) MODEL. Whatever carries the model —
    its own sampler run, or another technique that calls it as one of several experts — calls
    ``reset_run_states`` at the start of every run, so nothing from an earlier prompt leaks into the next.
    ``reset`` must be a plain function or closure (ModelPatcher.clone deep-copies model_options; a function
    is kept by reference, an object would be copied)."""
    to = model_patcher.model_options.setdefault("transformer_options", {})
    to[RUN_STATE] = {**to.get(RUN_STATE, {}), key: reset}


def reset_run_states(model_options: dict) -> None:
    """Reset every per-run state registered on a MODEL's options (see ``register_run_state``)."""
    for reset in dict((model_options or {}).get("transformer_options", {}).get(RUN_STATE, {})).values():
        reset()


# ============================================================================ folders

def register_model_folder(name: str, sub: tuple[str, ...] | None, exts) -> None:
    """Register a model folder with ComfyUI: ``models/<sub...>`` first (if ``sub``), then any paths
    extra_model_paths.yaml already gave ``name``. ``sub`` None: only what the user lists."""
    paths, _ = folder_paths.folder_names_and_paths.get(name, ([], set()))
    if sub is not None:
        default = os.path.join(folder_paths.models_dir, *sub)
        paths = [default] + [p for p in paths if p != default]
    folder_paths.folder_names_and_paths[name] = (list(paths), set(exts))
