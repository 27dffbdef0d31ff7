"""Nodes for the Atelier world and the metrics that judge images drawn on it.

Thin glue over ../models/world.py and ../models/metrics.py: tensors in, numbers, reports and
previews out. Metric nodes score every image of a batch and output the batch mean; their
report lists each image.
"""
from __future__ import annotations

import json
import logging

import numpy as np
import torch
from comfy_api.latest import io, ui

from ..models import metrics, world

log = logging.getLogger(__name__)

CATEGORY = "atelier/metrics"
MAX_SEED = 0xFFFFFFFFFFFFFFFF


def _images(t: torch.Tensor, name: str) -> list[np.ndarray]:
    """A ComfyUI IMAGE batch as a list of (H, W, 3) float arrays."""
    if not isinstance(t, torch.Tensor) or t.ndim != 4 or t.shape[-1] not in (1, 3, 4):
        shape = tuple(t.shape) if isinstance(t, torch.Tensor) else type(t).__name__
        raise ValueError(f"{name}: expected an IMAGE (batch, height, width, 3), got {shape}; "
                         "connect an IMAGE output such as VAE Decode or Load Image")
    if t.shape[0] == 0:
        raise ValueError(f"{name}: the IMAGE batch is empty, so there is nothing to score (a mean over no images "
                         "would be NaN); connect a node that outputs at least one image")
    return [metrics.as_image(t[i], name) for i in range(t.shape[0])]


def _pair(n_a: int, n_b: int, name_a: str, name_b: str) -> list[tuple[int, int]]:
    """Index pairs for two batches: equal sizes pair up, a batch of one is broadcast."""
    if n_a == n_b:
        return [(i, i) for i in range(n_a)]
    if n_b == 1:
        return [(i, 0) for i in range(n_a)]
    if n_a == 1:
        return [(0, j) for j in range(n_b)]
    raise ValueError(f"{name_b}: batch of {n_b} does not match {name_a}'s batch of {n_a}; "
                     f"give one {name_b} for all, or one per {name_a}")


def _to_image_batch(arrays: list[np.ndarray]) -> torch.Tensor:
    return torch.from_numpy(np.stack(arrays).astype(np.float32))


def _preview(batch: torch.Tensor):
    return ui.PreviewImage(batch)


class AtelierWorldSample(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierWorldSample",
            display_name="Atelier World Sample",
            category=CATEGORY,
            description=(
                "Draws one image of the Atelier world (coloured shapes on a plain or lightly textured "
                "background) with its caption, one mask per object and a clean edge map. The same seed, "
                "index and stream always give the same scene; sizes 64 and 128 show the same scene at two "
                "resolutions. Use it as a reference, a sketch (edges) or a region (masks) for the metric nodes."
            ),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=MAX_SEED, control_after_generate=False,
                             tooltip="Seed of the world. Sample i of a seed never changes."),
                io.Int.Input("index", default=0, min=0, max=2**31 - 1,
                             tooltip="Which sample of the seed's stream to draw (any index, in any order)."),
                io.Int.Input("size", default=64, min=32, max=512, step=8,
                             tooltip="Width and height in pixels; 64 and 128 are the standard sizes."),
                io.Combo.Input("stream", options=["train", "benchmark"], default="train",
                               tooltip="train: the training stream; benchmark: the prompt set the Atelier "
                                       "benchmarks use (disjoint from training for the same seed)."),
            ],
            outputs=[
                io.Image.Output("image", display_name="image", tooltip="The rendered scene."),
                io.String.Output("caption", display_name="caption",
                                 tooltip="Its caption, e.g. 'a red circle left of a blue square'."),
                io.Mask.Output("masks", display_name="masks",
                               tooltip="One mask per object, in caption order (batch of 1 to 3)."),
                io.Image.Output("edges", display_name="edges",
                                tooltip="Object outlines, white on black: a clean sketch."),
                io.String.Output("objects", display_name="objects",
                                 tooltip="Ground truth as JSON: shape, colour, size, centre, bbox per object."),
            ],
        )

    @classmethod
    def execute(cls, seed: int, index: int, size: int, stream: str) -> io.NodeOutput:
        if stream == "train":
            s = world.sample(seed, index, size)
        elif stream == "benchmark":
            s = world.prompt_sample(seed, index, size)
        else:
            raise ValueError(f"stream: unknown value {stream!r}; choose train or benchmark")
        image = torch.from_numpy(s.image.astype(np.float32) / 255.0)[None]
        masks = torch.from_numpy(s.masks.astype(np.float32))
        edges = torch.from_numpy(s.edges.astype(np.float32))[None, :, :, None].expand(-1, -1, -1, 3).contiguous()
        return io.NodeOutput(image, s.caption, masks, edges, json.dumps(s.to_dict()))


