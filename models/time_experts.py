"""Time experts: which expert denoises at which noise level (RAPHAEL Time-MoE, eDiff-I, PanGu-Draw).

Pure torch + stdlib. Tensors and numbers in, tensors and numbers out; the ComfyUI glue lives in
../nodes/time_experts.py.

Conventions
-----------
* Experts are ordered from the highest noise to the lowest: expert 0 denoises first (structure,
  SDXL base), the last expert denoises last (texture, refiner).
* A boundary list has n_experts - 1 entries and is turned into descending sigma thresholds
  ``th[0] > th[1] > ...``. A denoising call at sigma ``s`` goes to the first expert ``i`` with
  ``s >= th[i]``, the last expert if none: expert i owns the half-open interval [th[i], th[i-1]).
* Timestep boundaries live in [0, 1000]: timestep t owns sigma(t) from the model's sigma table
  (log-linear interpolation, the same as ComfyUI's ModelSamplingDiscrete.sigma); 0 means "every
  call goes to the experts above" and 1000 means "no call does" (timesteps run 0..999), so the
  extremes reproduce a single expert exactly.
* "auto" splits [sigma_min, sigma_max] into n equal parts of log-SNR (= -2 log sigma), eDiff-I style.

Timesteps on flow schedules (Flux, SD3: ``FlowTimesteps``)
---------------------------------------------------------
A flow model's noise level is its sigma in (0, 1] (z_t = (1 - sigma)·x0 + sigma·eps) and its own conditioning
timestep is proportional to it (ComfyUI: SD3 ``timestep(sigma) = 1000·sigma``, Flux ``timestep(sigma) = sigma``,
which the Flux network multiplies by 1000). A timestep boundary t there means ``sigma = t / 1000`` (times
sigma_max, which is 1): the model's own timestep, so t = 500 is sigma 0.5 (signal = noise) whatever the shift
(ModelSamplingFlux / ModelSamplingSD3 move the steps along the schedule, never the boundary). "auto" splits
the log noise-to-signal ratio log(sigma / (1 - sigma)) between t = 1 and t = 999 into n equal parts (symmetric
around sigma 0.5), again independent of the shift. A discrete (DDPM) model keeps its 1000-entry sigma table
(``TableTimesteps``): t is an index of that table, as above.

Route record (``new_record``/``record_call``/``draw_routes``), shared with the space-experts work
-------------------------------------------------------------------------------------------------
A plain dict (JSON-serialisable)::

    {"format": "atelier.routes/1",
     "experts": ["expert 1", "expert 2"],          # display names, index = expert id
     "runs": [                                      # newest last, at most MAX_RUNS kept
        {"sample_sigmas": [14.6, ..., 0.0],          # the sampler's schedule (may be empty)
         "calls": [{"sigma": 14.6, "timestep": 999.0, "expert": 0,
                    "regions": [...optional, see below]}, ...]}]}

``regions`` (optional, written by space experts): a list of {"expert": k, "label": str,
"fraction": f} giving the share of the image each space expert owned during that call. The drawing
shows one column per call (left = first call = highest noise), the time expert as the colour of the
top band, and, when present, the regions stacked in the lower band in proportion to ``fraction``.
"""
from __future__ import annotations

import bisect
import math
from typing import Sequence

import torch

FORMAT = "atelier.routes/1"
MAX_RUNS = 8
T_MAX = 1000  # exclusive top edge of the timestep range (timesteps are 0..999)

# Colour per expert id (RGB 0..1); cycles after 8.
PALETTE = [(0.90, 0.33, 0.20), (0.20, 0.52, 0.90), (0.30, 0.75, 0.35), (0.95, 0.75, 0.15),
           (0.60, 0.35, 0.80), (0.20, 0.80, 0.80), (0.85, 0.45, 0.65), (0.55, 0.55, 0.55)]


