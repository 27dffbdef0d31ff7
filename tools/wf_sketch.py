"""Example workflows for sketch guidance (issue 6): a sketch from the canvas, a sketch from an image, and
training a latent edge predictor. Each trains (or, once trained, just loads) the predictor with
AtelierTrainLEP so the graph runs as is; swap in Atelier Load Latent Edge Predictor once you have one."""
from __future__ import annotations

import json
import math

from wf_basic import ksample, txt2img

# "2": predictors trained since the fast form carry its denoised-latent head; an older sd15_sketch_lep file
# (paper form only) is left alone and a fresh one is trained on first run.
LEP_NAME = "sd15_sketch_lep2"


def _star_strokes(size=512):
    c, r1, r2 = size / 2, size * 0.36, size * 0.15
    pts = []
    for k in range(11):
        r = r1 if k % 2 == 0 else r2
        a = -math.pi / 2 + k * math.pi / 5
        pts.append([round(c + r * math.cos(a), 1), round(c + r * math.sin(a), 1)])
    return json.dumps({"version": 1, "width": size, "height": size, "background": "",
                       "strokes": [{"mode": "draw", "size": 6, "points": pts}]})


def _train(g, ck, steps=100, title="Train LEP (loads it when already trained)"):
    return g.node("AtelierTrainLEP", title=title, model=ck[0], clip=ck[1], vae=ck[2], folder=".", name=LEP_NAME,
                  steps=steps, batch_size=4, learning_rate=1e-4, resolution=0, edge_method="canny", seed=0,
                  resume=True, save_every=100)


def _sample(g, model, pos, neg, lat, vae, prefix):
    ksample(g, model, pos[0], neg[0], lat[0], vae, prefix, seed=7, steps=20, cfg=8.0)


def sketch_canvas(g):
    g.note("Sketch guidance from a drawing: draw in the Sketch Canvas node (Draw/Erase/Undo/Clear, brush size, "
           "an image as a background guide); the drawing is saved in the workflow. The LEP node trains the "
           "latent edge predictor on the images of ComfyUI's input folder ('.'; point it at your own folder of "
           "images + captions; 3000 steps at batch 16 as in the paper) and loads it when it is already trained. "
           "beta 1.6 on the first 50% of the steps, cfg 8, as in the paper.")
    ck, pos, neg, lat = txt2img(g, prompt="a yellow star")
    lep = _train(g, ck)
    canvas = g.node("AtelierSketchCanvas", width=512, height=512, sketch=_star_strokes())
    guided = g.node("AtelierSketchGuidance", model=ck[0], lep=lep[0], vae=ck[2], sketch=canvas[0], beta=1.6,
                    start_percent=0.0, end_percent=0.5, grad_every=1, form="paper")
    _sample(g, guided[0], pos, neg, lat, ck[2], "atelier_sketch_canvas")


def sketch_from_image(g):
    g.note("Sketch guidance from an image: its Canny edges become the sketch (or feed a line drawing straight "
           "into Sketch Preprocess, which detects black-on-white or white-on-black strokes and can thin or "
           "thicken them). form 'fast' takes the guidance gradient on the denoised latent through the LEP's small "
           "head: about the cost of plain sampling (the paper form backpropagates through the UNet, ~1.6x); "
           "beta 1 suits small models.")
    ck, pos, neg, lat = txt2img(g, prompt="a red circle left of a blue square")
    lep = _train(g, ck)
    src = g.node("LoadImage", image="example.png")
    edges = g.node("AtelierImageToEdges", image=src[0], method="canny", low=6.0, high=10.0)
    sketch = g.node("AtelierSketchPreprocess", image=edges[0], polarity="auto", threshold=0.5, stroke="keep",
                    thicken_px=1)
    guided = g.node("AtelierSketchGuidance", model=ck[0], lep=lep[0], vae=ck[2], sketch=sketch[0], beta=1.0,
                    start_percent=0.0, end_percent=0.5, grad_every=1, form="fast")
    _sample(g, guided[0], pos, neg, lat, ck[2], "atelier_sketch_from_image")


