"""Loader node for the tiny, seeded test families (no files needed)."""
from __future__ import annotations

import logging
import os

import comfy.model_management as mm
from comfy_api.latest import io

from ..models import knn_embed
from ..models.tiny_substitution import substitute_tiny
from . import tiny_family

# The kNN nodes' embedder type (the same type string as in nodes/knn.py).
Embedder = io.Custom("ATELIER_KNN_EMBEDDER")


class AtelierTinyCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTinyCheckpointLoader",
            display_name="Atelier Tiny Checkpoint (test)",
            category="atelier/testing",
            description=(
                "Builds a tiny model with seeded random weights and the real block layout, tokenizers and latent "
                "format of SD1.5, SDXL (UNets), PixArt-Σ (DiT), Flux.1 dev / schnell or SD3.5 (flow-matching "
                "MMDiTs). It draws noise-like pictures: it exists to try workflows and run tests without "
                "downloading weights. Same seed, same weights."
            ),
            inputs=[
                io.Combo.Input("family", options=sorted(tiny_family.FAMILIES), default="sd15",
                               tooltip="Which topology and latent format to imitate: sd15 (64 px native), sdxl (128 px), "
                                       "pixart (PixArt-Σ, SDXL latents, 320 px), flux (Flux.1 dev, guidance "
                                       "embedding), flux_schnell (no guidance embedding) or sd3 (SD3.5); the flux "
                                       "and sd3 families use 16-channel latents (Empty SD3 Latent Image), 128 px."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights. Two seeds give two different models of one family, "
                                     "e.g. two experts."),
            ],
            outputs=[
                io.Model.Output(tooltip="The tiny diffusion model."),
                io.Clip.Output(tooltip="The tiny text encoder with the real tokenizer."),
                io.Vae.Output(tooltip="A TAESD-type VAE (8x downscale; 4 latent channels, 16 for flux and sd3)."),
            ],
        )

    @classmethod
    def execute(cls, family: str, seed: int) -> io.NodeOutput:
        model, clip, vae = tiny_family.build_family(family, seed)
        return io.NodeOutput(model, clip, vae)


class AtelierTinyUnCLIPCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTinyUnCLIPCheckpointLoader",
            display_name="Atelier Tiny unCLIP (test)",
            category="atelier/testing",
            description=(
                "The tiny stand-in for unCLIP Checkpoint Loader (SD2.1 unCLIP): a seeded random model with the "
                "SD2.1-unCLIP topology at toy size that reads 32-d CLIP image embeddings, a tiny text encoder, VAE "
                "and CLIP vision model; family sdxl: the same for SDXL revision (an SDXL checkpoint with clip_vision_g), "
                "which tiny mode uses for an SDXL checkpoint whose workflow feeds image embeddings. It draws "
                "noise-like pictures: it exists to try workflows and run tests without downloading weights."
            ),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights. Same seed, same weights."),
                io.Combo.Input("family", options=["sd21", "sdxl"], default="sd21", optional=True,
                               tooltip="sd21: SD2.1 unCLIP (32-d image embeddings). sdxl: SDXL revision, the tiny "
                                       "sdxl with a 1280-wide pooled vector, read from a 1280-d image embedding as "
                                       "SDXL reads clip_vision_g's; its CLIP_VISION has a 1280-d projection."),
            ],
            outputs=[
                io.Model.Output(tooltip="The tiny unCLIP diffusion model (reads unclip_conditioning)."),
                io.Clip.Output(tooltip="The tiny text encoder with the real tokenizer."),
                io.Vae.Output(tooltip="A TAESD-type VAE (8x downscale, 4 latent channels)."),
                io.ClipVision.Output(tooltip="A tiny CLIP vision model with a 32-d (sdxl: 1280-d) projection."),
            ],
        )

    @classmethod
    def execute(cls, seed: int, family: str = "sd21") -> io.NodeOutput:
        if family == "sdxl":
            return io.NodeOutput(*tiny_family.build_revision_family(seed))
        return io.NodeOutput(*tiny_family.build_unclip_family(seed))


class AtelierKNNTinyOpenCLIPLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierKNNTinyOpenCLIPLoader",
            display_name="Atelier Tiny open_clip (test)",
            category="atelier/testing",
            description="A toy open_clip model (both towers, real tokenizer) with seeded random weights, embedding "
                        "into 32 dimensions like the tiny unCLIP model reads. Its neighbours are arbitrary: it "
                        "exists to try the kNN workflows and run tests without downloading weights; tiny mode "
                        "puts it in place of Atelier kNN open_clip Loader.",
            inputs=[io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                                 tooltip="Seed of the random weights. An index built with one seed is queried "
                                         "with the same seed.")],
            outputs=[Embedder.Output("embedder", display_name="embedder",
                                     tooltip="Embedding model for the kNN nodes.")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(knn_embed.random_open_clip_embedder(
            tiny_family.TINY_OPEN_CLIP, seed, device=mm.text_encoder_device()))


class AtelierTinyReduxLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTinyReduxLoader",
            display_name="Atelier Tiny Flux Redux (test)",
            category="atelier/testing",
            description=(
                "The tiny stand-in for Load Style Model with flux1-redux-dev: ComfyUI's own Redux image encoder with "
                "seeded random weights, reading the last hidden states of the tiny SigLIP (Atelier Tiny CLIP Vision, "
                "siglip; 48 wide, as the real one reads SigLIP's 1152) and writing tokens of the tiny flux text width "
                "(64, as the real one writes Flux's 4096), for core Apply Style Model. Tiny mode puts it in place of "
                "Load Style Model. Same seed, same weights."
            ),
            inputs=[
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights. Same seed, same weights."),
            ],
            outputs=[io.StyleModel.Output(tooltip="The tiny Redux style model, for Apply Style Model.")],
        )

    @classmethod
    def execute(cls, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_family.load_style_model(tiny_family.redux_state_dict(seed)))


TINY_VISION_KINDS = {"siglip": "TINY_SIGLIP", "clip": "TINY_CLIP_VISION", "clip_g": "TINY_CLIP_G_VISION"}


class AtelierTinyCLIPVisionLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTinyCLIPVisionLoader",
            display_name="Atelier Tiny CLIP Vision (test)",
            category="atelier/testing",
            description=(
                "The tiny stand-in for Load CLIP Vision: a ComfyUI CLIP vision model with seeded random weights. "
                "siglip: SigLIP-shaped (no class token, every token layer-normed, 48 wide, 16 tokens), what the tiny "
                "Flux Redux reads, as sigclip_vision_patch14_384 for Flux Redux. clip: the tiny unCLIP's CLIP ViT "
                "(32 wide, 32-d image embeddings), as clip_vision_h for SD2.1 unCLIP. clip_g: the same with a 1280-d "
                "projection, as clip_vision_g for SDXL revision. Tiny mode puts it in place of Load CLIP Vision."
            ),
            inputs=[
                io.Combo.Input("kind", options=list(TINY_VISION_KINDS), default="siglip",
                               tooltip="siglip: the image encoder of (tiny) Flux Redux. clip: the image encoder of "
                                       "the tiny unCLIP model. clip_g: the image encoder of tiny SDXL revision."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1, control_after_generate=False,
                             tooltip="Seed of the random weights. Same seed, same weights."),
            ],
            outputs=[io.ClipVision.Output(tooltip="The tiny CLIP vision model.")],
        )

    @classmethod
    def execute(cls, kind: str, seed: int) -> io.NodeOutput:
        return io.NodeOutput(tiny_family.build_clip_vision(seed, getattr(tiny_family, TINY_VISION_KINDS[kind])))


NODES = [AtelierTinyCheckpointLoader, AtelierTinyUnCLIPCheckpointLoader, AtelierKNNTinyOpenCLIPLoader,
         AtelierTinyReduxLoader, AtelierTinyCLIPVisionLoader]


def _tiny_prompt_handler(json_data: dict) -> dict:
    if isinstance(json_data.get("prompt"), dict):
        mini = os.environ.get("ATELIER_TINY_MODELS") == "mini"
        json_data["prompt"] = substitute_tiny(json_data["prompt"], mini=mini)
    return json_data


def _install_tiny_mode() -> None:
    """ATELIER_TINY_MODELS=1: the server swaps checkpoint loaders for the tiny models in every
    queued prompt (browser tests on machines without weights); ATELIER_TINY_MODELS=mini: for
    Atelier Mini (demos, the gallery). Off by default."""
    if os.environ.get("ATELIER_TINY_MODELS") not in ("1", "mini"):
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    PromptServer.instance.add_on_prompt_handler(_tiny_prompt_handler)
    logging.warning("[Atelier] ATELIER_TINY_MODELS=%s: checkpoint loaders run %s.", os.environ["ATELIER_TINY_MODELS"],
                    "Atelier Mini" if os.environ["ATELIER_TINY_MODELS"] == "mini" else "the tiny seeded models")


_install_tiny_mode()