# ---------------------------------------------------------------- conversions on a sigma table
def _table(sigma_table) -> torch.Tensor:
    t = torch.as_tensor(sigma_table, dtype=torch.float64).flatten()
    if t.numel() < 2 or not bool((t[1:] >= t[:-1]).all()) or not bool((t > 0).all()):
        raise ValueError("sigma table must be positive and ascending (ComfyUI's model_sampling.sigmas)")
    return t


def timestep_to_sigma(t: float, sigma_table) -> float:
    """Sigma of a (fractional) timestep, log-linear between table entries; 0 → sigma_min."""
    tab = _table(sigma_table)
    n = tab.numel()
    t = min(max(float(t), 0.0), n - 1.0)
    lo, hi = int(math.floor(t)), int(math.ceil(t))
    w = t - lo
    return float(torch.exp((1 - w) * tab[lo].log() + w * tab[hi].log()))


def log_table(sigma_table) -> list[float]:
    """log sigma per timestep as a plain list (for fast per-call lookups)."""
    return [math.log(float(x)) for x in _table(sigma_table)]


def timestep_from_logs(sigma: float, logs: Sequence[float]) -> float:
    """sigma_to_timestep on a precomputed ``log_table``: a bisection, no tensors (per denoising call)."""
    s = float(sigma)
    if s <= 0 or math.log(s) <= logs[0]:
        return 0.0
    ls = math.log(s)
    if ls >= logs[-1]:
        return float(len(logs) - 1)
    hi = bisect.bisect_left(logs, ls)
    lo = hi - 1
    return lo + (ls - logs[lo]) / max(logs[hi] - logs[lo], 1e-12)


def sigma_to_timestep(sigma: float, sigma_table) -> float:
    """Continuous timestep of a sigma (inverse of timestep_to_sigma), clamped to [0, n-1]."""
    return timestep_from_logs(sigma, log_table(sigma_table))


class TableTimesteps:
    """Timesteps of a discrete (DDPM) model: indices of its ascending sigma table (0..n-1)."""
    kind = "table"
    t_min = 0.0  # the lowest timestep a calibration measures at

    def __init__(self, sigma_table):
        self.table = _table(sigma_table)
        self.logs = log_table(self.table)

    def to_sigma(self, t: float) -> float:
        return timestep_to_sigma(t, self.table)

    def from_sigma(self, sigma: float) -> float:
        return timestep_from_logs(sigma, self.logs)

    def auto(self, n: int) -> list[float]:
        lo, hi = math.log(float(self.table[0])), math.log(float(self.table[-1]))
        return [math.exp(hi - (hi - lo) * k / n) for k in range(1, n)]


class FlowTimesteps:
    """Timesteps of a flow model (sigma in (0, sigma_max], sigma_max = 1): t = T_MAX·sigma/sigma_max, the model's
    own timestep scaled to 0..1000 (see the module docstring)."""
    kind = "flow"
    t_min = 1.0  # sigma 0 carries no noise: every expert's x0 error is 0 there

    def __init__(self, sigma_max: float = 1.0):
        self.sigma_max = float(sigma_max)
        if not (self.sigma_max > 0 and math.isfinite(self.sigma_max)):
            raise ValueError("FlowTimesteps: sigma_max must be a positive number")

    def to_sigma(self, t: float) -> float:
        return min(max(float(t), 0.0), float(T_MAX)) / T_MAX * self.sigma_max

    def from_sigma(self, sigma: float) -> float:
        return min(max(float(sigma) / self.sigma_max * T_MAX, 0.0), float(T_MAX))

    def auto(self, n: int) -> list[float]:
        def lr(t):  # log noise-to-signal ratio at timestep t
            s = self.to_sigma(t) / self.sigma_max
            return math.log(s / (1.0 - s))
        lo, hi = lr(1.0), lr(T_MAX - 1.0)
        out = []
        for k in range(1, n):
            r = math.exp(hi - (hi - lo) * k / n)
            out.append(r / (1.0 + r) * self.sigma_max)
        return out