class AtelierDetectShapes(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierDetectShapes",
            display_name="Atelier Detect Shapes",
            category=CATEGORY,
            description=(
                "Finds the coloured shapes in world-like images (saturated shapes on a low-contrast "
                "background) with classical image analysis, no model: each object's colour name, shape "
                "(circle, square, triangle, star, cross, ring), box and centre. Shows the boxes."
            ),
            inputs=[io.Image.Input("image", tooltip="Images to analyse (each one on its own).")],
            outputs=[
                io.String.Output("detections", display_name="detections",
                                 tooltip="JSON: one list of objects per image."),
                io.Int.Output("count", display_name="count", tooltip="Number of objects found in the first image."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="The images with a labelled box per object."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor) -> io.NodeOutput:
        per_image, previews = [], []
        for img in _images(image, "image"):
            dets = metrics.detect_objects(img)
            per_image.append([d.to_dict() for d in dets])
            previews.append(metrics.draw_detections(img, dets))
        preview = _to_image_batch(previews)
        return io.NodeOutput(json.dumps(per_image), len(per_image[0]), preview, ui=_preview(preview))


class AtelierPromptAdherence(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        vocab = ", ".join(world.COLORS) + "; " + ", ".join(world.SHAPES)
        return io.Schema(
            node_id="AtelierPromptAdherence",
            display_name="Atelier Prompt Adherence",
            category=CATEGORY,
            description=(
                "How much of a prompt an image shows: the share of requested objects found with the right "
                "colour and shape, and with the right colour alone. Reads 'colour shape' pairs from the prompt "
                f"({vocab}); other words are ignored, but a word where a colour or shape belongs that the world "
                "does not know ('a chartreuse circle', 'a red hexagon') is an error: it could not be checked. "
                "The report also gives the chance level."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Images to score; each is scored against the same prompt."),
                io.String.Input("prompt", multiline=True, default="a red circle left of a blue square",
                                tooltip="The prompt the images were made from, e.g. a world caption. "
                                        "Connect the prompt string, or type it."),
            ],
            outputs=[
                io.Float.Output("object_score", display_name="object_score",
                                tooltip="Mean share of requested objects found (colour and shape)."),
                io.Float.Output("color_score", display_name="color_score",
                                tooltip="Mean share of requested colours found."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per image: what was asked, what was found; and chance levels."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="The images with a labelled box per detected object."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor, prompt: str) -> io.NodeOutput:
        requests = metrics.as_requests(prompt, "prompt")
        imgs = _images(image, "image")
        results = [metrics.prompt_adherence(img, requests) for img in imgs]
        obj = float(np.mean([r.object_score for r in results]))
        col = float(np.mean([r.color_score for r in results]))
        chance = metrics.chance_levels()
        lines = [f"asked: {', '.join(r.describe() for r in requests)}",
                 f"mean over {len(results)} image(s): objects {obj:.3f}, colours {col:.3f}",
                 f"chance (an unrelated world image): objects {chance['random_image_object']:.3f}, "
                 f"colours {chance['random_image_color']:.3f}"]
        for i, r in enumerate(results):
            lines.append(f"image {i}: {r.report()}")
        log.debug("prompt adherence %r: objects %.3f colours %.3f over %d images", prompt, obj, col, len(results))
        preview = _to_image_batch([metrics.draw_detections(img, r.detections) for img, r in zip(imgs, results)])
        return io.NodeOutput(obj, col, "\n".join(lines), preview, ui=_preview(preview))


class AtelierRegionAdherence(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierRegionAdherence",
            display_name="Atelier Region Adherence",
            category=CATEGORY,
            description=(
                "Whether a colour appears where it was asked to: IoU between the area where objects of that "
                "colour are detected and the requested region mask (1 = exactly there, 0 = elsewhere or "
                "missing). The preview dims the image, outlines the region in white and tints the detected "
                "colour green inside it, red outside."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Images to score."),
                io.Mask.Input("mask", tooltip="The requested region(s), same size as the images."),
                io.Combo.Input("color", options=list(world.COLORS), default="red",
                               tooltip="The colour whose placement is checked."),
                io.Int.Input("mask_index", default=-1, min=-1, max=1023,
                             tooltip="-1: one mask for all images, or one mask per image. 0 or more: use that "
                                     "mask of the batch for every image (e.g. object 0 of Atelier World Sample)."),
            ],
            outputs=[
                io.Float.Output("iou", display_name="iou", tooltip="Mean IoU over the images."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per image: IoU, precision, recall and areas."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="Region outline and detected colour on the dimmed image."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor, mask: torch.Tensor, color: str, mask_index: int) -> io.NodeOutput:
        metrics.check_color(color, "color")
        imgs = _images(image, "image")
        m = mask if mask.ndim == 3 else mask.reshape((-1,) + tuple(mask.shape[-2:]))
        if mask_index >= 0:
            if mask_index >= m.shape[0]:
                raise ValueError(f"mask_index: {mask_index} is past the mask batch of {m.shape[0]}; "
                                 f"use 0..{m.shape[0] - 1}, or -1")
            m = m[mask_index:mask_index + 1]
        lines, ious, previews = [], [], []
        for i, j in _pair(len(imgs), m.shape[0], "image", "mask"):
            img, reg = imgs[i], m[j].cpu().numpy()
            if reg.shape != img.shape[:2]:
                raise ValueError(f"mask: size {reg.shape[1]}x{reg.shape[0]} differs from the image's "
                                 f"{img.shape[1]}x{img.shape[0]}; scale the mask to the image size")
            dets = metrics.detect_objects(img)
            r = metrics.region_adherence(img, reg, color, detections=dets)
            ious.append(r["iou"])
            lines.append(f"image {i}: iou {r['iou']:.3f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
                         f"{color} area {r['found_area']:.3f}  region area {r['region_area']:.3f}")
            previews.append(metrics.region_overlay(img, reg, metrics.concept_mask(img, color, dets)))
        iou = float(np.mean(ious))
        lines.insert(0, f"{color}: mean IoU {iou:.3f} over {len(ious)} image(s)")
        preview = _to_image_batch(previews)
        return io.NodeOutput(iou, "\n".join(lines), preview, ui=_preview(preview))


class AtelierSketchAdherence(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierSketchAdherence",
            display_name="Atelier Sketch Adherence",
            category=CATEGORY,
            description=(
                "How closely an image follows a sketch: its edges (colour Canny) against the sketch's strokes. "
                "F1 counts edge pixels within the tolerance of a stroke and strokes within the tolerance of an "
                "edge (1 = perfect); Chamfer is the mean distance between the two in pixels (0 = perfect). "
                "Preview: red = image edges only, green = sketch only, yellow = both."
            ),
            inputs=[
                io.Image.Input("image", tooltip="Images to score."),
                io.Image.Input("sketch", tooltip="Sketch of the same size: white strokes on black or black on "
                                                 "white (detected). One for all images, or one per image."),
                io.Float.Input("tolerance", default=2.0, min=0.0, max=16.0, step=0.5,
                               tooltip="How far (pixels) an edge may lie from a stroke and still count."),
            ],
            outputs=[
                io.Float.Output("f1", display_name="f1", tooltip="Mean edge F1 over the images."),
                io.Float.Output("chamfer", display_name="chamfer",
                                tooltip="Mean symmetric Chamfer distance in pixels."),
                io.String.Output("report", display_name="report", tooltip="Per image: F1, precision, recall, Chamfer."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="Image edges (red), sketch (green), agreement (yellow)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image: torch.Tensor, sketch: torch.Tensor, tolerance: float) -> io.NodeOutput:
        imgs, sketches = _images(image, "image"), _images(sketch, "sketch")
        lines, f1s, chs, previews = [], [], [], []
        for i, j in _pair(len(imgs), len(sketches), "image", "sketch"):
            img, sk = imgs[i], sketches[j]
            if sk.shape[:2] != img.shape[:2]:
                raise ValueError(f"sketch: size {sk.shape[1]}x{sk.shape[0]} differs from the image's "
                                 f"{img.shape[1]}x{img.shape[0]}; scale the sketch to the image size")
            r = metrics.sketch_adherence(img, sk, tolerance)
            f1s.append(r["f1"])
            chs.append(r["chamfer"])
            lines.append(f"image {i}: f1 {r['f1']:.3f}  precision {r['precision']:.3f}  recall {r['recall']:.3f}  "
                         f"chamfer {r['chamfer']:.2f} px")
            previews.append(metrics.edge_overlay(metrics.image_edges(img), metrics.sketch_edges(sk)))
        f1, ch = float(np.mean(f1s)), float(np.mean(chs))
        lines.insert(0, f"mean over {len(f1s)} image(s): f1 {f1:.3f}, chamfer {ch:.2f} px (tolerance {tolerance:g} px)")
        preview = _to_image_batch(previews)
        return io.NodeOutput(f1, ch, "\n".join(lines), preview, ui=_preview(preview))


class AtelierHandoffCoherence(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierHandoffCoherence",
            display_name="Atelier Handoff Coherence",
            category=CATEGORY,
            description=(
                "How much two images agree, e.g. the result before and after a handoff between models or "
                "resolutions: edge F1 of their edge maps, colour-histogram intersection and PSNR of blurred "
                "copies (layout and colour, blind to fine detail). Images of different sizes but the same "
                "aspect are compared at the smaller size."
            ),
            inputs=[
                io.Image.Input("image_a", tooltip="First image(s), e.g. the structure stage."),
                io.Image.Input("image_b",
                               tooltip="Second image(s), e.g. the final result. One for all, or one per image_a."),
                io.Float.Input("tolerance", default=2.0, min=0.0, max=16.0, step=0.5,
                               tooltip="How far (pixels, at the compared size) matching edges may lie apart."),
            ],
            outputs=[
                io.Float.Output("edge_f1", display_name="edge_f1",
                                tooltip="Mean F1 between the two images' edges (1 = same outlines)."),
                io.Float.Output("hist_intersection", display_name="hist_intersection",
                                tooltip="Mean colour-histogram intersection (1 = same colours)."),
                io.Float.Output("lowfreq_psnr", display_name="lowfreq_psnr",
                                tooltip=f"Mean PSNR of blurred copies in dB (capped at {metrics.PSNR_CAP:g})."),
                io.String.Output("report", display_name="report",
                                 tooltip="Per pair: all coherence figures, Chamfer and chi-square included."),
                io.Image.Output("preview", display_name="preview",
                                tooltip="Edges of image_a (red), image_b (green), both (yellow)."),
            ],
            is_output_node=True,
        )

    @classmethod
    def execute(cls, image_a: torch.Tensor, image_b: torch.Tensor, tolerance: float) -> io.NodeOutput:
        a_list, b_list = _images(image_a, "image_a"), _images(image_b, "image_b")
        rows, lines, previews = [], [], []
        for i, j in _pair(len(a_list), len(b_list), "image_a", "image_b"):
            x, y = metrics.match_sizes(a_list[i], b_list[j])
            r = metrics.handoff_coherence(x, y, tolerance)
            rows.append(r)
            lines.append(f"pair {i}: edge f1 {r['edge_f1']:.3f}  chamfer {r['chamfer']:.2f} px  "
                         f"hist ∩ {r['hist_intersection']:.3f}  chi² {r['hist_chi2']:.3f}  "
                         f"low-freq PSNR {r['lowfreq_psnr']:.2f} dB")
            previews.append(metrics.edge_overlay(metrics.image_edges(x), metrics.image_edges(y)))
        mean = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
        lines.insert(0, f"mean over {len(rows)} pair(s): edge f1 {mean['edge_f1']:.3f}, "
                        f"hist ∩ {mean['hist_intersection']:.3f}, low-freq PSNR {mean['lowfreq_psnr']:.2f} dB")
        preview = _to_image_batch(previews)
        return io.NodeOutput(mean["edge_f1"], mean["hist_intersection"], mean["lowfreq_psnr"],
                             "\n".join(lines), preview, ui=_preview(preview))


NODES = [
    AtelierWorldSample,
    AtelierDetectShapes,
    AtelierPromptAdherence,
    AtelierRegionAdherence,
    AtelierSketchAdherence,
    AtelierHandoffCoherence,
]
