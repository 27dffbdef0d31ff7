"""Cost baseline for the DiT and flow-matching families (issue 17.6): what the next issues' techniques on
PixArt, Flux and SD3 report their cost against, as ratios measured in the same run.

1. Core sampling (``common_ksampler``, euler) on each tiny DiT family at its native size, with the family's
   usual guidance: pixart and sd3 cfg 4.5 (cond + uncond, one batched call per step), flux with FluxGuidance
   3.5 and cfg 1 (one call per step), flux_schnell cfg 1. Ratio: s/step over tiny sd15's (64 px, cfg 7) in
   the same run.
2. A Flux DiT at real width, random weights, fp32: ComfyUI's own ``comfy.ldm.flux.model.Flux`` (through
   ``supported_models.Flux``) with hidden 3072, 24 heads, context 4096, vec 768, guidance embedding, at 512 px
   (64x64 latent -> 1024 image tokens, + 256 text tokens) with 1 double + 1 single, 2 + 1 and 2 + 2 blocks.
   The differences give the cost of one double and one single block and the fixed rest (embedders, final
   layer, sampler); ratio: s/step over the full-size SD1.5 UNet (256 px, fp32, cfg 7) in the same run.
   A real Flux.1 has 19 double + 38 single blocks: its step is about rest + 19 d + 38 s.

    python bench/bench_dit.py [--steps N] [--repeats N] [--wide-steps N] [--no-wide] [--no-sd15-full] [--threads N]

The real-width rows are timed without a warm-up run (one forward is seconds; the first call's allocations are
noise against it); the tiny rows with one.

ATELIER_BENCH_QUICK=1 shrinks it to a smoke run (tiny rows, 2 steps, no real-width rows).
"""
from __future__ import annotations

import argparse
import gc
import importlib

import harness

# The real Flux.1 widths (comfy/model_detection.py reads these from a dev/schnell file); depth is ours.
FLUX_WIDE = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2, "vec_in_dim": 768,
    "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24,
    "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True, "guidance_embed": True,
}
WIDE_PX = 512
TEXT_TOKENS = 256  # Flux's T5 prompt length
TINY = {"pixart": (4.5, None), "flux": (1.0, 3.5), "flux_schnell": (1.0, None), "sd3": (4.5, None)}  # cfg, FluxGuidance


def ksampler(model, positive, negative, latent, steps, cfg, scheduler="simple"):
    import nodes
    return nodes.common_ksampler(model, 0, steps, cfg, "euler", scheduler, positive, negative, latent, denoise=1.0)[0]


def build_wide_flux(double: int, single: int, seed: int = 0):
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from pure_models import load_models
    cfg = comfy.supported_models.Flux(dict(FLUX_WIDE, depth=double, depth_single_blocks=single))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    load_models("seeded_init").seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


PIXART_WIDE_PX = 512      # PixArt-Σ's 512 px model (input_size 64); its 1024 px one is input_size 128
PIXART_TEXT_TOKENS = 300  # PixArt-Σ's T5 prompt length