def as_timesteps(schedule):
    """A TableTimesteps/FlowTimesteps as given, or a TableTimesteps of a sigma table."""
    return schedule if hasattr(schedule, "to_sigma") and hasattr(schedule, "auto") else TableTimesteps(schedule)


# ---------------------------------------------------------------- boundaries
MODES = ("timestep", "sigma", "auto")


def _numbers(text: str, name: str) -> list[float]:
    vals = []
    for part in str(text).replace(";", ",").split(","):
        part = part.strip()
        if not part:
            continue
        try:
            vals.append(float(part))
        except ValueError:
            raise ValueError(f"{name}: {part!r} is not a number; write comma-separated values such as '500' "
                             "or '750, 500, 250'") from None
        if not math.isfinite(vals[-1]):
            raise ValueError(f"{name}: {part!r} is not a finite number; write comma-separated values such as "
                             "'500' or '750, 500, 250'")
    return vals


def parse_boundaries(text: str, mode: str, n_experts: int, sigma_table, name: str = "boundaries") -> list[float]:
    """Descending sigma thresholds (n_experts - 1 of them) from the user's boundary text.

    ``sigma_table``: a discrete model's sigma table, or a TableTimesteps / FlowTimesteps. mode "timestep":
    values in [0, 1000]; "sigma": positive sigmas; "auto": the text is ignored and the log-SNR range of the
    schedule is split into n_experts equal parts. Values must be strictly monotone (either direction); the
    highest-noise boundary always separates expert 1 from expert 2.
    """
    if n_experts < 1:
        raise ValueError("experts: connect at least one MODEL")
    if mode not in MODES:
        raise ValueError(f"mode: {mode!r} is not one of {MODES}")
    ts = as_timesteps(sigma_table)
    if n_experts == 1:
        return []
    if mode == "auto":
        return ts.auto(n_experts)
    vals = _numbers(text, name)
    if len(vals) != n_experts - 1:
        raise ValueError(f"{name}: {len(vals)} value(s) for {n_experts} experts; give exactly {n_experts - 1} "
                         f"(one boundary between each pair of neighbouring experts), or use mode 'auto'")
    if len(vals) > 1:
        d = [b - a for a, b in zip(vals, vals[1:])]
        if not (all(x > 0 for x in d) or all(x < 0 for x in d)):
            raise ValueError(f"{name}: {text!r} is not sorted; give strictly decreasing (or increasing) values "
                             "without repeats, e.g. '750, 500, 250'")
    if mode == "timestep":
        for v in vals:
            if not 0 <= v <= T_MAX:
                raise ValueError(f"{name}: timestep {v:g} is outside 0..{T_MAX} (0 = every call to the experts "
                                 f"above, {T_MAX} = none); use a value in that range")
        vals = sorted(vals, reverse=True)
        out = []
        for v in vals:
            if v >= T_MAX:
                out.append(math.inf)
            elif v <= 0:
                out.append(0.0)
            else:
                out.append(ts.to_sigma(v))
        return out
    for v in vals:
        if not (v >= 0 and math.isfinite(v)):
            raise ValueError(f"{name}: sigma {v:g} must be a finite number ≥ 0")
    return sorted(vals, reverse=True)


def expert_for_sigma(sigma: float, thresholds: Sequence[float]) -> int:
    """Index of the expert whose interval [th[i], th[i-1]) holds sigma."""
    s = float(sigma)
    for i, th in enumerate(thresholds):
        if s >= th:
            return i
    return len(thresholds)


def split_schedule(sigmas: torch.Tensor, thresholds: Sequence[float]) -> list[tuple[int, int, int]]:
    """Segments (expert, start, end) of a sampler schedule: step j (sigmas[j] → sigmas[j+1]) belongs
    to the expert of sigmas[j]; segment sigmas are sigmas[start:end+1]. Empty steps are skipped."""
    out: list[tuple[int, int, int]] = []
    n = int(sigmas.shape[-1]) - 1
    for j in range(n):
        e = expert_for_sigma(float(sigmas[j]), thresholds)
        if out and out[-1][0] == e and out[-1][2] == j:
            out[-1] = (e, out[-1][1], j + 1)
        else:
            out.append((e, j, j + 1))
    return out