def lep_training(g):
    g.note("Train a latent edge predictor (Voynov et al.): a folder of images under ComfyUI's input folder, "
           "captions in <image>.txt (else the file name). Edge maps are computed (Canny), images noised at a "
           "random timestep, and a per-pixel MLP learns to map the UNet's activations to the VAE encoding of "
           "the edges. Saved to models/atelier/lep/<name>.safetensors; Cancel keeps a resumable checkpoint. "
           "Set steps 3000 and batch 16 for the paper's setting (100 x 4 here keeps the demo short). The guided "
           "image at the end checks the result.")
    ck, pos, neg, lat = txt2img(g, prompt="a green triangle")
    lep = _train(g, ck, title="Train LEP")
    src = g.node("LoadImage", image="example.png")
    edges = g.node("AtelierImageToEdges", image=src[0], method="sobel", low=6.0, high=10.0)
    guided = g.node("AtelierSketchGuidance", model=ck[0], lep=lep[0], vae=ck[2], sketch=edges[0], beta=1.6,
                    start_percent=0.0, end_percent=0.5, grad_every=1, form="paper")
    _sample(g, guided[0], pos, neg, lat, ck[2], "atelier_lep_training")


FLUX_LEP_NAME = "flux_sketch_lep"


def flux_sketch_fast(g):
    from wf_dit import FLUX_DEV, TINY_NOTE, flux_loaders
    g.note("Flux sketch guidance (fast form): the drawing guides Flux.1 dev through SamplerCustomAdvanced + "
           "BasicGuider (Flux has no CFG batch: one conditioned model call per step). The LEP reads Flux's "
           "double-stream blocks at 1/2 and the end and single-stream blocks at 1/4, 1/2, 3/4 of the depth; form "
           "'fast' takes the gradient on the denoised latent through the LEP's small head (no backward through "
           "Flux: about the cost of plain sampling). The Train LEP node trains on ComfyUI's input folder on the "
           "first run (point it at your own images + captions) and loads the file afterwards. "
           + TINY_NOTE.format(family="Flux", size=1024))
    model, clip, vae = flux_loaders(g, FLUX_DEV)
    sampling = g.node("ModelSamplingFlux", model=model[0], max_shift=1.15, base_shift=0.5, width=1024, height=1024)
    lep = g.node("AtelierTrainLEP", title="Train LEP (loads it when already trained)", model=sampling[0],
                 clip=clip[0], vae=vae[0], folder=".", name=FLUX_LEP_NAME, steps=100, batch_size=4,
                 learning_rate=1e-4, resolution=0, edge_method="canny", seed=0, resume=True, save_every=100)
    canvas = g.node("AtelierSketchCanvas", width=1024, height=1024, sketch=_star_strokes(1024))
    guided = g.node("AtelierSketchGuidance", model=sampling[0], lep=lep[0], vae=vae[0], sketch=canvas[0], beta=1.0,
                    start_percent=0.0, end_percent=0.5, grad_every=1, form="fast")
    pos = g.node("CLIPTextEncode", title="Prompt", text="a yellow star", clip=clip[0])
    fg = g.node("FluxGuidance", conditioning=pos[0], guidance=3.5)
    guider = g.node("BasicGuider", model=guided[0], conditioning=fg[0])
    noise = g.node("RandomNoise", noise_seed=42)
    sampler = g.node("KSamplerSelect", sampler_name="euler")
    sigmas = g.node("BasicScheduler", model=sampling[0], scheduler="simple", steps=20, denoise=1.0)
    latent = g.node("EmptySD3LatentImage", width=1024, height=1024, batch_size=1)
    out = g.node("SamplerCustomAdvanced", noise=noise[0], guider=guider[0], sampler=sampler[0], sigmas=sigmas[0],
                 latent_image=latent[0])
    img = g.node("VAEDecode", samples=out[0], vae=vae[0])
    g.node("SaveImage", images=img[0], filename_prefix="atelier_flux_sketch_fast")


WORKFLOWS = {"sketch_canvas.json": sketch_canvas, "sketch_from_image.json": sketch_from_image,
             "lep_training.json": lep_training, "flux_sketch_fast.json": flux_sketch_fast}
