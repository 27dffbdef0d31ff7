"""Sketch guidance cost: the core KSampler vs the paper's form (a backward through the UNet on every guided
step, grad_every 1) vs the fast form (form "fast": the gradient is taken on the denoised latent through the
LEP file's small denoised-latent head, no UNet backward) vs grad_every 2 (a fresh paper-form gradient every
2nd guided step, direction reused), on the
full-size SD1.5 UNet (random weights, built under inference mode like a loader's) at 256 px, fp32, cfg 8,
window 0-50%. Wall time and peak RSS above the pre-run level (a sampling thread), plus the size of the
per-run non-inference weight copies. Then adherence on the tiny SD1.5 model: the final latent's LEP loss
against a sketch (lower is better) for unguided / paper / fast / grad_every 2, over a few seeds, with an LEP trained
here for a few dozen steps (random weights: a plumbing-level signal, not image quality).

DiT rows (``--dit-only`` runs just these): the same three cases (core, paper form, fast form) on DiTs at real
width with few blocks, random weights, fp32, built by bench/bench_dit.py's builders: ComfyUI's Flux (hidden 3072,
24 heads, T5 context 4096 x 256 tokens, ``--flux-blocks`` double x single, default 1x1) at 512 px, FluxGuidance
3.5, cfg 1 (one model call per step), and PixArt-Σ (hidden 1152, 16 heads, caption width 4096 x 300 tokens,
``--pixart-depth`` blocks, default 4) at 512 px (its 512 px model's input size 64), cfg 4.5 (cond + uncond
batched). The LEPs are untrained predictors of the right input width (blocks read x hidden) and 16 / 4 output
channels: the cost does not depend on their weights. Euler, ``--dit-steps`` (default 2) with the default 0-50 %
window (it guides the first step, and the second where that one's sigma lies on the 50 % boundary, as on Flux: the
rows say how many were guided), ``--dit-repeats`` (default 3) interleaved repeats (core, paper, fast in each, the
order rotated per repeat); the ratio is on the process CPU seconds of a whole KSampler run (one torch thread: less
exposed to the shared machine's load than wall time), per repeat, median with min-max; peak RSS above each run's
start, freed memory handed back to the OS (malloc_trim) before each run.

    python bench/bench_sketch.py [--steps 8] [--no-full] [--threads 1]
    python bench/bench_sketch.py --dit-only [--dit-steps 2] [--dit-repeats 3] [--flux-blocks 1x1] [--pixart-depth 4]
        [--no-pixart] [--no-flux]
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os
import threading
import time

import harness
from bench_ksampler import build_full_sd15, ksampler


def _rss_mb() -> float:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def measure(fn):
    """(seconds, peak RSS above the starting RSS in MiB) of fn()."""
    gc.collect()
    start, peak, stop = _rss_mb(), [0.0], threading.Event()

    def watch():
        while not stop.is_set():
            peak[0] = max(peak[0], _rss_mb())
            time.sleep(0.01)
    th = threading.Thread(target=watch, daemon=True)
    th.start()
    t0 = time.perf_counter()
    out = fn()
    dt = time.perf_counter() - t0
    stop.set()
    th.join()
    return out, dt, max(0.0, max(peak[0], _rss_mb()) - start)


def _malloc_trim() -> None:
    try:
        import ctypes
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def interleaved(modes: dict, run, reps: int) -> dict:
    """modes: label -> model; ``run(model)`` samples once. Each repeat runs every mode once, the order rotated per
    repeat; per label: wall seconds, process CPU seconds and peak RSS above the start (MiB) of each run."""
    out = {k: {"wall": [], "cpu": [], "mem": []} for k in modes}
    labels = list(modes)
    for r in range(reps):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            gc.collect()
            _malloc_trim()         # freed memory back to the OS: each run's peak RSS above its start is its own
            c0 = time.process_time()
            _, wall, mem = measure(lambda: run(modes[label]))
            out[label]["cpu"].append(time.process_time() - c0)
            out[label]["wall"].append(wall)
            out[label]["mem"].append(mem)
        print(f"repeat {r + 1}/{reps}: " + ", ".join(f"{k} {v['cpu'][-1]:.1f}s" for k, v in out.items()), flush=True)
    return out


def dit_rows(ns, quick: bool) -> tuple[list[dict], dict]:
    """Core vs paper vs fast form on a real-width Flux and PixArt-Σ with few blocks (the module docstring)."""
    import statistics
    import node_helpers
    import torch
    import bench_dit
    pk = harness.boot().pack_module.__name__
    sk = importlib.import_module(pk + ".nodes.sketch")
    L = importlib.import_module(pk + ".models.lep")
    tiny = importlib.import_module(pk + ".nodes.tiny_family")
    steps = ns.dit_steps or 2
    reps = ns.dit_repeats or (1 if quick else 3)
    rows, extra = [], {}
    cases = []
    if not ns.no_flux:
        d, s = (int(n) for n in ns.flux_blocks.split("x"))
        cases.append(("flux", f"flux-3072 {d}d+{s}s {bench_dit.WIDE_PX}px", lambda: bench_dit.build_wide_flux(d, s),
                      bench_dit.WIDE_PX, 1.0))
    if not ns.no_pixart:
        cases.append(("pixart", f"pixart-1152 {ns.pixart_depth} blocks {bench_dit.PIXART_WIDE_PX}px",
                      lambda: bench_dit.build_wide_pixart(ns.pixart_depth), bench_dit.PIXART_WIDE_PX, 4.5))
    for fam, label, build, px, cfg in cases:
        with torch.inference_mode():
            model = build()
            dm = model.model.diffusion_model
            vae = tiny.build_family(fam, 0)[2]          # the tiny family's VAE only encodes the sketch
            gen = torch.Generator().manual_seed(3)
            if fam == "flux":
                cond = [[torch.randn(1, bench_dit.TEXT_TOKENS, 4096, generator=gen),
                         {"pooled_output": torch.randn(1, 768, generator=gen)}]]
                cond = node_helpers.conditioning_set_values(cond, {"guidance": 3.5})
                uncond = cond                                  # cfg 1: never evaluated
            else:
                cond = [[torch.randn(1, bench_dit.PIXART_TEXT_TOKENS, 4096, generator=gen), {}]]
                uncond = [[torch.randn(1, bench_dit.PIXART_TEXT_TOKENS, 4096, generator=gen), {}]]
            channels = model.model.latent_format.latent_channels
            latent = {"samples": torch.zeros(1, channels, px // 8, px // 8)}
            sketch = torch.ones(1, px, px, 3)
            sketch[:, px // 4:3 * px // 4, px // 4 - 3:px // 4 + 3] = 0.0
            sketch[:, px // 4 - 3:px // 4 + 3, px // 4:3 * px // 4] = 0.0
            layers = L.LAYERS[fam]
        with torch.inference_mode(False):     # untrained predictor of the right width: cost only
            lepm = sk.LEPModel(L.LatentEdgePredictor(sk.dit_channels(dm, layers), out_channels=channels).eval(),
                               {"family": fam, "layers": L.layer_names(fam)},
                               L.DenoisedEdgeHead(in_channels=channels, out_channels=channels).eval())
        with torch.inference_mode():
            modes = {"core KSampler": model}
            states = {}
            for form in ("paper", "fast"):
                key = f"{form} form"
                modes[key], states[key] = sk.patch_model(model, lepm, vae, sketch, beta=1.6, start_percent=0.0,
                                                         end_percent=0.5, form=form)

            def run(m):
                return bench_dit.ksampler(m, cond, uncond, latent, steps, cfg)
            got = interleaved(modes, run, reps)
        core = got["core KSampler"]
        for key, v in got.items():
            ratios = [a / b for a, b in zip(v["cpu"], core["cpu"])]
            row = {"case": f"{label} {key}", "steps": steps, "repeats": reps,
                   "cpu_s_median": statistics.median(v["cpu"]), "cpu_s_all": [round(x, 1) for x in v["cpu"]],
                   "wall_s_all": [round(x, 1) for x in v["wall"]], "peak_rss_mb": max(v["mem"]),
                   "peak_above_core_mb": max(v["mem"]) - max(core["mem"]),
                   "ratio": statistics.median(ratios), "ratio_min": min(ratios), "ratio_max": max(ratios),
                   "ratio_per_repeat": [round(x, 3) for x in ratios]}
            if key in states:
                st = states[key].stats
                row["guided_steps_per_run"] = len(st["runs"][-1]["guided_steps"])
                row["gradients_per_run"] = st["fresh"] / reps
            rows.append(row)
        extra[f"{fam}_params_m"] = round(sum(p.numel() for p in dm.parameters()) / 1e6, 1)
        extra[f"{fam}_weight_copy_mb"] = sum(p.numel() * p.element_size() for p in dm.parameters()) / 2**20
        del model, modes, states, dm
        gc.collect()
    return rows, extra


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--no-full", action="store_true")
    ap.add_argument("--dit-only", action="store_true", help="only the real-width DiT rows (Flux, PixArt-Σ)")
    ap.add_argument("--dit-steps", type=int, default=None, help="steps of the DiT rows (default 2)")
    ap.add_argument("--dit-repeats", type=int, default=None, help="interleaved repeats of the DiT rows (default 3)")
    ap.add_argument("--flux-blocks", default="1x1", help="double x single blocks of the real-width Flux")
    ap.add_argument("--pixart-depth", type=int, default=4, help="blocks of the real-width PixArt-Σ")
    ap.add_argument("--no-flux", action="store_true")
    ap.add_argument("--no-pixart", action="store_true")
    ns = ap.parse_args()
    quick = harness.quick()
    h = harness.boot()
    import torch
    torch.set_num_threads(ns.threads)
    if ns.dit_only:
        rows, extra = dit_rows(ns, quick)
        harness.report("sketch_guidance_dit", rows, {"threads": ns.threads, "window": "0-50%", "beta": 1.6,
                                                     "load_avg": os.getloadavg(), **extra})
        return
    pk = h.pack_module.__name__
    sk = importlib.import_module(pk + ".nodes.sketch")
    L = importlib.import_module(pk + ".models.lep")
    tiny = importlib.import_module(pk + ".nodes.tiny_family")
    world = importlib.import_module(pk + ".models.world")
    import numpy as np
    rows, extra = [], {"threads": ns.threads, "window": "0-50%", "cfg": 8.0}

    sketch = torch.ones(1, 256, 256, 3)
    sketch[:, 64:192, 60:66] = 0.0
    sketch[:, 60:66, 64:192] = 0.0
    if not ns.no_full:
        steps = ns.steps or (2 if quick else 8)
        with torch.inference_mode():
            model = build_full_sd15(torch.float32)
            _m, _c, vae = tiny.build_family("sd15", 0)    # the VAE only encodes the sketch (timing-neutral)
            cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
            uncond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2)), {}]]
            latent = {"samples": torch.zeros(1, 4, 32, 32)}
            channels = 320 + 640 + 1280 + 3 * 1280 + 1280 + 1280 + 640
        with torch.inference_mode(False):
            lepm = sk.LEPModel(L.LatentEdgePredictor(channels).eval(), {"family": "sd15"}, L.DenoisedEdgeHead().eval())
        reps = 1 if quick else 3
        with torch.inference_mode():
            ksampler(model, cond, uncond, latent, 1, cfg=8.0)          # warm-up / load
            modes = {"core KSampler": None}
            for every, form, label in ((1, "paper", "paper form (grad every guided step)"),
                                       (1, "fast", "fast form (denoised-latent head)"),
                                       (2, "paper", "paper form, grad_every 2")):
                modes[label] = sk.patch_model(model, lepm, vae, sketch, beta=1.6, start_percent=0.0,
                                              end_percent=0.5, grad_every=every, form=form)
            times = {k: [] for k in modes}
            mems = {k: [] for k in modes}
            copies = {}
            # Interleaved repeats: the shared machine's load drifts, so each mode sees the same conditions.
            for _ in range(reps):
                for label, patched in modes.items():
                    mdl = model if patched is None else patched[0]
                    _, t, mem = measure(lambda: ksampler(mdl, cond, uncond, latent, steps, cfg=8.0))
                    times[label].append(t)
                    mems[label].append(mem)
                    if patched is not None:
                        copies[label] = patched[1].stats.get("weight_copies", 0)
            med = {k: float(np.median(v)) for k, v in times.items()}
            for label in modes:
                row = {"case": label, "steps": steps, "seconds_median": med[label],
                       "seconds_all": [round(x, 1) for x in times[label]], "peak_rss_mb": max(mems[label]),
                       "ratio": med[label] / med["core KSampler"],
                       "ratio_per_repeat": [round(a / b, 2) for a, b in zip(times[label], times["core KSampler"])]}
                if label in copies:
                    row["weight_tensors_copied"] = copies[label]
                if modes[label] is not None:
                    st = modes[label][1].stats
                    row["fresh_gradients_per_run"] = st["fresh"] / reps
                    row["reused_directions_per_run"] = st["reused"] / reps
                rows.append(row)
            extra["weight_copy_mb"] = sum(p.numel() * p.element_size()
                                          for p in model.model.diffusion_model.parameters()) / 2**20
            del model
            gc.collect()

    # Adherence on the tiny model.
    import folder_paths
    from PIL import Image
    import tempfile
    tmp = tempfile.mkdtemp(prefix="bench_sketch_")
    d = os.path.join(folder_paths.get_input_directory(), "bench_sketch_world")
    os.makedirs(d, exist_ok=True)
    for s in world.iter_samples(3, 0, 8, size=64):
        Image.fromarray(s.image).save(os.path.join(d, f"w{s.index:03d}.png"))
        with open(os.path.join(d, f"w{s.index:03d}.txt"), "w") as f:
            f.write(s.caption)
    saved = {k: folder_paths.folder_names_and_paths[k] for k in ("atelier_lep", "atelier_lep_resume")}
    folder_paths.folder_names_and_paths["atelier_lep"] = ([os.path.join(tmp, "lep")], {".safetensors"})
    folder_paths.folder_names_and_paths["atelier_lep_resume"] = ([os.path.join(tmp, "res")], {".safetensors"})
    import nodes
    try:
        with torch.inference_mode():
            model, clip, vae = tiny.build_family("sd15", 0)
            lepm, rep = sk.train_lep(model, clip, vae, "bench_sketch_world", "bench", steps=30, batch_size=4,
                                     learning_rate=1e-3, resolution=64, save_every=0)
            ref = world.sample(3, 1000, 64)
            sk_img = torch.from_numpy(np.where(ref.edges, 0.0, 1.0)).float()[None, ..., None].expand(1, 64, 64, 3)
            target = sk.sketch_target(vae, model, sk_img)
            pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
            neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
            base = model.model

            def final_loss(lat):
                x0 = base.latent_format.process_in(lat)
                t = torch.tensor([200.0])
                sigma = base.model_sampling.sigma(t)
                z = base.model_sampling.noise_scaling(sigma.view(-1, 1, 1, 1), torch.randn(
                    x0.shape, generator=torch.Generator().manual_seed(9)), x0)
                kw = sk.encode_text(base, clip, "a red circle", z)
                with L.FeatureCapture(base.diffusion_model, "sd15") as cap:
                    base.apply_model(z, sigma, **kw)
                    f = L.concat_features(cap.take(), (8, 8))
                return float(L.lep_loss(lepm.module(f, t), target).mean())

            seeds = (1, 2, 3) if quick else (1, 2, 3, 4, 5, 6)
            res = {"unguided": [], "paper": [], "fast": [], "grad_every 2": []}
            for seed in seeds:
                def run(mm_):
                    return nodes.common_ksampler(mm_, seed, 8, 8.0, "euler", "normal", pos, neg,
                                                 {"samples": torch.zeros(1, 4, 8, 8)})[0]["samples"]
                res["unguided"].append(final_loss(run(model)))
                for every, form, key in ((1, "paper", "paper"), (1, "fast", "fast"), (2, "paper", "grad_every 2")):
                    m, _ = sk.patch_model(model, lepm, vae, sk_img, beta=1.6, grad_every=every, form=form)
                    res[key].append(final_loss(run(m)))
            for key, v in res.items():
                rows.append({"case": f"tiny adherence: {key}", "steps": 8, "lep_loss_mean": float(np.mean(v)),
                             "lep_loss_per_seed": [round(x, 4) for x in v],
                             "wins_vs_unguided": int(sum(a < b for a, b in zip(v, res["unguided"])))})
    finally:
        folder_paths.folder_names_and_paths.update(saved)
        import shutil
        shutil.rmtree(d, ignore_errors=True)
        shutil.rmtree(tmp, ignore_errors=True)
    harness.report("sketch_guidance", rows, extra)


if __name__ == "__main__":
    main()
