"""What kNN -> Flux Redux costs (issue 18.4), as ratios to the core Redux path measured in the same run.

Core Redux encodes one reference image with SigLIP (CLIPVisionEncode) and Apply Style Model appends its 729 tokens
to the text tokens. Atelier kNN Retrieve re-encodes the k neighbour images (the index keeps pooled embeddings
only), then either one score-weighted set of 729 tokens (combine "weighted mean", what the core path appends) or
729 per neighbour ("all neighbours").

1. Encoding: ComfyUI's SigLIP at full size (comfy/clip_vision_siglip_384.json: so400m/14, 27 layers, width 1152,
   384 px = 729 tokens; random weights, fp32) on 1 image (core) vs k images (Retrieve's re-encode).
2. Sampling: one step of ComfyUI's Flux at real width (hidden 3072, context 4096; 1 double + 1 single block,
   random weights, fp32, 512 px = 1024 image tokens, 256 text tokens) with no Redux tokens, + 729 (core Redux
   = weighted mean) and + k x 729 (all neighbours). Ratio: s/step over the text-only step.
3. Storage (computed): the token states the index would hold per image to skip the re-encode, vs the pooled
   vector it holds.

    python bench/bench_knn_redux.py [--k 4] [--repeats 1] [--threads N] [--no-flux]

ATELIER_BENCH_QUICK=1: the tiny SigLIP and the tiny flux instead (a smoke run of the code path; no figures).
"""
from __future__ import annotations

import argparse
import gc
import importlib
import os

import harness

SIGLIP_TOKENS, SIGLIP_WIDTH = 729, 1152
TEXT_TOKENS = 256


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4, help="neighbours (default 4, Retrieve's default)")
    ap.add_argument("--repeats", type=int, default=1, help="timed runs per row (default 1: each is seconds)")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--no-flux", action="store_true", help="skip the real-width Flux rows")
    ns = ap.parse_args()
    quick = harness.quick()
    h = harness.boot()
    tiny = importlib.import_module(h.pack_module.__name__ + ".nodes.tiny_family")
    import torch
    import comfy.clip_vision
    if ns.threads:
        torch.set_num_threads(ns.threads)
    from pure_models import load_models
    seeded_init_ = load_models("seeded_init").seeded_init_

    rows = []
    if quick:
        vision = tiny.build_clip_vision(0, tiny.TINY_SIGLIP)
    else:
        vision = comfy.clip_vision.ClipVisionModel(os.path.join(os.path.dirname(comfy.clip_vision.__file__),
                                                                "clip_vision_siglip_384.json"))
        seeded_init_(vision.model, 0)
    gen = torch.Generator().manual_seed(0)
    images = torch.rand(ns.k, 512, 512, 3, generator=gen)
    with torch.inference_mode():
        core = harness.timeit(lambda: vision.encode_image(images[:1]), repeats=ns.repeats, warmup=1)
        ours = harness.timeit(lambda: vision.encode_image(images), repeats=ns.repeats, warmup=0)
        tokens = vision.encode_image(images[:1]).last_hidden_state.shape[1:]
    rows.append({"case": f"SigLIP encode 1 image (core CLIPVisionEncode), {tuple(tokens)} tokens", **core,
                 "ratio": 1.0})
    rows.append({"case": f"SigLIP encode k={ns.k} neighbours (Retrieve re-encode)", **ours,
                 "ratio": ours["median_s"] / core["median_s"]})
    del vision
    gc.collect()

    per_step = {}
    if not ns.no_flux:
        import bench_dit
        if quick:
            model, width, n_tok, px, vec = tiny.build_model("flux", 0), tiny.T5_WIDTH, 16, 64, 64
        else:
            model, width, n_tok, px, vec = bench_dit.build_wide_flux(1, 1), 4096, SIGLIP_TOKENS, bench_dit.WIDE_PX, 768
        lat = {"samples": torch.zeros(1, 16, px // 8, px // 8)}
        base = None
        for label, extra in (("text only (core txt2img)", 0), ("+ 1 x Redux tokens (core Redux = weighted mean)", 1),
                             (f"+ {ns.k} x Redux tokens (all neighbours)", ns.k)):
            g = torch.Generator().manual_seed(3)
            cond = [[torch.randn(1, TEXT_TOKENS + extra * n_tok, width, generator=g),
                     {"pooled_output": torch.randn(1, vec, generator=g), "guidance": 3.5}]]
            t = harness.timeit(lambda: bench_dit.ksampler(model, cond, cond, lat, 1, 1.0), repeats=ns.repeats,
                               warmup=0 if not quick else 1)
            row = {"case": f"flux {'tiny' if quick else '3072 1d+1s'} {px}px, {label}", **t, "per_step_s": t["median_s"]}
            base = base or row
            row["ratio"] = row["per_step_s"] / base["per_step_s"]
            rows.append(row)
            per_step[extra] = row["per_step_s"]
        del model
        gc.collect()

    storage = {"token_states_fp16_bytes_per_image": SIGLIP_TOKENS * SIGLIP_WIDTH * 2,
               "pooled_fp32_bytes_per_image": SIGLIP_WIDTH * 4,
               "100k_images_token_states_gb": SIGLIP_TOKENS * SIGLIP_WIDTH * 2 * 100_000 / 1e9,
               "100k_images_pooled_gb": SIGLIP_WIDTH * 4 * 100_000 / 1e9}
    extra = {"note": "encode rows: ratio to core's one-image encode; flux rows: ratio to the text-only step "
                     "(one model call, cfg 1); random weights, fp32", "k": ns.k, "storage": storage}
    if per_step and not quick:
        extra["reencode_s_over_one_1d1s_step"] = ours["median_s"] / per_step[0]
    harness.report("knn_redux", rows, extra)


if __name__ == "__main__":
    main()
