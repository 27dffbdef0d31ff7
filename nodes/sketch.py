"""Sketch guidance with a latent edge predictor (Voynov et al.): sketch input (image or the canvas
widget of web/js/sketch_canvas.js), edge maps, LEP training and loading, and a MODEL patch that
guides ComfyUI's own samplers. The maths is in ../models/lep.py.

Folders (registered at import, extendable in extra_model_paths.yaml):
  atelier_lep         models/atelier/lep/*.safetensors          trained predictors (with metadata)
  atelier_lep_resume  models/atelier/lep_resume/*.safetensors   resumable training checkpoints

Guidance (AtelierSketchGuidance) is two hooks on a clone of the MODEL:
  * an APPLY_MODEL wrapper (keyed) that, on guided steps, runs the UNet forward with autograd on
    (inference mode off, clones of x/sigma/conds, non-inference copies of the weights swapped in
    with torch.func.functional_call, made once per sampling run), captures the 9 LEP layers with
    forward hooks that live only for that call, evaluates the LEP on the cond rows and keeps
    g = grad_{z_t} ||P(F(z_t)) - E(sketch)||^2. The forward it ran is the step's model output, so
    the paper's form costs one backward per guided step, not an extra forward.
  * a post-CFG function that moves the denoised prediction: D' = D - beta ||x - D|| g/||g||
    (= the paper's alpha = beta ||z_t - z_{t-1}|| / ||grad L|| step for Euler-type samplers).
  The forward stops recording autograd after the last LEP layer (the full-resolution output
  blocks behind it never reach the loss), which saves their activations' memory.
  grad_every = k > 1: a fresh gradient on every k-th guided step, the last direction reused (with
  the current step's size) in between.

The window (start/end_percent, grad_every) is a glue.SigmaWindow measured on each run's own noise range
(run_window): a full run uses it as given; a run that starts lower (img2img, denoise < 1; a second-pass
sampler) maps 0 to its first step's noise level, so the default 0-50 % is the first half of *its* denoising.
A run in which no step falls in the window logs a warning and shows it on the sampling node.
Building the predictor copies never touches the global RNG (ToMe and ancestral samplers draw from it), and a
second model call at a step's sigma (PAG's perturbed pass) runs plainly, so beta 0 is bit-identical next to
any other patch. Hooks use glue.hook_key("sketch_guidance"); the per-run state is also registered with
glue.register_run_state, so a model that carries this one (time experts) resets it. The training loop is
models/lep_train.py; this file passes it the UNet feature forward, progress and Cancel.

form "fast" (the cheaper form) drops the UNet backward altogether: the LEP file also carries a small
denoised-latent head H (trained next to the LEP on the same batches), and the post-CFG function takes
g = grad_{x0_hat} ||H(x0_hat, t) - E(sketch)||^2 on the cond branch's denoised prediction — the
gradient-on-the-clean-estimate shortcut of manifold-preserving guidance (He et al. 2023) — then applies
the same D' = D - beta ||x - D|| g/||g|| step. No weight copies, no autograd through the UNet.
"""
from __future__ import annotations

import json
import logging
import math
import os
import re
from pathlib import Path

import numpy as np
import torch

import comfy.model_management as mm
import comfy.patcher_extension
import comfy.utils
import folder_paths
from comfy_api.latest import io

from ..models import lep as L
from ..models import lep_train as T
from ..models.knn_common import atomic_write_bytes
from . import dit_hooks, glue
from .glue import family_of

log = logging.getLogger(__name__)

CATEGORY = "atelier/sketch"
FOLDER_LEP = "atelier_lep"
FOLDER_RESUME = "atelier_lep_resume"
HOOK_KEY = glue.hook_key("sketch_guidance")
NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.\-]{0,63}$")
IMAGE_EXTS = {".png", ".jpg", ".jpeg", ".webp", ".bmp"}

LEP = io.Custom("ATELIER_LEP")


for _name, _sub in ((FOLDER_LEP, ("atelier", "lep")), (FOLDER_RESUME, ("atelier", "lep_resume"))):
    glue.register_model_folder(_name, _sub, {".safetensors"})


class LEPModel:
    """A loaded predictor: the module (eval mode) and its metadata."""

    def __init__(self, module: L.LatentEdgePredictor, meta: dict, head: L.DenoisedEdgeHead | None = None):
        self.module, self.meta, self.head = module, meta, head

    @property
    def family(self) -> str:
        return self.meta.get("family", "")

    @staticmethod
    def _ordinary_copy(module: torch.nn.Module, make, device):
        """``make()``'s module with ``module``'s weights as ordinary (not inference) tensors, so autograd can
        run through it."""
        with torch.inference_mode(False), torch.random.fork_rng(devices=[]):
            m = make()        # its random init is overwritten; fork_rng keeps the global RNG (ToMe, samplers) as it was
            m.load_state_dict({k: v.clone() for k, v in module.state_dict().items()})
            return m.to(device).eval()

    def fresh_copy(self, device) -> L.LatentEdgePredictor:
        """The LEP as ordinary tensors (the paper form)."""
        p = self.module
        return self._ordinary_copy(p, lambda: L.LatentEdgePredictor(p.in_channels, p.hidden, p.out_channels,
                                                                   p.pe_dim), device)

    def fresh_head(self, device) -> L.DenoisedEdgeHead:
        """The denoised-latent head as ordinary tensors (the cheaper guidance form); a clear error if the
        file has none."""
        if self.head is None:
            raise L.LEPError("form: this LEP file has no denoised-latent head (it was trained before the fast form "
                             "existed); retrain it with Atelier Train Latent Edge Predictor or use form 'paper'")
        h = self.head
        return self._ordinary_copy(h, lambda: L.DenoisedEdgeHead(h.in_channels, h.hidden, h.depth, h.out_channels,
                                                                 h.pe_dim), device)


def save_lep(module: L.LatentEdgePredictor, path: str, meta: dict, head: L.DenoisedEdgeHead | None = None) -> None:
    """Write the predictor atomically (a reader, or a crash, sees the old file or the new one; a symlink at
    ``path`` is replaced, never written through)."""
    from safetensors.torch import save
    t = L.state_to_tensors(module)
    if head is not None:
        t.update({L.HEAD_PREFIX + k: v for k, v in L.state_to_tensors(head).items()})
    atomic_write_bytes(Path(path), save(t, metadata={k: str(v) for k, v in meta.items()}))


LEP_FIX = "pick another file, or train it again with Atelier Train Latent Edge Predictor"


def load_lep(path: str, input_name: str = "lep_name") -> LEPModel:
    """A trained predictor; a corrupt, foreign or truncated file gives an error naming it (``input_name``)."""
    tensors, meta = glue.load_safetensors(path, input_name, "latent edge predictor", LEP_FIX)
    if meta.get("atelier") != "lep":
        raise glue.fail(input_name, f"{os.path.basename(path)} ({path}) has no Atelier LEP metadata", LEP_FIX,
                        cls=L.LEPError)
    try:
        sd, head_sd = L.split_head(tensors)
        module = L.lep_from_tensors(sd, meta)
        head = L.head_from_tensors(head_sd, meta) if head_sd else None
        meta["layers"] = json.loads(meta.get("layers", "[]"))
    except (L.LEPError, RuntimeError, KeyError, ValueError, IndexError) as e:
        reason = str(e).split("\n")[0].removeprefix("lep_name: ")
        raise glue.fail(input_name, f"{os.path.basename(path)} ({path}) is not a usable latent edge predictor "
                                    f"({reason})", LEP_FIX, cls=L.LEPError) from e
    return LEPModel(module, meta, head)


