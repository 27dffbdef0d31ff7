"""Train Atelier Mini: a tiny latent-diffusion family on the generated world (CPU-friendly).

    nohup nice -n 5 python tools/train_mini.py --family sd15 --steps 6000 > out/train_sd15.log 2>&1 &

Recipe (one run = three phases, each resumable):
  1. data: ``--data`` world training samples at the family's native size (cached in the
     checkpoint folder), captions tokenised by the family's own tokenizer.
  2. vae:  the TAESD-type encoder/decoder on 8-px-aligned 32-px crops (L1 + MSE reconstruction,
     small latent L2 and decoder noise augmentation); then ``vae_scale``/``vae_shift`` are set so
     that the latents times the family's latent-format scale factor have mean 0 and std 1.
  3. unet: UNet + text encoder jointly, eps-prediction on the model's own discrete schedule
     (``model_sampling``), 10% caption dropout (for CFG), AdamW, warmup + cosine LR, EMA.
The forward pass is ComfyUI's own modules (diffusion_model, cond_stage_model, TAESD) from
``nodes/tiny_family.py``, so the weights load into exactly these classes. Everything random is
drawn from generators seeded by (seed, step): a resumed run continues the same sequence.
Checkpoints (safetensors + JSON, no pickle) go to ``out/mini_ckpt/<family>_seed<seed>/``;
the result is written with ``models/mini_format.py`` (8-bit weights, used token rows only).
"""
from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (ROOT, HERE)]
sys.path.insert(0, str(HERE))

import numpy as np  # noqa: E402
import torch  # noqa: E402
import torch.nn.functional as F  # noqa: E402

log = logging.getLogger("atelier.train_mini")

DEFAULTS = {  # per family: native px, data size, batch sizes, learning rate
    "sd15": {"px": 64, "data": 12000, "batch": 64, "vae_batch": 16, "lr": 5e-4},
    "sdxl": {"px": 128, "data": 6000, "batch": 32, "vae_batch": 32, "lr": 5e-4},
    # a DiT (nodes/mini.MiniPixArtSigma): 288 px (ComfyUI's PixArt needs latents >= 33 px), objects drawn
    # at their 160-px pixel size (the VAE was trained on 128 px), latents through Mini sdxl's shipped VAE
    # (a shared latent space); v-prediction (ComfyUI's V_PREDICTION on PixArt-Σ's schedule), not PixArt-Σ's eps:
    # at sigma_max 157 an eps model's error is multiplied by sigma in its clean estimate (nodes/mini.py)
    "pixart": {"px": 288, "scene_px": 160, "data": 1200, "batch": 16, "vae_batch": 0, "lr": 5e-4,
               "vae_weights": "atelier_mini_sdxl.safetensors", "param": "v"},
}
PARAMS = ("eps", "v", "flow")
CROP = 32
CAPTION_DROP = 0.1
EMA_DECAY = 0.995
VAE_LR = 1e-3
VAE_NOISE = 0.1
VAE_L2 = 1e-3
ZERO_INIT = ("out_layers.3.", "proj_out.", "out.2.")  # residual outputs start at zero (as in SD)


# ------------------------------------------------------------------------------------------
# setup

def _import_pack() -> str:
    """Import ComfyUI's core (CPU) and this checkout as a package, without registering nodes:
    training needs the model classes only, not a working node set."""
    import comfy_env
    sys.path.insert(0, str(comfy_env.find_comfyui(verbose=False)))
    saved, sys.argv = sys.argv, ["main.py", "--cpu"]
    try:
        import comfy.options
        comfy.options.enable_args_parsing()
        import comfy.cli_args  # noqa: F401  (parses --cpu)
        import utils.extra_config  # noqa: F401  (before comfy/ lands on sys.path, as main.py does)
    finally:
        sys.argv = saved
    from pure_models import import_package
    return import_package("atelier_train_pack", ROOT).__name__


def comfy_modules():
    """(tiny_family, world, mini_format): from the booted headless ComfyUI when there is one (tests),
    else from a bare import of ComfyUI's core and this checkout."""
    import headless
    h = headless.Headless.current()
    pkg = h.pack_module.__name__ if h is not None else _import_pack()
    return (importlib.import_module(pkg + ".nodes.tiny_family"), importlib.import_module(pkg + ".models.world"),
            importlib.import_module(pkg + ".models.mini_format"))


def mini_module():
    import headless
    h = headless.Headless.current()
    pkg = h.pack_module.__name__ if h is not None else _import_pack()
    return importlib.import_module(pkg + ".nodes.mini")


def gen(seed: int, stream: int, step: int) -> torch.Generator:
    return torch.Generator().manual_seed((seed * 1_000_003 + stream * 7_919 + step) % (2 ** 63))


def hardware() -> str:
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{cpu}, {os.cpu_count()} cores, {torch.get_num_threads()} torch threads, torch {torch.__version__}"


# ------------------------------------------------------------------------------------------
# data

