"""Space experts: per-step cost vs the core KSampler and vs core masked conditioning, same run.

Rows (each sampled with the core KSampler path, cfg 7, euler):
- core: the plain model;
- space-experts R: R conditioning experts on R attention-derived regions, mixing active at every
  step (mask_start_t=1000), one UNet pass per step whatever R;
- paint-with-words R: R painted regions (vertical stripes), eDiff-I bias on, one expert each;
- core masked R: the same R stripes as ConditioningSetMask(strength 1) + ConditioningCombine with
  the base prompt (ComfyUI batches the R+1 conds, so the UNet batch grows with R).

Models: the full-size SD1.5 UNet (random weights, 256 px, fp32; ``--px`` to change) and the tiny
SD1.5 (64 px). The machine is shared and noisy, so the bench times process CPU seconds with one
torch thread (wall time swung 10x between identical runs here); read the ratios.

    python bench/bench_space_experts.py [--steps N] [--repeats N] [--px 256] [--no-full] [--threads N]
"""
from __future__ import annotations

import argparse
import gc
import importlib
import time

import harness


def stripes(R: int, h: int, w: int):
    import torch
    m = torch.zeros(R, h, w)
    for r in range(R):
        m[r, :, r * w // R:(r + 1) * w // R] = 1.0
    return m


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--no-full", action="store_true")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time = compute)")
    ns = ap.parse_args()
    quick = harness.quick()
    h = harness.boot()
    P = h.pack_module.__name__
    tiny = importlib.import_module(P + ".nodes.tiny_family")
    sx = importlib.import_module(P + ".nodes.space_experts")
    import torch
    import nodes
    from bench_ksampler import build_full_sd15
    if ns.threads:
        torch.set_num_threads(ns.threads)

    def ksampler(model, pos, neg, latent, steps):
        return nodes.common_ksampler(model, 0, steps, 7.0, "euler", "normal", pos, neg, latent, denoise=1.0)[0]

    def fix_norms(model):  # guard: norm scales 1 (older tiny builds zeroed some; see the tests)
        with torch.no_grad():
            for mod in model.model.diffusion_model.modules():
                if isinstance(mod, (torch.nn.GroupNorm, torch.nn.LayerNorm)) and mod.weight is not None:
                    mod.weight.fill_(1.0)
        return model

    def setup_for(R, dim, masks=None, pww=0.0):
        g = torch.Generator().manual_seed(10)
        experts = [sx.Expert(name=f"e{r}", cond=torch.randn(1, 77, dim, generator=g), pooled=None) for r in range(R)]
        return sx.SpaceSetup(phrases=[f"p{r}" for r in range(R)], groups=[[1 + r] for r in range(R)],
                             experts=experts, route=list(range(R)), scores=[], mask_start_sigma=float("inf"),
                             user_masks=masks, pww_weight=pww)

    def masked_cond(pos, R, h, w):
        import nodes as core
        out = pos
        g = torch.Generator().manual_seed(10)
        m = stripes(R, h, w)
        for r in range(R):
            c = [[torch.randn(1, 77, pos[0][0].shape[-1], generator=g), dict(pos[0][1])]]
            c = core.ConditioningSetMask().append(c, m[r:r + 1], "default", 1.0)[0]
            out = core.ConditioningCombine().combine(out, c)[0]
        return out

    def cpu_timeit(fn, repeats):
        """Process CPU seconds (min over repeats, after one warm-up): on a shared CPU this is far steadier
        than wall time, and with one torch thread it is the compute the step costs."""
        fn()
        times = []
        for _ in range(repeats):
            gc.collect()
            t0 = time.process_time()
            fn()
            times.append(time.process_time() - t0)
        return {"cpu_s": min(times), "runs": repeats}

    def cases(model, pos, neg, latent, steps, reps, label, regions):
        h8, w8 = latent["samples"].shape[-2:]
        dim = pos[0][0].shape[-1]
        rows = []
        tb = cpu_timeit(lambda: ksampler(model, pos, neg, latent, steps), reps)
        base = tb["cpu_s"] / steps

        def add(name, fn):
            t = cpu_timeit(fn, reps)
            rows.append({"case": f"{label} {name}", "steps": steps, **t, "per_step_s": t["cpu_s"] / steps,
                         "ratio": t["cpu_s"] / steps / base})

        rows.append({"case": f"{label} core KSampler", "steps": steps, **tb, "per_step_s": base, "ratio": 1.0})
        for R in regions:
            m, _ = sx.apply_space(model, setup_for(R, dim))
            add(f"space-experts {R} regions", lambda: ksampler(m, pos, neg, latent, steps))
            m, _ = sx.apply_space(model, setup_for(R, dim, masks=stripes(R, h8 * 8, w8 * 8), pww=1.0))
            add(f"paint-with-words {R} regions", lambda: ksampler(m, pos, neg, latent, steps))
            mc = masked_cond(pos, R, h8 * 8, w8 * 8)
            add(f"core masked cond {R} regions", lambda: ksampler(model, mc, neg, latent, steps))
            gc.collect()
        return rows

    rows = []
    regions = (2, 4) if quick else (2, 4, 8)
    model, clip, _vae = tiny.build_family("sd15", 0)
    fix_norms(model)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle and a blue square"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    rows += cases(model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, ns.steps or (2 if quick else 8),
                  ns.repeats or (1 if quick else 3), "tiny-sd15 64px", regions)
    if not ns.no_full and not quick:
        model = build_full_sd15(torch.float32)
        g = torch.Generator().manual_seed(1)
        pos = [[torch.randn(1, 77, 768, generator=g), {}]]
        neg = [[torch.randn(1, 77, 768, generator=g), {}]]
        s = ns.px // 8
        rows += cases(model, pos, neg, {"samples": torch.zeros(1, 4, s, s)}, ns.steps or 2, ns.repeats or 1,
                      f"full-sd15 {ns.px}px fp32", regions)
    harness.report("space_experts", rows, {"threads": torch.get_num_threads(),
                                           "note": "process CPU seconds (min over repeats after a warm-up), 1 torch thread; ratio = per-step CPU time / core KSampler per-step CPU time on the same model"})


if __name__ == "__main__":
    main()
