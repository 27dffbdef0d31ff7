"""Baseline: the core KSampler on the tiny SD1.5/SDXL models and on the full-size SD1.5 UNet
architecture (random weights, 256 px, fp32 and bf16). Every technique's bench reports its cost
as a ratio to the matching row here, measured in the same run.

    python bench/bench_ksampler.py [--steps N] [--repeats N] [--no-full]
"""
from __future__ import annotations

import argparse
import gc
import importlib

import harness


def sd15_full_unet_config():
    return {
        "use_checkpoint": False, "image_size": 32, "out_channels": 4, "use_spatial_transformer": True,
        "legacy": False, "adm_in_channels": None, "in_channels": 4, "model_channels": 320,
        "num_res_blocks": [2, 2, 2, 2], "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0],
        "channel_mult": [1, 2, 4, 4], "transformer_depth_middle": 1, "use_linear_in_transformer": False,
        "context_dim": 768, "num_heads": 8, "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
        "use_temporal_attention": False, "use_temporal_resblock": False,
    }


def build_full_sd15(dtype, seed=0):
    """The real SD1.5 UNet (860 M parameters) with seeded random weights, as a ComfyUI MODEL."""
    import comfy.model_management as mm
    import comfy.model_patcher
    import comfy.supported_models
    from pure_models import load_models
    cfg = comfy.supported_models.SD15(sd15_full_unet_config())
    cfg.set_inference_dtype(dtype, None)
    model = cfg.get_model({})
    load_models("seeded_init").seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(), offload_device=mm.unet_offload_device())


def ksampler(model, positive, negative, latent, steps, cfg=7.0, seed=0):
    import nodes
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", positive, negative, latent, denoise=1.0)[0]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=None)
    ap.add_argument("--no-full", action="store_true", help="skip the full-size SD1.5 rows")
    ap.add_argument("--full-steps", type=int, default=None, help="steps of the full-size rows (default 4)")
    ap.add_argument("--dtypes", default="fp32,bf16", help="full-size rows to run (bf16 is very slow on CPUs without AMX)")
    ns = ap.parse_args()
    quick = harness.quick()
    h = harness.boot()
    tiny = importlib.import_module(h.pack_module.__name__ + ".nodes.tiny_family")
    import torch

    rows = []
    steps = ns.steps or (4 if quick else 20)
    reps = ns.repeats or (1 if quick else 5)
    for family, px in (("sd15", 64), ("sdxl", 128)):
        model, clip, _vae = tiny.build_family(family, 0)
        pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
        neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
        latent = {"samples": torch.zeros(1, 4, px // 8, px // 8)}
        t = harness.timeit(lambda: ksampler(model, pos, neg, latent, steps), repeats=reps)
        rows.append({"case": f"tiny-{family} {px}px fp32", "steps": steps, **t, "per_step_s": t["median_s"] / steps})

    if not ns.no_full:
        full_steps = ns.full_steps or ns.steps or (2 if quick else 4)
        full_reps = ns.repeats or (1 if quick else 2)
        cond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(1)), {}]]
        uncond = [[torch.randn(1, 77, 768, generator=torch.Generator().manual_seed(2)), {}]]
        latent = {"samples": torch.zeros(1, 4, 32, 32)}
        wanted = {"fp32": torch.float32, "bf16": torch.bfloat16}
        for dtype in [wanted[d] for d in ns.dtypes.split(",")]:
            model = build_full_sd15(dtype)
            t = harness.timeit(lambda: ksampler(model, cond, uncond, latent, full_steps), repeats=full_reps)
            name = "fp32" if dtype == torch.float32 else "bf16"
            rows.append({"case": f"full-sd15 256px {name}", "steps": full_steps, **t,
                         "per_step_s": t["median_s"] / full_steps})
            del model
            gc.collect()
        fp32 = next((r for r in rows if r["case"] == "full-sd15 256px fp32"), None)
        for r in rows:
            if fp32 and r["case"].startswith("full-sd15"):
                r["ratio"] = r["per_step_s"] / fp32["per_step_s"]
    harness.report("ksampler_baseline", rows, {"note": "cfg 7, euler/normal; per_step_s includes cond+uncond"})


if __name__ == "__main__":
    main()
