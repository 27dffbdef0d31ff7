"""Quality baseline: plain core KSampler on Atelier Mini, scored by prompt adherence.

N seeded prompts from the world's benchmark stream (``world.prompt_set``) run through
AtelierMiniCheckpointLoader -> CLIPTextEncode -> KSampler -> VAEDecode in the headless executor,
per family. Each image is scored with ``models/metrics.prompt_adherence`` (objects = colour and
shape, colours, shapes) and compared with chance: the analytic levels (``chance_levels``) and the
empirical shuffled baseline (prompt i scored against image i+1). The world's own rendering of
each prompt gives the detector's ceiling. Every technique reports its deltas against this.

    python bench/bench_quality.py [--n 48] [--steps 20] [--cfg 5] [--grid docs/mini_grid.png]
"""
from __future__ import annotations

import argparse
import importlib
import textwrap
import time

import harness

FAMILY_PX = {"sd15": 64, "sdxl": 128, "pixart": 288}
SCORES = ("object", "color", "shape")


def graph(family: str, text: str, noise_seed: int, steps: int, cfg: float) -> dict:
    px = FAMILY_PX[family]
    return {
        "1": {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": family}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": px, "height": px, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": noise_seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def generate(h, family: str, captions: list[str], steps: int, cfg: float):
    """Images (H, W, 3) float numpy, one per caption (noise seed = prompt index), and seconds each."""
    images, seconds = [], []
    for i, text in enumerate(captions):
        t0 = time.perf_counter()
        h.run_prompt(graph(family, text, i, steps, cfg))
        seconds.append(time.perf_counter() - t0)
        images.append(h.executor.caches.outputs.get("6")[0][0][0].numpy())
    return images, seconds


def score(metrics, captions, images) -> tuple[dict, list]:
    dets = [metrics.detect_objects(im) for im in images]
    adh = [metrics.prompt_adherence(None, c, detections=d) for c, d in zip(captions, dets)]
    n = len(adh)
    out = {s: sum(getattr(a, f"{s}_score") for a in adh) / n for s in SCORES}
    out["count_match"] = sum(a.count_match for a in adh) / n
    shuffled = metrics.shuffled_baseline(captions, detections=dets)
    out.update({f"shuffled_{s}": shuffled[s] for s in SCORES})
    return out, adh


def save_grid(path, rows: list[tuple[str, list, list[str]]], tile: int = 128, wrap: int = 21):
    """rows: (label, images, captions). Nearest-upscaled tiles with their captions underneath."""
    import numpy as np
    from PIL import Image, ImageDraw
    cols = max(len(r[1]) for r in rows)
    label_w, text_h, pad = 56, 52, 4
    cell_w, cell_h = tile + pad, tile + text_h
    canvas = Image.new("RGB", (label_w + cols * cell_w, len(rows) * cell_h + pad), "white")
    draw = ImageDraw.Draw(canvas)
    for r, (label, images, captions) in enumerate(rows):
        y = r * cell_h + pad
        draw.text((4, y + tile // 2 - 6), label, fill="black")
        for c, (im, cap) in enumerate(zip(images, captions)):
            arr = (np.clip(im, 0, 1) * 255).astype("uint8")
            x = label_w + c * cell_w
            canvas.paste(Image.fromarray(arr).resize((tile, tile), Image.NEAREST), (x, y))
            draw.multiline_text((x, y + tile + 2), "\n".join(textwrap.wrap(cap, wrap)[:4]), fill="black",
                                spacing=1)
    path.parent.mkdir(parents=True, exist_ok=True)
    canvas.save(path)


def main():
    ap = argparse.ArgumentParser(description="Prompt adherence of plain sampling on Atelier Mini.")
    ap.add_argument("--n", type=int, default=None, help="prompts per family (default 48; 4 quick)")
    ap.add_argument("--seed", type=int, default=7, help="prompt-set seed (world.prompt_set)")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--families", default="sd15,sdxl")
    ap.add_argument("--grid", default=str(harness.ROOT / "docs" / "mini_grid.png"), help="'' to skip")
    ap.add_argument("--grid-n", type=int, default=8, help="images per family in the grid")
    ns = ap.parse_args()
    n = ns.n or (4 if harness.quick() else 48)
    h = harness.boot()
    pkg = h.pack_module.__name__
    world = importlib.import_module(pkg + ".models.world")
    metrics = importlib.import_module(pkg + ".models.metrics")

    rows, grid_rows = [], []
    for family in ns.families.split(","):
        prompts = world.prompt_set(ns.seed, n, size=FAMILY_PX[family])
        captions = [p.caption for p in prompts]
        images, seconds = generate(h, family, captions, ns.steps, ns.cfg)
        got, _ = score(metrics, captions, images)
        ceiling, _ = score(metrics, captions, [p.image.astype("float32") / 255.0 for p in prompts])
        rows.append({"case": f"mini-{family} {FAMILY_PX[family]}px", "n": n, "steps": ns.steps, "cfg": ns.cfg,
                     "median_s": sorted(seconds)[len(seconds) // 2], **got,
                     **{f"ceiling_{s}": ceiling[s] for s in SCORES}})
        grid_rows.append((family, images[:ns.grid_n], captions[:ns.grid_n]))

    counts = [len(p.objects) for p in world.prompt_set(ns.seed, n)]
    chance = metrics.chance_levels(sorted(set(counts)))
    cols = ("case", "object", "color", "shape", "count_match", "shuffled_object", "shuffled_color",
            "shuffled_shape", "ceiling_object", "ceiling_color", "ceiling_shape", "median_s")
    print("  ".join(f"{c:>15}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>15.3f}" if isinstance(r[c], float) else f"{r[c]:>15}" for c in cols))
    print("chance (analytic): " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()))
    if ns.grid:
        from pathlib import Path
        save_grid(Path(ns.grid), grid_rows)
        print(f"grid: {ns.grid}")
    harness.report("quality_mini", rows, {
        "chance": chance, "prompt_seed": ns.seed, "sampler": "euler/normal, negative ''",
        "note": "scores: fraction of requested objects found (colour+shape / colour / shape); "
                "shuffled_*: prompt i against image i+1 (empirical chance); ceiling_*: the world's own "
                "rendering of the prompt (detector ceiling)"})


if __name__ == "__main__":
    main()
