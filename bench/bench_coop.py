"""Coop bridge cost, measured against the core nodes in the same run.

1. Per-step cost of Coop fusion (A = tiny SD1.5, B = tiny SDXL, bridge through both VAEs) with
   k = 1 and k = 4, against model A alone and against running both models without the bridge
   (a core KSampler on A plus one on B: the same UNet work, no VAE round trips).
2. The resolution bridge (SD1.5 64 px → SDXL 128 px, switch at half the steps) against the core
   chains at equal steps: KSamplerAdvanced (leftover noise) → LatentUpscaleBy bilinear →
   KSamplerAdvanced, and the classic hires fix (full low-res KSampler → LatentUpscaleBy →
   KSampler denoise 0.5).

3. DiT rows (issue 18): A = tiny Flux dev (16 channels, flow), B = tiny SDXL (4 channels, eps), 64 px:
   Coop k = 1 and k = 4 against both models without the bridge, and the Flux → SDXL struct→texture
   handoff through the bridge (T_struct 500, noise level matched through each model_sampling) against
   the core decode→encode chain (KSamplerAdvanced leftover noise → VAEDecode Flux → VAEEncode SDXL →
   KSamplerAdvanced, add_noise disabled), equal steps.

    python bench/bench_coop.py [--steps N] [--repeats N] [--threads N] [--no-dit]

Tiny models with TAESD-type VAEs: the VAE share of a bridge step is larger here than with real
UNets and smaller than with a full KL VAE at 1024 px. Ratios, not absolute times, are the result.
"""
from __future__ import annotations

import argparse
import importlib

