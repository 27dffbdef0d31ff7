"""Space experts: per-step cost vs the core KSampler and vs core masked conditioning, same run, interleaved.

Rows (each sampled on the core KSampler path: comfy.sample.sample, cfg 7, euler, normal):
- core: the plain model;
- space-experts R: R conditioning experts on R attention-derived regions, mixing active at every
  step (mask_start_t=1000), one UNet pass per step whatever R;
- paint-with-words R: R painted regions (vertical stripes), eDiff-I bias on, one expert each;
- core masked R: the same R stripes as ConditioningSetMask(strength 1) + ConditioningCombine with
  the base prompt (ComfyUI batches the R+1 conds, so the UNet batch grows with R).

Models: Atelier Mini sd15 (64 px, trained weights, so attention-derived regions are real ones; ``--small tiny``
for the random tiny sd15) and the full-size SD1.5 UNet (random weights, 256 px, fp32; ``--px`` to change).

Noise: the machine is shared, so the bench times process CPU seconds with one torch thread, and every repeat
runs plain, case, plain, case, ..., plain (the case order rotates per repeat); a case's ratio in a repeat is its
per-step time over the mean of the two plain runs around it. It prints the median ratio over ``--repeats`` (>= 5)
with its spread (min-max and the inter-quartile range of the per-repeat ratios); a ratio is marked
``resolved`` only where its whole min-max range lies on one side of 1.00, else ``noise`` (then only the upper
end bounds the cost).

Per step = the steady state: steps 3.. of each run (step 1 only captures maps, step 2 is the first mixing step,
which also projects the experts' prompts to keys/values once per run and block); ``ratio_run`` is the same
over all steps of the run.

    python bench/bench_space_experts.py [--steps N] [--repeats N] [--px 256] [--no-full] [--no-small]
        [--small mini|tiny] [--cases experts,pww,masked] [--full-cases ...] [--regions 2,4,8] [--threads N]

``--dit-only``: the same cases on ComfyUI's Flux at real width (``bench_dit.build_wide_flux``: hidden 3072,
24 heads, T5 context 4096 x 256 tokens, random weights, fp32; ``--flux-blocks DxS`` double x single blocks,
default 1x1) at ``--dit-px`` (default 512 = 1024 image tokens), cfg 1 (one model call per step), euler, simple,
``--dit-steps`` (default 1) steps, sampled on the same core path. The node's Flux code path (``nodes/space_dit.py``,
installed by ``apply_space``): space experts R = R random 256-token T5 experts painting R user stripes (routing in
order, as ``AtelierSpaceExperts`` with ``regions``; each joins the joint sequence); paint-with-words R = the R
stripes as regions, weight 1, no experts (as ``AtelierPaintWithWords``); core masked R as above. Real-width runs
are seconds each, so there is no warm-up run; ``--dit-repeats`` (default 1) interleaved repeats, the same
plain, case, plain, ... order and ratios (with fewer than 3 steps a ratio is over all steps of a run).

    python bench/bench_space_experts.py --dit-only [--dit-repeats N] [--dit-steps N] [--dit-px 512]
        [--flux-blocks 1x1] [--cases ...] [--regions 2,4,8] [--threads 1]
"""
from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import time

import harness