def load_data(world, clip, family: str, seed: int, n: int, px: int, cache_dir: Path | None):
    """Images (N,H,W,3) uint8, captions, and token ids {"l"/"g": (N,77) long} (+ empty-caption ids)."""
    cache = cache_dir / f"data_{family}_px{px}_seed{seed}_n{n}.npz" if cache_dir else None
    bigger = sorted(cache_dir.glob(f"data_{family}_px{px}_seed{seed}_n*.npz"),
                    key=lambda p: int(p.stem.rsplit("_n", 1)[1])) if cache_dir and cache_dir.is_dir() else []
    bigger = [p for p in bigger if int(p.stem.rsplit("_n", 1)[1]) >= n]
    if bigger:  # samples are a pure function of (seed, index): the first n of a larger set are the same
        z = np.load(bigger[0], allow_pickle=False)
        images, captions = z["images"][:n], [str(c) for c in z["captions"][:n]]
    else:
        from tqdm import tqdm
        images = np.empty((n, px, px, 3), np.uint8)
        captions = []
        for i in tqdm(range(n), desc=f"render {family} world", unit="img", mininterval=5):
            s = world.sample(seed, i, px)
            images[i] = s.image
            captions.append(s.caption)
        if cache:
            cache.parent.mkdir(parents=True, exist_ok=True)
            tmp = cache.with_suffix(".tmp.npz")
            np.savez(tmp, images=images, captions=np.array(captions))
            tmp.replace(cache)
    memo: dict[str, dict] = {}

    def ids(text: str) -> dict[str, list[int]]:
        if text not in memo:
            memo[text] = {k: [t for t, _w in sec[0]] for k, sec in clip.tokenize(text).items()}
        return memo[text]

    per = [ids(c) for c in captions]
    toks = {k: torch.tensor([p[k] for p in per], dtype=torch.long) for k in per[0]}
    empty = {k: torch.tensor(v, dtype=torch.long) for k, v in ids("").items()}
    return images, captions, toks, empty


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div_(255.0)


def world_sample(world, seed: int, index: int, px: int, scene_px: int | None = None):
    """(image, caption) of world training sample ``index`` at ``px``; ``scene_px`` < ``px`` draws the
    objects (and background texture) at the pixel size they have at ``scene_px``, on the larger
    canvas: same scene, layout and caption, objects as many pixels wide as the VAE saw in training."""
    if not scene_px or scene_px == px:
        s = world.sample(seed, index, px)
        return s.image, s.caption
    import dataclasses
    k = scene_px / px
    specs, bg = world._draw_specs(world._rng(seed, index, world._STREAM_TRAIN), world.DEFAULT_CONFIG)
    specs = [dataclasses.replace(sp, r=sp.r * k) for sp in specs]
    image, objects, _m, _e = world.render(specs, dataclasses.replace(bg, period=bg.period * k), px)
    return image, world.caption_for(objects, bg)


def vae_from_weights(taesd, path: Path, fmt) -> dict:
    """Load the VAE of a shipped Mini file into ``taesd`` (the 8-bit weights, dequantised: exactly
    the VAE users get), so a new family shares that Mini's latent space; returns its metadata."""
    from safetensors import safe_open
    with safe_open(str(path), "pt") as f:
        meta = dict(f.metadata() or {})
        flat = {k: f.get_tensor(k) for k in f.keys() if k.startswith("vae.")}
    taesd.load_state_dict(fmt.unpack({**flat, "unet.x": torch.zeros(1), "clip.x": torch.zeros(1)})["vae"])
    log.info("vae: taken from %s (family %s, vae_scale %.4f, vae_shift %.4f)", path, meta.get("family"),
             taesd.vae_scale.item(), taesd.vae_shift.item())
    return meta


@torch.no_grad()
def encode_world(world, taesd, seed: int, n: int, px: int, scale_factor: float, folder: Path | None,
                 chunk: int = 50, scene_px: int | None = None):
    """Model-space latents x0 (N, 4, px/8, px/8) and captions of world samples 0..n-1, through a
    fixed VAE (no calibration: the latent space stays that VAE's). Rendered and encoded in chunks
    cached in ``folder`` (resumable; only latents are kept, images are not)."""
    from tqdm import tqdm
    zs, captions = [], []
    for c0 in tqdm(range(0, n, chunk), desc=f"latents {px}px", mininterval=30):
        c1 = min(n, c0 + chunk)
        f = folder / f"latents_px{px}_scene{scene_px or px}_seed{seed}_{c0}_{c1}.npz" if folder else None
        if f is not None and f.is_file():
            z = np.load(f, allow_pickle=False)
            zs.append(torch.from_numpy(z["x0"]))
            captions += [str(c) for c in z["captions"]]
            continue
        samples = [world_sample(world, seed, i, px, scene_px) for i in range(c0, c1)]
        u = taesd.taesd_encoder(to_tensor(np.stack([s[0] for s in samples])))
        x0 = ((u / taesd.vae_scale + taesd.vae_shift) * scale_factor).float()
        zs.append(x0)
        captions += [s[1] for s in samples]
        if f is not None:
            f.parent.mkdir(parents=True, exist_ok=True)
            tmp = f.with_suffix(".tmp.npz")
            np.savez(tmp, x0=x0.numpy(), captions=np.array([s[1] for s in samples]))
            tmp.replace(f)
    x0 = torch.cat(zs)
    log.info("latents: %d at %d px, mean %.3f std %.3f", len(x0), px, x0.mean().item(), x0.std().item())
    return x0, captions


# ------------------------------------------------------------------------------------------
# checkpoints (safetensors + json: resumable, no pickle)

def save_safetensors(path: str | Path, tensors: dict, metadata: dict | None = None) -> None:
    """Write a safetensors file whole or not at all: to <path>.tmp first, then moved over ``path``; the folder
    is made."""
    from safetensors.torch import save_file
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    save_file(tensors, str(tmp), metadata=metadata)
    tmp.replace(path)


