"""Time experts quality on Atelier Mini (issue 4): routed vs single-model sampling.

N seeded prompts from the world's benchmark stream (``world.prompt_set``, as bench/bench_quality.py);
every case is a graph of core + Atelier nodes (noise seed = prompt index, euler/normal, ``--steps``
steps for every case, cfg ``--cfg``, negative ''):

* ``sd15 alone`` / ``sdxl alone``: core KSampler on Mini sd15 (64 px) / Mini sdxl (128 px).
* ``struct sd15 -> tex sdxl @T``: AtelierStructTextureSampler (PanGu-Draw), structure = Mini sd15 at
  64 px for t >= T, texture = Mini sdxl at 128 px below, texture_scale 2 (the Coop bridge), as in
  workflows/time_experts_struct_texture.json. T = ``--t-struct`` (default 500, 250 and 750 too).
* ``struct sdxl -> tex sd15 @500``: the other way round (sdxl lays out at 128 px, sd15 finishes at
  64 px, texture_scale 0.5).
* with ``--old`` (an earlier Mini sd15 checkpoint, default out/mini_old/atelier_mini_sd15_3000):
  ``sd15 old alone`` and AtelierTimeExperts routing two sd15 experts by timestep (boundary 500) in the
  core KSampler, both orders (workflows/time_experts_sd15.json). When the two files are the same
  weights the routed rows must equal ``sd15 alone`` (a sanity check, reported).

Each final picture is scored with ``models/metrics.prompt_adherence`` (objects = colour and shape,
colours, shapes; count_match = the number of detected objects equals the number requested), next to
the analytic chance levels and the shuffled baseline (prompt i vs image i+1). Paired differences
(same prompts, same seeds) of each routed case against each single model.

    python bench/bench_quality_time.py [--n 24] [--steps 20] [--cfg 5]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
from pathlib import Path

import harness
from quality_common import (SCORES, add_common_args, adherence, adherence_row, base_graph, boot, decode,
                            format_paired, ksampler, paired_diff, run_cases)

OLD_DEFAULT = harness.ROOT / "out" / "mini_old" / "atelier_mini_sd15_3000.safetensors"


def register_path_loader(h, pkg: str) -> None:
    """A bench-only loader node for a Mini file at a given path (nodes/mini.py load_mini(family, path)):
    a user would load a second checkpoint with their checkpoint loader; Mini's loader takes only the family."""
    mini = importlib.import_module(pkg + ".nodes.mini")

    class BenchMiniPathLoader:
        CATEGORY = "bench"
        RETURN_TYPES = ("MODEL", "CLIP", "VAE")
        FUNCTION = "load"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"family": (["sd15", "sdxl"],), "path": ("STRING", {"default": ""})}}

        def load(self, family, path):
            return mini.load_mini(family, path)

    h.nodes.NODE_CLASS_MAPPINGS["BenchMiniPathLoader"] = BenchMiniPathLoader


def case_graph(case: str, text: str, seed: int, steps: int, cfg: float, old: str | None) -> dict:
    g = base_graph(text)
    if old:
        g["L3"] = {"class_type": "BenchMiniPathLoader", "inputs": {"family": "sd15", "path": old}}
    if case == "sd15 alone":
        g["S"] = ksampler("sd15", ["E1", 0], seed, steps, cfg)
        g["OUT"] = decode(["S", 0], "L1")
    elif case == "sdxl alone":
        g["S"] = ksampler("sdxl", ["E2", 0], seed, steps, cfg)
        g["OUT"] = decode(["S", 0], "L2")
    elif case == "sd15 old alone":
        g["S"] = ksampler("sd15", ["E1", 0], seed, steps, cfg)
        g["S"]["inputs"]["model"] = ["L3", 0]
        g["OUT"] = decode(["S", 0], "L1")
    elif case.startswith("routed sd15"):
        first, second = (("L3", "L1") if case == "routed sd15 old->new" else ("L1", "L3"))
        g["TE"] = {"class_type": "AtelierTimeExperts", "inputs": {
            "model_1": [first, 0], "model_2": [second, 0], "mode": "timestep", "boundaries": "500"}}
        g["S"] = ksampler("sd15", ["E1", 0], seed, steps, cfg)
        g["S"]["inputs"]["model"] = ["TE", 0]
        g["OUT"] = decode(["S", 0], "L1")
    elif case.startswith("struct "):
        t = int(case.rsplit("@", 1)[1])
        up = case.startswith("struct sd15")
        s, x = ("1", "2") if up else ("2", "1")
        g["S"] = {"class_type": "AtelierStructTextureSampler", "inputs": {
            "structure_model": [f"L{s}", 0], "structure_positive": [f"P{s}", 0], "structure_negative": [f"N{s}", 0],
            "texture_model": [f"L{x}", 0], "latent_image": [f"E{s}", 0], "seed": seed, "steps": steps, "cfg": cfg,
            "sampler_name": "euler", "scheduler": "normal", "t_struct": t, "denoise": 1.0,
            "texture_positive": [f"P{x}", 0], "texture_negative": [f"N{x}", 0],
            "structure_vae": [f"L{s}", 2], "texture_vae": [f"L{x}", 2], "texture_scale": 2.0 if up else 0.5}}
        g["OUT"] = decode(["S", 0], f"L{x}")
    else:
        raise ValueError(case)
    g["PV"] = {"class_type": "PreviewImage", "inputs": {"images": ["OUT", 0]}}
    return g


