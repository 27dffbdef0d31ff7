"""Loader node for the tiny, seeded test families (no files needed)."""
from __future__ import annotations

import logging
import os

from comfy_api.latest import io

from ..models.tiny_substitution import substitute_tiny
from . import tiny_family


class AtelierTinyCheckpointLoader(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="AtelierTinyCheckpointLoader",
            display_name="Atelier Tiny Checkpoint (test model)",
            category="atelier/loaders",
            description=(
                "Builds a tiny model with seeded random weights and the real SD1.5 or SDXL block layout, "
                "tokenizer and latent format. It draws noise-like pictures: it exists to try workflows and "
                "run tests without downloading weights. Same seed, same weights."
            ),
            inputs=[
                io.Combo.Input("family", options=sorted(tiny_family.FAMILIES), default="sd15",
                               tooltip="Which topology and latent format to imitate: sd15 (64 px native) or sdxl (128 px native)."),
                io.Int.Input("seed", default=0, min=0, max=2**31 - 1,
                             tooltip="Seed of the random weights. Two seeds give two different models of one family, "
                                     "e.g. two experts."),
            ],
            outputs=[
                io.Model.Output(tooltip="The tiny diffusion model."),
                io.Clip.Output(tooltip="The tiny text encoder with the real tokenizer."),
                io.Vae.Output(tooltip="A TAESD-type VAE (8x downscale, 4 latent channels)."),
            ],
        )

    @classmethod
    def execute(cls, family: str, seed: int) -> io.NodeOutput:
        model, clip, vae = tiny_family.build_family(family, seed)
        return io.NodeOutput(model, clip, vae)


NODES = [AtelierTinyCheckpointLoader]


def _tiny_prompt_handler(json_data: dict) -> dict:
    if isinstance(json_data.get("prompt"), dict):
        json_data["prompt"] = substitute_tiny(json_data["prompt"])
    return json_data


def _install_tiny_mode() -> None:
    """ATELIER_TINY_MODELS=1: the server swaps checkpoint loaders for the tiny models in every
    queued prompt (demos and browser tests on machines without weights). Off by default."""
    if os.environ.get("ATELIER_TINY_MODELS") != "1":
        return
    try:
        from server import PromptServer
    except ImportError:
        return
    if getattr(PromptServer, "instance", None) is None:
        return
    PromptServer.instance.add_on_prompt_handler(_tiny_prompt_handler)
    logging.warning("[Atelier] ATELIER_TINY_MODELS=1: checkpoint loaders run the tiny seeded models.")


_install_tiny_mode()