class Checkpoint:
    def __init__(self, folder: Path):
        self.folder = folder

    def path(self, phase: str) -> Path:
        return self.folder / f"{phase}.safetensors"

    def save(self, phase: str, step: int, tensors: dict, opt: torch.optim.Optimizer | None, info: dict):
        flat = {f"p.{k}": v.detach().cpu().contiguous() for k, v in tensors.items()}
        if opt is not None:
            # keyed by the parameter's index in the group: parameters that never got a gradient
            # (unused text-encoder rows/layers) have no state, so an enumeration would shift them
            for idx, st in opt.state_dict()["state"].items():
                for name, v in st.items():
                    flat[f"opt.{idx}.{name}"] = torch.as_tensor(v).detach().cpu().contiguous()
        save_safetensors(self.path(phase), flat, {"info": json.dumps({**info, "step": step, "opt_keys": "index"})})

    def load(self, phase: str, opt: torch.optim.Optimizer | None):
        from safetensors import safe_open
        p = self.path(phase)
        if not p.is_file():
            return None
        with safe_open(str(p), "pt") as f:
            info = json.loads(f.metadata()["info"])
            flat = {k: f.get_tensor(k) for k in f.keys()}
        tensors = {k[2:]: v for k, v in flat.items() if k.startswith("p.")}
        if opt is not None:
            sd = opt.state_dict()
            saved = {}
            for k, v in flat.items():
                if k.startswith("opt."):
                    _, i, name = k.split(".", 2)
                    saved.setdefault(int(i), {})[name] = v
            if info.get("opt_keys") != "index":
                saved = _realign_old_state(saved, opt)
            sd["state"] = saved
            opt.load_state_dict(sd)
        return info, tensors


def _realign_old_state(saved: dict, opt: torch.optim.Optimizer) -> dict:
    """Checkpoints written before the states were keyed by parameter index numbered them
    0..n-1 skipping stateless parameters; put each back on the parameter whose shape it has."""
    params = opt.param_groups[0]["params"]
    out, j = {}, 0
    for i in sorted(saved):
        while j < len(params) and saved[i]["exp_avg"].shape != params[j].shape:
            j += 1
        if j == len(params):
            log.warning("optimizer state of this checkpoint does not fit: starting the moments afresh")
            return {}
        out[j] = saved[i]
        j += 1
    return out


def set_lr(opt, lr: float, step: int, total: int, warmup: int, schedule: str = "cosine", anneal: int = 0):
    """Linear warmup, then cosine down to 10% ("cosine") or constant ("const": a run stopped
    early at step k equals a run with --steps k, so the UNet phase can be cut to the time left).
    ``anneal`` > 0 with "const": the last ``anneal`` steps go down to 10% on a cosine."""
    if step < warmup:
        f = (step + 1) / warmup
    elif schedule == "const":
        k = step - (total - anneal)
        f = 1.0 if anneal <= 0 or k < 0 else 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, k / anneal)))
    else:
        f = 0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warmup) / max(1, total - warmup))))
    for g in opt.param_groups:
        g["lr"] = lr * f


def resume_phase(ckpt: Checkpoint, phase: str, opt, curve: list, restore, logger: logging.Logger = log):
    """Continue a phase from its checkpoint: ``restore(tensors)`` puts the weights back, ``opt`` gets its state,
    ``curve`` the saved loss curve. Returns (the step to start from, the seconds already spent); (0, 0.0) when the
    phase has no checkpoint yet."""
    got = ckpt.load(phase, opt)
    if not got:
        return 0, 0.0
    info, tensors = got
    restore(tensors)
    curve[:] = info.get("curve", [])
    logger.info("%s: resumed at step %d", phase, info["step"])
    return info["step"], info.get("seconds", 0.0)


class EmaWeights:
    """A phase's trainable parameters (by their names in the checkpoint) and their exponential moving average:
    resumed from and saved to one checkpoint phase (the parameters under their names, the average under
    ``ema.<name>``); ``ship()`` writes the average into the model (what the Mini file ships). ``logger``: the
    trainer's own."""

    def __init__(self, named: dict[str, torch.nn.Parameter], logger: logging.Logger = log):
        self.named, self.log = named, logger
        self.ema = {k: p.detach().clone() for k, p in named.items()}

    def resume(self, ckpt: Checkpoint, phase: str, opt, curve: list) -> tuple[int, float]:
        """resume_phase for the parameters and their average."""
        return resume_phase(ckpt, phase, opt, curve, self._restore, self.log)

    def _restore(self, tensors: dict) -> None:
        with torch.no_grad():
            for k, p in self.named.items():
                p.copy_(tensors[k])
                self.ema[k] = tensors["ema." + k].clone()

    def step(self, opt, loss: torch.Tensor, step: int) -> None:
        """One optimizer step on ``loss`` (the gradient clipped to norm 1), then the average's update."""
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(list(self.named.values()), 1.0)
        opt.step()
        self.update(step)

    def update(self, step: int) -> None:
        decay = min(EMA_DECAY, (1 + step) / (10 + step))
        with torch.no_grad():
            for k, p in self.named.items():
                self.ema[k].lerp_(p.detach(), 1 - decay)

    def checkpoint(self, ckpt: Checkpoint | None, phase: str, done: int, every: int, total: int, opt,
                   curve: list, t0: float) -> bool:
        """Save every ``every`` steps, at the last step and when a STOP file is in the checkpoint folder;
        True when it was (the caller stops there)."""
        stop = ckpt is not None and (ckpt.folder / "STOP").exists()
        if ckpt and (done % every == 0 or done == total or stop):
            ckpt.save(phase, done, {**self.named, **{"ema." + k: v for k, v in self.ema.items()}}, opt,
                      {"curve": curve, "seconds": time.time() - t0})
        if stop:
            self.log.info("%s: STOP file found; stopping at step %d", phase, done)
        return stop

    def ship(self) -> None:
        with torch.no_grad():
            for k, p in self.named.items():
                p.requires_grad_(False)
                p.copy_(self.ema[k])