def supported_labels() -> str:
    """The families the LEP reads (rows of glue.FAMILIES with lep_layers)."""
    return ", ".join(f.label for f in glue.FAMILIES.values() if f.lep_layers)


def lep_layers(model, names=None) -> tuple:
    """The layers the LEP reads on ``model``: its family row's (glue.FAMILIES lep_layers), or those a trained
    predictor recorded (``names``, its metadata); LEPError when the family has none."""
    row = glue.family_row(model)
    if row is None or not row.lep_layers:
        raise L.LEPError(f"model: sketch guidance supports {supported_labels()}; this model "
                         f"({row.label if row else type(model.model.latent_format).__name__}) is not one of them")
    return L.parse_layer_names(names) if names else tuple(row.lep_layers)


def is_dit(family: str) -> bool:
    return family in dit_hooks.BLOCK_LISTS


def feature_capture(dm, family: str, layers, latent_hw, stop_grad_after_last: bool = False):
    """Forward hooks on the LEP's layers for one model call; ``take()`` gives the activations (UNet: at their own
    resolutions; DiT: the image tokens of each block laid back on the latent grid, dit_hooks.token_grid)."""
    if is_dit(family):
        try:
            picks = [(k, dit_hooks.block_index(len(dit_hooks.blocks(dm, family, k)), pos)) for k, pos in layers]
        except ValueError as e:
            raise L.LEPError(str(e)) from None
        return dit_hooks.BlockOutputs(dm, family, picks, latent_hw, stop_grad_after_last)
    return L.FeatureCapture(dm, family, stop_grad_after_last)


def dit_channels(dm, layers) -> int:
    """A DiT LEP's input width: its blocks' token width (the model's hidden size) per layer read."""
    return int(dm.hidden_size) * len(layers)


def _is_flow(model_sampling) -> bool:
    import comfy.model_sampling as cms
    return isinstance(model_sampling, cms.CONST)


def lep_timestep(model_sampling, sigma: torch.Tensor) -> torch.Tensor:
    """The noise level as the LEP's timestep (0..999): the model's own discrete timestep (SD1.5, SDXL, PixArt), or
    1000 * sigma / sigma_max on a flow model (Flux, SD3: the convention time experts use; shift-independent)."""
    if _is_flow(model_sampling):
        return sigma.float() * (1000.0 / float(model_sampling.sigma_max))
    return model_sampling.timestep(sigma).float()


def lep_sigma(model_sampling, t: torch.Tensor) -> torch.Tensor:
    """The inverse of :func:`lep_timestep`: training timesteps 0..999 to the model's sigmas."""
    if _is_flow(model_sampling):
        return t.float() * (float(model_sampling.sigma_max) / 1000.0)
    return model_sampling.sigma(t.float())


def check_family(model, lep: LEPModel) -> str:
    fam = family_of(model)
    lep_layers(model)
    if lep.family != fam:
        raise L.LEPError(f"lep: this predictor was trained on a {lep.family} model, the model here is {fam}; "
                         f"load an LEP trained on {fam} (or train one with Atelier Train Latent Edge Predictor)")
    return fam


# ----------------------------------------------------------------------------- sketch nodes

def _mask_out(mask: torch.Tensor) -> torch.Tensor:
    return mask.float()


class AtelierSketchCanvas(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSketchCanvas",
            display_name="Atelier Sketch Canvas",
            category=CATEGORY,
            description="Draw a sketch inside the node (draw, erase, clear, brush size, undo, a background image "
                        "as a guide). The strokes are stored in the workflow as JSON and drawn again here in "
                        "Python at the canvas size; the output is black strokes on white.",
            inputs=[
                io.Int.Input("width", default=512, min=64, max=4096, step=8,
                             tooltip="Canvas width in pixels; match the image you generate."),
                io.Int.Input("height", default=512, min=64, max=4096, step=8,
                             tooltip="Canvas height in pixels; match the image you generate."),
                io.String.Input("sketch", default="", multiline=True,
                                tooltip="The drawing as JSON (written by the canvas; edit only to paste a drawing)."),
            ],
            outputs=[io.Image.Output("image", display_name="image", tooltip="Black strokes on white, width x height."),
                     io.Mask.Output("strokes", display_name="strokes", tooltip="1 where a stroke is.")],
        )

    @classmethod
    def validate_inputs(cls, width, height, sketch):
        try:
            L.parse_canvas(sketch)
        except L.LEPError as e:
            return str(e)
        return True

    @classmethod
    def execute(cls, width: int, height: int, sketch: str) -> io.NodeOutput:
        data = L.parse_canvas(sketch)
        sx, sy = width / data["width"], height / data["height"]
        strokes = [{**s, "points": s["points"] * np.array([sx, sy]), "size": s["size"] * math.sqrt(sx * sy)}
                   for s in data["strokes"]]
        mask = L.rasterize_strokes(width, height, strokes)
        if not mask.any():
            raise L.LEPError("sketch: the canvas is empty; draw some strokes (or use a sketch IMAGE instead)")
        m = torch.from_numpy(mask)[None]
        img = (1.0 - m.float())[..., None].expand(1, height, width, 3).contiguous()
        return io.NodeOutput(img, _mask_out(m))


class AtelierSketchPreprocess(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSketchPreprocess",
            display_name="Atelier Sketch Preprocess",
            category=CATEGORY,
            description="Turns a sketch image (black strokes on white or white on black, detected) into a clean "
                        "edge map: thresholded, optionally thinned to one pixel or thickened. Output: white edges "
                        "on black, the form the edge predictor was trained on.",
            inputs=[
                io.Image.Input("image", tooltip="A line drawing or scribble."),
                io.Combo.Input("polarity", options=["auto", "black strokes", "white strokes"], default="auto",
                               tooltip="auto: dark strokes on light paper if most of the image is bright."),
                io.Float.Input("threshold", default=0.5, min=0.01, max=0.99, step=0.01,
                               tooltip="How dark (or bright) a pixel must be to count as a stroke."),
                io.Combo.Input("stroke", options=["keep", "thin", "thicken"], default="keep",
                               tooltip="thin: one pixel wide (Zhang-Suen); thicken: widen by thicken_px."),
                io.Int.Input("thicken_px", default=1, min=0, max=32, tooltip="Radius added by 'thicken'."),
            ],
            outputs=[io.Image.Output("edges", display_name="edges", tooltip="White edges on black."),
                     io.Mask.Output("mask", display_name="mask", tooltip="1 on edges.")],
        )

    @classmethod
    def execute(cls, image, polarity, threshold, stroke, thicken_px) -> io.NodeOutput:
        mask = L.preprocess_sketch(image, polarity, threshold, stroke, thicken_px)
        return io.NodeOutput(L.mask_to_edge_image(mask), _mask_out(mask))


