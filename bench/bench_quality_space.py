"""Region adherence of space experts / paint-with-words on Atelier Mini, vs plain and core masked sampling.

Each case asks for colour A (a shape) in region 1 and colour B (another shape) in region 2; the
regions are the two halves of the image (left/right or top/bottom, region 1 on either side), and
the caption says the same in the world's grammar ("a red circle left of a blue square"). Every
case is run, with the same noise seed, through graphs a user would build:

* ``plain``      core KSampler on the caption; no region control.
* ``pww+experts`` a painted colour map (LoadImage) -> Atelier Regions from Color Map
  ("#ff0000: red circle; #0000ff: blue square") -> Atelier Paint-with-Words (weight w) with two
  Atelier Space Experts ("a red circle", "a blue square", routing in order) -> core KSampler
  (the wiring of workflows/paint_with_words_colormap.json).
* ``pww-only``    the same without experts (eDiff-I bias only).
* ``experts-only`` the same with weight 0 (experts painting the regions, no bias).
* ``core-masked`` core ConditioningSetMask (LoadImageMask, strength 1) for each region's prompt +
  ConditioningCombine with the caption (area composition with a global prompt).

Scores (``models/metrics.py``): for A in region 1 and B in region 2 the IoU of the detected colour
with its region (``region_adherence``), the share of the colour's area inside it (precision), and as
a control the swapped IoU (A against region 2, B against region 1); "in place" = the colour was
found and at least half of its area lies in its region; prompt adherence (colours / objects found).
Chance: a colour placed at random lands mostly in its half half the time (in place = found x 0.5),
and the IoU of a concept of the found area scattered at random (``region_iou_chance``). The IoU of
a half with one world object is small even when perfect: the ceiling row is the world's own
rendering of a medium object centred in each half.

Cost: process CPU seconds per sampling step, from runs at ``--steps`` and at 2 steps on the same
case (upstream nodes cached), median over ``--time-reps``, interleaved; ratio vs plain.

    python bench/bench_quality_space.py [--family sd15|sdxl|pixart] [--regions halves|boxes] [--n 24] [--steps 20]
        [--cfg 5] [--weight 1] [--methods plain,pww+experts,pww-only,pww-only@0.25,experts-only,core-masked]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import tempfile
import time
from pathlib import Path

import harness
import numpy as np

FAMILY_PX = {"sd15": 64, "sdxl": 128, "pixart": 288}  # pixart: Mini-DiT (DiT cross-attention adapter)
LAYOUTS = ("left of", "right of", "above", "below")
METHODS = ("plain", "pww+experts", "pww-only", "experts-only", "core-masked")
DEFAULT_METHODS = ("plain", "pww+experts", "pww-only", "pww-only@0.25", "experts-only", "core-masked")


# ----------------------------------------------------------------------------- cases


def half(px: int, where: str) -> np.ndarray:
    m = np.zeros((px, px), dtype=bool)
    h = px // 2
    {"left": lambda: m.__setitem__((slice(None), slice(0, h)), True),
     "right": lambda: m.__setitem__((slice(None), slice(h, None)), True),
     "top": lambda: m.__setitem__((slice(0, h), slice(None)), True),
     "bottom": lambda: m.__setitem__((slice(h, None), slice(None)), True)}[where]()
    return m


REGION1 = {"left of": "left", "right of": "right", "above": "top", "below": "bottom"}
OPPOSITE = {"left": "right", "right": "left", "top": "bottom", "bottom": "top"}


def box(px: int, where: str) -> np.ndarray:
    """A square of half the image side, centred in the named half."""
    m = np.zeros((px, px), dtype=bool)
    h, q = px // 2, px // 4
    sl = {"left": (slice(q, q + h), slice(0, h)), "right": (slice(q, q + h), slice(h, px)),
          "top": (slice(0, h), slice(q, q + h)), "bottom": (slice(h, px), slice(q, q + h))}[where]
    m[sl] = True
    return m


def make_cases(world, seed: int, n: int, px: int, regions: str = "halves") -> list[dict]:
    """n cases: distinct colours, distinct shapes, layouts cycling through the four relations."""
    rng = np.random.default_rng(np.random.SeedSequence([seed, 5]))
    colors, shapes = list(world.COLORS), list(world.SHAPES)
    shape_fn = {"halves": half, "boxes": box}[regions]
    cases = []
    for i in range(n):
        ca, cb = rng.choice(len(colors), 2, replace=False)
        sa, sb = rng.choice(len(shapes), 2, replace=False)
        rel = LAYOUTS[i % len(LAYOUTS)]
        a, b = (colors[ca], shapes[sa]), (colors[cb], shapes[sb])
        da, db = f"{world._article(a[0])} {a[0]} {a[1]}", f"{world._article(b[0])} {b[0]} {b[1]}"
        r1 = REGION1[rel]
        cases.append({"i": i, "caption": f"{da} {rel} {db}", "A": a, "B": b, "desc_a": da, "desc_b": db,
                      "relation": rel, "r1": shape_fn(px, r1), "r2": shape_fn(px, OPPOSITE[r1])})
    return cases


def write_maps(case: dict, folder: Path) -> str:
    """The painted colour map: region 1 pure red, region 2 pure blue (PNG in ComfyUI's input dir)."""
    from PIL import Image
    img = np.zeros(case["r1"].shape + (3,), dtype=np.uint8)
    img[case["r1"]] = (255, 0, 0)
    img[case["r2"]] = (0, 0, 255)
    name = f"atelier_qs_{case['i']:03d}_{case['r1'].shape[0]}.png"
    Image.fromarray(img).save(folder / name)
    return name


def ceiling_image(world, case: dict, px: int) -> np.ndarray:
    """The world's rendering of a medium A centred in region 1 and a medium B centred in region 2."""
    def centre(m):
        ys, xs = np.nonzero(m)
        return (xs.mean() + 0.5) / px, (ys.mean() + 0.5) / px
    specs = []
    for (col, shp), m in ((case["A"], case["r1"]), (case["B"], case["r2"])):
        cx, cy = centre(m)
        specs.append(world.ObjectSpec(shp, col, "medium", world.COLORS[col], cx, cy, 0.145, 0.0))
    bg = world.Background("plain", (128, 128, 128), 0.0, 0.0, 0.0)
    return world.render(specs, bg, px)[0].astype(np.float32) / 255.0


# ----------------------------------------------------------------------------- graphs


def graph(method: str, family: str, case: dict, map_png: str, seed: int, steps: int, cfg: float,
          weight: float) -> dict:
    """API prompt of one method; 'name@w' overrides the paint-with-words weight."""
    if "@" in method:
        method, w = method.split("@")
        weight = float(w)
    px = FAMILY_PX[family]
    (ca, sa), (cb, sb) = case["A"], case["B"]
    g = {
        "1": {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": family}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": px, "height": px, "batch_size": 1}},
        "20": {"class_type": "CLIPTextEncode", "inputs": {"text": case["caption"], "clip": ["1", 1]}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    model, positive = ["1", 0], ["20", 0]
    if method != "plain":
        g["21"] = {"class_type": "CLIPTextEncode", "inputs": {"text": case["desc_a"], "clip": ["1", 1]}}
        g["22"] = {"class_type": "CLIPTextEncode", "inputs": {"text": case["desc_b"], "clip": ["1", 1]}}
    if method in ("pww+experts", "pww-only", "experts-only"):
        g["10"] = {"class_type": "LoadImage", "inputs": {"image": map_png}}
        g["30"] = {"class_type": "AtelierRegionsFromColorMap", "inputs": {
            "color_map": ["10", 0], "mapping": f"#ff0000: {ca} {sa}; #0000ff: {cb} {sb}", "tolerance": 0.1}}
        pww = {"model": ["1", 0], "clip": ["1", 1], "prompt": case["caption"], "regions": ["30", 0],
               "weight": 0.0 if method == "experts-only" else weight, "alpha": 0.2, "routing": "in order",
               "gate_noise": 0.0, "seed": 0}
        if method != "pww-only":
            g["31"] = {"class_type": "AtelierSpaceExpert", "inputs": {"conditioning": ["21", 0], "name": "region 1"}}
            g["32"] = {"class_type": "AtelierSpaceExpert", "inputs": {"conditioning": ["22", 0], "name": "region 2",
                                                                     "experts": ["31", 0]}}
            pww["experts"] = ["32", 0]
        g["33"] = {"class_type": "AtelierPaintWithWords", "inputs": pww}
        model, positive = ["33", 0], ["33", 1]
    elif method == "core-masked":
        g["11"] = {"class_type": "LoadImageMask", "inputs": {"image": map_png, "channel": "red"}}
        g["12"] = {"class_type": "LoadImageMask", "inputs": {"image": map_png, "channel": "blue"}}
        g["40"] = {"class_type": "ConditioningSetMask", "inputs": {
            "conditioning": ["21", 0], "mask": ["11", 0], "strength": 1.0, "set_cond_area": "default"}}
        g["41"] = {"class_type": "ConditioningSetMask", "inputs": {
            "conditioning": ["22", 0], "mask": ["12", 0], "strength": 1.0, "set_cond_area": "default"}}
        g["42"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["20", 0], "conditioning_2": ["40", 0]}}
        g["43"] = {"class_type": "ConditioningCombine", "inputs": {"conditioning_1": ["42", 0], "conditioning_2": ["41", 0]}}
        positive = ["43", 0]
    elif method != "plain":
        raise ValueError(method)
    g["5"] = {"class_type": "KSampler", "inputs": {
        "model": model, "positive": positive, "negative": ["3", 0], "latent_image": ["4", 0], "seed": seed,
        "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    return g


# ----------------------------------------------------------------------------- scoring


def score_image(metrics, image, case) -> dict:
    dets = metrics.detect_objects(image)
    out = {}
    for key, col, own, other in (("a", case["A"][0], case["r1"], case["r2"]),
                                 ("b", case["B"][0], case["r2"], case["r1"])):
        ra = metrics.region_adherence(image, own, col, detections=dets)
        sw = metrics.region_adherence(image, other, col, detections=dets)
        found = ra["found_area"] > 0
        out[f"iou_{key}"] = ra["iou"]
        out[f"swap_{key}"] = sw["iou"]
        out[f"found_{key}"] = float(found)
        out[f"inplace_{key}"] = float(found and ra["precision"] >= 0.5)
        out[f"prec_{key}"] = ra["precision"] if found else float("nan")
        out[f"chance_iou_{key}"] = metrics.region_iou_chance(ra["region_area"], ra["found_area"])
    adh = metrics.prompt_adherence(None, case["caption"], detections=dets)
    out["color"], out["object"] = adh.color_score, adh.object_score
    out["both_inplace"] = float(out["inplace_a"] and out["inplace_b"])
    return out


def summarise(scores: list[dict]) -> dict:
    n = len(scores)
    mean = lambda k: sum(s[k] for s in scores) / n
    prec = [s[k] for s in scores for k in ("prec_a", "prec_b") if not np.isnan(s[k])]
    return {
        "iou_A_r1": mean("iou_a"), "iou_B_r2": mean("iou_b"),
        "iou_both": (mean("iou_a") + mean("iou_b")) / 2,
        "swap_iou": (mean("swap_a") + mean("swap_b")) / 2,
        "inplace_A": mean("inplace_a"), "inplace_B": mean("inplace_b"), "both_inplace": mean("both_inplace"),
        "found": (mean("found_a") + mean("found_b")) / 2,
        "precision_found": sum(prec) / len(prec) if prec else float("nan"),
        "chance_iou": (mean("chance_iou_a") + mean("chance_iou_b")) / 2,
        "chance_inplace": (mean("found_a") + mean("found_b")) / 2 * 0.5,
        "color": mean("color"), "object": mean("object"),
    }


def sign_test(wins: int, losses: int) -> float:
    """Two-sided exact sign-test p-value (ties dropped)."""
    from math import comb
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


# ----------------------------------------------------------------------------- main


def main():
    ap = argparse.ArgumentParser(description="Region adherence of space experts / paint-with-words on Atelier Mini.")
    ap.add_argument("--family", default="sd15", choices=sorted(FAMILY_PX))
    ap.add_argument("--n", type=int, default=None, help="cases (default 24; 4 quick)")
    ap.add_argument("--seed", type=int, default=11, help="case-set seed")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--weight", type=float, default=1.0, help="paint-with-words weight w (node default 1.0)")
    ap.add_argument("--methods", default=",".join(DEFAULT_METHODS),
                    help=f"comma-separated, from {', '.join(METHODS)}; 'name@w' sets the weight, e.g. pww-only@0.25")
    ap.add_argument("--regions", default="halves", choices=("halves", "boxes"),
                    help="halves: region 1 and 2 tile the image; boxes: half-side squares centred in each half "
                         "(the rest is background, left to the caption)")
    ap.add_argument("--time-reps", type=int, default=None, help="timing repeats per method (default 7; 1 quick)")
    ap.add_argument("--grid", default=None, help="grid PNG (default out/bench/quality_space_<family>_<regions>.png; '' skips)")
    ap.add_argument("--grid-n", type=int, default=12)
    ap.add_argument("--tag", default="", help="suffix of the result name")
    ns = ap.parse_args()
    n = ns.n or (4 if harness.quick() else 24)
    reps = ns.time_reps or (1 if harness.quick() else 7)
    methods = [m for m in ns.methods.split(",") if m]
    import torch
    torch.set_num_threads(1)
    h = harness.boot()
    pkg = h.pack_module.__name__
    world = importlib.import_module(pkg + ".models.world")
    metrics = importlib.import_module(pkg + ".models.metrics")
    px = FAMILY_PX[ns.family]
    in_dir = Path(tempfile.mkdtemp(prefix="atelier_qs_"))
    h.folder_paths.set_input_directory(str(in_dir))

    cases = make_cases(world, ns.seed, n, px, ns.regions)
    pngs = [write_maps(c, in_dir) for c in cases]
    images = {m: [] for m in methods}
    scores = {m: [] for m in methods}
    wall = {m: [] for m in methods}
    for c, png in zip(cases, pngs):
        for m in methods:
            t0 = time.perf_counter()
            h.run_prompt(graph(m, ns.family, c, png, c["i"], ns.steps, ns.cfg, ns.weight))
            wall[m].append(time.perf_counter() - t0)
            im = h.executor.caches.outputs.get("6")[0][0][0].numpy()
            images[m].append(im)
            scores[m].append(score_image(metrics, im, c))
    ceiling = summarise([score_image(metrics, ceiling_image(world, c, px), c) for c in cases])

    # per-step cost: CPU seconds at --steps minus at 2 steps, same case, upstream cached; interleaved
    per_step = {m: [] for m in methods}
    lo = 2
    for r in range(reps):
        c, png = cases[r % n], pngs[r % n]
        for m in methods:
            seed = 10_000 + r
            h.run_prompt(graph(m, ns.family, c, png, seed, 3, ns.cfg, ns.weight))  # warm upstream
            ts = {}
            for s in (lo, ns.steps):
                t0 = time.process_time()
                h.run_prompt(graph(m, ns.family, c, png, seed, s, ns.cfg, ns.weight))
                ts[s] = time.process_time() - t0
            per_step[m].append((ts[ns.steps] - ts[lo]) / (ns.steps - lo))

    base_step = statistics.median(per_step["plain"]) if "plain" in per_step else None
    rows = []
    for m in methods:
        row = {"case": m, "n": n, **summarise(scores[m]),
               "per_step_s": statistics.median(per_step[m]), "median_s": statistics.median(wall[m])}
        if base_step:
            row["ratio"] = row["per_step_s"] / base_step
        if m != "plain" and "plain" in methods:
            d = [(s["iou_a"] + s["iou_b"]) - (p["iou_a"] + p["iou_b"]) for s, p in zip(scores[m], scores["plain"])]
            w, l_ = sum(x > 1e-9 for x in d), sum(x < -1e-9 for x in d)
            row["iou_wins_vs_plain"], row["iou_losses_vs_plain"] = w, l_
            row["sign_p_vs_plain"] = sign_test(w, l_)
            # the other way: the colours in the wrong region (swapped IoU) — lower is better
            d = [(s["swap_a"] + s["swap_b"]) - (p["swap_a"] + p["swap_b"]) for s, p in zip(scores[m], scores["plain"])]
            w, l_ = sum(x < -1e-9 for x in d), sum(x > 1e-9 for x in d)
            row["swap_wins_vs_plain"], row["swap_losses_vs_plain"] = w, l_
            row["swap_sign_p_vs_plain"] = sign_test(w, l_)
        rows.append(row)
    rows.append({"case": "ceiling (world render)", "n": n, **ceiling})

    cols = ("case", "iou_A_r1", "iou_B_r2", "swap_iou", "chance_iou", "inplace_A", "inplace_B", "both_inplace",
            "chance_inplace", "found", "color", "object", "ratio")
    print(f"\nAtelier Mini {ns.family} {px}px, {ns.regions}, {n} cases, {ns.steps} steps, cfg {ns.cfg}, pww weight {ns.weight}")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.3f}" if isinstance(r.get(c), float) else f"{r.get(c, '-')!s:>14}"
                        for c in cols))
    for r in rows:
        if "iou_wins_vs_plain" in r:
            print(f"{r['case']}: IoU(A,r1)+IoU(B,r2) above plain in {r['iou_wins_vs_plain']}/{n} cases, below in "
                  f"{r['iou_losses_vs_plain']} (sign test p = {r['sign_p_vs_plain']:.2g}); swapped IoU below plain in "
                  f"{r['swap_wins_vs_plain']}, above in {r['swap_losses_vs_plain']} (p = {r['swap_sign_p_vs_plain']:.2g})")

    grid = ns.grid if ns.grid is not None else str(harness.ROOT / "out" / "bench" / f"quality_space_{ns.family}_{ns.regions}{ns.tag}.png")
    if grid:
        bq = importlib.import_module("bench_quality")
        k = min(ns.grid_n, n)
        caps = [c["caption"] for c in cases[:k]]
        grid_rows = [("region", [np.stack([c["r1"], np.zeros_like(c["r1"]), c["r2"]], -1).astype("float32")
                                 for c in cases[:k]], [f"red: {c['desc_a']}; blue: {c['desc_b']}" for c in cases[:k]])]
        grid_rows += [(m.replace("+", "+\n").replace("-", "-\n").replace("@", "\n@"), images[m][:k], caps)
                      for m in methods]
        bq.save_grid(Path(grid), grid_rows)
        print(f"grid: {grid}")
    weights = harness.ROOT / "weights" / f"atelier_mini_{ns.family}.safetensors"
    st = weights.stat()
    harness.report(f"quality_space_{ns.family}_{ns.regions}{ns.tag}", rows, {
        "family": ns.family, "regions": ns.regions, "px": px, "steps": ns.steps, "cfg": ns.cfg, "pww_weight": ns.weight,
        "case_seed": ns.seed, "noise_seed": "case index (same for every method)",
        "weights": {"file": weights.name, "bytes": st.st_size,
                    "mtime_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(st.st_mtime))},
        "cases": [{"caption": c["caption"], "A": c["desc_a"], "B": c["desc_b"], "region1": REGION1[c["relation"]]}
                  for c in cases],
        "per_case": {m: scores[m] for m in methods},
        "per_step_s_all": per_step,
        "note": "iou_A_r1/iou_B_r2: IoU of colour A (B) with region 1 (2); swap_iou: A vs region 2 and B vs region 1 "
                "(control); inplace: colour found and >= half its area in its region; chance_inplace = found x 0.5; "
                "chance_iou: region_iou_chance(region, found area); ratio: CPU seconds per step vs plain "
                "(runs at steps and at 2 steps, median over repeats); ceiling: world render of a medium object "
                "centred in each half"})


if __name__ == "__main__":
    main()