def main():
    ap = argparse.ArgumentParser(description="Routed (time experts) vs single-model sampling on Atelier Mini.")
    add_common_args(ap)
    ap.add_argument("--t-struct", default="750,500,250", help="T_struct values for sd15 -> sdxl")
    ap.add_argument("--old", default=str(OLD_DEFAULT), help="earlier Mini sd15 file for same-family routing; '' skips")
    ap.add_argument("--grid", default=str(harness.ROOT / "docs" / "quality_time_grid.png"), help="'' to skip")
    ap.add_argument("--grid-n", type=int, default=8)
    ap.add_argument("--name", default="quality_time", help="results file bench/results/<name>.json")
    ns = ap.parse_args()
    h, pkg, world, metrics, n = boot(ns)
    mini = importlib.import_module(pkg + ".nodes.mini")
    old = ns.old if ns.old and Path(ns.old).is_file() else None
    same_weights = None
    if old:
        register_path_loader(h, pkg)
        same_weights = Path(old).read_bytes() == mini.weights_path("sd15").read_bytes()

    cases = ["sd15 alone", "sdxl alone"]
    cases += [f"struct sd15->tex sdxl @{int(t)}" for t in ns.t_struct.split(",") if t.strip()]
    cases += ["struct sdxl->tex sd15 @500"]
    if old:
        cases += ["sd15 old alone", "routed sd15 old->new", "routed sd15 new->old"]
    prompts = world.prompt_set(ns.seed, n, size=64)
    captions = [p.caption for p in prompts]
    images, seconds = run_cases(h, captions, cases, lambda c, text, i: case_graph(c, text, i, ns.steps, ns.cfg, old))

    rows, per = [], {}
    for c in cases:
        per[c], shuf = adherence(metrics, captions, images[c])
        rows.append(adherence_row(c, images[c], seconds[c], per[c], shuf, ci=True))
    if old and same_weights:
        for c in ("sd15 old alone", "routed sd15 old->new", "routed sd15 new->old"):
            same = all(float(abs(a - b).max()) == 0.0 for a, b in zip(images[c], images["sd15 alone"]))
            print(f"sanity: {c} identical to sd15 alone (same weights): {same}")

    diffs = {}
    singles = [c for c in ("sd15 alone", "sdxl alone", "sd15 old alone") if c in cases]
    for c in cases:
        if c in singles:
            continue
        for s in singles:
            diffs[f"{c} - {s}"] = paired_diff(per[c], per[s])

    counts = [len(p.objects) for p in prompts]
    chance = metrics.chance_levels(sorted(set(counts)))
    print(f"\nPrompt adherence, N={n} prompts (seed {ns.seed}), {ns.steps} steps each, cfg {ns.cfg}; "
          f"mean ± 95% CI; mean requested objects {statistics.mean(counts):.2f}")
    cols = ("case", "px", "object", "color", "shape", "count_match", "mean_detected", "shuffled_object",
            "shuffled_color", "shuffled_shape", "margin_object", "margin_color", "margin_shape", "median_s")
    print(f"{'case':>28}  " + "  ".join(f"{c:>13}" for c in cols[1:]))
    for r in rows:
        cells = []
        for c in cols[1:]:
            v = r[c]
            cells.append(f"{v:6.3f}±{r[c + '_ci95']:5.3f}" if c in SCORES else
                         (f"{v:>13.3f}" if isinstance(v, float) else f"{v:>13}"))
        print(f"{r['case']:>28}  " + "  ".join(f"{x:>13}" for x in cells))
    print("chance (analytic): " + ", ".join(f"{a} {b:.3f}" for a, b in chance.items()))
    print("\nPaired differences routed - single (mean ± 95% CI; prompts better/worse)")
    for name, d in diffs.items():
        print(f"{name:>44}  " + format_paired(d))
    if ns.grid and not harness.quick():
        bq = importlib.import_module("bench_quality")
        g = ns.grid_n
        short = {"sd15 alone": "sd15", "sdxl alone": "sdxl", "sd15 old alone": "sd15 old",
                 "routed sd15 old->new": "old>new", "routed sd15 new->old": "new>old"}

        def label(c):
            if c.startswith("struct "):
                return ("s>xl " if c.startswith("struct sd15") else "xl>s ") + c.rsplit("@", 1)[1]
            return short.get(c, c[:9])
        bq.save_grid(Path(ns.grid), [(label(c), images[c][:g], captions[:g]) for c in cases])
        print(f"grid: {ns.grid}")
    weights = {fam: mini.read_weights(fam)[1].get("steps") for fam in ("sd15", "sdxl")}
    if old:
        weights["sd15_old"] = mini.read_weights("sd15", old)[1].get("steps")
    harness.report(ns.name, rows, {
        "chance": chance, "prompt_seed": ns.seed, "steps": ns.steps, "cfg": ns.cfg, "mini_train_steps": weights,
        "old_file": old, "old_is_current_sd15": same_weights, "paired_differences": diffs,
        "mean_requested_objects": statistics.mean(counts),
        "seconds_note": "median wall seconds per image on a shared 2-core CPU (one torch thread), noisy",
        "note": "scores: fraction of requested objects found (colour+shape / colour / shape); shuffled_*: prompt i "
                "against image i+1; count_match: detected count equals requested count"})


if __name__ == "__main__":
    main()