class AtelierImageToEdges(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierImageToEdges",
            display_name="Atelier Image to Edges",
            category=CATEGORY,
            description="Edge map of an image (Canny on the colour gradient, or thresholded Sobel), white on "
                        "black: a sketch from a photo, and the training targets of the edge predictor. For "
                        "PiDiNet/HED use a preprocessor pack and feed its output to Sketch Preprocess.",
            inputs=[
                io.Image.Input("image", tooltip="Any image."),
                io.Combo.Input("method", options=["canny", "sobel"], default="canny",
                               tooltip="canny: thin edges with hysteresis; sobel: thresholded gradient magnitude."),
                io.Float.Input("low", default=6.0, min=0.0, max=100.0, step=0.5,
                               tooltip="canny: lower hysteresis threshold (Lab units per pixel)."),
                io.Float.Input("high", default=10.0, min=0.0, max=200.0, step=0.5,
                               tooltip="canny: upper threshold; sobel: high/50 is the fraction of the maximum."),
            ],
            outputs=[io.Image.Output("edges", display_name="edges", tooltip="White edges on black."),
                     io.Mask.Output("mask", display_name="mask", tooltip="1 on edges.")],
        )

    @classmethod
    def execute(cls, image, method, low, high) -> io.NodeOutput:
        mask = edges_of(image, method, low, high)
        return io.NodeOutput(L.mask_to_edge_image(mask), _mask_out(mask))


def edges_of(image, method="canny", low=6.0, high=10.0) -> torch.Tensor:
    if method == "canny":
        return L.canny_edges(image, low=low, high=high)
    if method == "sobel":
        return L.sobel_edges(image, threshold=min(max(high / 50.0, 0.01), 0.99))
    raise L.LEPError(f"method: {method!r}; choose canny or sobel")


# ----------------------------------------------------------------------------- loader

class AtelierLEPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierLEPLoader",
            display_name="Atelier Load Latent Edge Predictor",
            category=CATEGORY,
            description="Loads a latent edge predictor (.safetensors) from models/atelier/lep. Its metadata names "
                        "the model family and layers it was trained on; Sketch Guidance refuses a mismatch.",
            inputs=[io.Combo.Input("lep_name", options=folder_paths.get_filename_list(FOLDER_LEP),
                                   tooltip="A file made by Atelier Train Latent Edge Predictor.")],
            outputs=[LEP.Output("lep", display_name="lep", tooltip="The predictor, for Sketch Guidance.")],
        )

    @classmethod
    def execute(cls, lep_name: str) -> io.NodeOutput:
        return io.NodeOutput(load_lep(folder_paths.get_full_path_or_raise(FOLDER_LEP, lep_name)))


# ----------------------------------------------------------------------------- training

def caption_for(path: Path, root: Path | None = None, skipped: list | None = None) -> str:
    """The caption of a training image: <image>.txt beside it, else the file name. A caption file that is a
    link leading out of the training folder is not read (it is listed in ``skipped``)."""
    side = path.with_suffix(".txt")
    if side.is_file():
        if root is not None and not _inside_real(side, root):
            if skipped is not None:
                skipped.append((side.relative_to(root).as_posix(), "caption links outside the folder; not read"))
        else:
            return side.read_text(encoding="utf-8", errors="replace").strip()
    return re.sub(r"[_\-]+", " ", re.sub(r"\d+$", "", path.stem)).strip()


def _reason(e: BaseException) -> str:
    """The underlying reason of a glue file error (the library's own message), for short listings."""
    cause = e.__cause__ or e
    text = str(cause).strip()
    return text.splitlines()[0] if text else type(cause).__name__


def _inside_real(path: Path, root: Path) -> bool:
    real = Path(os.path.realpath(path))
    return real == root or root in real.parents


def list_dataset(folder: Path, skipped: list | None = None) -> list[tuple[Path, str]]:
    """(image, caption) pairs under ``folder`` (a real path), in path order. Links leading out of the folder
    (files or folders) are not followed: they go to ``skipped`` as (relative path, reason)."""
    root = Path(os.path.realpath(folder))
    files, left = glue.list_files(root, IMAGE_EXTS)
    if skipped is not None:
        skipped.extend(left)
    items = [(p, caption_for(p, root, skipped)) for p in sorted(files)]
    if not items:
        raise L.LEPError(f"folder: no images ({', '.join(sorted(IMAGE_EXTS))}) in {folder}"
                         + (f" ({len(left)} entries skipped: links leading out of the folder)" if left else "")
                         + "; put the training images there")
    return items


def load_square(path: Path, size: int) -> torch.Tensor:
    """A training image, centre-cropped and resized; an unreadable one raises an AtelierError naming it."""
    from PIL import Image
    im = glue.open_image(path, "folder")
    w, h = im.size
    s = min(w, h)
    im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    im = im.resize((size, size), Image.BICUBIC)
    return torch.from_numpy(np.asarray(im, dtype=np.float32) / 255.0)


def encode_text(base, clip, caption: str, x: torch.Tensor) -> dict:
    """Model kwargs for one caption, built by the model's own extra_conds: c_crossattn, y (SDXL, SD3, Flux's pooled
    vector), guidance (Flux dev: FluxGuidance's default 3.5), c_size/c_ar (PixArt's micro-conditioning)."""
    cond = clip.encode_from_tokens_scheduled(clip.tokenize(caption))
    c, extra = cond[0][0], dict(cond[0][1])
    h, w = x.shape[-2] * 8, x.shape[-1] * 8
    out = base.extra_conds(cross_attn=c, device=x.device, noise=x, width=w, height=h, target_width=w,
                           target_height=h, **{k: v for k, v in extra.items() if k == "pooled_output"})
    kw = {}
    for k, v in out.items():
        if k in ("c_crossattn", "y", "guidance", "c_size", "c_ar"):
            kw[k] = v.cond
    return kw


def vae_encode(vae, base, images: torch.Tensor) -> torch.Tensor:
    return base.latent_format.process_in(vae.encode(images[..., :3]).float())


#: the no-grad feature forward of a larger batch runs in micro-batches of this size (memory, Cancel); batches up
#: to it run in one forward, as they always did (same numerics).
FEATURE_CHUNK = 16
#: what must match for a file (finished predictor or resume checkpoint) to count as the same training
IDENTITY = ("family", "layers", "channels", "folder", "resolution")
#: settings a finished file records; a later run with other values is "already trained" and ignores them
SETTINGS = ("steps", "batch_size", "learning_rate", "edge_method", "seed")


def folder_identity(root: Path) -> str:
    """The training folder as recorded in the files: relative to ComfyUI's input folder ('.' for itself)."""
    input_real = Path(os.path.realpath(folder_paths.get_input_directory()))
    try:
        rel = Path(root).relative_to(input_real).as_posix()
        return rel or "."
    except ValueError:
        return str(root)


def _meta_of(path: str, what: str) -> dict:
    with glue.open_safetensors(path, "name", what, "pick a new name, or turn 'overwrite' on to replace it") as f:
        return dict(f.metadata() or {})


