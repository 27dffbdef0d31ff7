"""Training of the latent edge predictor (and the fast form's denoised-latent head) and its resumable
checkpoint format. Pure torch (+ safetensors): no ComfyUI imports.

What needs ComfyUI comes in as callables, from the node (nodes/sketch.py):

* ``features(idx, t, noise)`` -> (features (B, C, H, W), denoised latent (B, 4, H, W)): noise the training
  latents ``idx`` at timesteps ``t`` with the generator ``noise``, run the UNet's feature forward, return
  the concatenated LEP-layer activations and the model's denoised prediction, as ordinary (non-inference)
  tensors;
* ``progress(done, total)``, ``check_interrupt()`` and ``interruptible(module, depth=...)`` (a context
  manager that checks for Cancel before each child module runs).

One step: a batch of ``batch_size`` random training images and random timesteps (a ``random.Random``),
features of the noised latents (noise from a ``torch.Generator``), one Adam step of the LEP on
||P(F) - E||^2, then one Adam step of the head on ||H(x0_hat, t) - E||^2 on the same batch.

Checkpoint (safetensors; metadata ``atelier = lep_resume``, ``step`` and the training's identity):
``lep.*`` / ``head.*`` weights and buffers, ``adam.<param>.{exp_avg,exp_avg_sq,step}`` and
``adam_head.*`` likewise, ``losses`` / ``head_losses``, and the two random states (``rng.batches``: the
batch sampler's Mersenne-Twister state, ``rng.noise``: the noise generator's state), so a resumed
training continues bit-exactly where the interrupted one stopped. A checkpoint without the random states
(older versions) resumes with the batch sampler seeded from (seed, step), as those versions did.
"""
from __future__ import annotations

import contextlib
import random
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from . import lep as L
from .knn_common import atomic_write_bytes

RESUME_KIND = "lep_resume"


def _no_guard(_module, depth: int = 1):
    return contextlib.nullcontext()


def tail_mean(values, n: int = 20) -> float:
    """The mean of the last ``n`` losses (the reported final loss), NaN for none."""
    return float(np.mean(values[-max(1, min(n, len(values))):])) if values else float("nan")