import harness


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 = steadier on a shared machine)")
    ap.add_argument("--no-dit", action="store_true", help="skip the Flux ↔ SDXL rows")
    ap.add_argument("--coherence-only", action="store_true",
                    help="only the handoff-coherence plumbing check (bridge vs plain decode->encode handoff)")
    ns = ap.parse_args()
    quick = harness.quick()
    h = harness.boot()
    import torch
    torch.set_num_threads(ns.threads)
    import nodes
    pkg = h.pack_module.__name__
    tiny = importlib.import_module(pkg + ".nodes.tiny_family")
    nc = importlib.import_module(pkg + ".nodes.coop")

    steps = ns.steps or (4 if quick else 16)
    reps = ns.repeats or (1 if quick else 3)
    ma, ca, va = tiny.build_family("sd15", 0)
    mb, cb, vb = tiny.build_family("sdxl", 5)
    enc = lambda c, t: c.encode_from_tokens_scheduled(c.tokenize(t))
    pa, na, pb, nb = enc(ca, "a red circle"), enc(ca, ""), enc(cb, "a red circle"), enc(cb, "")
    lat_a = {"samples": torch.zeros(1, 4, 8, 8)}     # 64 px: A's native size; B runs at the same pixels
    lat_b = {"samples": torch.zeros(1, 4, 8, 8)}

    def ks(model, pos, neg, lat, n=steps, denoise=1.0):
        return nodes.common_ksampler(model, 1, n, 7.0, "euler", "normal", pos, neg, lat, denoise=denoise)[0]

    def coop(k):
        g = nc.make_coop_guider(ma, va, pa, na, 7.0, mb, vb, pb, nb, 7.0, 0.5, k, 0.0, 1.0, 1.0)
        return nc._run_guider(g, ma, lat_a, 1, steps, "euler", "normal", 1.0)

    if ns.coherence_only:
        return coherence(h, nc, ma, va, pa, na, mb, vb, pb, nb, steps)

    rows = []
    cases = []  # (row, fn): timed round-robin below so that load changes hit every case alike

    def add(case, fn, n_steps=steps):
        rows.append({"case": case, "steps": n_steps})
        cases.append((rows[-1], fn))
        return rows[-1]

    a_alone = add("A alone (core KSampler, tiny sd15 64px)", lambda: ks(ma, pa, na, lat_a))
    both = add("A + B, no bridge (two core KSamplers)", lambda: (ks(ma, pa, na, lat_a), ks(mb, pb, nb, lat_b)))
    k1 = add("Coop d=0.5 k=1", lambda: coop(1))
    k4 = add("Coop d=0.5 k=4", lambda: coop(4))

    # ---- resolution bridge vs hires-fix chains, equal steps
    half = steps // 2
    up_by = nodes.LatentUpscaleBy()

    def bridge():
        return nc.resolution_bridge_sample(ma, va, pa, na, mb, vb, pb, nb, lat_a, 1, steps, 7.0, 7.0, "euler",
                                           "normal", 0.5, 2.0)

    def chain_leftover():
        lo = nodes.common_ksampler(ma, 1, steps, 7.0, "euler", "normal", pa, na, lat_a, start_step=0,
                                   last_step=half, force_full_denoise=False)[0]
        up = up_by.upscale(lo, "bilinear", 2.0)[0]
        return nodes.common_ksampler(mb, 1, steps, 7.0, "euler", "normal", pb, nb, up, disable_noise=True,
                                     start_step=half, last_step=10000, force_full_denoise=True)[0]

    def chain_hires():
        lo = ks(ma, pa, na, lat_a, n=half)
        up = up_by.upscale(lo, "bilinear", 2.0)[0]
        return ks(mb, pb, nb, up, n=half, denoise=0.5)

    rb = add("resolution bridge 64->128px (switch 0.5)", bridge)
    c1 = add("core: KSamplerAdv leftover -> LatentUpscaleBy -> KSamplerAdv", chain_leftover)
    c2 = add("core hires fix: KSampler -> LatentUpscaleBy -> KSampler d=0.5", chain_hires)

    # one bridge's VAE work alone: A decode + B encode + B decode + A encode at 64 px
    ca_, cb_ = nc._Codec(ma, va), nc._Codec(mb, vb)
    z = torch.randn(1, 4, 8, 8)
    vae_row = add("VAE round trip of one bridge step (2 decodes + 2 encodes)",
                  lambda: ca_.encode(cb_.decode(cb_.encode(ca_.decode(z)))), n_steps=1)

    dit = {}
    if not ns.no_dit:
        tmod = importlib.import_module(pkg + ".nodes.time_experts")
        mf, cf, vf = tiny.build_family("flux", 0)
        pf, nf = enc(cf, "a red circle"), enc(cf, "")
        lat_f = {"samples": torch.zeros(1, 16, 8, 8)}
        half_f = steps // 2

        def ks_f(model, pos, neg, lat, **kw):
            return nodes.common_ksampler(model, 1, steps, 7.0, "euler", "simple", pos, neg, lat, **kw)[0]

        def coop_f(k):
            g = nc.make_coop_guider(mf, vf, pf, nf, 7.0, mb, vb, pb, nb, 7.0, 0.5, k, 0.0, 1.0, 1.0)
            return nc._run_guider(g, mf, lat_f, 1, steps, "euler", "simple", 1.0)

        def bridged_handoff():
            return tmod.struct_texture_sample(mf, pf, nf, mb, pb, nb, lat_f, 1, steps, 7.0, "euler", "simple", 500,
                                              1.0, vf, vb, 1.0)[0]

        def core_round_trip():
            lo = ks_f(mf, pf, nf, lat_f, start_step=0, last_step=half_f, force_full_denoise=False)
            px = nodes.VAEDecode().decode(vf, lo)[0]
            z = nodes.VAEEncode().encode(vb, px)[0]
            return nodes.common_ksampler(mb, 1, steps, 7.0, "euler", "simple", pb, nb, z, disable_noise=True,
                                         start_step=half_f, last_step=10000, force_full_denoise=True)[0]
        dit["alone"] = add("DiT: A alone (core KSampler, tiny flux 64px)", lambda: ks_f(mf, pf, nf, lat_f))
        dit["both"] = add("DiT: A + B, no bridge (core KSampler flux + sdxl)",
                          lambda: (ks_f(mf, pf, nf, lat_f), ks(mb, pb, nb, lat_b)))
        dit["k1"] = add("DiT: Coop flux+sdxl d=0.5 k=1", lambda: coop_f(1))
        dit["k4"] = add("DiT: Coop flux+sdxl d=0.5 k=4", lambda: coop_f(4))
        dit["bridge"] = add("DiT: struct->texture flux->sdxl through the bridge (T_struct 500)", bridged_handoff)
        dit["chain"] = add("DiT: core KSamplerAdv flux -> VAEDecode -> VAEEncode sdxl -> KSamplerAdv", core_round_trip)

    import statistics
    import time
    for _, fn in cases:
        fn()  # warm-up
    times = {id(r): [] for r, _ in cases}
    for _ in range(reps):
        for r, fn in cases:
            t0 = time.perf_counter()
            fn()
            times[id(r)].append(time.perf_counter() - t0)
    for r, _ in cases:
        r["median_s"] = statistics.median(times[id(r)])
        r["min_s"] = min(times[id(r)])
        r["runs"] = reps
        r["per_step_s"] = r["median_s"] / r["steps"]
        r["peak_mb"] = harness.peak_rss_mb()
    for r in (a_alone, both, k1, k4):
        r["ratio"] = r["per_step_s"] / both["per_step_s"]
        r["ratio_min"] = r["min_s"] / both["min_s"]
    fusion = {"coop_k1_vs_both": k1["ratio"], "coop_k4_vs_both": k4["ratio"],
              "coop_k1_vs_a_alone": k1["per_step_s"] / a_alone["per_step_s"],
              "coop_k4_vs_a_alone": k4["per_step_s"] / a_alone["per_step_s"],
              "vae_round_trip_vs_both_per_step": vae_row["median_s"] / both["per_step_s"],
              "by_min_time": {"coop_k1_vs_both": k1["min_s"] / both["min_s"],
                              "coop_k4_vs_both": k4["min_s"] / both["min_s"],
                              "coop_k1_vs_a_alone": k1["min_s"] / a_alone["min_s"],
                              "coop_k4_vs_a_alone": k4["min_s"] / a_alone["min_s"],
                              "vae_round_trip_vs_both_per_step": vae_row["min_s"] / (both["min_s"] / steps)}}
    for r in (rb, c1, c2):
        r["ratio"] = r["median_s"] / c1["median_s"]
        r["ratio_min"] = r["min_s"] / c1["min_s"]
    dit_summary = {}
    if dit:
        for key in ("alone", "both", "k1", "k4"):
            dit[key]["ratio"] = dit[key]["per_step_s"] / dit["both"]["per_step_s"]
            dit[key]["ratio_min"] = dit[key]["min_s"] / dit["both"]["min_s"]
        for key in ("bridge", "chain"):
            dit[key]["ratio"] = dit[key]["median_s"] / dit["chain"]["median_s"]
            dit[key]["ratio_min"] = dit[key]["min_s"] / dit["chain"]["min_s"]
        dit_summary = {"coop_k1_vs_both": dit["k1"]["ratio"], "coop_k4_vs_both": dit["k4"]["ratio"],
                       "bridged_handoff_vs_core_decode_encode": dit["bridge"]["ratio"],
                       "by_min_time": {"coop_k1_vs_both": dit["k1"]["ratio_min"],
                                       "coop_k4_vs_both": dit["k4"]["ratio_min"],
                                       "bridged_handoff_vs_core_decode_encode": dit["bridge"]["ratio_min"]}}
    harness.report("coop", rows, {
        "note": (f"tiny models (TAESD-type VAEs), cfg 7, euler/normal, {steps} steps, torch threads {ns.threads}. "
                 "Fusion rows: ratio = per-step time / 'A + B, no bridge'. Resolution rows: ratio = total time / the "
                 "leftover-noise core chain (same model evaluations at each resolution: steps/2 low + steps/2 high; "
                 "the bridge adds one low-res evaluation for x0 and a decode+encode)."),
        "fusion": fusion,
        "dit_flux_sdxl": dit_summary,
        "resolution_bridge_vs_core_chain": rb["median_s"] / c1["median_s"],
        "resolution_bridge_vs_hires_fix": rb["median_s"] / c2["median_s"],
        "by_min_time_resolution": {"bridge_vs_core_chain": rb["min_s"] / c1["min_s"],
                                   "bridge_vs_hires_fix": rb["min_s"] / c2["min_s"]},
    })