def identity_differences(meta: dict, ident: dict) -> tuple[list[str], list[str]]:
    """(what differs, what the file does not record) between a file's metadata and this run's identity."""
    diffs, unknown = [], []
    for k in IDENTITY:
        if k not in meta:
            unknown.append(k)
            continue
        have, want = meta[k], ident[k]
        if k == "layers":
            try:
                have = json.loads(have)
            except ValueError:
                pass
            same = have == want
            have, want = (len(have) if isinstance(have, list) else have), len(want)
            if not same:
                diffs.append(f"it reads other UNet layers ({have} layers, this run {want})")
            continue
        if str(have) != str(want):
            label = {"family": "it was trained for {h}, the model here is {w}",
                     "channels": "its features have {h} channels, this model gives {w}",
                     "folder": "it was trained on the folder '{h}', this run's folder is '{w}'",
                     "resolution": "it was trained at {h} px, this run asks {w} px"}[k]
            diffs.append(label.format(h=have, w=want))
    return diffs, unknown


def _unknown_note(path, unknown) -> str:
    return (f"{os.path.basename(path)} records no {', '.join(unknown)} (made by an older Atelier version), so "
            "those could not be compared")


def _ignored_settings(meta: dict, wanted: dict) -> list[str]:
    """The inputs a finished file was trained with other values of (names and both values)."""
    out = []
    for k in SETTINGS:
        if k not in meta:
            continue
        have, want = meta[k], wanted[k]
        if k == "steps":
            if int(have) != int(want):
                out.append(f"steps {want} (the file has {have})")
            continue
        if k == "learning_rate":
            try:
                same = math.isclose(float(have), float(want), rel_tol=1e-9)
            except ValueError:
                same = False
        else:
            same = str(have) == str(want)
        if not same:
            out.append(f"{k} {want} (the file used {have})")
    return out


def check_finished(final_path: str, ident: dict, steps: int, resume: bool, overwrite: bool):
    """What to do about the finished file at ``final_path``: ``(None, notes)`` to train (and replace it, when
    that is allowed), or ``(LEPModel, notes)`` when it is this training, already done. A file of another
    training (family, layers, channels, folder, size), a foreign or unreadable file, or an older file that
    cannot be compared is never replaced unless ``overwrite`` is on."""
    if not os.path.lexists(final_path):
        return None, []
    if os.path.islink(final_path):
        if overwrite:
            return None, [f"replacing the link {final_path} (overwrite on)"]
        raise glue.refuse_overwrite(final_path, ["it is a symbolic link"])
    try:
        meta = _meta_of(final_path, "latent edge predictor")
    except glue.AtelierError as e:
        if overwrite:
            return None, [f"replacing the unreadable {final_path} (overwrite on)"]
        reason = _reason(e)
        raise glue.refuse_overwrite(final_path, [f"it is not a readable safetensors file ({reason})"]) from e
    if meta.get("atelier") != "lep":
        diffs, unknown = ["it is not an Atelier latent edge predictor"], []
    else:
        diffs, unknown = identity_differences(meta, ident)
    if diffs:
        if overwrite:
            return None, [f"replacing {final_path} (overwrite on): " + "; ".join(diffs)]
        raise glue.refuse_overwrite(final_path, diffs)
    notes = [_unknown_note(final_path, unknown)] if unknown else []
    if resume and int(meta.get("steps", -1)) >= steps:
        return load_lep(final_path, "name"), notes
    if unknown and not overwrite:
        raise glue.refuse_overwrite(final_path, [_unknown_note(final_path, unknown)])
    why = "resume is off" if not resume else f"it has {meta.get('steps')} steps, steps asks {steps}"
    return None, notes + [f"training again and replacing {final_path} ({why})"]


def check_resume(resume_path: str, ident: dict, resume: bool, overwrite: bool) -> tuple[bool, list[str]]:
    """Whether to continue from the checkpoint at ``resume_path``. A checkpoint of another training, a foreign or
    unreadable file (or, with resume off, one that cannot be compared) is refused unless ``overwrite`` is on;
    then it is discarded."""
    if not os.path.lexists(resume_path):
        return False, []
    where = f"the resume checkpoint {resume_path}"
    if os.path.islink(resume_path):
        if overwrite:
            return False, [f"discarding {where} (a link; overwrite on)"]
        raise glue.refuse_overwrite(resume_path, ["it is a symbolic link, not a resume checkpoint"])
    try:
        meta = _meta_of(resume_path, "LEP resume checkpoint")
    except glue.AtelierError as e:
        if overwrite:
            return False, [f"discarding the unreadable {where} (overwrite on)"]
        reason = _reason(e)
        raise glue.refuse_overwrite(resume_path, [f"it is not a readable resume checkpoint ({reason})"]) from e
    if meta.get("atelier") != "lep_resume":
        diffs, unknown = ["it is not an Atelier LEP resume checkpoint"], []
    else:
        diffs, unknown = identity_differences(meta, ident)
        if {"family", "channels"} & set(unknown):
            diffs.append("it records no family or channels")
    if diffs:
        if overwrite:
            return False, [f"discarding {where} (overwrite on): " + "; ".join(diffs)]
        raise glue.refuse_overwrite(resume_path, diffs)
    if resume:
        return True, [_unknown_note(resume_path, unknown)] if unknown else []
    if unknown and not overwrite:
        raise glue.refuse_overwrite(resume_path, [_unknown_note(resume_path, unknown)])
    return False, [f"resume is off: {where} (same training) is discarded"]


def feature_channels(model, clip, fam: str, dev) -> int:
    """The LEP's input width for this model: the channels of its 9 layers, from one small forward."""
    base = model.model
    if is_dit(fam):
        return dit_channels(base.diffusion_model, lep_layers(model))
    x = torch.zeros(1, base.latent_format.latent_channels, 16, 16, device=dev)
    kw = encode_text(base, clip, "", x)
    to = dict(model.model_options.get("transformer_options", {}))
    with torch.no_grad(), L.FeatureCapture(base.diffusion_model, fam) as cap:
        base.apply_model(x, base.model_sampling.sigma(torch.tensor([500.0], device=dev)), transformer_options=to,
                         **kw)
        return int(sum(f.shape[1] for f in cap.take()))


