"""Time experts: cost of routing by noise level, against the core baseline measured in the same run.

Rows
  one expert routed   AtelierTimeExperts(model, model, boundary 1000) in KSampler vs the core KSampler
                      on that model (goal: ≤ 2 % overhead).
  two experts routed  two different models switched at t = 500 vs the core two-KSamplerAdvanced chain
                      that switches at the same step (goal: no slower).
  load_models_gpu     calls per run and models requested, counted by wrapping
                      comfy.model_management.load_models_gpu.
  DiT rows            the same on tiny Flux dev (two seeds, 128 px, flow schedule: boundary t = 500 is
                      sigma 0.5) and tiny PixArt-Σ (320 px): time experts on a DiT vs the core sampler
                      (goal ≤ 1.01×).

    python bench/bench_time_experts.py [--steps N] [--repeats N] [--no-full] [--no-dit] [--threads N]

Tiny models (64 px sd15) always; the full-size SD1.5 UNet (random weights, 256 px, fp32) unless
--no-full. The machine is shared: compare ratios, not seconds.
"""
from __future__ import annotations

import argparse
import gc
import importlib

import harness


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-full", action="store_true")
    ap.add_argument("--no-dit", action="store_true", help="skip the tiny Flux / PixArt rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ns = ap.parse_args()
    quick = harness.quick()
    h = harness.boot()
    import torch
    if ns.threads:
        torch.set_num_threads(ns.threads)
    import comfy.model_management as mm
    import comfy.samplers
    import nodes
    P = h.pack_module.__name__
    tiny = importlib.import_module(P + ".nodes.tiny_family")
    tmod = importlib.import_module(P + ".nodes.time_experts")
    from bench_ksampler import build_full_sd15

    loads = []
    real_load = mm.load_models_gpu

    def counting(models, *a, **k):
        loads.append(len(models))
        return real_load(models, *a, **k)
    mm.load_models_gpu = counting

    def ks(model, pos, neg, latent, steps, **kw):
        return nodes.common_ksampler(model, 1, steps, 7.0, "euler", "normal", pos, neg, latent, **kw)[0]

    def cases(name, a, b, pos, neg, latent, steps, reps):
        rows = []
        sig = comfy.samplers.KSampler(a, steps=steps, device="cpu", sampler="euler", scheduler="normal").sigmas
        split = next(j for j in range(steps) if float(sig[j]) < tmod._timesteps(a).to_sigma(500))
        one = tmod.AtelierTimeExperts.execute(model_1=a, model_2=a, mode="timestep", boundaries="1000").args[0]
        two = tmod.AtelierTimeExperts.execute(model_1=a, model_2=b, mode="timestep", boundaries="500").args[0]

        def chain():
            s1 = ks(a, pos, neg, latent, steps, start_step=0, last_step=split)
            return ks(b, pos, neg, s1, steps, disable_noise=True, start_step=split, last_step=10000,
                      force_full_denoise=True)

        timings = {}
        # interleave repeats so drift in machine load hits every case alike
        fns = {"core KSampler": lambda: ks(a, pos, neg, latent, steps),
               "one expert routed": lambda: ks(one, pos, neg, latent, steps),
               "core 2xKSamplerAdvanced chain": chain,
               "two experts routed": lambda: ks(two, pos, neg, latent, steps)}
        for f in fns.values():
            f()
        for _ in range(reps):
            for k, f in fns.items():
                timings.setdefault(k, []).append(harness.timeit(f, repeats=1, warmup=0)["median_s"])
        load_counts = {}
        for k, f in fns.items():
            loads.clear()
            f()
            load_counts[k] = (len(loads), sum(loads))
        med = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
        for k in fns:
            row = {"case": f"{name}: {k}", "steps": steps, "median_s": med[k], "min_s": min(timings[k]),
                   "per_step_s": med[k] / steps, "load_calls": load_counts[k][0], "models_requested": load_counts[k][1]}
            if k == "one expert routed":
                row["ratio"] = med[k] / med["core KSampler"]
            if k == "two experts routed":
                row["ratio"] = med[k] / med["core 2xKSamplerAdvanced chain"]
            rows.append(row)
        return rows

    rows = []
    steps = ns.steps or (4 if quick else 20)
    reps = ns.repeats or (1 if quick else 7)
    _, clip, _ = tiny.build_family("sd15", 0)
    a, b = tiny.build_model("sd15", 0), tiny.build_model("sd15", 1)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    rows += cases("tiny-sd15 64px", a, b, pos, neg, {"samples": torch.zeros(1, 4, 8, 8)}, steps, reps)

    if not ns.no_dit:
        for fam, px, ch in (("flux", 128, 16), ("pixart", 320, 4)):
            _, dclip, _ = tiny.build_family(fam, 0)
            da, db = tiny.build_model(fam, 0), tiny.build_model(fam, 1)
            dpos = dclip.encode_from_tokens_scheduled(dclip.tokenize("a red circle"))
            dneg = dclip.encode_from_tokens_scheduled(dclip.tokenize(""))
            rows += cases(f"tiny-{fam} {px}px", da, db, dpos, dneg, {"samples": torch.zeros(1, ch, px // 8, px // 8)},
                          steps, reps)
            del da, db
            gc.collect()

    if not ns.no_full:
        fsteps = ns.steps or (2 if quick else 4)
        freps = ns.repeats or (1 if quick else 2)
        cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
        uncond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2)), {}]]
        fa, fb = build_full_sd15(torch.float32, 0), build_full_sd15(torch.float32, 1)
        rows += cases("full-sd15 256px fp32", fa, fb, cond, uncond, {"samples": torch.zeros(1, 4, 32, 32)},
                      fsteps, freps)
        del fa, fb
        gc.collect()
    mm.load_models_gpu = real_load
    harness.report("time_experts", rows, {
        "note": "cfg 7, euler/normal; repeats interleaved; ratio: one routed / core KSampler, two routed / core chain",
        "threads": torch.get_num_threads()})


if __name__ == "__main__":
    main()
