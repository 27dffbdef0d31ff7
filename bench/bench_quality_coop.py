"""Coop bridge quality on Atelier Mini (issues 7, 18): handoff coherence and prompt adherence.

For N seeded prompts from the world's benchmark stream (``world.prompt_set``), the same as
bench/bench_quality.py, every case is a graph of core + Atelier nodes run by the headless executor
(noise seed = prompt index, euler/normal, ``--steps`` steps, cfg ``--cfg``, negative ''). Below for the
default ``--pair sd15-sdxl``; ``--pair`` takes any two Mini families as stage 1 -> stage 2, each at its
Mini native size (``nodes/mini.native_px``), the bridge's scale = the ratio of the sizes: ``sdxl-pixart``
(UNet 128 px -> DiT 288 px, x2.25) and ``pixart-sdxl`` (DiT 288 px -> UNet 128 px, x4/9; the resolution
bridge is the same ``bridged_two_stage`` as Struct->Texture across families). Mini pixart is in Mini
sdxl's latent space (one VAE) but on another DDPM schedule (sigma_max 157 vs 14.6): the bridge hands over at
the same noise-to-signal ratio through each model's ``model_sampling``; the two core chains start stage 2
at step k of its own schedule, as two KSamplerAdvanced with the same step counts do:

* ``sd15 alone``     KSampler on Mini sd15 at 64 px (the stage-1 model's own picture)
* ``sdxl alone``     KSampler on Mini sdxl at 128 px (reference, no handoff)
* ``bridge``         AtelierResolutionBridgeSampler sd15 64 px -> sdxl 128 px, switch_at = k/steps,
                     scale 2 (as workflows/coop_sd15_to_sdxl_upscale.json)
* ``plain``          the plain core handoff at the same noise level: sd15 KSamplerAdvanced steps 0..k
                     with leftover noise -> VAEDecode (sd15 VAE) -> ImageScale 128 bicubic -> VAEEncode
                     (sdxl VAE) -> sdxl KSamplerAdvanced from step k, add_noise disabled
* ``core renoise``   the core chain a careful user could build instead: sd15 KSamplerAdvanced 0..k
                     *without* leftover noise (jumps to its clean estimate) -> decode -> ImageScale ->
                     sdxl VAEEncode -> sdxl KSamplerAdvanced from step k with add_noise enabled
                     (fresh noise at step k's level; what the bridge does, built from core nodes)
* ``fused``          AtelierCoopSampler, A = sdxl 128 px, B = sd15 at b_scale 0.5, settings of
                     workflows/coop_sd15_sdxl_fused.json (d 0.6, bridge_every 2, window 0..0.8)

Coherence (``models/metrics.handoff_coherence``: edge F1 at 2 px, Chamfer, RGB-histogram
intersection, low-frequency PSNR; compared at the smaller size, 64 px here) of each final picture against two stage-1
pictures: ``x0@k`` (sd15's clean estimate at the switch, from KSamplerAdvanced 0..k without leftover
noise, decoded) and ``sd15 alone`` (the full sd15 picture with the same seed). Two yardsticks:
``sdxl alone`` vs the stage-1 pictures (same prompt, no shared trajectory) and a shuffled level
(stage-1 picture of prompt i vs the final of prompt i+1). Prompt adherence of every final picture
(``prompt_adherence``) with the analytic chance levels and the shuffled baseline.

    python bench/bench_quality_coop.py [--pair sd15-sdxl|sdxl-pixart|pixart-sdxl] [--n 24] [--steps 20]
                                       [--cfg 5] [--switch 0.5]
"""
from __future__ import annotations

import argparse
import importlib
import statistics

import harness
from quality_common import (add_common_args, adherence, adherence_row, base_graph, boot, decode, family_refs,
                            format_paired, ksampler, mean_ci, paired_diff, run_cases)

COH = ("edge_f1", "chamfer", "hist_intersection", "lowfreq_psnr")
#: case names with the stage families in them; "sd15 alone" / "sdxl alone" are "<stage 1> alone" / "<stage 2>
#: alone" of the default pair (for another pair: its families' names)
FINALS = ("stage1 alone", "stage2 alone", "bridge", "plain", "core renoise", "fused")
PAIRS = {"sd15-sdxl": ("sd15", "sdxl"), "sdxl-pixart": ("sdxl", "pixart"), "pixart-sdxl": ("pixart", "sdxl")}