def training_memory(channels: int, batch_size: int, resolution: int, images: int) -> tuple[int, int]:
    """(bytes of the dataset's latents, bytes of one training step): the step holds the batch's captured
    features (resized, concatenated, copied: ~3x) and the predictor's activations and gradients (~3x its
    hidden widths), per latent pixel, in fp32."""
    px = (resolution // 8) ** 2
    latents = images * 2 * L.OUT_CHANNELS * px * 4 + 2 * 8 * resolution * resolution * 3 * 4
    step = batch_size * px * 4 * (3 * (channels + L.PE_DIM) + 3 * sum(L.HIDDEN))
    return latents, step


def check_training_memory(channels, batch_size, resolution, images, dev) -> None:
    latents, step = training_memory(channels, batch_size, resolution, images)
    cpu = torch.device("cpu")
    if torch.device(dev).type == "cpu":
        glue.check_memory(latents + step, "batch_size, resolution",
                          f"training at {resolution} px with batch {batch_size} ({images} images, {channels} feature "
                          f"channels)", device=cpu)
        return
    glue.check_memory(latents, "resolution", f"the latents of {images} images at {resolution} px", device=cpu)
    glue.check_memory(step, "batch_size, resolution",
                      f"one training step at {resolution} px with batch {batch_size} ({channels} feature channels)",
                      device=dev)


def train_lep(model, clip, vae, folder: str, name: str, steps: int = 3000, batch_size: int = 16,
              learning_rate: float = 1e-4, resolution: int = 512, edge_method: str = "canny", seed: int = 0,
              resume: bool = True, save_every: int = 500, progress=None,
              overwrite: bool = False, layer_names: list[str] | None = None) -> tuple[LEPModel, dict]:
    """Train an LEP for ``model``; returns the predictor and a report (losses, paths, skipped files, notes).
    A name holding another training's file is refused unless ``overwrite``; Cancel acts within one UNet block.
    ``layer_names``: other layers than the family row's (bench/bench_sketch.py measures DiT alternatives)."""
    if not NAME_RE.match(name or ""):
        raise L.LEPError(f"name: {name!r}; use letters, digits, '_', '-', '.' (it becomes <name>.safetensors)")
    fam = family_of(model)
    layers = lep_layers(model, layer_names)
    glue.check_vae(model, vae, "model", "vae")
    root = glue.resolve_user_folder(folder, "folder", example="lep_training")
    skipped: list[tuple[str, str]] = []
    items = list_dataset(root, skipped)
    out_dir = folder_paths.get_folder_paths(FOLDER_LEP)[0]
    resume_dir = folder_paths.get_folder_paths(FOLDER_RESUME)[0]
    os.makedirs(out_dir, exist_ok=True)
    os.makedirs(resume_dir, exist_ok=True)
    final_path = os.path.join(out_dir, f"{name}.safetensors")
    resume_path = os.path.join(resume_dir, f"{name}.safetensors")

    if resolution <= 0:
        resolution = native_resolution(model)
    mm.load_models_gpu([model])
    base = model.model
    dev = mm.get_torch_device()
    names = L.layer_names(fam, layers)
    channels = (dit_channels(base.diffusion_model, layers) if is_dit(fam)
                else feature_channels(model, clip, fam, dev))
    ident = {"family": fam, "layers": names, "channels": channels,
             "folder": folder_identity(root), "resolution": resolution}
    wanted = {"steps": steps, "batch_size": batch_size, "learning_rate": learning_rate, "edge_method": edge_method,
              "seed": seed}
    done, notes = check_finished(final_path, ident, steps, resume, overwrite)
    if done is not None:
        ignored = _ignored_settings(done.meta, wanted)
        if ignored:
            log.warning("[Atelier] LEP %s is already trained (%s); these inputs were IGNORED: %s. To train with them, "
                        "pick a new name or set resume off (replaces the file).", name, final_path, "; ".join(ignored))
        else:
            log.info("[Atelier] LEP %s is already trained (%s); loading it", name, final_path)
        return done, {"path": final_path, "losses": [], "final_loss": float(done.meta.get("final_loss", "nan")),
                      "start": steps, "skipped": True, "ignored": ignored, "notes": notes, "skipped_files": skipped}
    use_resume, more = check_resume(resume_path, ident, resume, overwrite)
    notes += more
    for note in notes:
        log.warning("[Atelier] LEP %s: %s", name, note)
    check_training_memory(ident["channels"], batch_size, resolution, len(items), dev)

    # Precompute latents of images and edge maps (in chunks) and text conds (once per caption). Unreadable
    # images are skipped and listed; Cancel is checked per chunk and inside the VAE.
    img_lat, edge_lat, conds, kept = [], [], {}, []
    chunk = 8
    with glue.interruptible(vae.first_stage_model, depth=3):
        for c0 in range(0, len(items), chunk):
            glue.check_interrupt()
            imgs = []
            for p, cap in items[c0:c0 + chunk]:
                try:
                    imgs.append(load_square(p, resolution)[None])
                    kept.append((p, cap))
                except glue.AtelierError as e:
                    skipped.append((p.relative_to(root).as_posix(), _reason(e)))
            if not imgs:
                continue
            imgs = torch.cat(imgs)
            edges = L.mask_to_edge_image(edges_of(imgs, edge_method))
            img_lat.append(vae_encode(vae, base, imgs).cpu())
            edge_lat.append(vae_encode(vae, base, edges).cpu())
    if not kept:
        raise glue.fail("folder", f"none of the {len(items)} images in {root} could be read ("
                        + "; ".join(f"{n}: {r}" for n, r in skipped[:5]) + ")",
                        "replace them with PNG/JPEG/WebP/BMP images", cls=L.LEPError)
    items = kept
    if skipped:
        log.warning("[Atelier] LEP %s: skipped %d file(s) of %s: %s", name, len(skipped), root,
                    "; ".join(f"{n} ({r})" for n, r in skipped))
    for _, cap in items:
        glue.check_interrupt()
        if cap not in conds:
            conds[cap] = encode_text(base, clip, cap, img_lat[0][:1].to(dev))
    caps = [cap for _, cap in items]
    x0_all, e_all = torch.cat(img_lat), torch.cat(edge_lat)
    hw = tuple(x0_all.shape[-2:])

    def shapes(i):
        return tuple((k, tuple(v.shape)) for k, v in sorted(conds[caps[i]].items()))

    def features(idx: list[int], t: torch.Tensor, gen: torch.Generator):
        x0 = x0_all[idx].to(dev)
        sigma = lep_sigma(base.model_sampling, t.to(dev))
        noise = torch.randn(x0.shape, generator=gen).to(dev)
        z = base.model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), noise, x0)
        to = dict(model.model_options.get("transformer_options", {}))
        n = len(idx)
        # captions whose text tokens differ in length (PixArt's T5 tokens are not padded) cannot share a batch
        same = len({shapes(i) for i in idx}) == 1
        size = (n if n <= FEATURE_CHUNK else FEATURE_CHUNK) if same else 1
        feats, dens = [], []
        with torch.no_grad(), glue.interruptible(base.diffusion_model, depth=3), \
                feature_capture(base.diffusion_model, fam, layers, hw) as cap:
            for a in range(0, n, size):
                glue.check_interrupt()
                part = idx[a:a + size]
                kw = {k: torch.cat([conds[caps[i]][k].to(dev) for i in part]) for k in conds[caps[part[0]]]}
                if size == n:
                    denoised = base.apply_model(z, sigma, transformer_options=to, **kw)
                else:
                    denoised = base.apply_model(z[a:a + size], sigma[a:a + size], transformer_options=to, **kw)
                feats.append(L.concat_features(cap.take(), hw))
                dens.append(denoised)
        with torch.inference_mode(False):
            if len(feats) == 1:
                return feats[0].clone(), dens[0].float().clone()
            return torch.cat(feats), torch.cat(dens).float()

    run = T.LEPTraining(features, e_all, learning_rate=learning_rate, seed=seed, device=dev)
    if use_resume:
        _load_resume(resume_path, run)
        log.info("[Atelier] LEP %s: resuming at step %d", name, run.step)
    start = run.step
    meta = {"atelier": "lep", "family": fam, "layers": json.dumps(names), "channels": run.channels,
            "pe_dim": L.PE_DIM, "hidden": json.dumps(list(L.HIDDEN)), "resolution": resolution,
            "edge_method": edge_method, "images": len(items), "batch_size": batch_size, "learning_rate": learning_rate,
            "head": json.dumps({"hidden": L.HEAD_HIDDEN, "depth": L.HEAD_DEPTH, "input": "denoised latent"}),
            "folder": ident["folder"], "seed": seed}
    resume_meta = {k: meta[k] for k in IDENTITY}
    run.run(steps, batch_size, save_every=save_every, save=lambda r: r.save_checkpoint(resume_path, resume_meta),
            progress=progress, check_interrupt=glue.check_interrupt, interruptible=glue.interruptible)
    lep, head, losses, head_losses = run.lep, run.head, run.losses, run.head_losses
    final, final_head = run.final_loss, run.final_head_loss
    meta.update(steps=steps, final_loss=final, final_head_loss=final_head)
    save_lep(lep, final_path, meta, head)
    if os.path.lexists(resume_path):
        os.remove(resume_path)
    with torch.inference_mode(False):
        module = L.lep_from_tensors(L.state_to_tensors(lep), meta)
        head_copy = L.head_from_tensors(L.state_to_tensors(head), meta)
    meta["layers"] = names
    return LEPModel(module, meta, head_copy), {"path": final_path, "losses": losses, "final_loss": final,
                                                "head_losses": head_losses, "final_head_loss": final_head,
                                                "start": start, "notes": notes, "skipped_files": skipped}


