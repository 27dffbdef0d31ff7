"""Shared pieces of the quality benches that run the two Atelier Mini families side by side
(bench_quality_coop.py, bench_quality_time.py): the common graph nodes, the case runner, prompt
adherence per case and the paired statistics.

Graph node ids: L1/L2 the Mini loaders of a pair of families (default sd15, sdxl), P1/N1 and P2/N2
their positive/empty negative prompts, E1/E2 an empty latent at each one's size (default 64 px, 128 px);
a case's picture is the VAEDecode at node "OUT".
"""
from __future__ import annotations

import importlib
import math
import statistics
import time

import harness

SCORES = ("object", "color", "shape")
PAIRED = SCORES + ("count_match",)


# ------------------------------------------------------------------------------------ setup
def add_common_args(ap) -> None:
    """--n, --seed, --steps, --cfg, as every Mini quality bench takes them."""
    ap.add_argument("--n", type=int, default=None, help="prompts (default 24; 3 quick)")
    ap.add_argument("--seed", type=int, default=7, help="prompt-set seed (world.prompt_set)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)


def boot(ns):
    """One torch thread, the booted headless ComfyUI (progress bars off) and the pack's world and metrics
    modules: ``(h, pkg, world, metrics, n)`` with n = --n, else 24 (3 in a quick run)."""
    import torch
    torch.set_num_threads(1)
    n = ns.n or (3 if harness.quick() else 24)
    h = harness.boot()
    import comfy.utils
    comfy.utils.PROGRESS_BAR_ENABLED = False
    pkg = h.pack_module.__name__
    world = importlib.import_module(pkg + ".models.world")
    metrics = importlib.import_module(pkg + ".models.metrics")
    return h, pkg, world, metrics, n


# ----------------------------------------------------------------------------------- graphs
PAIR = ("sd15", "sdxl")


def base_graph(text: str, families: tuple[str, str] = PAIR, px: tuple[int, int] = (64, 128)) -> dict:
    """Both Mini families loaded (L1, L2), their prompts encoded and one empty latent each (E1, E2 at
    ``px``)."""
    g = {}
    for i, (fam, side) in enumerate(zip(families, px), 1):
        g[f"L{i}"] = {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": fam}}
        g[f"P{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": [f"L{i}", 1]}}
        g[f"N{i}"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [f"L{i}", 1]}}
        g[f"E{i}"] = {"class_type": "EmptyLatentImage", "inputs": {"width": side, "height": side, "batch_size": 1}}
    return g


def family_refs(fam: str, families: tuple[str, str] = PAIR) -> tuple[list, list, list]:
    """The MODEL, positive and negative of a family in base_graph."""
    i = families.index(fam) + 1
    return [f"L{i}", 0], [f"P{i}", 0], [f"N{i}", 0]


def ksampler(fam: str, latent, seed, steps, cfg, families: tuple[str, str] = PAIR) -> dict:
    """Core KSampler on a family of base_graph, euler/normal, full denoise."""
    model, pos, neg = family_refs(fam, families)
    return {"class_type": "KSampler", "inputs": {
        "model": model, "positive": pos, "negative": neg, "latent_image": latent, "seed": seed,
        "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}


def decode(samples, vae_loader: str) -> dict:
    return {"class_type": "VAEDecode", "inputs": {"samples": samples, "vae": [vae_loader, 2]}}


def run_cases(h, captions: list[str], cases: list[str], graph_for) -> tuple[dict, dict]:
    """Every case's graph for every caption (noise seed = prompt index); the image at node "OUT" and
    the seconds of each run, per case. ``graph_for(case, text, seed)`` builds the API prompt."""
    import torch
    images = {c: [] for c in cases}
    seconds = {c: [] for c in cases}
    for i, text in enumerate(captions):
        for c in cases:
            t0 = time.perf_counter()
            with torch.no_grad():
                h.run_prompt(graph_for(c, text, i))
            seconds[c].append(time.perf_counter() - t0)
            images[c].append(h.executor.caches.outputs.get("OUT")[0][0][0].numpy())
        print(f"[{i + 1}/{len(captions)}] {text}", flush=True)
    return images, seconds


# ---------------------------------------------------------------------------------- scoring
def adherence(metrics, captions: list[str], images: list) -> tuple[dict, dict]:
    """Prompt adherence of one case's pictures: per-prompt lists of each score, count_match and
    n_detected, and the shuffled baseline (prompt i against image i+1)."""
    dets = [metrics.detect_objects(im) for im in images]
    adh = [metrics.prompt_adherence(None, t, detections=d) for t, d in zip(captions, dets)]
    per = {s: [getattr(a, f"{s}_score") for a in adh] for s in SCORES}
    per["count_match"] = [float(a.count_match) for a in adh]
    per["n_detected"] = [float(len(d)) for d in dets]
    return per, metrics.shuffled_baseline(captions, detections=dets)


def adherence_row(case: str, images: list, seconds: list, per: dict, shuffled: dict, ci: bool) -> dict:
    """The results row of a case: mean scores (with their 95% CI half-widths when ``ci``), count_match,
    mean detected objects, the shuffled baseline and the margins over it, median seconds."""
    row = {"case": case, "px": images[0].shape[0], "n": len(images), "median_s": statistics.median(seconds)}
    for s in SCORES:
        if ci:
            row[s], row[s + "_ci95"] = mean_ci(per[s])
        else:
            row[s] = statistics.mean(per[s])
    row["count_match"] = statistics.mean(per["count_match"])
    row["mean_detected"] = statistics.mean(per["n_detected"])
    row.update({f"shuffled_{s}": shuffled[s] for s in SCORES})
    row.update({f"margin_{s}": row[s] - shuffled[s] for s in SCORES})
    return row


def mean_ci(xs):
    """Mean and 95% CI half-width (normal approximation; nan for one value)."""
    m = statistics.mean(xs)
    half = 1.96 * statistics.stdev(xs) / math.sqrt(len(xs)) if len(xs) > 1 else float("nan")
    return m, half


def paired_diff(per_a: dict, per_b: dict, metrics=PAIRED) -> dict:
    """Per-prompt differences a - b of each metric: mean, 95% CI half-width, prompts better/worse."""
    d = {}
    for m in metrics:
        xs = [a - b for a, b in zip(per_a[m], per_b[m])]
        mm, half = mean_ci(xs)
        d[m] = {"mean": mm, "ci95": half, "wins": sum(x > 0 for x in xs), "losses": sum(x < 0 for x in xs)}
    return d


def format_paired(d: dict) -> str:
    """One paired_diff result on a line: ``object +0.111±0.218 (1/0)  color ...`` (wins/losses)."""
    return "  ".join(f"{m} {v['mean']:+.3f}±{v['ci95']:.3f} ({v['wins']}/{v['losses']})" for m, v in d.items())
