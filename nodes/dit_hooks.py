"""Per-block access to the DiT / MMDiT families (PixArt, Flux, SD3): which blocks a denoiser has, how to read
the image tokens out of a block's output, and how to lay tokens back on the latent grid. One place for these
facts, shared by every technique that reads DiT blocks (sketch guidance's LEP; space experts / paint-with-words).

Pure torch on ComfyUI's module layout (no comfy imports, so it loads anywhere):

  family  block kind  module list                  output of one block        image tokens
  pixart  "block"     diffusion_model.blocks        x (B, N, C)                all N
  flux    "double"    diffusion_model.double_blocks (img, txt)                 img[:, :N] (Kontext refs follow)
  flux    "single"    diffusion_model.single_blocks cat(txt, img) (B, T+N, C)  [:, T:T+N]  (T = txt_in's tokens)
  sd3     "joint"     diffusion_model.joint_blocks  (context, x)               x (B, N, C)

N = ceil(h / p) * ceil(w / p) for a latent of h x w and patch size p (every family pads the latent up to whole
patches, row-major token order). :func:`token_grid` turns (B, N, C) tokens into a (B, C, h, w) map on the
latent grid: the token grid upsampled by p (bilinear by default, token values at their patch centres, as the
UNet path resizes its coarse activations; ``mode="nearest"`` is the exact inverse of the patchify), the padding
cropped.

Hooks: :class:`BlockOutputs` registers forward hooks on the chosen blocks only inside its ``with`` block (one
model call), so nothing stays on a shared model and other packs' hooks and ``patches_replace["dit"]`` block
replacements are unaffected (a replacement calls the original block, whose hooks then fire; Flux's and SD3's
single-slot ``patches_replace["dit"]`` is left alone). Forward hooks are list-type: several techniques may hook
the same block at once.
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch
import torch.nn.functional as F

#: block kind -> attribute of the diffusion model holding that ModuleList, per family
BLOCK_LISTS: dict[str, dict[str, str]] = {
    "pixart": {"block": "blocks"},
    "flux": {"double": "double_blocks", "single": "single_blocks"},
    "sd3": {"joint": "joint_blocks"},
}


#: families whose blocks change a stream in place after normalising it (ComfyUI 0.3.64 Flux: SingleStreamBlock
#: ``x +=``, DoubleStreamBlock ``txt +=``): a backward through them needs their LayerNorms to read copies
IN_PLACE_STREAMS = ("flux",)


def kinds(family: str) -> tuple[str, ...]:
    return tuple(BLOCK_LISTS.get(family, {}))


def blocks(dm: torch.nn.Module, family: str, kind: str) -> torch.nn.ModuleList:
    """The ModuleList of ``kind`` blocks of a diffusion model of ``family``; ValueError when it has none."""
    attr = BLOCK_LISTS.get(family, {}).get(kind)
    seq = getattr(dm, attr, None) if attr else None
    if seq is None or len(seq) == 0:
        raise ValueError(f"model: this {type(dm).__name__} has no {kind} blocks; is it really {family}?")
    return seq


def block_index(n: int, position: float) -> int:
    """The block at a relative depth ``position`` (0 = first, 1 = last) of ``n`` blocks (rounded half up)."""
    return min(n - 1, max(0, int(math.floor(position * (n - 1) + 0.5))))


def patch_size(dm: torch.nn.Module) -> int:
    p = getattr(dm, "patch_size", 2)
    return int(p[0] if isinstance(p, (tuple, list)) else p)


def token_shape(latent_hw: Sequence[int], patch: int) -> tuple[int, int]:
    """(rows, columns) of image tokens for a latent of ``latent_hw``: the latent is padded to whole patches."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    return -(-h // patch), -(-w // patch)


def image_tokens(kind: str, output, n_img: int, n_txt: int | None = None) -> torch.Tensor:
    """The (B, n_img, C) image tokens of one block's output (see the module table)."""
    if kind == "double":
        return output[0][:, :n_img]
    if kind == "joint":
        return output[1][:, :n_img]
    x = output[0] if isinstance(output, (tuple, list)) else output
    if kind == "single":
        t = x.shape[1] - n_img if n_txt is None else n_txt
        return x[:, t:t + n_img]
    return x[:, :n_img]


def token_grid(tokens: torch.Tensor, latent_hw: Sequence[int], patch: int, mode: str = "bilinear") -> torch.Tensor:
    """(B, N, C) row-major patch tokens -> (B, C, h, w) on the latent grid (upsampled by ``patch``: bilinear, or
    nearest = every latent pixel takes its patch's token), the padding cropped."""
    h, w = int(latent_hw[0]), int(latent_hw[1])
    th, tw = token_shape((h, w), patch)
    b, n, c = tokens.shape
    if n != th * tw:
        raise ValueError(f"model: a block gave {n} image tokens, a {h}x{w} latent at patch {patch} has {th * tw}")
    g = tokens.transpose(1, 2).reshape(b, c, th, tw)
    if patch > 1:
        g = F.interpolate(g, scale_factor=patch, mode=mode, **({} if mode == "nearest" else {"align_corners": False}))
    return g[:, :, :h, :w]