class Pair:
    """Stage 1 -> stage 2 families of Mini, their native sizes (nodes/mini.native_px), the bridge scale and
    whether they share a latent space (the family table, glue.FAMILIES)."""

    def __init__(self, name: str, mini, glue):
        self.name = name
        self.families = PAIRS[name]
        self.px = tuple(mini.native_px(f) for f in self.families)
        self.scale = self.px[1] / self.px[0]
        rows = [glue.FAMILIES[f] for f in self.families]
        self.latents = tuple(f"{r.latent_format.__name__} {r.channels} ch" for r in rows)
        self.same_latent_space = rows[0].latent_format is rows[1].latent_format

    def label(self, case: str) -> str:
        return case.replace("stage1", self.families[0]).replace("stage2", self.families[1])


def _ksa(fam: str, latent, seed, steps, cfg, start, end, add_noise: bool, leftover: bool, families) -> dict:
    model, pos, neg = family_refs(fam, families)
    return {"class_type": "KSamplerAdvanced", "inputs": {
        "model": model, "add_noise": "enable" if add_noise else "disable", "noise_seed": seed, "steps": steps,
        "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "positive": pos, "negative": neg,
        "latent_image": latent, "start_at_step": start, "end_at_step": end,
        "return_with_leftover_noise": "enable" if leftover else "disable"}}


