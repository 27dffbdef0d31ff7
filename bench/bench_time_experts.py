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
  overhead            the routing wrappers' own time, measured directly: timing wrappers put just outside
                      and just inside each of the router's keyed wrappers (OUTER_SAMPLE, SAMPLER_SAMPLE once
                      per run; CALC_COND_BATCH once per model call), the same pair on the plain model (the
                      measuring floor: an empty wrapper layer). Routing cost = routed (outside - inside) -
                      plain (outside - inside), thread CPU time, per call and per run, next to the model
                      call itself (inside time); on the tiny rows and (--wide) on a real-width Flux
                      (hidden 3072, 1 double + 1 single block, 512 px, bench_dit.build_wide_flux), whose call
                      bounds the ratio for a real Flux.1 (19 + 38 blocks: larger calls, the same overhead).

Every case's ratio is taken per repeat (routed / core in the same repeat, run next to each other) and
reported as the median with min-max and IQR over the repeats, on wall and on thread CPU time (CPU time is
what the load of other processes inflates least).

    python bench/bench_time_experts.py [--steps N] [--repeats N] [--no-full] [--no-dit] [--threads N]
                                       [--wide] [--wide-steps N] [--wide-repeats N]

Tiny models (64 px sd15) always; the full-size SD1.5 UNet (random weights, 256 px, fp32) unless
--no-full. The machine is shared: compare ratios, not seconds.
"""
from __future__ import annotations

import argparse
import gc
import importlib
import statistics
import time

import harness

TIMER = "bench.timer"


def spread(xs: list[float]) -> dict:
    """median, min, max and the quartiles of a list."""
    xs = sorted(xs)
    q = statistics.quantiles(xs, n=4) if len(xs) > 1 else [xs[0]] * 3
    return {"median": statistics.median(xs), "min": xs[0], "max": xs[-1], "q1": q[0], "q3": q[2]}


def fmt_spread(d: dict, digits: int = 3) -> str:
    return (f"{d['median']:.{digits}f} (min-max {d['min']:.{digits}f}-{d['max']:.{digits}f}, "
            f"IQR {d['q1']:.{digits}f}-{d['q3']:.{digits}f})")


def timed(model, key: str | None):
    """A clone of ``model`` with timing wrappers (thread CPU and wall ns per call, recorded at nesting depth 0
    only). OUTER_SAMPLE / SAMPLER_SAMPLE: one just outside and one just inside the wrappers ``key`` put there.
    Per model call: one outside ``key``'s CALC_COND_BATCH wrapper and one APPLY_MODEL wrapper (the model call
    itself): the router calls another expert through core calc_cond_batch with that expert's options, which carry
    the wrappers added after the router node, so an inner CALC_COND_BATCH timer would not see those calls.
    key None: the same timers on a model without the router (the measuring floor). Returns (clone, records):
    records[type] = {"outside": [(cpu_ns, wall_ns), ...], "inside": [...]}."""
    import comfy.patcher_extension as pe
    W = pe.WrappersMP
    m = model.clone()
    records = {}

    def make(store, depth, acc, outside: bool):
        """outside: records (its own time, the inside time summed within it); inside: adds to ``acc`` (a
        model call may run several apply_model calls, e.g. PixArt's cond and uncond of other T5 lengths)."""
        def w(executor, *args, **kwargs):
            if depth[0]:
                return executor(*args, **kwargs)
            depth[0] += 1
            if outside:
                acc[:] = [0, 0]
            c0, w0 = time.thread_time_ns(), time.perf_counter_ns()
            try:
                return executor(*args, **kwargs)
            finally:
                dc, dw = time.thread_time_ns() - c0, time.perf_counter_ns() - w0
                depth[0] -= 1
                if outside:
                    store["outside"].append((dc, dw))
                    store["inside"].append(tuple(acc))
                else:
                    acc[0] += dc
                    acc[1] += dw
        return w

    for wt, inner in ((W.OUTER_SAMPLE, W.OUTER_SAMPLE), (W.SAMPLER_SAMPLE, W.SAMPLER_SAMPLE),
                      (W.CALC_COND_BATCH, W.APPLY_MODEL)):
        own = list(m.wrappers.get(wt, {}).get(key, [])) if key else []
        rec = records[wt] = {"outside": [], "inside": []}
        if own:
            m.remove_wrappers_with_key(wt, key)
        # wrappers run in the order of their keys, then of the list: outside timer, the router's, inside timer
        acc = [0, 0]
        m.add_wrapper_with_key(wt, TIMER + ".outside", make(rec, [0], acc, True))
        for f in own:
            m.add_wrapper_with_key(wt, key, f)
        m.add_wrapper_with_key(inner, TIMER + ".inside", make(rec, [0], acc, False))
    return m, records


def layer_costs(records: dict) -> dict:
    """Per wrapper type: the list of (outside - inside) thread-CPU and wall microseconds per call, and the
    inside (the wrapped work) CPU/wall seconds."""
    out = {}
    for wt, rec in records.items():
        if len(rec["outside"]) != len(rec["inside"]):
            raise RuntimeError(f"{wt}: {len(rec['outside'])} outside vs {len(rec['inside'])} inside timings")
        pairs = list(zip(rec["outside"], rec["inside"]))
        out[wt] = {"cpu_us": [(o[0] - i[0]) / 1e3 for o, i in pairs], "wall_us": [(o[1] - i[1]) / 1e3 for o, i in pairs],
                   "inside_cpu_s": [i[0] / 1e9 for _, i in pairs], "inside_wall_s": [i[1] / 1e9 for _, i in pairs]}
    return out


def overhead_rows(name: str, plain_model, routed_model, key: str, run, repeats: int,
                  warmup: bool = True) -> tuple[list, dict]:
    """Routing cost measured by timing wrappers: ``run(model)`` samples once; plain and routed runs
    interleaved ``repeats`` times. Rows: per model call (CALC_COND_BATCH outside - APPLY_MODEL inside) and per
    run (OUTER_SAMPLE + SAMPLER_SAMPLE), routed minus the plain floor, and the model call's own time."""
    import comfy.patcher_extension as pe
    mp, rp = timed(plain_model, None)
    mr, rr = timed(routed_model, key)
    if warmup:
        run(mp)
        run(mr)
    for recs in (rp, rr):
        for rec in recs.values():
            rec["outside"].clear()
            rec["inside"].clear()
    for _ in range(repeats):
        run(mp)
        run(mr)
    lp, lr = layer_costs(rp), layer_costs(rr)
    cc = pe.WrappersMP.CALC_COND_BATCH
    floor = statistics.median(lp[cc]["cpu_us"])
    per_call = [x - floor for x in lr[cc]["cpu_us"]]
    per_call_wall = [x - statistics.median(lp[cc]["wall_us"]) for x in lr[cc]["wall_us"]]
    calls_per_run = len(lr[cc]["cpu_us"]) // repeats
    per_run = []
    for r in range(repeats):
        tot = 0.0
        for wt in (pe.WrappersMP.OUTER_SAMPLE, pe.WrappersMP.SAMPLER_SAMPLE):
            tot += lr[wt]["cpu_us"][r] - lp[wt]["cpu_us"][r]
        per_run.append(tot)
    model_call = lp[cc]["inside_cpu_s"] + lr[cc]["inside_cpu_s"]
    call_s = statistics.median(model_call)
    calls = spread(per_call)
    runs = spread(per_run)
    # the share of a run the routing takes at this model's call time
    share = (runs["median"] + calls_per_run * calls["median"]) / 1e6 / (calls_per_run * call_s)
    share_hi = (max(runs["max"], 0) + calls_per_run * calls["q3"]) / 1e6 / (calls_per_run * call_s)
    row = {"case": f"{name}: routing overhead", "calls": len(per_call), "calls_per_run": calls_per_run,
           "per_call_us": calls, "per_call_wall_us": spread(per_call_wall), "floor_per_call_us": floor,
           "per_run_us": runs, "model_call_cpu_s": spread(model_call), "ratio": 1.0 + share,
           "ratio_upper": 1.0 + share_hi}
    print(f"{name}: routing per model call {fmt_spread(calls, 1)} us CPU (floor {floor:.1f} us), per run "
          f"{fmt_spread(runs, 0)} us; model call {call_s:.4f} s CPU -> routed/core {1 + share:.6f}x "
          f"(upper {1 + share_hi:.6f}x)", flush=True)
    return [row], {"plain": lp, "routed": lr}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-full", action="store_true")
    ap.add_argument("--no-dit", action="store_true", help="skip the tiny Flux / PixArt rows")
    ap.add_argument("--threads", type=int, default=0, help="torch threads (0 = leave as is)")
    ap.add_argument("--overhead-repeats", type=int, default=None,
                    help="runs of the direct overhead measurement per tiny row (default 5, 1 quick; 0 = skip)")
    ap.add_argument("--no-sd15", action="store_true", help="skip the tiny sd15 rows")
    ap.add_argument("--wide", action="store_true",
                    help="the overhead at real width: Flux hidden 3072, 1 double + 1 single block, 512 px, cfg 1")
    ap.add_argument("--wide-steps", type=int, default=2)
    ap.add_argument("--wide-repeats", type=int, default=2)
    ns = ap.parse_args()
    if ns.overhead_repeats is None:
        ns.overhead_repeats = 1 if harness.quick() else 5
    quick = harness.quick()
    h = harness.boot()
    import torch
    if ns.threads:
        torch.set_num_threads(ns.threads)
    import comfy.model_management as mm
    import comfy.samplers
    import nodes
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
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

        timings, cpu = {}, {}
        # interleave repeats so drift in machine load hits every case alike
        fns = {"core KSampler": lambda: ks(a, pos, neg, latent, steps),
               "one expert routed": lambda: ks(one, pos, neg, latent, steps),
               "core 2xKSamplerAdvanced chain": chain,
               "two experts routed": lambda: ks(two, pos, neg, latent, steps)}
        for f in fns.values():
            f()
        for _ in range(reps):
            for k, f in fns.items():
                gc.collect()
                c0, w0 = time.thread_time(), time.perf_counter()
                f()
                timings.setdefault(k, []).append(time.perf_counter() - w0)
                cpu.setdefault(k, []).append(time.thread_time() - c0)
        load_counts = {}
        for k, f in fns.items():
            loads.clear()
            f()
            load_counts[k] = (len(loads), sum(loads))
        med = {k: sorted(v)[len(v) // 2] for k, v in timings.items()}
        for k in fns:
            row = {"case": f"{name}: {k}", "steps": steps, "median_s": med[k], "min_s": min(timings[k]),
                   "per_step_s": med[k] / steps, "load_calls": load_counts[k][0], "models_requested": load_counts[k][1]}
            ref = {"one expert routed": "core KSampler", "two experts routed": "core 2xKSamplerAdvanced chain"}.get(k)
            if ref:
                row["ratio"] = med[k] / med[ref]
                # per-repeat ratios (each routed run next to its core run), wall and thread CPU
                row["ratio_wall"] = spread([x / y for x, y in zip(timings[k], timings[ref])])
                row["ratio_cpu"] = spread([x / y for x, y in zip(cpu[k], cpu[ref])])
                print(f"{name}: {k} / {ref}: wall {fmt_spread(row['ratio_wall'])}; CPU {fmt_spread(row['ratio_cpu'])}",
                      flush=True)
            rows.append(row)
        if ns.overhead_repeats:
            orows, _ = overhead_rows(name, a, one, tmod.KEY, lambda m: ks(m, pos, neg, latent, steps),
                                     ns.overhead_repeats)
            rows.extend(orows)
        return rows

    rows = []
    steps = ns.steps or (4 if quick else 20)
    reps = ns.repeats or (1 if quick else 7)
    if not ns.no_sd15:
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

    if ns.wide and not quick:
        import bench_dit
        gen = torch.Generator().manual_seed(3)
        wcond = [[torch.randn(1, bench_dit.TEXT_TOKENS, 4096, generator=gen),
                  {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 3.5}]]
        wlat = {"samples": torch.zeros(1, 16, bench_dit.WIDE_PX // 8, bench_dit.WIDE_PX // 8)}
        wide = bench_dit.build_wide_flux(1, 1)
        wone = tmod.AtelierTimeExperts.execute(model_1=wide, model_2=wide, mode="timestep", boundaries="1000").args[0]
        ws = ns.wide_steps

        def wrun(m):
            return nodes.common_ksampler(m, 1, ws, 1.0, "euler", "simple", wcond, wcond, wlat)[0]
        orows, _ = overhead_rows(f"flux-3072 1d+1s {bench_dit.WIDE_PX}px", wide, wone, tmod.KEY, wrun,
                                 ns.wide_repeats, warmup=False)
        rows.extend(orows)
        del wide, wone
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