def stripes(R: int, h: int, w: int):
    import torch
    m = torch.zeros(R, h, w)
    for r in range(R):
        m[r, :, r * w // R:(r + 1) * w // R] = 1.0
    return m


def quartiles(xs):
    xs = sorted(xs)
    if len(xs) < 4:
        return xs[0], xs[-1]
    q = statistics.quantiles(xs, n=4, method="inclusive")
    return q[0], q[2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="steps per run (default 6 small, 4 full; >= 3)")
    ap.add_argument("--repeats", type=int, default=None, help="interleaved repeats (default 7 small, 5 full)")
    ap.add_argument("--px", type=int, default=256)
    ap.add_argument("--no-full", action="store_true")
    ap.add_argument("--no-small", action="store_true")
    ap.add_argument("--small", choices=["mini", "tiny"], default="mini")
    ap.add_argument("--cases", default="experts,pww,masked", help="comma list of experts, pww, masked")
    ap.add_argument("--full-cases", default=None, help="the cases on the full-size UNet (default: --cases)")
    ap.add_argument("--regions", default=None, help="comma list of region counts (default 2,4,8)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: CPU time = compute)")
    ap.add_argument("--dit-only", action="store_true", help="only the real-width Flux rows (see the docstring)")
    ap.add_argument("--dit-repeats", type=int, default=1, help="interleaved repeats of the Flux rows (default 1)")
    ap.add_argument("--dit-steps", type=int, default=1, help="steps per Flux run (default 1)")
    ap.add_argument("--dit-px", type=int, default=None, help="Flux image size (default bench_dit.WIDE_PX, 512)")
    ap.add_argument("--flux-blocks", default="1x1", help="double x single blocks of the real-width Flux")
    ns = ap.parse_args()
    quick = harness.quick()
    h = harness.boot()
    P = h.pack_module.__name__
    tiny = importlib.import_module(P + ".nodes.tiny_family")
    mini = importlib.import_module(P + ".nodes.mini")
    sx = importlib.import_module(P + ".nodes.space_experts")
    import torch
    import comfy.sample
    from bench_ksampler import build_full_sd15
    if ns.threads:
        torch.set_num_threads(ns.threads)
    def parse_kinds(text):
        return [c.strip() for c in text.split(",") if c.strip()]
    kinds = parse_kinds(ns.cases)
    regions = [int(r) for r in ns.regions.split(",")] if ns.regions else ([2, 4] if quick else [2, 4, 8])

    def run_timed(model, pos, neg, latent, steps, cfg=7.0, scheduler="normal"):
        """The core KSampler path (prepare_noise + comfy.sample.sample, no preview), CPU seconds per step."""
        lat = comfy.sample.fix_empty_latent_channels(model, latent["samples"])
        noise = comfy.sample.prepare_noise(lat, 0, None)
        marks = [time.process_time()]

        def cb(step, x0, x, total):
            marks.append(time.process_time())
        comfy.sample.sample(model, noise, steps, cfg, "euler", scheduler, pos, neg, lat, denoise=1.0,
                            callback=cb, disable_pbar=True, seed=0)
        return [b - a for a, b in zip(marks, marks[1:])]

    def setup_for(R, dim, masks=None, pww=0.0, tokens=77, n_experts=None):
        g = torch.Generator().manual_seed(10)
        n_experts = R if n_experts is None else n_experts
        experts = [sx.Expert(name=f"e{r}", cond=torch.randn(1, tokens, dim, generator=g), pooled=None)
                   for r in range(n_experts)]
        return sx.SpaceSetup(phrases=[f"p{r}" for r in range(R)], groups=[[1 + r] for r in range(R)],
                             experts=experts, route=list(range(R)) if n_experts else [], scores=[],
                             mask_start_sigma=float("inf"),
                             user_masks=masks, pww_weight=pww)

    def masked_cond(pos, R, h, w):
        import nodes as core
        out = pos
        g = torch.Generator().manual_seed(10)
        m = stripes(R, h, w)
        for r in range(R):
            c = [[torch.randn(1, *pos[0][0].shape[-2:], generator=g), dict(pos[0][1])]]
            c = core.ConditioningSetMask().append(c, m[r:r + 1], "default", 1.0)[0]
            out = core.ConditioningCombine().combine(out, c)[0]
        return out

    def cases(model, pos, neg, latent, steps, reps, label, kinds, dit=False):
        """dit: the real-width Flux rows (user stripes for the experts, no experts for paint-with-words, cfg 1,
        simple, no warm-up run)."""
        h8, w8 = latent["samples"].shape[-2:]
        dim, tokens = pos[0][0].shape[-1], pos[0][0].shape[-2]
        lo = 2 if steps >= 3 else 0
        cfg, sched = (1.0, "simple") if dit else (7.0, "normal")
        arms = []  # (name, model, positive)
        for R in regions:
            px_stripes = stripes(R, h8 * 8, w8 * 8)
            if "pww" in kinds and dit:
                m, _ = sx.apply_space(model, setup_for(R, dim, masks=px_stripes, pww=1.0, n_experts=0))
                arms.append((f"paint-with-words {R} regions", m, pos))
            if "experts" in kinds:
                setup = setup_for(R, dim, masks=px_stripes, tokens=tokens) if dit else setup_for(R, dim)
                arms.append((f"space-experts {R} regions", sx.apply_space(model, setup)[0], pos))
            if "pww" in kinds and not dit:
                m, _ = sx.apply_space(model, setup_for(R, dim, masks=px_stripes, pww=1.0))
                arms.append((f"paint-with-words {R} regions", m, pos))
            if "masked" in kinds:
                arms.append((f"core masked cond {R} regions", model, masked_cond(pos, R, h8 * 8, w8 * 8)))

        def one(m, p):
            gc.collect()
            ts = run_timed(m, p, neg, latent, steps, cfg, sched)
            return sum(ts[lo:]) / len(ts[lo:]), sum(ts) / len(ts)
        if not dit:
            one(model, pos)  # warm-up
            for _name, m, p in arms:
                one(m, p)
        plain_steady, plain_run = [], []
        ratio = {a[0]: [] for a in arms}
        ratio_run = {a[0]: [] for a in arms}
        per_step = {a[0]: [] for a in arms}
        for r in range(reps):
            order = arms[r % len(arms):] + arms[:r % len(arms)]
            prev = one(model, pos)
            plain_steady.append(prev[0])
            plain_run.append(prev[1])
            for name, m, p in order:
                t = one(m, p)
                nxt = one(model, pos)
                plain_steady.append(nxt[0])
                plain_run.append(nxt[1])
                ratio[name].append(t[0] / ((prev[0] + nxt[0]) / 2))
                ratio_run[name].append(t[1] / ((prev[1] + nxt[1]) / 2))
                per_step[name].append(t[0])
                prev = nxt
            print(f"[{label}] repeat {r + 1}/{reps}: " + ", ".join(
                f"{n.split(' regions')[0]} {ratio[n][-1]:.3f}" for n, _m, _p in arms), flush=True)
            if dit:
                print(f"[{label}] repeat {r + 1}/{reps}: plain s/step " +
                      ", ".join(f"{x:.2f}" for x in plain_steady[-len(arms) - 1:]), flush=True)
        rows = [{"case": f"{label} core KSampler", "steps": steps, "repeats": reps,
                 "per_step_s": statistics.median(plain_steady), "ratio": 1.0}]
        for name, _m, _p in arms:
            rs = ratio[name]
            q1, q3 = quartiles(rs)
            med = statistics.median(rs)
            resolved = min(rs) > 1.0 or max(rs) < 1.0
            rows.append({"case": f"{label} {name}", "steps": steps, "repeats": reps,
                         "per_step_s": statistics.median(per_step[name]), "ratio": med,
                         "ratio_min": min(rs), "ratio_max": max(rs), "ratio_q1": q1, "ratio_q3": q3,
                         "ratio_run": statistics.median(ratio_run[name]),
                         "verdict": "resolved" if resolved else "noise", "ratios": rs})
        return rows

    rows = []
    if ns.dit_only:
        from bench_dit import TEXT_TOKENS, WIDE_PX, build_wide_flux
        double, single = (int(x) for x in ns.flux_blocks.lower().split("x"))
        px = ns.dit_px or WIDE_PX
        model = build_wide_flux(double, single)
        g = torch.Generator().manual_seed(1)
        ctx = model.model.diffusion_model.params.context_in_dim
        vec = model.model.diffusion_model.params.vec_in_dim
        pos = [[torch.randn(1, TEXT_TOKENS, ctx, generator=g),
                {"pooled_output": torch.randn(1, vec, generator=g), "guidance": 3.5}]]
        neg = [[torch.randn(1, TEXT_TOKENS, ctx, generator=g), {"pooled_output": torch.randn(1, vec, generator=g)}]]
        rows += cases(model, pos, neg, {"samples": torch.zeros(1, 16, px // 8, px // 8)}, ns.dit_steps,
                      ns.dit_repeats, f"flux {double}+{single} {px}px fp32", kinds, dit=True)
        ns.no_small = ns.no_full = True
    if not ns.no_small:
        if ns.small == "mini":
            model, clip, _vae = mini.load_mini("sd15")
            label = "mini-sd15 64px"
        else:
            model, clip, _vae = tiny.build_family("sd15", 0)
            label = "tiny-sd15 64px"
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle and a blue square"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        rows += cases(model, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, ns.steps or (3 if quick else 6),
                      ns.repeats or (1 if quick else 7), label, kinds)
    if not ns.no_full and not quick:
        model = build_full_sd15(torch.float32)
        g = torch.Generator().manual_seed(1)
        pos = [[torch.randn(1, 77, 768, generator=g), {}]]
        neg = [[torch.randn(1, 77, 768, generator=g), {}]]
        s = ns.px // 8
        rows += cases(model, pos, neg, {"samples": torch.zeros(1, 4, s, s)}, ns.steps or 4, ns.repeats or 5,
                      f"full-sd15 {ns.px}px fp32", parse_kinds(ns.full_cases) if ns.full_cases else kinds)
    print()
    print(f"{'case':48s} {'per step':>9s} {'ratio':>6s} {'min-max':>13s} {'IQR':>13s} {'run':>6s}  verdict")
    for r in rows:
        if "ratio_min" in r:
            print(f"{r['case']:48s} {r['per_step_s']:9.4f} {r['ratio']:6.3f} {r['ratio_min']:6.3f}-{r['ratio_max']:6.3f}"
                  f" {r['ratio_q1']:6.3f}-{r['ratio_q3']:6.3f} {r['ratio_run']:6.3f}  {r['verdict']}")
        else:
            print(f"{r['case']:48s} {r['per_step_s']:9.4f} {1.0:6.3f}")
    harness.report("space_experts_dit" if ns.dit_only else "space_experts", rows, {
        "threads": torch.get_num_threads(),
        "note": "process CPU seconds, 1 torch thread; per repeat plain and case runs alternate (plain, case, plain, "
                "...); ratio = a case's per-step time (steps 3.. of a run) / the mean of the plain runs around it, "
                "median over repeats, with min-max and IQR; 'resolved' when min-max lies on one side of 1.00; "
                "ratio_run: the same over all steps of a run"})


if __name__ == "__main__":
    main()