def native_resolution(model) -> int:
    """The model's training size (glue.native_px: what its model_config declares, else its family's): 512
    SD1.5, 1024 SDXL; Atelier's tiny and Mini stand-ins 64/128."""
    return glue.native_px(model) or (1024 if family_of(model) == "sdxl" else 512)


def _load_resume(path, run: T.LEPTraining) -> None:
    """Continue ``run`` from a checkpoint whose identity ``check_resume`` accepted; a corrupt one names the file."""
    fix = "pick a new name, or turn 'overwrite' on to discard the checkpoint"
    t, meta = glue.load_safetensors(path, "name", "LEP resume checkpoint", fix)
    try:
        had_head = run.restore(t, meta)
    except (RuntimeError, KeyError, ValueError) as e:
        raise glue.fail("name", f"{os.path.basename(path)} ({path}) is not a usable LEP resume checkpoint "
                                f"({str(e).splitlines()[0] if str(e) else type(e).__name__})", fix,
                        cls=L.LEPError) from e
    if not had_head:
        log.warning("[Atelier] LEP resume checkpoint %s has no denoised-latent head; the head starts afresh",
                    os.path.basename(path))


class AtelierTrainLEP(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTrainLEP",
            display_name="Atelier Train Latent Edge Predictor",
            category=CATEGORY,
            description="Trains the paper's per-pixel edge predictor on a folder of images with captions "
                        "(<image>.txt, else the file name): edge maps are computed, images noised at a random "
                        "timestep, the UNet's 9 layer activations mapped to the VAE encoding of the edge map "
                        "(Adam), and next to it the small denoised-latent head the fast guidance form uses. "
                        "Saves models/atelier/lep/<name>.safetensors with metadata; Cancel keeps a "
                        "resumable checkpoint every save_every steps, and running again resumes.",
            inputs=[
                io.Model.Input("model", tooltip="The model the predictor will guide (SD1.5, SDXL, PixArt-Σ, SD3 or Flux)."),
                io.Clip.Input("clip", tooltip="Its text encoder, for the captions."),
                io.Vae.Input("vae", tooltip="Its VAE, to encode images and edge maps."),
                io.String.Input("folder", default="lep_training",
                                tooltip="Folder of images relative to ComfyUI's input folder ('.' = the input folder)."),
                io.String.Input("name", default="my_lep", tooltip="File name of the predictor (no extension)."),
                io.Int.Input("steps", default=3000, min=1, max=100000, tooltip="Training steps (paper: 3000)."),
                io.Int.Input("batch_size", default=16, min=1, max=256, tooltip="Images per step (paper: 16)."),
                io.Float.Input("learning_rate", default=1e-4, min=1e-6, max=1e-1, step=1e-5,
                               tooltip="Adam learning rate."),
                io.Int.Input("resolution", default=0, min=0, max=2048, step=64,
                             tooltip="Training images are centre-cropped and resized to this square size; 0: the "
                                     "model's native size (512 SD1.5, 1024 SDXL)."),
                io.Combo.Input("edge_method", options=["canny", "sobel"], default="canny",
                               tooltip="How the target edge maps are computed from the images."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of batches, timesteps and noise."),
                io.Boolean.Input("resume", default=True,
                                 tooltip="Continue from models/atelier/lep_resume/<name>.safetensors if present; "
                                         "if <name> is already trained (same model family, folder, size, at least "
                                         "these steps) load it instead of training again (other inputs are then "
                                         "ignored; the report says which). "
                                         "Off: train from scratch."),
                io.Int.Input("save_every", default=500, min=0, max=100000,
                             tooltip="Steps between resumable checkpoints (0: none)."),
                io.Boolean.Input("overwrite", default=False, optional=True,
                                 tooltip="Off: a name that holds another training's predictor or checkpoint (other "
                                         "model family, layers, folder or size, or a file that is not one) is "
                                         "refused and left untouched. On: replace it."),
            ],
            outputs=[LEP.Output("lep", display_name="lep", tooltip="The trained predictor."),
                     io.String.Output("report", display_name="report",
                                      tooltip="Path, steps and loss; skipped files; ignored inputs.")],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, model, clip, vae, folder, name, steps, batch_size, learning_rate, resolution, edge_method,
                seed, resume, save_every, overwrite=False) -> io.NodeOutput:
        pbar = comfy.utils.ProgressBar(steps)
        lep, rep = train_lep(model, clip, vae, folder, name.strip(), steps, batch_size, learning_rate, resolution,
                             edge_method, seed, resume, save_every, progress=lambda d, t: pbar.update_absolute(d, t),
                             overwrite=bool(overwrite))
        return io.NodeOutput(lep, training_report(lep, rep, steps))


def training_report(lep: LEPModel, rep: dict, steps: int) -> str:
    """The node's report: what was saved or loaded, what was ignored or skipped (loudly)."""
    lines = []
    if rep.get("skipped"):
        ignored = rep.get("ignored") or []
        if ignored:
            lines.append("ALREADY TRAINED - INPUTS IGNORED: " + "; ".join(ignored) + ".")
            lines.append(f"Loaded the finished {rep['path']} instead of training. To train with these inputs, pick "
                         "a new name, or set resume off (trains again and replaces the file).")
        lines.append(f"already trained: {rep['path']} (final loss {rep['final_loss']:.4f}); set resume off to "
                     "train again")
    else:
        losses = rep["losses"]
        lines.append(f"saved {rep['path']}\nfamily {lep.family}, {lep.meta['channels']} channels, steps {steps} "
                     f"(resumed at {rep['start']})\nloss first {losses[0] if losses else float('nan'):.4f} "
                     f"final {rep['final_loss']:.4f}\ndenoised-latent head (fast form) final loss "
                     f"{rep['final_head_loss']:.4f}")
    for note in rep.get("notes") or []:
        lines.append(f"note: {note}")
    files = rep.get("skipped_files") or []
    if files:
        lines.append(f"skipped {len(files)} file(s):")
        lines.extend(f"  {n}: {why}" for n, why in files)
    return "\n".join(lines)


# ----------------------------------------------------------------------------- guidance

class _SwapParams(torch.nn.Module):
    """functional_call target: runs ``fn`` while the UNet's weights are replaced by copies."""

    def __init__(self, unet):
        super().__init__()
        self.unet = unet

    def forward(self, fn, *args, **kwargs):
        return fn(*args, **kwargs)


def _clone_tree(v):
    if isinstance(v, torch.Tensor):
        return v.clone()
    if isinstance(v, list):
        return [_clone_tree(x) for x in v]
    if isinstance(v, tuple):
        return tuple(_clone_tree(x) for x in v)
    if isinstance(v, dict):
        return {k: _clone_tree(x) for k, x in v.items()}
    return v


class GuidanceState:
    """Per patched MODEL: sketch target, settings and the per-run caches (weights, gradient, window)."""

    def __init__(self, lep: LEPModel, target: torch.Tensor, beta: float, window: glue.SigmaWindow, family: str,
                 form: str = "paper"):
        self.lep, self.target, self.beta, self.form = lep, target, float(beta), form
        self.window, self.family = window, family
        self.layers: tuple = ()      # the LEP's layers on this model (patch_model sets them)
        self.stats = {"fresh": 0, "reused": 0, "losses": [], "runs": []}
        self.counter = glue.StepCounter()
        self.reset()

    @property
    def every(self) -> int:
        return self.window.every

    def reset(self):
        self.params = None
        self.lep_run = None
        self.head_run = None
        self.grad = None
        self.grad_sigma = None
        self.run_window: glue.SigmaWindow | None = None
        self.counter.reset()

    def start_run(self, model_sampling, sigmas) -> None:
        """At the start of a sampler run: the window measured on this run's own noise range (see run_window),
        and a warning when no step of the run lies in it."""
        self.run_window = run_window(self.window, model_sampling, sigmas)
        steps = sorted(self.run_window.chosen_steps(model_sampling, sigmas)) if self.beta != 0 else []
        run = {"steps": max(0, len(sigmas) - 1), "guided_steps": steps,
               "window": (self.run_window.start, self.run_window.end)}
        self.stats["runs"].append(run)
        if self.beta != 0 and not self.run_window.steps(model_sampling, sigmas):
            msg = (f"Sketch guidance did nothing in this run: none of its {run['steps']} steps lies in the window "
                   f"start_percent {self.window.start:g} - end_percent {self.window.end:g} (measured on this run's "
                   "noise range); widen the window")
            self.stats.setdefault("warnings", []).append(msg)
            log.warning("[Atelier] %s", msg)
            _show_on_sampler(msg)

    def in_window(self, model_sampling, sigma: float) -> bool:
        return (self.run_window or self.window).contains(model_sampling, sigma)

    def weights(self, unet):
        """Non-inference copies of the UNet's inference-tensor weights, made once per run."""
        if self.params is None:
            with torch.inference_mode(False):
                self.params = {f"unet.{n}": t.clone() for n, t in
                               list(unet.named_parameters()) + list(unet.named_buffers()) if t.is_inference()}
            self.stats["weight_copies"] = len(self.params)
        return self.params


def run_window(window: glue.SigmaWindow, model_sampling, sigmas) -> glue.SigmaWindow:
    """The window of one sampler run (``glue.SigmaWindow.for_run``: percents of the run's own noise range)."""
    return window.for_run(model_sampling, sigmas)


def _show_on_sampler(text: str) -> None:
    """Show ``text`` on the node that is sampling (the KSampler) in the frontend, when a server runs."""
    try:
        from comfy_execution.utils import get_executing_context
        from server import PromptServer
        ctx = get_executing_context()
        inst = getattr(PromptServer, "instance", None)
        if ctx is not None and inst is not None:
            inst.send_progress_text(text, ctx.node_id)
    except Exception:  # noqa: BLE001  display only: never break sampling
        pass


def _target_for(state: GuidanceState, x: torch.Tensor) -> torch.Tensor:
    t = state.target.to(x.device)
    if tuple(t.shape[-2:]) != tuple(x.shape[-2:]):
        t = torch.nn.functional.interpolate(t, size=x.shape[-2:], mode="bilinear", align_corners=False)
    return t


def make_apply_model_wrapper(state: GuidanceState):
    def wrapper(executor, x, t, c_concat=None, c_crossattn=None, control=None, transformer_options={}, **kwargs):
        base = executor.class_obj
        sigma = float(t.reshape(-1)[0])
        cou = transformer_options.get("cond_or_uncond", [0])
        if (state.form != "paper" or not state.in_window(base.model_sampling, sigma) or 0 not in cou
                or state.grad_sigma == sigma):
            # outside the window, no cond rows, or a second call at this step's sigma (PAG's or SAG's extra
            # pass): the step's gradient is the main call's
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        if state.counter.index(sigma) % state.every != 0:
            state.stats["reused"] += 1
            state.grad_sigma = sigma
            return executor(x, t, c_concat, c_crossattn, control, transformer_options, **kwargs)
        rows = glue.cond_rows(cou, x.shape[0])
        unet = base.diffusion_model
        with torch.inference_mode(False), torch.enable_grad():
            params = state.weights(unet)
            if state.lep_run is None:
                state.lep_run = state.lep.fresh_copy(x.device)
            xg = x.detach().clone().requires_grad_(True)
            args = (executor, xg, t.clone(), _clone_tree(c_concat), _clone_tree(c_crossattn), _clone_tree(control),
                    transformer_options)
            with feature_capture(unet, state.family, state.layers, tuple(x.shape[-2:]),
                                 stop_grad_after_last=True) as cap:
                out = torch.func.functional_call(_SwapParams(unet), params, args, _clone_tree(kwargs), strict=False)
                feats = cap.take()
            f = L.concat_features([ft[rows] for ft in feats], tuple(x.shape[-2:]))
            ts = lep_timestep(base.model_sampling, t.clone())[rows]
            pred = state.lep_run(f, ts)
            loss = L.lep_loss(pred, _target_for(state, x))
            grad = torch.autograd.grad(loss.sum(), xg)[0][rows]
        state.grad = grad.detach()
        state.grad_sigma = sigma
        state.stats["fresh"] += 1
        state.stats["losses"].append(float(loss.mean()))
        return out.detach()
    return wrapper


def fast_gradient(state: GuidanceState, model, cond_denoised: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The cheaper form: g = grad_{x0_hat} ||H(x0_hat, t) - E(sketch)||^2 on the cond branch's denoised
    prediction, through the small denoised-latent head only (no backward through the UNet)."""
    with torch.inference_mode(False), torch.enable_grad():
        if state.head_run is None:
            state.head_run = state.lep.fresh_head(cond_denoised.device)
        d = cond_denoised.detach().float().clone().requires_grad_(True)
        ts = lep_timestep(model.model_sampling, sigma.detach().clone()).reshape(-1)[:1].expand(d.shape[0])
        loss = L.lep_loss(state.head_run(d, ts), _target_for(state, d))
        grad = torch.autograd.grad(loss.sum(), d)[0]
    state.stats["fresh"] += 1
    state.stats["losses"].append(float(loss.mean()))
    return grad.detach()


def make_post_cfg(state: GuidanceState):
    def post_cfg(args):
        denoised = args["denoised"]
        sigma = float(args["sigma"].reshape(-1)[0])
        model = args["model"]
        if state.beta == 0 or not state.in_window(model.model_sampling, sigma):
            return denoised
        if state.form == "fast":
            cd = args.get("cond_denoised")
            if cd is None or cd.shape != denoised.shape:
                return denoised
            g = fast_gradient(state, model, cd, args["sigma"])
            return L.guidance_shift(args["input"], denoised, g.to(denoised.dtype), state.beta)
        if state.grad is None:
            return denoised
        g = state.grad.to(denoised.device)
        if g.shape[0] != denoised.shape[0]:
            return denoised
        return L.guidance_shift(args["input"], denoised, g, state.beta)
    return post_cfg


def make_outer_sample_wrapper(state: GuidanceState):
    def wrapper(executor, noise, latent_image, sampler, sigmas, *args, **kwargs):
        state.reset()
        state.start_run(executor.class_obj.model_patcher.model.model_sampling, sigmas)
        try:
            return executor(noise, latent_image, sampler, sigmas, *args, **kwargs)
        finally:
            state.reset()  # frees the weight copies
    return wrapper


def sketch_target(vae, model, sketch: torch.Tensor) -> torch.Tensor:
    """Sketch IMAGE → VAE latent of its edge map (white on black), in the model's latent space."""
    mask = L.preprocess_sketch(sketch[:1])
    if not bool(mask.any()):
        raise L.LEPError("sketch: no strokes found (the image is blank at threshold 0.5); draw or connect a "
                         "sketch with visible lines")
    img = L.mask_to_edge_image(mask)
    h, w = img.shape[1] // 8 * 8, img.shape[2] // 8 * 8
    if h < 8 or w < 8:
        raise L.LEPError("sketch: the image must be at least 8x8 pixels")
    return vae_encode(vae, model.model, img[:, :h, :w]).cpu()


FORMS = ("paper", "fast")


def patch_model(model, lep: LEPModel, vae, sketch, beta=1.6, start_percent=0.0, end_percent=0.5, grad_every=1,
                form="paper"):
    fam = check_family(model, lep)
    glue.check_vae(model, vae, "model", "vae")
    window = glue.SigmaWindow(start_percent, end_percent, grad_every, "start_percent", "end_percent", "grad_every")
    if form not in FORMS:
        raise L.LEPError(f"form: {form!r}; choose one of {list(FORMS)}")
    if form == "fast":
        lep.fresh_head("cpu")  # a file without the head fails here, before sampling
    target = sketch_target(vae, model, sketch)
    with torch.inference_mode(False):
        target = target.clone()
    state = GuidanceState(lep, target, beta, window, fam, form)
    state.layers = lep_layers(model, lep.meta.get("layers"))
    if is_dit(fam) and form == "paper":
        dm = model.model.diffusion_model
        have = dit_channels(dm, state.layers)
        if have != lep.module.in_channels:
            raise L.LEPError(f"lep: this predictor reads {lep.module.in_channels} feature channels, this "
                             f"{glue.FAMILIES[fam].label} model's blocks give {have} ({len(state.layers)} blocks x "
                             f"width {int(dm.hidden_size)}): it was trained on another size of {glue.FAMILIES[fam].label}"
                             "; train an LEP on this model with Atelier Train Latent Edge Predictor")
    m = model.clone()
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, HOOK_KEY, make_apply_model_wrapper(state))
    m.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.OUTER_SAMPLE, HOOK_KEY, make_outer_sample_wrapper(state))
    m.set_model_sampler_post_cfg_function(make_post_cfg(state))
    glue.register_run_state(m, HOOK_KEY, lambda: state.reset())   # a carrier (e.g. time experts) resets it too
    return m, state