class BlockOutputs:
    """Forward hooks on chosen DiT blocks for one model call (the ``with`` block).

    ``picks``: (kind, index) per feature, in order; a block may appear more than once. After the call,
    ``tokens()`` gives each pick's (B, N, C) image tokens, ``grids()`` the same on the latent grid.
    ``stop_grad_after_last``: once the last picked block has run, autograd recording is switched off for the
    rest of the forward (blocks after it never reach a loss on these features; numerics unchanged); the
    caller's grad mode is restored at a new forward and when the block ends."""

    def __init__(self, dm: torch.nn.Module, family: str, picks: Sequence[tuple[str, int]], latent_hw: Sequence[int],
                 stop_grad_after_last: bool = False):
        self.dm, self.family, self.picks = dm, family, list(picks)
        self.latent_hw = (int(latent_hw[0]), int(latent_hw[1]))
        self.patch = patch_size(dm)
        th, tw = token_shape(self.latent_hw, self.patch)
        self.n_img = th * tw
        self.stop_grad_after_last = stop_grad_after_last
        # one hook per distinct block, serving every pick of it (a block may be picked twice)
        self.slots: dict[tuple[str, int], list[int]] = {}
        for j, key in enumerate(self.picks):
            self.slots.setdefault(key, []).append(j)
        self.outputs: list = [None] * len(self.picks)
        self.n_txt: int | None = None
        self._grad_mode = torch.is_grad_enabled()
        self._handles: list = []
        order = {k: j for j, k in enumerate(kinds(family))}
        self._last = max(self.slots, key=lambda key: (order[key[0]], key[1])) if self.picks else None

    def _hook(self, key: tuple[str, int]) -> Callable:
        kind, js = key[0], self.slots[key]
        last = key == self._last

        def fn(_module, _inputs, output):
            # the image tokens now, as a copy: Flux's single blocks add to their input in place, so the tensor a
            # block returns is changed by the next one
            tok = image_tokens(kind, output, self.n_img, self.n_txt).clone()
            for j in js:
                self.outputs[j] = tok
            if last and self.stop_grad_after_last:
                torch.set_grad_enabled(False)
        return fn

    @staticmethod
    def _own_input(_module, args):
        """Flux's blocks add to their streams in place (``x += ...``, ``txt += ...``) after a LayerNorm read them;
        on a recorded forward each LayerNorm reads a copy, so the backward finds the values it saved (a plain
        Flux block cannot be differentiated with respect to its input otherwise). Numerics unchanged."""
        if args and torch.is_grad_enabled() and torch.is_tensor(args[0]) and args[0].requires_grad:
            return (args[0].clone(),) + tuple(args[1:])
        return None

    def _txt(self, _module, _inputs, output):
        self.n_txt = int(output.shape[1])

    def _restart(self, _module, _inputs):
        torch.set_grad_enabled(self._grad_mode)

    def __enter__(self):
        self.outputs = [None] * len(self.picks)
        self.n_txt = None
        self._grad_mode = torch.is_grad_enabled()
        self._handles = [blocks(self.dm, self.family, k)[i].register_forward_hook(self._hook((k, i)))
                         for k, i in self.slots]
        txt_in = getattr(self.dm, "txt_in", None)            # Flux: the text tokens' count, for single blocks
        if isinstance(txt_in, torch.nn.Module):
            self._handles.append(txt_in.register_forward_hook(self._txt))
        if self.family in IN_PLACE_STREAMS and self._grad_mode:
            self._handles += [m.register_forward_pre_hook(self._own_input)
                              for k in kinds(self.family) for b in blocks(self.dm, self.family, k)
                              for m in b.modules() if isinstance(m, torch.nn.LayerNorm)]
        if self.stop_grad_after_last:
            self._handles.append(self.dm.register_forward_pre_hook(self._restart))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []
        torch.set_grad_enabled(self._grad_mode)
        return False

    def tokens(self) -> list[torch.Tensor]:
        """Each pick's (B, N, C) image tokens from the last call."""
        missing = [f"{k}.{i}" for (k, i), o in zip(self.picks, self.outputs) if o is None]
        if missing:
            raise ValueError(f"model: DiT blocks {missing} did not run during the forward pass (another patch "
                             "replaced them without calling the original block?)")
        out, self.outputs = list(self.outputs), [None] * len(self.picks)
        return out

    def grids(self) -> list[torch.Tensor]:
        toks = self.tokens()
        with torch.set_grad_enabled(self._grad_mode):
            return [token_grid(t, self.latent_hw, self.patch) for t in toks]

    take = grids   # the UNet capture's name (models/lep.FeatureCapture.take): activations on the latent grid