def build_wide_pixart(depth: int, px: int = PIXART_WIDE_PX, seed: int = 0):
    """PixArt-Σ at real width with ``depth`` blocks, random weights, fp32: the widths core detection hard-codes for a
    PixArt-Σ file (``tiny_family.DETECTED_CONFIGS``: hidden 1152, 16 heads, patch 2, caption width 4096), at
    ``px`` (input_size = px / 8)."""
    import torch
    import comfy.model_management as mm
    import comfy.model_patcher
    from pure_models import load_models
    tiny = importlib.import_module(harness.boot().pack_module.__name__ + ".nodes.tiny_family")
    cls, unet = tiny.DETECTED_CONFIGS["pixart"]
    cfg = cls(dict(unet, depth=depth, input_size=px // 8))
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    load_models("seeded_init").seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None, help="steps of the tiny rows (default 10)")
    ap.add_argument("--repeats", type=int, default=None, help="timed runs per row (default 3 tiny, 1 wide)")
    ap.add_argument("--wide-steps", type=int, default=None, help="steps of the real-width rows (default 2)")
    ap.add_argument("--no-wide", action="store_true", help="skip the real-width Flux rows")
    ap.add_argument("--no-sd15-full", action="store_true", help="skip the full-size SD1.5 baseline row")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--wide-configs", default="1x1,2x1,2x2",
                    help="double x single block counts of the real-width rows (1x1,2x2 gives one double + one single "
                         "block together; 2x1 separates them)")
    ns = ap.parse_args()
    quick = harness.quick()
    h = harness.boot()
    tiny = importlib.import_module(h.pack_module.__name__ + ".nodes.tiny_family")
    import torch
    if ns.threads:
        torch.set_num_threads(ns.threads)

    rows = []
    steps = ns.steps or (2 if quick else 10)
    reps = ns.repeats or (1 if quick else 3)
    base = None
    for family in ("sd15",) + tuple(TINY):
        px = tiny.FAMILIES[family]["native_px"]
        cfg, guidance = (7.0, None) if family == "sd15" else TINY[family]
        model, clip, _vae = tiny.build_family(family, 0)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle left of a blue square"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        if guidance is not None:
            import node_helpers
            pos = node_helpers.conditioning_set_values(pos, {"guidance": guidance})
        ch = tiny.FAMILIES[family].get("vae_channels", 4)
        latent = {"samples": torch.zeros(1, ch, px // 8, px // 8)}
        sched = "normal" if family == "sd15" else "simple"
        t = harness.timeit(lambda: ksampler(model, pos, neg, latent, steps, cfg, sched), repeats=reps)
        row = {"case": f"tiny-{family} {px}px cfg {cfg:g}", "steps": steps, **t, "per_step_s": t["median_s"] / steps}
        base = base or row
        row["ratio"] = row["per_step_s"] / base["per_step_s"]
        rows.append(row)
        del model, clip
        gc.collect()

    wide = {}
    if not (ns.no_wide or quick):
        wsteps = ns.wide_steps or 2
        wreps = ns.repeats or 1
        full = None
        if not ns.no_sd15_full:
            import bench_ksampler
            model = bench_ksampler.build_full_sd15(torch.float32)
            cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
            uncond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2)), {}]]
            lat = {"samples": torch.zeros(1, 4, 32, 32)}
            t = harness.timeit(lambda: ksampler(model, cond, uncond, lat, wsteps, 7.0, "normal"), repeats=wreps, warmup=0)
            full = {"case": "full-sd15 256px fp32 cfg 7", "steps": wsteps, **t, "per_step_s": t["median_s"] / wsteps,
                    "ratio": 1.0}
            rows.append(full)
            del model
            gc.collect()
        gen = torch.Generator().manual_seed(3)
        cond = [[torch.randn(1, TEXT_TOKENS, 4096, generator=gen),
                 {"pooled_output": torch.randn(1, 768, generator=gen), "guidance": 3.5}]]
        lat = {"samples": torch.zeros(1, 16, WIDE_PX // 8, WIDE_PX // 8)}
        configs = [tuple(int(n) for n in c.split("x")) for c in ns.wide_configs.split(",")]
        for double, single in configs:
            model = build_wide_flux(double, single)
            params = sum(p.numel() for p in model.model.diffusion_model.parameters())
            t = harness.timeit(lambda: ksampler(model, cond, cond, lat, wsteps, 1.0), repeats=wreps, warmup=0)
            row = {"case": f"flux-3072 {double}d+{single}s {WIDE_PX}px fp32", "steps": wsteps, **t,
                   "per_step_s": t["median_s"] / wsteps, "params_m": round(params / 1e6, 1)}
            if full:
                row["ratio"] = row["per_step_s"] / full["per_step_s"]
            rows.append(row)
            wide[(double, single)] = row["per_step_s"]
            del model
            gc.collect()
        if {(1, 1), (2, 1), (2, 2)} <= set(wide):
            d = wide[(2, 1)] - wide[(1, 1)]
            s = wide[(2, 2)] - wide[(2, 1)]
            rest = wide[(1, 1)] - d - s
            wide = {"double_block_s_per_step": d, "single_block_s_per_step": s, "rest_s_per_step": rest,
                    "flux1_19d_38s_estimate_s_per_step": rest + 19 * d + 38 * s}
        elif {(1, 1), (2, 2)} <= set(wide):
            ds = wide[(2, 2)] - wide[(1, 1)]
            rest = wide[(1, 1)] - ds
            wide = {"double_plus_single_block_s_per_step": ds, "rest_s_per_step": rest}
        else:
            wide = {}
        if full:
            wide.update({k.replace("_s_per_step", "_ratio_to_full_sd15_step"): v / full["per_step_s"]
                         for k, v in list(wide.items())})
        print("per block (s/step):", {k: round(v, 4) for k, v in wide.items()})
    harness.report("dit_baseline", rows, {
        "note": "tiny rows: ratio to tiny-sd15 s/step; flux-3072 rows: ratio to full-sd15 256px fp32 s/step "
                "(cfg 7, two model calls per step; Flux cfg 1, one call); random weights",
        "per_block": wide})


if __name__ == "__main__":
    main()
