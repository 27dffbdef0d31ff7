"""kNN retriever quality on Atelier Mini kNN (issue 20, item 5): do the retrieved neighbours change what is drawn?

Two databases of generated-world images with disjoint palettes, written by Atelier World Image Folder and
indexed by Atelier kNN Build Index with Atelier Mini kNN open_clip: warm (red, orange, yellow) and cool
(blue, cyan, purple), ``--count`` images each. For each of N seeded prompts (``world.prompt_set``, all eight
colours, as bench/bench_quality.py) and the same noise seed (= prompt index), three graphs of core + Atelier
nodes on Atelier Mini unCLIP (64 px, euler/normal, ``--steps``, cfg ``--cfg``, negative ''):

* ``text only``: the prompt alone (no unclip_conditioning).
* ``warm db`` / ``cool db``: Retrieve (text query = the prompt, k = ``--k``) from that database, Atelier kNN
  Conditioning (weighted mean, strength 1, noise augmentation 0) on the prompt's conditioning, KSampler.

Colours of the retrieved neighbours: the colour words of their captions. Colours drawn: the objects that
``models/metrics.detect_objects`` finds in the picture. Figures:

* ``neighbour_rate``: the share of detected objects whose colour is one of the retrieved neighbours' colours,
  against two chances: the same share in the ``text only`` picture of the same prompt and seed (what is
  drawn without neighbours), and in the picture drawn from the *other* database (whose neighbours have other
  colours, as the palettes are disjoint).
* the swap, paired per prompt: warm share (detected objects of a warm colour) of the ``warm db`` picture
  minus that of the ``cool db`` picture (the same for cool); a sign test over the prompts, the mean with its
  95% CI, and the mean pixel difference between the two pictures.
* prompt adherence of each case (models/metrics.prompt_adherence): what the neighbours cost the prompt.

Prompt sets (``--prompts``): ``colour`` (the captions as they are: every prompt names its colours, so the text
and the neighbours disagree wherever the database's palette differs), ``shape`` (the same captions with every
colour word removed (``world.without_colours``): they name shapes, sizes, layout and background and leave the colours open, which is the
case KNN-Diffusion's neighbours are for). ``--strength`` takes a comma-separated list (a sweep): the text-only
picture is drawn once per prompt, the two database pictures once per strength.

    python bench/bench_quality_knn.py [--n 24] [--seed 7] [--steps 20] [--cfg 5] [--k 4] [--count 48]
                                      [--prompts colour|shape] [--strength 1[,2,4]]
"""
from __future__ import annotations

import argparse
import math
import statistics
from pathlib import Path

import harness
from quality_common import add_common_args, adherence, adherence_row, boot, mean_ci

WARM = ("red", "orange", "yellow")
COOL = ("blue", "cyan", "purple")
DBS = {"warm db": WARM, "cool db": COOL}
CASES = ("text only", "warm db", "cool db")


def graph(case: str, text: str, seed: int, ns, strength: float = 1.0) -> dict:
    g = {
        "U": {"class_type": "AtelierMiniUnCLIPCheckpointLoader", "inputs": {}},
        "P": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["U", 1]}},
        "N": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["U", 1]}},
        "L": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "K": {"class_type": "KSampler", "inputs": {
            "model": ["U", 0], "positive": ["P", 0], "negative": ["N", 0], "latent_image": ["L", 0], "seed": seed,
            "steps": ns.steps, "cfg": ns.cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}},
        "OUT": {"class_type": "VAEDecode", "inputs": {"samples": ["K", 0], "vae": ["U", 2]}},
        "V": {"class_type": "PreviewImage", "inputs": {"images": ["OUT", 0]}},
    }
    if case in DBS:
        tag = case.split()[0]
        g.update({
            "E": {"class_type": "AtelierMiniKNNOpenCLIPLoader", "inputs": {}},
            "W": {"class_type": "AtelierWorldFolder", "inputs": {
                "folder": f"bench_knn/{tag}", "colors": ", ".join(DBS[case]), "shapes": "", "count": ns.count,
                "size": 64, "seed": 0}},
            "B": {"class_type": "AtelierKNNBuildIndex", "inputs": {
                "embedder": ["E", 0], "folder": ["W", 0], "index_name": f"bench_knn_{tag}_mini",
                "index_type": "auto", "rebuild": True, "batch_size": 16}},  # once per run (cached)
            "R": {"class_type": "AtelierKNNRetrieve", "inputs": {
                "index": ["B", 0], "embedder": ["E", 0], "text": text, "k": ns.k, "combine": "weighted mean",
                "temperature": 0.05, "image_size": 64}},
            "C": {"class_type": "AtelierKNNConditioning", "inputs": {
                "conditioning": ["P", 0], "neighbours": ["R", 2], "strength": strength, "temperature": 0.05,
                "query_weight": 0.0, "mode": "weighted mean", "noise_augmentation": 0.0, "model": ["U", 0]}},
        })
        g["K"]["inputs"]["positive"] = ["C", 0]
    return g


