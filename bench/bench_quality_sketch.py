"""Sketch guidance quality on Atelier Mini (sd15 64 px by default; ``--family pixart``: the Mini-DiT, 288 px):
sketch adherence at matched prompt adherence.

The family's size and latent come from the family table (``glue.native_px`` of the loaded Mini model, the row's
latent channels); ``--layers`` picks the denoiser layers the LEP reads: ``default`` (the family row's
``lep_layers``), ``every`` (every DiT block, ``models/lep.every_block``), or spec names such as
``block@0,block@0.5,block@1`` (DiT blocks by relative depth; UNet names like ``input.2``). The trained file
records its layers, and guidance reads those.

1. Trains a latent edge predictor (LEP) for the Mini family with the pack's own trainer (``nodes/sketch.train_lep``,
   the code behind the AtelierTrainLEP node and tools/train_lep.py) on world images from the training
   stream (``world.iter_samples``), saved under out/quality_sketch/lep/ (not the repo); a finished predictor
   with the same name, size and step count is loaded instead of retrained (--retrain to force).
2. For N seeded benchmark prompts (``world.prompt_set``), the sketch is the world's own clean edge map of
   that prompt's scene (one-pixel mask boundaries, black strokes on white, written as a PNG and loaded with
   core LoadImage, like a user's drawing). Cases, all on the core KSampler (euler/normal, same noise seed
   per prompt), each an API graph a user would build:
     unguided          Mini -> KSampler
     guided b=...      Mini -> AtelierSketchGuidance(LEPLoader, LoadImage sketch) -> KSampler (default window
                       0-50 %, grad_every 1, form paper: a backward through the UNet on every guided step)
     fast b=...        the same with form fast (gradient on the denoised latent through the LEP file's
                       denoised-latent head: no UNet backward)
     sdedit d=...      LoadImage sketch -> VAEEncode -> KSampler at denoise d (the image-only baseline)
3. Scores (models/metrics.py): sketch adherence (edge F1 within 2 px, precision, recall, Chamfer px) of the
   image's edges against the sketch; its "shuffled" level (image i against sketch i+1: what any image of the
   world scores against an unrelated sketch of it); prompt adherence (objects = colour+shape, colours,
   shapes); the world's own rendering against its own sketch (ceiling). Per-image wall time of each case
   and its ratio to unguided (the cases of one prompt run back to back, so they share the machine's load).

    python bench/bench_quality_sketch.py [--n 24] [--train-steps 1500] [--betas 0.5,1,1.6] [--denoise 0.6,0.8]
    python bench/bench_quality_sketch.py --family pixart [--layers default|every|block@0,block@0.5,block@1]
"""
from __future__ import annotations

import argparse
import importlib
import statistics
import time
from pathlib import Path

import harness

FAMILY = "sd15"      # the Mini family and what its row says, set by configure() once the model is loaded
PX = 64
LATENT = "EmptyLatentImage"
SCORES = ("object", "color", "shape")
#: empty-latent node per latent channel count (4: SD1.5/SDXL/PixArt latent formats; 16: SD3/Flux)
EMPTY_LATENT = {4: "EmptyLatentImage", 16: "EmptySD3LatentImage"}


def configure(family: str, px: int, channels: int) -> None:
    global FAMILY, PX, LATENT
    FAMILY, PX, LATENT = family, int(px), EMPTY_LATENT[int(channels)]


def loader() -> dict:
    return {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": FAMILY}}


def empty_latent() -> dict:
    return {"class_type": LATENT, "inputs": {"width": PX, "height": PX, "batch_size": 1}}


def base_graph(text: str, seed: int, steps: int, cfg: float, model_ref, latent_ref, denoise: float) -> dict:
    return {
        "1": loader(),
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model_ref, "positive": ["2", 0], "negative": ["3", 0], "latent_image": latent_ref,
            "seed": seed, "steps": steps, "cfg": cfg, "sampler_name": "euler", "scheduler": "normal",
            "denoise": denoise}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }


def graph_unguided(text, seed, steps, cfg):
    g = base_graph(text, seed, steps, cfg, ["1", 0], ["4", 0], 1.0)
    g["4"] = empty_latent()
    return g