# ------------------------------------------------------------------------------------------
# phase 1: VAE

def borrow_vae(taesd, folder: Path, seed: int):
    """Take another family's trained TAESD (its checkpoint folder) and give it a different latent
    space: a seeded signed permutation of the 4 latent channels (encoder output rows and decoder
    input columns). Exact, because the decoder's input clamp is odd and elementwise."""
    got = Checkpoint(Path(folder)).load("vae", None)
    if not got:
        raise FileNotFoundError(f"--vae-from: no vae.safetensors in {folder}")
    taesd.load_state_dict(got[1])
    g = gen(seed, 3, 0)
    perm = torch.randperm(4, generator=g)
    sign = torch.where(torch.rand(4, generator=g) < 0.5, -1.0, 1.0)
    enc, dec = taesd.taesd_encoder[-1], taesd.taesd_decoder[1]
    with torch.no_grad():
        enc.weight.copy_(enc.weight[perm] * sign.view(4, 1, 1, 1))
        enc.bias.copy_(enc.bias[perm] * sign)
        dec.weight.copy_(dec.weight[:, perm] * sign.view(1, 4, 1, 1))
    log.info("vae: borrowed from %s (step %s), channels permuted %s, signs %s", folder, got[0]["step"],
             perm.tolist(), sign.tolist())
    return got[0]