def case_graph(case: str, text: str, seed: int, steps: int, cfg: float, k: int, pair: Pair) -> dict:
    """API graph of one case; the picture to read is node 'OUT' (a VAEDecode)."""
    fams, (px1, px2) = pair.families, pair.px
    g = base_graph(text, fams, pair.px)
    if case == "stage1 alone":
        g["S"] = ksampler(fams[0], ["E1", 0], seed, steps, cfg, fams)
        g["OUT"] = decode(["S", 0], "L1")
    elif case == "stage2 alone":
        g["S"] = ksampler(fams[1], ["E2", 0], seed, steps, cfg, fams)
        g["OUT"] = decode(["S", 0], "L2")
    elif case == "x0@k":
        g["S"] = _ksa(fams[0], ["E1", 0], seed, steps, cfg, 0, k, add_noise=True, leftover=False, families=fams)
        g["OUT"] = decode(["S", 0], "L1")
    elif case == "bridge":
        g["S"] = {"class_type": "AtelierResolutionBridgeSampler", "inputs": {
            "model_low": ["L1", 0], "vae_low": ["L1", 2], "positive_low": ["P1", 0], "negative_low": ["N1", 0],
            "model_high": ["L2", 0], "vae_high": ["L2", 2], "positive_high": ["P2", 0], "negative_high": ["N2", 0],
            "latent_image": ["E1", 0], "seed": seed, "steps": steps, "sampler_name": "euler", "scheduler": "normal",
            "cfg_low": cfg, "cfg_high": cfg, "switch_at": k / steps, "scale": pair.scale, "resize_method": "bicubic"}}
        g["OUT"] = decode(["S", 0], "L2")
    elif case in ("plain", "core renoise"):
        renoise = case == "core renoise"
        g["S1"] = _ksa(fams[0], ["E1", 0], seed, steps, cfg, 0, k, add_noise=True, leftover=not renoise,
                       families=fams)
        g["D1"] = decode(["S1", 0], "L1")
        g["UP"] = {"class_type": "ImageScale", "inputs": {"image": ["D1", 0], "upscale_method": "bicubic",
                                                          "width": px2, "height": px2, "crop": "disabled"}}
        g["EN"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["UP", 0], "vae": ["L2", 2]}}
        g["S2"] = _ksa(fams[1], ["EN", 0], seed, steps, cfg, k, 10000, add_noise=renoise, leftover=False,
                       families=fams)
        g["OUT"] = decode(["S2", 0], "L2")
    elif case == "fused":
        g["S"] = {"class_type": "AtelierCoopSampler", "inputs": {
            "model_a": ["L2", 0], "vae_a": ["L2", 2], "positive_a": ["P2", 0], "negative_a": ["N2", 0], "cfg_a": cfg,
            "model_b": ["L1", 0], "vae_b": ["L1", 2], "positive_b": ["P1", 0], "negative_b": ["N1", 0], "cfg_b": cfg,
            "fusion_d": 0.6, "bridge_every": 2, "start_percent": 0.0, "end_percent": 0.8, "b_scale": px1 / px2,
            "resize_method": "bicubic", "latent_image": ["E2", 0], "seed": seed, "steps": steps,
            "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
        g["OUT"] = decode(["S", 0], "L2")
    else:
        raise ValueError(case)
    g["PV"] = {"class_type": "PreviewImage", "inputs": {"images": ["OUT", 0]}}
    return g


def main():
    ap = argparse.ArgumentParser(description="Coop bridge coherence and adherence on Atelier Mini.")
    add_common_args(ap)
    ap.add_argument("--pair", default="sd15-sdxl", choices=sorted(PAIRS),
                    help="stage 1 -> stage 2 Mini families, each at its native size")
    ap.add_argument("--switch", type=float, default=0.5, help="handoff at step round(switch*steps)")
    ap.add_argument("--grid", default=None, help="default docs/quality_coop_grid.png (sd15-sdxl), "
                                                 "docs/quality_coop_<pair>_grid.png; '' to skip")
    ap.add_argument("--grid-n", type=int, default=8)
    ap.add_argument("--name", default=None, help="results file bench/results/<name>.json (default quality_coop, "
                                                 "quality_coop_<pair> for another pair)")
    ap.add_argument("--cases", default=",".join(FINALS),
                    help="comma-separated finals to run, stage1/stage2 or the family names (the stage-1 model "
                         "alone is always run: it is a stage-1 reference)")
    ns = ap.parse_args()
    k = round(ns.switch * ns.steps)
    h, pkg, world, metrics, n = boot(ns)
    pair = Pair(ns.pair, importlib.import_module(pkg + ".nodes.mini"), importlib.import_module(pkg + ".nodes.glue"))
    default = ns.pair == "sd15-sdxl"
    suffix = "" if default else "_" + ns.pair.replace("-", "_")
    ns.name = ns.name or "quality_coop" + suffix
    if ns.grid is None:
        ns.grid = str(harness.ROOT / "docs" / f"quality_coop{suffix}_grid.png")
    L = pair.label

    prompts = world.prompt_set(ns.seed, n, size=64)
    captions = [p.caption for p in prompts]
    wanted = set(ns.cases.split(","))
    finals = [c for c in FINALS if c == "stage1 alone" or c in wanted or L(c) in wanted]
    cases = ["x0@k"] + finals
    images, seconds = run_cases(h, captions, cases,
                                lambda c, text, i: case_graph(c, text, i, ns.steps, ns.cfg, k, pair))

    # prompt adherence of every final picture
    rows, per_adh = [], {}
    for c in finals:
        per_adh[c], shuf = adherence(metrics, captions, images[c])
        rows.append(adherence_row(L(c), images[c], seconds[c], per_adh[c], shuf, ci=False))
    adh_diffs = {}
    for c in [c for c in ("bridge", "plain", "core renoise", "fused") if c in finals]:
        for ref in [r for r in ("stage1 alone", "stage2 alone") if r in finals]:
            adh_diffs[f"{c} - {L(ref)}"] = paired_diff(per_adh[c], per_adh[ref])

    # coherence of finals against the stage-1 pictures
    coh = {}
    pairs = [(ref, c) for ref in ("x0@k", "stage1 alone") for c in finals if c != ref]
    pairs += [("stage2 alone", "fused")] if {"stage2 alone", "fused"} <= set(finals) else []
    for ref, c in pairs:
        per = [metrics.handoff_coherence(images[ref][i], images[c][i]) for i in range(n)]
        shuf = [metrics.handoff_coherence(images[ref][i], images[c][(i + 1) % n]) for i in range(n)]
        coh[(ref, c)] = {"per": per, "shuffled": {m: statistics.mean(d[m] for d in shuf) for m in COH}}
    coh_rows = []
    for (ref, c), v in coh.items():
        r = {"case": f"{L(c)} vs {L(ref)}", "final": L(c), "stage1": L(ref)}
        for m in COH:
            mm, half = mean_ci([d[m] for d in v["per"]])
            r[m], r[m + "_ci95"] = mm, half
            r["shuffled_" + m] = v["shuffled"][m]
        r["chamfer_median"] = statistics.median(d["chamfer"] for d in v["per"])
        coh_rows.append(r)
    # paired differences bridge - plain, bridge - core renoise (same prompts, same seeds)
    diffs = {}
    for ref in ("x0@k", "stage1 alone"):
        for a, b in (("bridge", "plain"), ("bridge", "core renoise"), ("core renoise", "plain")):
            if a not in finals or b not in finals:
                continue
            pa, pb = coh[(ref, a)]["per"], coh[(ref, b)]["per"]
            d = {}
            for m in COH:
                xs = [x[m] - y[m] for x, y in zip(pa, pb)]
                mm, half = mean_ci(xs)
                d[m] = {"mean": mm, "ci95": half, "a_better": sum((x < 0) if m == "chamfer" else (x > 0) for x in xs)}
            diffs[f"{a} - {b} (vs {L(ref)})"] = d

    counts = [len(p.objects) for p in prompts]
    chance = metrics.chance_levels(sorted(set(counts)))
    print(f"\n{pair.families[0]} {pair.px[0]} px -> {pair.families[1]} {pair.px[1]} px (scale {pair.scale:g}; latents "
          f"{' / '.join(pair.latents)}, {'one' if pair.same_latent_space else 'two'} latent space(s)). "
          f"Prompt adherence, N={n} prompts (seed {ns.seed}), {ns.steps} steps, cfg {ns.cfg}, switch at step {k}")
    cols = ("case", "px", "object", "color", "shape", "count_match", "mean_detected", "shuffled_object",
            "shuffled_color", "shuffled_shape", "margin_object", "margin_color", "margin_shape", "median_s")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.3f}" if isinstance(r[c], float) else f"{r[c]:>14}" for c in cols))
    print("chance (analytic): " + ", ".join(f"{a} {b:.3f}" for a, b in chance.items()))
    print("\nHandoff coherence (mean ± 95% CI; shuffled = stage-1 of prompt i vs final of prompt i+1)")
    print(f"{'final vs stage-1':>28}  " + "  ".join(f"{m:>22}" for m in COH))
    for r in coh_rows:
        print(f"{r['case']:>28}  " + "  ".join(
            f"{r[m]:7.3f}±{r[m + '_ci95']:5.3f} ({r['shuffled_' + m]:6.3f})" for m in COH)
            + f"  chamfer median {r['chamfer_median']:.2f}")
    print("\nPaired differences (mean ± 95% CI; count of prompts where the first is better)")
    for name, d in diffs.items():
        print(f"{name:>40}  " + "  ".join(f"{m} {v['mean']:+.3f}±{v['ci95']:.3f} ({v['a_better']}/{n})"
                                          for m, v in d.items()))
    print("\nPaired adherence differences (mean ± 95% CI; prompts better/worse)")
    for name, d in adh_diffs.items():
        print(f"{name:>28}  " + format_paired(d))
    if ns.grid and not harness.quick():
        from pathlib import Path
        bq = importlib.import_module("bench_quality")
        g = ns.grid_n
        bq.save_grid(Path(ns.grid), [(L(c)[:7], images[c][:g], captions[:g]) for c in cases])
        print(f"grid: {ns.grid}")
    weights = {}
    for fam in pair.families:
        try:
            weights[fam] = importlib.import_module(pkg + ".nodes.mini").read_weights(fam)[1].get("steps")
        except Exception as e:  # noqa: BLE001 - informative only
            weights[fam] = repr(e)
    harness.report(ns.name, rows + coh_rows, {
        "pair": ns.pair, "px": pair.px, "scale": pair.scale, "latents": pair.latents, "chance": chance, "prompt_seed": ns.seed, "steps": ns.steps, "cfg": ns.cfg, "switch_step": k,
        "mini_train_steps": weights, "paired_differences": diffs,
        "paired_adherence_differences": adh_diffs, "mean_requested_objects": statistics.mean(counts),
        "seconds_note": "median wall seconds per image on a shared 2-core CPU (one torch thread), noisy",
        "note": "finals scored with prompt_adherence; coherence = handoff_coherence(stage-1 picture, final) at 64 px"})


if __name__ == "__main__":
    main()