def graph_guided(text, seed, steps, cfg, sketch_file, lep_name, beta, form="paper"):
    g = base_graph(text, seed, steps, cfg, ["10", 0], ["4", 0], 1.0)
    g["4"] = empty_latent()
    g["8"] = {"class_type": "LoadImage", "inputs": {"image": sketch_file}}
    g["9"] = {"class_type": "AtelierLEPLoader", "inputs": {"lep_name": lep_name}}
    g["10"] = {"class_type": "AtelierSketchGuidance", "inputs": {
        "model": ["1", 0], "lep": ["9", 0], "vae": ["1", 2], "sketch": ["8", 0], "beta": beta,
        "start_percent": 0.0, "end_percent": 0.5, "grad_every": 1, "form": form}}
    return g


def graph_sdedit(text, seed, steps, cfg, sketch_file, denoise):
    g = base_graph(text, seed, steps, cfg, ["1", 0], ["11", 0], denoise)
    g["8"] = {"class_type": "LoadImage", "inputs": {"image": sketch_file}}
    g["11"] = {"class_type": "VAEEncode", "inputs": {"pixels": ["8", 0], "vae": ["1", 2]}}
    return g


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--family", default="sd15", help="Atelier Mini family (nodes/mini.FAMILIES): sd15, sdxl, pixart")
    ap.add_argument("--layers", default="default",
                    help="LEP layers: default (the family row's), every (every DiT block), or comma-separated "
                         "names (DiT block@<relative depth>, e.g. block@0,block@0.5,block@1)")
    ap.add_argument("--n", type=int, default=None, help="prompts (default 24; 3 quick)")
    ap.add_argument("--seed", type=int, default=7, help="prompt-set seed (world.prompt_set), as bench_quality")
    ap.add_argument("--steps", type=int, default=20)
    ap.add_argument("--cfg", type=float, default=5.0)
    ap.add_argument("--betas", default="0.5,1,1.6", help="guidance strengths (1.6 = the node's default)")
    ap.add_argument("--denoise", default="0.6,0.8", help="SDEdit denoise levels")
    ap.add_argument("--forms", default="paper,fast", help="guidance forms (paper: UNet backward; fast: "
                                                          "denoised-latent head)")
    ap.add_argument("--train-steps", type=int, default=None, help="LEP training steps (default 1500; 5 quick)")
    ap.add_argument("--train-images", type=int, default=None, help="world training images (default 512; 64 quick)")
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--lr", type=float, default=1e-3)
    ap.add_argument("--lep-name", default="", help="predictor name (default mini_<family>_world[_<layers>]_s<steps>)")
    ap.add_argument("--retrain", action="store_true", help="train again even if a finished LEP exists")
    ap.add_argument("--no-unguided", action="store_true",
                    help="leave out the unguided case (no time ratio, no paired wins): comparing LEP layer choices")
    ap.add_argument("--train-only", action="store_true", help="train (or load) and score the held-out loss only")
    ap.add_argument("--tag", default="", help="suffix of the report name (quality_sketch_<family><tag>)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=str(harness.ROOT / "out" / "quality_sketch"))
    ap.add_argument("--grid", default="", help="PNG path for a grid of the first --grid-n prompts ('' to skip)")
    ap.add_argument("--grid-n", type=int, default=8)
    ns = ap.parse_args()
    quick = harness.quick()
    n = ns.n or (3 if quick else 24)
    train_steps = ns.train_steps or (5 if quick else 1500)
    ns.train_images = ns.train_images or (64 if quick else 512)
    out = Path(ns.out).resolve()
    if quick and ns.out == ap.get_default("out"):
        out = out.with_name("quality_sketch_quick")     # a smoke run never touches the real predictor

    h = harness.boot(str(out / "output"))
    import numpy as np
    import torch
    import folder_paths
    torch.set_num_threads(ns.threads)
    pk = h.pack_module.__name__
    sk = importlib.import_module(pk + ".nodes.sketch")
    mini = importlib.import_module(pk + ".nodes.mini")
    glue = importlib.import_module(pk + ".nodes.glue")
    world = importlib.import_module(pk + ".models.world")
    metrics = importlib.import_module(pk + ".models.metrics")
    L = importlib.import_module(pk + ".models.lep")
    if ns.family not in mini.FAMILIES:
        ap.error(f"--family: {ns.family!r}; one of {', '.join(mini.FAMILIES)}")
    with torch.inference_mode():
        model, clip, vae = mini.load_mini(ns.family)
    row = glue.family_row(model)
    configure(ns.family, glue.native_px(model), row.channels)
    if ns.layers == "default":
        layer_names, layer_tag = None, ""
    elif ns.layers == "every":
        dm = model.model.diffusion_model
        kind = sk.dit_hooks.kinds(FAMILY)
        if len(kind) != 1:
            ap.error(f"--layers every: {row.label} has block kinds {kind}; name the blocks instead")
        layer_names = L.layer_names(FAMILY, L.every_block(kind[0], len(sk.dit_hooks.blocks(dm, FAMILY, kind[0]))))
        layer_tag = "_every"
    else:
        layer_names = [x.strip() for x in ns.layers.split(",") if x.strip()]
        layer_tag = "_" + "-".join(x.replace("@", "").replace(".", "") for x in layer_names)
    layers = sk.lep_layers(model, layer_names)

    # Everything this bench writes lives under out/: the input folder (training images, sketches) and the
    # predictor folders, put first so the trainer saves there and the loader lists them.
    input_dir = out / "input"
    input_dir.mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(input_dir))
    for key, sub in (("atelier_lep", "lep"), ("atelier_lep_resume", "lep_resume")):
        paths, exts = folder_paths.folder_names_and_paths[key]
        (out / sub).mkdir(parents=True, exist_ok=True)
        folder_paths.folder_names_and_paths[key] = ([str(out / sub)] + [p for p in paths if p != str(out / sub)],
                                                    exts)
    wpath = mini.weights_path(FAMILY)
    wstat = wpath.stat()
    weights = {"file": wpath.name, "bytes": wstat.st_size,
               "mtime_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime(wstat.st_mtime))}
    base_name = ns.lep_name or f"mini_{FAMILY}_world{layer_tag}_s{train_steps}"
    lep_name = f"{base_name}_{int(wstat.st_mtime)}"   # a new Mini file gets its own predictor

    # ---------------------------------------------------------------- 1. the LEP
    train_folder = f"lep_world_{ns.train_images}" + ("" if PX == 64 else f"_{PX}px")
    train_dir = input_dir / train_folder
    train_dir.mkdir(exist_ok=True)
    have = len(list(train_dir.glob("*.png")))
    if have < ns.train_images:
        from PIL import Image
        for s in world.iter_samples(0, 0, ns.train_images, size=PX):
            Image.fromarray(s.image).save(train_dir / f"world_{s.index:05d}.png")
            (train_dir / f"world_{s.index:05d}.txt").write_text(s.caption)
    ticks = []      # (step, seconds since start) at every progress call: setup time and seconds per step

    def progress(done, total):
        ticks.append((done, time.perf_counter() - t0))
    t0 = time.perf_counter()
    with torch.inference_mode():
        lep, rep = sk.train_lep(model, clip, vae, train_folder, lep_name, steps=train_steps,
                                batch_size=ns.batch_size, learning_rate=ns.lr, resolution=PX, seed=0,
                                resume=not ns.retrain, save_every=100, layer_names=layer_names,
                                progress=progress)
    train_s = time.perf_counter() - t0
    losses = rep["losses"]
    k = max(1, min(20, len(losses) // 10 or 1))
    curve = [round(float(np.mean(losses[i:i + k])), 5) for i in range(0, len(losses), k)] if losses else []
    training = {"name": lep_name, "path": rep["path"], "family": FAMILY, "px": PX, "layers": L.layer_names(FAMILY, layers),
                "feature_channels": int(lep.meta.get("channels", 0)), "steps": train_steps, "batch_size": ns.batch_size,
                "lr": ns.lr, "images": ns.train_images, "seconds": round(train_s, 1),
                "setup_seconds": round(ticks[0][1], 1) if ticks else None,
                "seconds_per_step": (round((ticks[-1][1] - ticks[0][1]) / (ticks[-1][0] - ticks[0][0]), 3)
                                     if len(ticks) > 1 and ticks[-1][0] > ticks[0][0] else None),
                "skipped_already_trained": bool(rep.get("skipped")), "final_loss": rep["final_loss"],
                "final_head_loss": rep.get("final_head_loss", float(lep.meta.get("final_head_loss", "nan"))),
                "first_loss_mean_of_%d" % k: curve[0] if curve else None,
                "last_loss_mean_of_%d" % k: curve[-1] if curve else None, "curve_means_of_%d" % k: curve}
    print(f"LEP {lep_name}: {train_steps} steps in {train_s:.0f}s; loss {training}")

    # Held-out LEP loss: benchmark scenes (prompt_set, not in the training stream) at a mid noise level.
    prompts = world.prompt_set(ns.seed, n, size=PX)
    with torch.inference_mode():
        base = model.model
        held = []
        tgts = []
        for p in prompts:
            tgts.append(sk.sketch_target(vae, model, torch.from_numpy(
                np.where(p.edges, 0.0, 1.0).astype("float32"))[None, ..., None].expand(1, PX, PX, 3)))
        const = torch.cat(tgts).mean(0, keepdim=True)       # the best constant map over these sketches
        for t_val in (200, 500, 800):
            vals = []
            for i, p in enumerate(prompts):
                img = torch.from_numpy(p.image.astype("float32") / 255.0)[None]
                x0 = sk.vae_encode(vae, base, img)
                tgt = tgts[i]
                t = torch.tensor([float(t_val)])
                sigma = sk.lep_sigma(base.model_sampling, t)
                z = base.model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), torch.randn(
                    x0.shape, generator=torch.Generator().manual_seed(i)), x0)
                kw = sk.encode_text(base, clip, p.caption, z)
                with sk.feature_capture(base.diffusion_model, FAMILY, layers, tuple(z.shape[-2:])) as cap:
                    x0_hat = base.apply_model(z, sigma, **kw)
                    f = L.concat_features(cap.take(), tuple(z.shape[-2:]))

                def corr(pred):
                    a = (pred - pred.mean((2, 3), keepdim=True)).flatten()
                    b = (tgt - tgt.mean((2, 3), keepdim=True)).flatten()
                    return float((a * b).sum() / (a.norm() * b.norm()).clamp_min(1e-12))
                pred = lep.module(f, t)
                hpred = lep.head(x0_hat.float(), t)
                vals.append((float(L.lep_loss(pred, tgt).mean()), float(L.lep_loss(const, tgt).mean()), corr(pred),
                             float(L.lep_loss(hpred, tgt).mean()), corr(hpred)))
            held.append({"t": t_val, "lep_loss": float(np.mean([v[0] for v in vals])),
                         "constant_map_loss": float(np.mean([v[1] for v in vals])),
                         "spatial_corr": float(np.mean([v[2] for v in vals])),
                         "head_loss": float(np.mean([v[3] for v in vals])),
                         "head_spatial_corr": float(np.mean([v[4] for v in vals]))})
        training["held_out"] = held
    print("held-out LEP loss on the benchmark sketches (vs the best constant map; spatial correlation):", held)
    if ns.train_only:
        harness.report(f"quality_sketch_train_{FAMILY}{layer_tag}{ns.tag}", [], {"training": training,
                                                                                "mini_weights": weights})
        return

    # ---------------------------------------------------------------- 2. sampling
    from PIL import Image
    sk_dir = input_dir / "sketches"
    sk_dir.mkdir(exist_ok=True)
    sketch_files = []
    for i, p in enumerate(prompts):
        f = sk_dir / (f"sketch_{ns.seed}_{i:03d}.png" if PX == 64 else f"sketch_{ns.seed}_{PX}px_{i:03d}.png")
        Image.fromarray(np.where(p.edges, 0, 255).astype("uint8")).convert("RGB").save(f)
        sketch_files.append(f"sketches/{f.name}")
    betas = [float(b) for b in ns.betas.split(",") if b.strip()]
    denoises = [float(d) for d in ns.denoise.split(",") if d.strip()]
    cases = [] if ns.no_unguided else [("unguided", lambda i, p: graph_unguided(p.caption, i, ns.steps, ns.cfg))]
    forms = [f.strip() for f in ns.forms.split(",") if f.strip()]
    for form in forms:
        for b in betas:
            label = f"guided b={b:g}" if form == "paper" else f"{form} b={b:g}"
            cases.append((label, lambda i, p, b=b, form=form: graph_guided(
                p.caption, i, ns.steps, ns.cfg, sketch_files[i], lep_name + ".safetensors", b, form)))
    for d in denoises:
        cases.append((f"sdedit d={d:g}", lambda i, p, d=d: graph_sdedit(
            p.caption, i, ns.steps, ns.cfg, sketch_files[i], d)))
    images = {c: [] for c, _ in cases}
    seconds = {c: [] for c, _ in cases}
    for i, p in enumerate(prompts):
        for c, make in cases:        # the cases of one prompt back to back: same machine load
            t0 = time.perf_counter()
            h.run_prompt(make(i, p))
            seconds[c].append(time.perf_counter() - t0)
            images[c].append(h.executor.caches.outputs.get("6")[0][0][0].numpy())
        print(f"prompt {i + 1}/{n}: " + ", ".join(f"{c} {seconds[c][-1]:.1f}s" for c, _ in cases), flush=True)

    # ---------------------------------------------------------------- 3. scores
    sketches = [p.edges for p in prompts]
    captions = [p.caption for p in prompts]

    def sketch_scores(imgs, sks):
        s = [metrics.sketch_adherence(im, skm) for im, skm in zip(imgs, sks)]
        return {k: float(np.mean([x[k] for x in s])) for k in ("f1", "precision", "recall", "chamfer")}, s

    def prompt_scores(imgs):
        dets = [metrics.detect_objects(im) for im in imgs]
        adh = [metrics.prompt_adherence(None, c, detections=d) for c, d in zip(captions, dets)]
        return {s: float(np.mean([getattr(a, f"{s}_score") for a in adh])) for s in SCORES}, adh

    rows = []
    per_image = {}
    ref_images = [p.image.astype("float32") / 255.0 for p in prompts]
    all_cases = [c for c, _ in cases] + ["world rendering (ceiling)"]
    unguided_med = statistics.median(seconds["unguided"]) if "unguided" in seconds else None
    for c in all_cases:
        imgs = ref_images if c.startswith("world") else images[c]
        sa, per = sketch_scores(imgs, sketches)
        shuf, _ = sketch_scores(imgs, sketches[1:] + sketches[:1])
        pa, adh = prompt_scores(imgs)
        row = {"case": c, "n": n, "edge_f1": sa["f1"], "precision": sa["precision"], "recall": sa["recall"],
               "chamfer_px": sa["chamfer"], "shuffled_f1": shuf["f1"], "shuffled_chamfer_px": shuf["chamfer"],
               **{f"prompt_{s}": pa[s] for s in SCORES}}
        if c in seconds:
            row["median_s"] = statistics.median(seconds[c])
        if c in seconds and unguided_med:
            row["ratio"] = row["median_s"] / unguided_med
            row["ratio_per_image_median"] = statistics.median(
                a / b for a, b in zip(seconds[c], seconds["unguided"]))
        per_image[c] = [round(x["f1"], 3) for x in per]
        rows.append(row)
    # paired comparison of each case against unguided (same prompt, same noise seed)
    for r in rows:
        if r["case"] in images and r["case"] != "unguided" and "unguided" in images:
            a, b = per_image[r["case"]], per_image["unguided"]
            r["f1_wins_vs_unguided"] = f"{sum(x > y for x, y in zip(a, b))}/{n}"

    cols = ("case", "edge_f1", "precision", "recall", "chamfer_px", "shuffled_f1", "shuffled_chamfer_px",
            "prompt_object", "prompt_color", "prompt_shape", "median_s", "ratio", "f1_wins_vs_unguided")
    print("  ".join(f"{c:>14}" for c in cols))
    for r in rows:
        print("  ".join(f"{r[c]:>14.3f}" if isinstance(r.get(c), float) else f"{str(r.get(c, '-')):>14}"
                        for c in cols))
    counts = sorted({len(p.objects) for p in prompts})
    chance = metrics.chance_levels(counts)
    print("prompt adherence chance (analytic): " + ", ".join(f"{k} {v:.3f}" for k, v in chance.items()))
    if ns.grid:
        from bench_quality import save_grid
        gn = min(ns.grid_n, n)
        grows = [("sketch", [np.where(s, 0.0, 1.0)[..., None].repeat(3, -1) for s in sketches[:gn]], captions[:gn]),
                 ("world", ref_images[:gn], captions[:gn])]
        grows += [(c.replace("guided ", "g ").replace("sdedit ", "sde "), images[c][:gn], captions[:gn])
                  for c, _ in cases]
        save_grid(Path(ns.grid), grows)
        print(f"grid: {ns.grid}")
    harness.report("quality_sketch" + ("" if FAMILY == "sd15" else f"_{FAMILY}") + layer_tag + ns.tag, rows, {
        "family": FAMILY, "px": PX, "layers": training["layers"],
        "training": training, "mini_weights": weights, "prompt_seed": ns.seed, "steps": ns.steps, "cfg": ns.cfg,
        "sampler": "euler/normal, negative '', noise seed = prompt index", "threads": ns.threads,
        "prompt_chance": chance, "per_image_f1": per_image,
        "note": "sketch = world's clean edge map of the prompt's scene (1 px, black on white); edge F1 within "
                "2 px and Chamfer (px) of metrics.image_edges(image) vs the sketch; shuffled_*: image i vs "
                "sketch i+1; prompt_*: metrics.prompt_adherence; guided = AtelierSketchGuidance window 0-50%, "
                "grad_every 1, form paper (UNet backward); fast = the same node with form fast (gradient on the "
                "denoised latent through the LEP's head, no UNet backward); sdedit = VAEEncode(sketch picture) + KSampler at denoise d"})


if __name__ == "__main__":
    main()