def train_vae(taesd, images: np.ndarray, seed: int, steps: int, batch: int, ckpt: Checkpoint | None,
              every: int, resume: bool, curve: list, log_every: int = 50):
    from tqdm import tqdm
    params = list(taesd.taesd_encoder.parameters()) + list(taesd.taesd_decoder.parameters())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=VAE_LR, weight_decay=0.0, fused=True)
    start, prev = resume_phase(ckpt, "vae", opt, curve, taesd.load_state_dict) if resume and ckpt else (0, 0.0)
    n, px = images.shape[0], images.shape[1]
    cells = (px - CROP) // 8 + 1
    t0 = time.time() - prev
    bar = tqdm(range(start, steps), desc="vae", initial=start, total=steps, mininterval=10)
    avg = None
    for step in bar:
        g = gen(seed, 1, step)
        idx = torch.randint(0, n, (batch,), generator=g)
        oy = torch.randint(0, cells, (batch,), generator=g) * 8
        ox = torch.randint(0, cells, (batch,), generator=g) * 8
        crops = np.stack([images[i, y:y + CROP, x:x + CROP] for i, y, x in zip(idx.tolist(), oy.tolist(), ox.tolist())])
        x = to_tensor(crops)
        set_lr(opt, VAE_LR, step, steps, min(50, steps // 5 + 1))
        u = taesd.taesd_encoder(x)
        rec = taesd.taesd_decoder(u + VAE_NOISE * torch.randn(u.shape, generator=g))
        loss = F.l1_loss(rec, x) + F.mse_loss(rec, x) + VAE_L2 * u.pow(2).mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        avg = loss.item() if avg is None else 0.98 * avg + 0.02 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}")
        if (step + 1) % log_every == 0:
            curve.append([step + 1, round(loss.item() if log_every == 1 else avg, 5)])
        if ckpt and ((step + 1) % every == 0 or step + 1 == steps):
            ckpt.save("vae", step + 1, taesd.state_dict(), opt, {"curve": curve, "seconds": time.time() - t0})
    for p in params:
        p.requires_grad_(False)
    return {"loss": avg, "steps": steps, "seconds": time.time() - t0}


@torch.no_grad()
def encode_all(taesd, images: np.ndarray, batch: int = 64) -> torch.Tensor:
    """Raw encoder outputs u for every image (N, 4, H/8, W/8)."""
    from tqdm import tqdm
    out = [taesd.taesd_encoder(to_tensor(images[i:i + batch]))
           for i in tqdm(range(0, len(images), batch), desc="encode", mininterval=10)]
    return torch.cat(out)


@torch.no_grad()
def calibrate(taesd, u: torch.Tensor, scale_factor: float) -> torch.Tensor:
    """Set vae_scale/vae_shift so that z * scale_factor ~ mean 0, std 1; return model-space x0."""
    m, s = u.mean().item(), u.std().item()
    taesd.vae_scale.fill_(s * scale_factor)
    taesd.vae_shift.fill_(-m / (s * scale_factor))
    z = u / taesd.vae_scale + taesd.vae_shift  # what TAESD.encode returns (ComfyUI's LATENT)
    log.info("vae latent: raw mean %.3f std %.3f -> vae_scale %.4f vae_shift %.4f", m, s,
             taesd.vae_scale.item(), taesd.vae_shift.item())
    return z * scale_factor


# ------------------------------------------------------------------------------------------
# phase 2: UNet + text encoder

def encode_text(cond_model, family: str, toks: dict[str, torch.Tensor]):
    """(context, pooled) exactly as ComfyUI's CLIP.encode_from_tokens computes them (weights 1)."""
    if family == "sd15":
        return cond_model.clip_l(toks["l"].tolist())
    l_out, _ = cond_model.clip_l(toks["l"].tolist())
    g_out, g_pooled = cond_model.clip_g(toks["g"].tolist())
    return torch.cat([l_out, g_out], dim=-1), g_pooled


def eps_loss(base, cond_model, family: str, px: int, x0, toks, g: torch.Generator):
    """One eps-prediction loss on ComfyUI's discrete schedule."""
    ms = base.model_sampling
    b = x0.shape[0]
    t = torch.randint(0, len(ms.sigmas), (b,), generator=g)
    sigma = ms.sigmas[t].float()
    eps = torch.randn(x0.shape, generator=g)
    xt = x0 + eps * sigma.view(-1, 1, 1, 1)
    context, pooled = encode_text(cond_model, family, toks)
    y = base.encode_adm(pooled_output=pooled, width=px, height=px) if family == "sdxl" else None
    out = base.diffusion_model(ms.calculate_input(sigma, xt), ms.timestep(sigma).float(), context=context, y=y)
    return F.mse_loss(out.float(), eps)


def _clip_layer_forward(self, x, mask=None, optimized_attention=None):
    """comfy.clip_model.CLIPLayer.forward without its in-place adds (which autograd rejects)."""
    x = x + self.self_attn(self.layer_norm1(x), mask, optimized_attention)
    return x + self.mlp(self.layer_norm2(x))


def make_trainable_clip(cond_model):
    """Give this instance's CLIP layers an out-of-place forward (same maths; instance-only patch)."""
    import types
    import comfy.clip_model
    for m in cond_model.modules():
        if isinstance(m, comfy.clip_model.CLIPLayer):
            m.forward = types.MethodType(_clip_layer_forward, m)


def _t5_attn_forward(self, x, mask=None, past_bias=None, optimized_attention=None):
    """comfy.text_encoders.t5.T5LayerSelfAttention.forward without its in-place add."""
    output, past_bias = self.SelfAttention(self.layer_norm(x), mask=mask, past_bias=past_bias,
                                           optimized_attention=optimized_attention)
    return x + output, past_bias


def _t5_ff_forward(self, x):
    """comfy.text_encoders.t5.T5LayerFF.forward without its in-place add."""
    return x + self.DenseReluDense(self.layer_norm(x))


def make_trainable_t5(cond_model):
    import types
    import comfy.text_encoders.t5 as t5
    for m in cond_model.modules():
        if isinstance(m, t5.T5LayerSelfAttention):
            m.forward = types.MethodType(_t5_attn_forward, m)
        elif isinstance(m, t5.T5LayerFF):
            m.forward = types.MethodType(_t5_ff_forward, m)


def caption_tokens(clip, captions: list[str]):
    """Variable-length token ids (T5: no padding, as ComfyUI encodes them): (key, rows, empty)."""
    memo: dict[str, list[int]] = {}

    def ids(text: str) -> list[int]:
        if text not in memo:
            (key_, sec), = clip.tokenize(text).items()
            memo[text] = [t for t, _w in sec[0]]
        return memo[text]

    (key, _), = clip.tokenize("a").items()
    return key, [ids(c) for c in captions], ids("")


def draw_same_length(rows: list[list[int]], by_len: dict[int, torch.Tensor], batch: int, g: torch.Generator):
    """A batch of data indices whose captions have one token length (a batch's text tokens are not
    padded), the length drawn with the data's own frequencies."""
    i0 = int(torch.randint(0, len(rows), (1,), generator=g))
    bucket = by_len[len(rows[i0])]
    return bucket[torch.randint(0, len(bucket), (batch,), generator=g)]


def noised(ms, param: str, x0, g: torch.Generator):
    """(sigma, x_t, target) for one loss: eps / v on the model's discrete schedule, or flow matching
    (x_t = (1 - t) x0 + t eps, target eps - x0, t logit-normal as in SD3) for CONST model_sampling."""
    b = x0.shape[0]
    eps = torch.randn(x0.shape, generator=g)
    if param == "flow":
        sigma = torch.sigmoid(torch.randn(b, generator=g))
        s = sigma.view(-1, 1, 1, 1)
        return sigma, (1 - s) * x0 + s * eps, eps - x0
    t = torch.randint(0, len(ms.sigmas), (b,), generator=g)
    sigma = ms.sigmas[t].float()
    s = sigma.view(-1, 1, 1, 1)
    xt = x0 + eps * s
    if param == "v":  # ComfyUI's V_PREDICTION: denoised = x sd^2/(s^2+sd^2) - out s sd/sqrt(s^2+sd^2)
        sd = ms.sigma_data
        target = (eps * sd - x0 * s) / (s ** 2 + sd ** 2) ** 0.5
        return sigma, xt, target
    return sigma, xt, eps


def check_param(ms, param: str, family: str) -> None:
    """The parameterisation must be the one ComfyUI's model_sampling of the family inverts."""
    import comfy.model_sampling as cms
    kind = "flow" if isinstance(ms, cms.CONST) else "v" if isinstance(ms, cms.V_PREDICTION) else \
        "eps" if isinstance(ms, cms.EPS) else type(ms).__name__
    if param != kind:
        raise ValueError(f"--param {param}: the {family} model samples as {kind!r} "
                         f"({type(ms).__name__}); train it with --param {kind}")


def dit_loss(base, cond_model, key: str, param: str, x0, toks: list[list[int]], g: torch.Generator):
    """One loss of a DiT with a T5-type encoder: rows are grouped by token length (each group
    encoded and denoised on its own, as ComfyUI would), the loss taken over the whole batch."""
    ms = base.model_sampling
    sigma, xt, target = noised(ms, param, x0, g)
    xin, ts = ms.calculate_input(sigma.view(-1, 1, 1, 1), xt), ms.timestep(sigma).float()
    groups: dict[int, list[int]] = {}
    for j, t in enumerate(toks):
        groups.setdefault(len(t), []).append(j)
    outs, order = [], []
    encoder = getattr(cond_model, key)
    for _n, js in sorted(groups.items()):
        context = encoder([toks[j] for j in js])[0]
        outs.append(base.diffusion_model(xin[js], ts[js], context=context))
        order += js
    out = torch.cat(outs)[torch.argsort(torch.tensor(order))]
    return F.mse_loss(out.float(), target)


def trainable(base, cond_model) -> dict[str, torch.nn.Parameter]:
    named = {f"unet.{k}": p for k, p in base.diffusion_model.named_parameters()}
    named.update({f"clip.{k}": p for k, p in cond_model.named_parameters()})
    return named


def train_unet(base, cond_model, family: str, px: int, x0_all, toks, empty, seed: int, steps: int,
               batch: int, lr: float, ckpt: Checkpoint | None, every: int, resume: bool, curve: list,
               log_every: int = 100, anneal: int = 0, batch_loss=None, init_from: str | Path | None = None):
    """``batch_loss(g)``: the step's loss from the step's generator (a DiT family's); default: the
    UNet families' eps loss on fixed-length CLIP tokens. ``init_from``: a unet checkpoint whose EMA
    weights a fresh run starts from (step 0, fresh optimizer; ignored when resuming)."""
    from tqdm import tqdm
    make_trainable_clip(cond_model)
    make_trainable_t5(cond_model)
    named = trainable(base, cond_model)
    params = list(named.values())
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.01, fused=True)
    ema = EmaWeights(named)
    start, prev = ema.resume(ckpt, "unet", opt, curve) if resume and ckpt else (0, 0.0)
    if start == 0 and init_from:
        got = Checkpoint(Path(init_from).parent).load(Path(init_from).stem, None)
        if not got:
            raise FileNotFoundError(f"--init-from: no checkpoint at {init_from}")
        with torch.no_grad():
            for k, p in named.items():
                p.copy_(got[1]["ema." + k])
                ema.ema[k] = p.detach().clone()
        log.info("unet: initialised from the EMA weights of %s (step %s)", init_from, got[0]["step"])
    n = x0_all.shape[0]
    t0 = time.time() - prev
    bar = tqdm(range(start, steps), desc=f"unet {family}", initial=start, total=steps, mininterval=10)
    avg, done = None, max(start, 0)
    if start >= steps:
        done = start
    for step in bar:
        g = gen(seed, 2, step)
        set_lr(opt, lr, step, steps, min(200, steps // 10 + 1), "const", anneal)
        if batch_loss is not None:
            loss = batch_loss(g)
        else:
            idx = torch.randint(0, n, (batch,), generator=g)
            drop = torch.rand(batch, generator=g) < CAPTION_DROP
            tk = {k: torch.where(drop[:, None], empty[k][None], v[idx]) for k, v in toks.items()}
            loss = eps_loss(base, cond_model, family, px, x0_all[idx], tk, g)
        ema.step(opt, loss, step)
        avg = loss.item() if avg is None else 0.99 * avg + 0.01 * loss.item()
        bar.set_postfix(loss=f"{avg:.4f}")
        if (step + 1) % log_every == 0:
            curve.append([step + 1, round(loss.item() if log_every == 1 else avg, 5)])
            if log_every > 1:
                log.info("unet step %d loss %.4f", step + 1, avg)
        done = step + 1
        if ema.checkpoint(ckpt, "unet", done, every, steps, opt, curve, t0):
            break
    ema.ship()
    return {"loss": avg, "steps": done, "seconds": time.time() - t0}


# ------------------------------------------------------------------------------------------
# the whole run

def train(family: str, seed: int = 0, steps: int = 6000, vae_steps: int = 600, data: int | None = None,
          batch: int | None = None, lr: float | None = None, out: str | Path | None = None,
          ckpt_dir: str | Path | None = None, resume: bool = False, every: int = 250,
          vae_batch: int | None = None, log_every: int | None = None, vae_from: str | Path | None = None,
          anneal: int = 0, param: str | None = None, data_only: bool = False,
          init_from: str | Path | None = None) -> dict:
    """Train one family; write the Mini file to ``out`` (if given); return a summary dict.

    ``log_every``: loss-curve interval (default 50 VAE / 100 UNet steps; 1 records every step's
    raw loss instead of the running mean)."""
    tiny, world, fmt = comfy_modules()
    d = DEFAULTS[family]
    data, batch, lr = data or d["data"], batch or d["batch"], lr or d["lr"]
    vae_batch = vae_batch or d["vae_batch"]
    ckpt = Checkpoint(Path(ckpt_dir)) if ckpt_dir else None
    t0 = time.time()
    torch.manual_seed(seed)
    if "vae_weights" in d:
        return train_dit(family, seed, steps, data, batch, lr, out, ckpt, resume, every, log_every, anneal,
                         param or d["param"], data_only, init_from)
    px = tiny.FAMILIES[family]["native_px"]

    patcher = tiny.build_model(family, seed)
    base = patcher.model
    with torch.no_grad():
        for name, p in base.diffusion_model.named_parameters():
            if any(z in name for z in ZERO_INIT):
                p.zero_()
    clip = tiny.build_clip(family, seed)
    cond_model = clip.cond_stage_model
    import comfy.taesd.taesd
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    taesd.load_state_dict(tiny.taesd_state_dict(seed, tiny.FAMILIES[family]["vae_scale"]))

    images, captions, toks, empty = load_data(world, clip, family, seed, data, px, ckpt.folder if ckpt else None)
    log.info("data: %d images at %d px, %d distinct captions (%.0f s)", len(images), px, len(set(captions)),
             time.time() - t0)

    vae_curve: list = []
    if vae_from:
        info = borrow_vae(taesd, Path(vae_from), seed)
        vae_curve, vae_steps, vae_loss, vae_seconds = info.get("curve", []), info["step"], None, 0.0
    else:
        r = train_vae(taesd, images, seed, vae_steps, vae_batch, ckpt, every, resume, vae_curve, log_every or 50)
        vae_loss, vae_seconds = r["loss"], r["seconds"]
    t_vae = time.time() - t0
    scale_factor = base.latent_format.scale_factor
    x0_all = calibrate(taesd, encode_all(taesd, images), scale_factor).float()
    log.info("vae done: loss %s, %.0f s", vae_loss, t_vae)

    unet_curve: list = []
    r = train_unet(base, cond_model, family, px, x0_all, toks, empty, seed, steps, batch, lr,
                   ckpt, every, resume, unet_curve, log_every or 100, anneal)
    unet_loss, steps = r["loss"], r["steps"]
    if unet_loss is None and unet_curve:  # nothing left to train (export of a finished checkpoint)
        unet_loss = unet_curve[-1][1]
    if vae_loss is None and vae_curve:
        vae_loss = vae_curve[-1][1]
    seconds = vae_seconds + r["seconds"]
    summary = {
        "family": family, "seed": seed, "steps": steps, "vae_steps": vae_steps, "batch": batch,
        "vae_batch": vae_batch, "vae_from": str(vae_from or ""), "lr": lr, "anneal": anneal, "data": data,
        "px": px,
        "train_seconds": round(seconds, 1), "hardware": hardware(),
        "final_vae_loss": vae_loss, "final_unet_loss": unet_loss,
        "vae_curve": vae_curve, "unet_curve": unet_curve,
    }
    if out:
        write_weights(out, fmt, family, base, cond_model, taesd, toks, empty, summary, world)
    return summary


def train_dit(family: str, seed: int, steps: int, data: int, batch: int, lr: float, out, ckpt: Checkpoint | None,
              resume: bool, every: int, log_every: int | None, anneal: int, param: str, data_only: bool,
              init_from=None) -> dict:
    """A DiT family (DEFAULTS[family]["vae_weights"]): the VAE of a shipped Mini (not trained here),
    world latents through it (phase "latents", cached), then DiT + T5 jointly (phase "unet")."""
    tiny, world, fmt = comfy_modules()
    mini = mini_module()
    d = DEFAULTS[family]
    px = d["px"]
    t0 = time.time()
    patcher = mini.build_model(family, seed, param if param in mini.PREDICTIONS else "eps")
    base = patcher.model
    check_param(base.model_sampling, param, family)
    with torch.no_grad():  # adaLN-zero: residual gates start at zero (as in DiT/PixArt training)
        for name, p in base.diffusion_model.named_parameters():
            if name.startswith("final_layer.linear") or name.endswith(("cross_attn.proj.weight",
                                                                       "cross_attn.proj.bias")):
                p.zero_()
            if name.endswith("scale_shift_table") and name.startswith("blocks."):
                p[2].zero_(), p[5].zero_()  # gate_msa, gate_mlp
    clip = mini.build_clip(family, seed)
    cond_model = clip.cond_stage_model
    import comfy.taesd.taesd
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4).eval()
    vae_path = ROOT / "weights" / d["vae_weights"]
    vae_from_weights(taesd, vae_path, fmt)
    x0_all, captions = encode_world(world, taesd, seed, data, px, base.latent_format.scale_factor,
                                    ckpt.folder if ckpt else None, scene_px=d.get("scene_px"))
    t_data = time.time() - t0
    if data_only:
        return {"family": family, "data": len(x0_all), "data_seconds": round(t_data, 1)}
    key, rows, empty = caption_tokens(clip, captions)
    lengths = torch.tensor([len(r) for r in rows])
    by_len = {int(n): torch.nonzero(lengths == n).flatten() for n in lengths.unique()}
    log.info("data: %d latents at %d px (%.0f s), %d distinct captions, token lengths %s", len(rows), px, t_data,
             len(set(captions)), sorted(by_len))

    def batch_loss(g):
        idx = draw_same_length(rows, by_len, batch, g)
        drop = torch.rand(batch, generator=g) < CAPTION_DROP
        toks = [empty if dr else rows[i] for i, dr in zip(idx.tolist(), drop.tolist())]
        return dit_loss(base, cond_model, key, param, x0_all[idx], toks, g)

    unet_curve: list = []
    r = train_unet(base, cond_model, family, px, x0_all, None, None, seed, steps, batch, lr, ckpt, every, resume,
                   unet_curve, log_every or 100, anneal, batch_loss=batch_loss, init_from=init_from)
    unet_loss = r["loss"] if r["loss"] is not None else (unet_curve[-1][1] if unet_curve else None)
    summary = {
        "family": family, "seed": seed, "steps": r["steps"], "vae_steps": 0, "batch": batch, "vae_batch": 0,
        "vae_from": str(vae_path.name), "lr": lr, "anneal": anneal, "data": data, "px": px, "param": param,
        "scene_px": d.get("scene_px") or px, "init_from": str(init_from or ""),
        "train_seconds": round(r["seconds"], 1), "data_seconds": round(t_data, 1), "hardware": hardware(),
        "final_vae_loss": None, "final_unet_loss": unet_loss, "vae_curve": [], "unet_curve": unet_curve,
    }
    if out:
        ids = torch.tensor(sorted({t for row in rows for t in row} | set(empty)))
        write_weights(out, fmt, family, base, cond_model, taesd, None, None, summary, world, token_ids=ids)
    return summary


def write_weights(path, fmt, family, base, cond_model, taesd, toks, empty, summary, world, token_ids=None):
    ids = token_ids if token_ids is not None else torch.cat(
        [v.flatten() for v in toks.values()] + [v.flatten() for v in empty.values()]).unique()
    emb_keys = tuple(f"clip.{k}" for k in cond_model.state_dict()
                     if k.endswith(("token_embedding.weight", "transformer.shared.weight")))
    flat = fmt.pack({"unet": base.diffusion_model.state_dict(), "clip": cond_model.state_dict(),
                     "vae": taesd.state_dict()}, token_ids=ids, embedding_keys=emb_keys)
    meta = {k: str(summary[k]) for k in ("family", "seed", "steps", "vae_steps", "batch", "lr", "anneal", "data", "px",
                                         "train_seconds", "hardware", "vae_from", "param", "scene_px", "data_seconds",
                                         "init_from")
            if k in summary}
    meta.update({"format": fmt.FORMAT, "vocabulary": json.dumps(list(world.VOCABULARY)),
                 "loss": json.dumps({"vae": summary["final_vae_loss"], "unet": summary["final_unet_loss"]}),
                 "curve": json.dumps({"vae": summary["vae_curve"][-40:], "unet": summary["unet_curve"][-200:]}),
                 "storage": "int8 per-output-channel weights (rank>=2, >=4096 elements), fp16 rest; "
                            "token embeddings: used rows only",
                 "recipe": "tools/train_mini.py",
                 "train_seconds_note": "VAE + UNet phase wall time (world rendering and latent encoding "
                                       "excluded); on a shared machine"})
    path = Path(path)
    save_safetensors(path, flat, meta)
    log.info("wrote %s (%.2f MB)", path, path.stat().st_size / 1e6)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--family", choices=sorted(DEFAULTS), required=True)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--steps", type=int, default=6000, help="UNet + text encoder steps")
    ap.add_argument("--vae-steps", type=int, default=250)
    ap.add_argument("--vae-batch", type=int, default=16)
    ap.add_argument("--vae-from", default=None,
                    help="checkpoint folder of another family's run: reuse its VAE with permuted latent channels")
    ap.add_argument("--data", type=int, default=None, help="world samples to train on")
    ap.add_argument("--batch", type=int, default=None)
    ap.add_argument("--lr", type=float, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch CPU threads")
    ap.add_argument("--every", type=int, default=250, help="checkpoint every N steps")
    ap.add_argument("--out", default=None, help="weights file (default weights/atelier_mini_<family>.safetensors)")
    ap.add_argument("--ckpt-dir", default=None, help="default out/mini_ckpt/<family>_seed<seed>")
    ap.add_argument("--resume", action="store_true", help="continue from the checkpoints in --ckpt-dir")
    ap.add_argument("--param", choices=PARAMS, default=None,
                    help="DiT families: eps / v on the discrete schedule, or flow (flow matching, CONST models)")
    ap.add_argument("--data-only", action="store_true", help="DiT families: render and encode the data, then stop")
    ap.add_argument("--init-from", default=None,
                    help="a unet.safetensors checkpoint: start (step 0, fresh optimizer) from its EMA weights")
    ap.add_argument("--anneal", type=int, default=0,
                    help="the last N UNet steps lower the learning rate to 10%% on a cosine (default 0: constant)")
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    torch.set_num_threads(args.threads)
    out = args.out or ROOT / "weights" / f"atelier_mini_{args.family}.safetensors"
    ckpt_dir = args.ckpt_dir or ROOT / "out" / "mini_ckpt" / f"{args.family}_seed{args.seed}"
    summary = train(args.family, args.seed, args.steps, args.vae_steps, args.data, args.batch, args.lr, out,
                    ckpt_dir, args.resume, args.every, args.vae_batch, None, args.vae_from, args.anneal,
                    args.param, args.data_only, args.init_from)
    print(json.dumps({k: v for k, v in summary.items() if not k.endswith("curve")}, indent=1))


if __name__ == "__main__":
    main()