class AtelierSketchGuidance(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSketchGuidance",
            display_name="Atelier Sketch Guidance",
            category=CATEGORY,
            description="Guides any ComfyUI sampler (KSampler, SamplerCustomAdvanced) towards the edges of a "
                        "sketch with a latent edge predictor (Voynov et al.): on the guided steps the denoised "
                        "prediction moves against the gradient of ||P(F(z_t)) - E(sketch)||^2 (cond branch). "
                        "form 'paper' is the paper's (a backward pass through the UNet on each guided step, "
                        "~1.5-2x a plain step's time); form 'fast' takes the gradient on the model's denoised "
                        "prediction through the LEP file's small denoised-latent head instead (no UNet backward, "
                        "about the cost of plain sampling). grad_every 2 or more (paper form) reuses the last "
                        "gradient direction in between.",
            inputs=[
                io.Model.Input("model", tooltip="The model to guide (SD1.5, SDXL, PixArt-Σ, SD3 or Flux); the input is not modified."),
                LEP.Input("lep", tooltip="A latent edge predictor trained on this model's family."),
                io.Vae.Input("vae", tooltip="The model's VAE, to encode the sketch."),
                io.Image.Input("sketch", tooltip="Black strokes on white or white on black (detected); best at the "
                                                 "output size."),
                io.Float.Input("beta", default=1.6, min=0.0, max=10.0, step=0.05,
                               tooltip="Guidance strength (paper: 1.6). 0 leaves the sampler unchanged."),
                io.Float.Input("start_percent", default=0.0, min=0.0, max=1.0, step=0.01,
                               tooltip="Start of guidance, as a fraction of the denoising (by sigma)."),
                io.Float.Input("end_percent", default=0.5, min=0.0, max=1.0, step=0.01,
                               tooltip="End of guidance (paper: the first 50%)."),
                io.Int.Input("grad_every", default=1, min=1, max=16,
                             tooltip="Paper form: fresh gradient on every k-th guided step (1: the paper's form)."),
                io.Combo.Input("form", options=list(FORMS), default="paper", optional=True,
                               tooltip="paper: gradient through the UNet (Voynov et al.). fast: gradient on the "
                                       "denoised latent through the LEP's small head, no UNet backward "
                                       "(needs an LEP trained by this version)."),
            ],
            outputs=[io.Model.Output("guided_model", display_name="model", tooltip="The guided model.")],
        )

    @classmethod
    def execute(cls, model, lep, vae, sketch, beta, start_percent, end_percent, grad_every,
                form="paper") -> io.NodeOutput:
        m, _ = patch_model(model, lep, vae, sketch, beta, start_percent, end_percent, grad_every, form)
        return io.NodeOutput(m)


NODES = [AtelierSketchCanvas, AtelierSketchPreprocess, AtelierImageToEdges, AtelierLEPLoader, AtelierTrainLEP,
         AtelierSketchGuidance]