# ---------------------------------------------------------------- learned time gate (RAPHAEL)
def router_embedding(t: torch.Tensor, dim: int = 8) -> torch.Tensor:
    """E'(t) for the gate: a low-frequency Fourier basis over [0, 1000] (periods 2000/k, k = 1..dim/2).

    The UNet's own sinusoidal timestep embedding has periods down to ~6 timesteps, so a linear gate on
    it fit to a dozen calibration levels flips between them; these smooth features keep the gate's
    decision a slowly varying function of t."""
    t = torch.as_tensor(t, dtype=torch.float32).flatten()
    k = torch.arange(1, dim // 2 + 1, dtype=torch.float32)
    args = t[:, None] * (math.pi / 1000.0) * k[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def fit_router(timesteps: torch.Tensor, losses: torch.Tensor, dim: int = 8, temperature: float = 0.05,
               steps: int = 500, lr: float = 0.05, seed: int = 0) -> dict:
    """Fit a linear gate softmax(W E'(t) + b) over n experts to per-expert denoising losses.

    losses: (T, n) mean denoising error of each expert at each calibration timestep. The losses are
    normalised per timestep by their mean and interpolated linearly in t onto a 100-point grid; the
    target at t is softmax(-normalised / temperature), so the gate learns "which expert denoises best
    here" as a smooth function of t. Returns {"W": (n, dim), "b": (n,), "dim": dim, "accuracy": share
    of calibration timesteps where the gate's argmax equals the argmin loss}.
    """
    ts = torch.as_tensor(timesteps, dtype=torch.float32).flatten()
    L = torch.as_tensor(losses, dtype=torch.float32)
    if L.ndim != 2 or L.shape[0] != ts.numel():
        raise ValueError("losses must be (timesteps, experts)")
    n = L.shape[1]
    order = ts.argsort()
    ts_s, norm = ts[order], (L / L.mean(dim=1, keepdim=True).clamp_min(1e-12))[order]
    grid = torch.linspace(float(ts_s[0]), float(ts_s[-1]), 100) if ts_s.numel() > 1 else ts_s
    idx = torch.searchsorted(ts_s, grid).clamp(1, max(ts_s.numel() - 1, 1))
    if ts_s.numel() > 1:
        t0, t1 = ts_s[idx - 1], ts_s[idx]
        w = ((grid - t0) / (t1 - t0).clamp_min(1e-6)).clamp(0, 1)[:, None]
        norm_g = (1 - w) * norm[idx - 1] + w * norm[idx]
    else:
        norm_g = norm
    target = torch.softmax(-norm_g / max(temperature, 1e-6), dim=1)
    emb = router_embedding(grid, dim)
    g = torch.Generator().manual_seed(int(seed))
    # ComfyUI runs nodes inside torch.inference_mode(): the parameters and everything autograd saves must be
    # ordinary tensors made outside it (clones), or backward() fails in a real run.
    with torch.inference_mode(False), torch.enable_grad():
        emb, target = emb.clone(), target.clone()
        W = (torch.randn(n, dim, generator=g) * 0.01).requires_grad_(True)
        b = torch.zeros(n, requires_grad=True)
        opt = torch.optim.Adam([W, b], lr=lr)
        for _ in range(int(steps)):
            opt.zero_grad()
            logits = emb @ W.T + b
            loss = -(target * torch.log_softmax(logits, dim=1)).sum(dim=1).mean()
            loss.backward()
            opt.step()
    W, b = W.detach(), b.detach()
    pred = (router_embedding(ts, dim) @ W.T + b).argmax(dim=1)
    acc = float((pred == L.argmin(dim=1)).float().mean())
    return {"W": W, "b": b, "dim": dim, "accuracy": acc}


def router_for_boundaries(thresholds_t: Sequence[float], dim: int = 8, seed: int = 0) -> dict:
    """A gate fit to fixed timestep boundaries (descending): the default before calibration."""
    ts = torch.arange(0, 1000, 10, dtype=torch.float32)
    n = len(thresholds_t) + 1
    idx = torch.tensor([next((i for i, b in enumerate(thresholds_t) if float(t) >= b), n - 1) for t in ts])
    losses = torch.ones(ts.numel(), n)
    losses[torch.arange(ts.numel()), idx] = 0.0
    return fit_router(ts, losses, dim=dim, temperature=0.1, seed=seed)


def router_choose(router: dict, timestep: float, noise: float = 0.0, generator: torch.Generator | None = None) -> int:
    """argmax(W E'(t) + b + noise·N(0, 1)): RAPHAEL's t_router(E'(t)) + noise, noise 0 = deterministic."""
    logits = router_embedding(torch.tensor([float(timestep)]), router["dim"]) @ router["W"].T + router["b"]
    if noise > 0:
        logits = logits + noise * torch.randn(logits.shape, generator=generator)
    return int(logits.argmax(dim=1).item())


# ---------------------------------------------------------------- route record
def new_record(expert_names: Sequence[str]) -> dict:
    return {"format": FORMAT, "experts": list(expert_names), "runs": []}


def start_run(record: dict, sample_sigmas=None) -> dict:
    run = {"sample_sigmas": [float(s) for s in (sample_sigmas if sample_sigmas is not None else [])], "calls": []}
    record["runs"].append(run)
    del record["runs"][:-MAX_RUNS]
    return run


def record_call(record: dict, sigma: float, timestep: float, expert: int, regions: list | None = None) -> None:
    if not record["runs"]:
        start_run(record)
    call = {"sigma": float(sigma), "timestep": float(timestep), "expert": int(expert)}
    if regions:
        call["regions"] = list(regions)
    record["runs"][-1]["calls"].append(call)


def last_calls(record: dict) -> list[dict]:
    return record["runs"][-1]["calls"] if record.get("runs") else []


def draw_routes(record: dict, run: int = -1, height: int = 96, col_width: int = 12) -> torch.Tensor:
    """The diffusion path of one run as an IMAGE tensor (1, H, W, 3), values 0..1.

    One column per denoising call, left to right. Top band (60% of the height): the time expert's
    colour, with a white tick at each switch. Bottom band: the space-expert regions of that call
    stacked by fraction (grey when none). A thin bar under the top band shows log sigma, high = noisy.
    """
    runs = record.get("runs") or []
    calls = runs[run]["calls"] if runs else []
    n = max(len(calls), 1)
    W, H = n * col_width, int(height)
    img = torch.ones(H, W, 3) * 0.12
    top = int(H * 0.6)
    bar = max(2, H // 16)
    sig = [c["sigma"] for c in calls if c["sigma"] > 0]
    lo, hi = (math.log(min(sig)), math.log(max(sig))) if sig else (0.0, 1.0)
    prev = None
    for j, c in enumerate(calls):
        x0, x1 = j * col_width, (j + 1) * col_width
        img[:top - bar, x0:x1] = torch.tensor(PALETTE[c["expert"] % len(PALETTE)])
        if prev is not None and prev != c["expert"]:
            img[:top - bar, x0:x0 + 1] = 1.0
        prev = c["expert"]
        frac = 1.0 if hi <= lo or c["sigma"] <= 0 else (math.log(c["sigma"]) - lo) / (hi - lo)
        img[top - bar:top, x0:x1] = 0.25 + 0.75 * frac
        regions = c.get("regions") or []
        y = top
        for r in regions:
            h = int(round((H - top) * float(r.get("fraction", 0))))
            img[y:y + h, x0:x1] = torch.tensor(PALETTE[int(r.get("expert", 0)) % len(PALETTE)]) * 0.8
            y += h
        if not regions:
            img[top:, x0:x1] = 0.3
        img[:, x1 - 1:x1] *= 0.7  # column separator
    return img.unsqueeze(0).clamp(0, 1)