class LEPTraining:
    """One training run: the two modules, their Adam optimisers, the losses so far and the random state."""

    def __init__(self, features: Callable, targets: torch.Tensor, *, learning_rate: float, seed: int, device):
        self.features, self.targets = features, targets
        self.seed, self.device = int(seed), device
        self.noise = torch.Generator().manual_seed(self.seed)
        with torch.inference_mode(False):
            probe, probe_x0 = features([0], torch.tensor([500]), self.noise)
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(self.seed)
                out = int(targets.shape[1])      # the family's latent channels (4; 16 for Flux and SD3)
                self.lep = L.LatentEdgePredictor(probe.shape[1], out_channels=out).to(device)
                self.head = L.DenoisedEdgeHead(probe_x0.shape[1], out_channels=out).to(device)
            self.opt = torch.optim.Adam(self.lep.parameters(), lr=learning_rate)
            self.opt_head = torch.optim.Adam(self.head.parameters(), lr=learning_rate)
        self.channels = int(probe.shape[1])
        self.step = 0
        self.losses: list[float] = []
        self.head_losses: list[float] = []
        self.batches: random.Random | None = None   # made at the first run (seeded from the step reached)

    # ------------------------------------------------------------------ the loop

    def run(self, steps: int, batch_size: int, *, save_every: int = 0, save: Callable | None = None,
            progress: Callable | None = None, check_interrupt: Callable | None = None,
            interruptible: Callable | None = None) -> "LEPTraining":
        """Train from ``self.step`` to ``steps``; ``save(self)`` every ``save_every`` steps (not at the end)."""
        check = check_interrupt or (lambda: None)
        guard = interruptible or _no_guard
        if self.batches is None:
            self.batches = random.Random(self.seed * 7919 + self.step)
        rng, dev, n = self.batches, self.device, len(self.targets)
        lep, head, opt, opt_head = self.lep, self.head, self.opt, self.opt_head
        if progress is not None:
            progress(self.step, steps)       # the bar shows where training starts (0, or the resumed step) at once
        with guard(lep.net, depth=1), guard(head.net, depth=1):
            for step in range(self.step, steps):
                check()
                idx = [rng.randrange(n) for _ in range(batch_size)]
                t = torch.tensor([rng.randrange(1000) for _ in idx])
                feats, x0_hat = self.features(idx, t, self.noise)
                with torch.inference_mode(False), torch.enable_grad():
                    lep.train()
                    target = self.targets[idx].to(dev)
                    pred = lep(feats, t.to(dev))
                    loss = L.lep_loss(pred, target).mean()
                    opt.zero_grad(set_to_none=True)
                    loss.backward()
                    opt.step()
                    del feats, pred
                    check()
                    head_loss = L.lep_loss(head(x0_hat, t.to(dev)), target).mean()
                    opt_head.zero_grad(set_to_none=True)
                    head_loss.backward()
                    opt_head.step()
                self.losses.append(float(loss.detach()))
                self.head_losses.append(float(head_loss.detach()))
                self.step = step + 1
                if save is not None and save_every and self.step % save_every == 0 and self.step < steps:
                    save(self)
                if progress is not None:
                    progress(self.step, steps)
        lep.eval()
        head.eval()
        return self

    @property
    def final_loss(self) -> float:
        return tail_mean(self.losses)

    @property
    def final_head_loss(self) -> float:
        return tail_mean(self.head_losses)

    # ------------------------------------------------------------------ checkpoint

    def checkpoint_tensors(self) -> dict[str, torch.Tensor]:
        t = {f"lep.{k}": v for k, v in L.state_to_tensors(self.lep).items()}
        t.update({f"head.{k}": v for k, v in L.state_to_tensors(self.head).items()})
        t.update(adam_tensors(self.lep, self.opt, "adam."))
        t.update(adam_tensors(self.head, self.opt_head, "adam_head."))
        t["losses"] = torch.tensor(self.losses, dtype=torch.float32)
        t["head_losses"] = torch.tensor(self.head_losses, dtype=torch.float32)
        if self.batches is not None:
            version, mt, _gauss = self.batches.getstate()
            t["rng.batches"] = torch.tensor([version, *mt], dtype=torch.int64)
        t["rng.noise"] = self.noise.get_state().clone()
        return t

    def checkpoint_bytes(self, identity: dict) -> bytes:
        from safetensors.torch import save
        meta = {"atelier": RESUME_KIND, "step": str(self.step), **{k: str(v) for k, v in identity.items()}}
        return save(self.checkpoint_tensors(), metadata=meta)

    def save_checkpoint(self, path, identity: dict) -> None:
        """Write the resumable checkpoint atomically, recording the training's ``identity`` in its metadata."""
        atomic_write_bytes(Path(path), self.checkpoint_bytes(identity))

    def restore(self, tensors: dict[str, torch.Tensor], meta: dict) -> bool:
        """Continue from a checkpoint's tensors and metadata (RuntimeError/KeyError/ValueError when it does not
        fit). Returns whether it held the denoised-latent head (older checkpoints: the head starts afresh)."""
        t = tensors
        with torch.inference_mode(False):
            self.lep.load_state_dict({k[4:]: v for k, v in t.items() if k.startswith("lep.")})
            load_adam(self.lep, self.opt, t, "adam.")
            head_sd = {k[5:]: v for k, v in t.items() if k.startswith("head.")}
            if head_sd:
                self.head.load_state_dict(head_sd)
                load_adam(self.head, self.opt_head, t, "adam_head.")
        step = int(meta["step"])
        losses = t["losses"].tolist()
        head_losses = t["head_losses"].tolist() if "head_losses" in t else []
        batches = None
        if "rng.batches" in t:
            state = [int(v) for v in t["rng.batches"].tolist()]
            batches = random.Random()
            batches.setstate((state[0], tuple(state[1:]), None))
        if "rng.noise" in t:
            self.noise.set_state(t["rng.noise"].to(torch.uint8).clone())
        self.step, self.losses, self.head_losses, self.batches = step, losses, head_losses, batches
        return bool(head_sd)


def adam_tensors(module: torch.nn.Module, opt: torch.optim.Optimizer, prefix: str) -> dict[str, torch.Tensor]:
    """Adam's per-parameter state as named tensors: <prefix><param>.{exp_avg, exp_avg_sq, step}."""
    names = {id(p): n for n, p in module.named_parameters()}
    t = {}
    for group in opt.param_groups:
        for p in group["params"]:
            st = opt.state.get(p, {})
            for k in ("exp_avg", "exp_avg_sq"):
                if k in st:
                    t[f"{prefix}{names[id(p)]}.{k}"] = st[k].detach().cpu().contiguous()
            if "step" in st:
                t[f"{prefix}{names[id(p)]}.step"] = torch.as_tensor(st["step"]).float().reshape(1).cpu()
    return t


def load_adam(module: torch.nn.Module, opt: torch.optim.Optimizer, t: dict, prefix: str) -> None:
    dev = next(module.parameters()).device
    for n, p in module.named_parameters():
        if f"{prefix}{n}.exp_avg" in t:
            opt.state[p] = {"exp_avg": t[f"{prefix}{n}.exp_avg"].to(dev).clone(),
                            "exp_avg_sq": t[f"{prefix}{n}.exp_avg_sq"].to(dev).clone(),
                            "step": t[f"{prefix}{n}.step"].reshape(()).clone()}