def neighbour_colours(hits, colours) -> set[str]:
    words = set()
    for p in hits.paths:
        words |= set((Path(hits.root) / p).with_suffix(".txt").read_text(encoding="utf-8").replace(",", " ").split())
    return words & set(colours)


def share(dets, palette) -> float | None:
    """Share of detected objects whose colour is in ``palette`` (None: nothing detected)."""
    return sum(d.color in palette for d in dets) / len(dets) if dets else None


def sign_test(wins: int, losses: int) -> float:
    """Two-sided binomial sign-test p-value (ties dropped)."""
    n = wins + losses
    if n == 0:
        return 1.0
    k = min(wins, losses)
    p = sum(math.comb(n, i) for i in range(k + 1)) / 2 ** n
    return min(1.0, 2 * p)


def _mean(xs):
    xs = [x for x in xs if x is not None]
    return statistics.mean(xs) if xs else float("nan")


def db_figures(dets_db, dets_other, dets_text, hood, palette) -> dict:
    """The neighbour-colour rate of one database's pictures and its chances (module docstring)."""
    own = [share(d, nb) for d, nb in zip(dets_db, hood)]
    return {"neighbour_rate": _mean(own),
            "text_only_rate": _mean([share(d, nb) for d, nb in zip(dets_text, hood)]),
            "other_db_rate": _mean([share(d, nb) for d, nb in zip(dets_other, hood)]),
            "palette_share": _mean([share(d, palette) for d in dets_db]),
            "palette_share_text_only": _mean([share(d, palette) for d in dets_text]),
            "palette_share_other_db": _mean([share(d, palette) for d in dets_other]),
            "uniform_guess": statistics.mean(len(nb) / len(world_colours) for nb in hood),
            "palette_uniform": len(palette) / len(world_colours),
            "prompts_with_detections": sum(x is not None for x in own)}


def swap_figures(dets_warm, dets_cool, images_warm, images_cool) -> dict:
    """The paired swap: per prompt, (warm share of the warm picture - of the cool one) + (cool share of the cool
    picture - of the warm one); sign test, mean with 95% CI, mean pixel difference."""
    deltas = []
    for w, k in zip(dets_warm, dets_cool):
        if not w or not k:
            deltas.append(None)
            continue
        deltas.append((share(w, WARM) - share(k, WARM)) + (share(k, COOL) - share(w, COOL)))
    valid = [d for d in deltas if d is not None]
    wins, losses = sum(d > 0 for d in valid), sum(d < 0 for d in valid)
    mean_d, ci_d = mean_ci(valid) if len(valid) > 1 else (_mean(valid), float("nan"))
    pixel = [float(abs(a - b).mean()) for a, b in zip(images_warm, images_cool)]
    return {"delta_mean": mean_d, "delta_ci95": ci_d, "wins": wins, "losses": losses, "paired": len(valid),
            "ties": len(valid) - wins - losses, "no_detection": len(deltas) - len(valid),
            "sign_test_p": sign_test(wins, losses), "mean_abs_pixel_diff": statistics.mean(pixel),
            "pictures_identical": sum(p == 0 for p in pixel)}


world_colours: tuple[str, ...] = ()