@__import__("torch").no_grad()
def coherence(h, nc, ma, va, pa, na, mb, vb, pb, nb, steps, seeds=(1, 2, 3)):
    """Handoff coherence (models/metrics.handoff_coherence) between the low-res stage's decoded
    clean estimate at the switch and the final high-res image: the resolution bridge vs a plain
    handoff that decodes the *noisy* latent, upscales, encodes with the other VAE and continues at
    the same noise level. On the tiny random models this is a plumbing check, not a quality result."""
    import importlib
    import statistics

    import comfy.sample
    import comfy.samplers
    import torch
    metrics = importlib.import_module(h.pack_module.__name__ + ".models.metrics")
    from_ = importlib.import_module(h.pack_module.__name__ + ".models.coop")
    n = steps // 2
    res = {"bridge": [], "plain": []}
    for seed in seeds:
        lat = {"samples": torch.zeros(1, 4, 8, 8)}
        sig_l = nc._schedule(ma, steps, "euler", "normal")
        sig_h = nc._schedule(mb, steps, "euler", "normal")
        sampler = comfy.samplers.sampler_object("euler")
        noise = comfy.sample.prepare_noise(lat["samples"], seed)
        z_low = comfy.sample.sample_custom(ma, noise, 7.0, sampler, sig_l[: n + 1], pa, na, lat["samples"],
                                           disable_pbar=True, seed=seed)
        x0 = nc.estimate_x0(ma, {"samples": z_low}, float(sig_l[n]), pa, na, 7.0, seed)
        ref = va.decode(x0)[0].numpy()
        # the bridge
        bridged, _ = nc.bridge_latent({"samples": z_low}, float(sig_l[n]), ma, va, mb, vb, 2.0, seed + 1,
                                        denoised=x0)
        # plain handoff: decode the noisy latent, upscale, encode, continue without new noise
        px = va.decode(z_low).movedim(-1, 1)
        px = from_.resize_pixels(px, (128, 128), "bicubic").movedim(1, -1)
        plain = {"samples": vb.encode(px)}
        tail = torch.tensor([float(v) for v in sig_h[n:]])
        for name, start in (("bridge", bridged["samples"]), ("plain", plain["samples"])):
            out = comfy.sample.sample_custom(mb, torch.zeros_like(start), 7.0, sampler, tail, pb, nb, start,
                                             disable_pbar=True, seed=seed)
            img = vb.decode(out)[0].numpy()
            res[name].append(metrics.handoff_coherence(ref, img))
    summary = {name: {k: statistics.mean(d[k] for d in lst) for k in lst[0]} for name, lst in res.items()}
    rows = [{"case": f"{name} handoff (tiny sd15 64px -> tiny sdxl 128px)", **vals} for name, vals in summary.items()]
    harness.report("coop_coherence", rows, {"note": "plumbing check on random tiny models (Atelier Mini had not "
                                                    f"landed): mean over seeds {list(seeds)}, switch at {n}/{steps} steps"})


if __name__ == "__main__":
    main()