def main(argv=None):
    global world_colours
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_common_args(ap)
    ap.add_argument("--k", type=int, default=4, help="neighbours retrieved")
    ap.add_argument("--count", type=int, default=48, help="images per database")
    ap.add_argument("--strength", default="1", help="Atelier kNN Conditioning strength; a comma-separated list "
                                                    "sweeps it (the text-only picture is drawn once)")
    ap.add_argument("--prompts", choices=("colour", "shape"), default="colour",
                    help="colour: the world's captions (they name every colour); shape: the same captions with "
                         "the colour words removed (the colours are left to the neighbours)")
    ap.add_argument("--grid", default=None, help="also save the pictures as a PNG grid (rows: prompts; "
                                                 "columns: text only, then warm db, cool db per strength)")
    ns = ap.parse_args(argv)
    strengths = [float(x) for x in ns.strength.split(",") if x.strip()]
    h, pkg, world, metrics, n = boot(ns)
    import time

    import torch
    colours = world_colours = tuple(world.COLORS)
    captions = [s.caption for s in world.prompt_set(ns.seed, n)]
    if ns.prompts == "shape":
        captions = [world.without_colours(c) for c in captions]
    label = (lambda db, st: db) if strengths == [1.0] else (lambda db, st: f"{db} @{st:g}")
    runs = [("text only", None)] + [(db, st) for st in strengths for db in DBS]
    cases = [label(db, st) if st is not None else db for db, st in runs]
    images = {c: [] for c in cases}
    seconds = {c: [] for c in cases}
    hood = {c: [] for c in DBS}  # neighbour colours per prompt (the same at every strength)
    for i, text in enumerate(captions):
        for (db, st), c in zip(runs, cases):
            t0 = time.perf_counter()
            with torch.no_grad():
                h.run_prompt(graph(db, text, i, ns, st if st is not None else 1.0))
            seconds[c].append(time.perf_counter() - t0)
            images[c].append(h.executor.caches.outputs.get("OUT")[0][0][0].numpy())
            if db in DBS and len(hood[db]) == i:
                hood[db].append(neighbour_colours(h.executor.caches.outputs.get("R")[2][0], colours))
        print(f"[{i + 1}/{n}] {text}  warm nbrs {sorted(hood['warm db'][-1])}  cool nbrs {sorted(hood['cool db'][-1])}",
              flush=True)
    if ns.grid:
        import numpy as np
        from PIL import Image
        rows_px = [np.concatenate([images[c][i] for c in cases], 1) for i in range(n)]
        Image.fromarray((np.clip(np.concatenate(rows_px, 0), 0, 1) * 255).astype(np.uint8)).save(ns.grid)
    dets = {c: [metrics.detect_objects(im) for im in images[c]] for c in cases}
    other = {"warm db": "cool db", "cool db": "warm db"}

    rows, figures, swaps = [], {}, {}
    for c in cases:
        per, shuffled = adherence(metrics, captions, images[c])
        rows.append(adherence_row(c, images[c], seconds[c], per, shuffled, ci=True))
    for st in strengths:
        for db in DBS:
            figures[label(db, st)] = dict(db_figures(dets[label(db, st)], dets[label(other[db], st)],
                                                     dets["text only"], hood[db], DBS[db]), strength=st)
        swaps[f"{st:g}"] = swap_figures(dets[label("warm db", st)], dets[label("cool db", st)],
                                        images[label("warm db", st)], images[label("cool db", st)])

    for c, f in figures.items():
        print(f"{c}: neighbour colours in {f['neighbour_rate']:.3f} of detected objects; chance: text only "
              f"{f['text_only_rate']:.3f}, other database {f['other_db_rate']:.3f}, uniform {f['uniform_guess']:.3f}; "
              f"palette share {f['palette_share']:.3f} (text only {f['palette_share_text_only']:.3f}, other database "
              f"{f['palette_share_other_db']:.3f}, uniform {f['palette_uniform']:.3f})")
    for st, sw in swaps.items():
        print(f"swap (warm->cool) at strength {st}, paired over {sw['paired']} prompts: delta {sw['delta_mean']:+.3f}"
              f"±{sw['delta_ci95']:.3f}, {sw['wins']} better / {sw['losses']} worse / {sw['ties']} tied, sign test "
              f"p = {sw['sign_test_p']:.2g}; mean |pixel diff| {sw['mean_abs_pixel_diff']:.3f}")
    name = "bench_quality_knn" + ("" if ns.prompts == "colour" else f"_{ns.prompts}") + \
        ("" if strengths == [1.0] else "_sweep")
    harness.report(name, rows, {
        "n": n, "prompt_seed": ns.seed, "prompts": ns.prompts, "steps": ns.steps, "cfg": ns.cfg, "k": ns.k,
        "count": ns.count, "strengths": strengths,
        "databases": {"warm db": WARM, "cool db": COOL}, "figures": figures,
        "swap": swaps["1"] if strengths == [1.0] else swaps,
        "neighbour_colours": {c: [sorted(x) for x in hood[c]] for c in DBS},
        "detected": {c: [[d.color for d in ds] for ds in dets[c]] for c in cases}, "captions": captions})


if __name__ == "__main__":
    main()
