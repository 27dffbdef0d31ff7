"""Tiny SD1.5- and SDXL-topology model families built from seeded random weights.

Glue between ComfyUI's own classes (the same ones CheckpointLoaderSimple builds) and a narrow
configuration. The block layout (input/middle/output indices) is that of the real model, so
every hook Atelier installs sees the same block numbers it sees on a real SD1.5/SDXL file.

Family facts (``FAMILIES``):
  sd15: UNet model_channels 32, channel_mult 1,2,4,4, 2 res blocks, 1 transformer per attention
        level, context 64 (CLIP-L-shaped text encoder, 1 layer, width 64, real SD1 tokenizer),
        SD1.5 latent format (scale 0.18215), TAESD-type VAE. Native 64 px.
  sdxl: UNet model_channels 32, channel_mult 1,2,4, transformer depth 0,0,1,1,1,1, linear
        projections, context 64 (= CLIP-L 32 + CLIP-G 32, 3 layers each, real tokenizers),
        ADM 32 pooled + 6x256 size embedding, SDXL latent format (scale 0.13025), its own TAESD.
        Native 128 px.
"""
from __future__ import annotations

import torch

import comfy.latent_formats
import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.utils

from ..models.seeded_init import seeded_init_
from .glue import register_vae_scale

_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "adm_in_channels": None,
    "model_channels": 32, "num_res_blocks": [2, 2, 2, 2], "channel_mult": [1, 2, 4, 4],
    "transformer_depth": [1, 1, 1, 1, 1, 1, 0, 0], "transformer_depth_middle": 1,
    "transformer_depth_output": [1, 1, 1, 1, 1, 1, 1, 1, 1, 0, 0, 0],
    "use_linear_in_transformer": False, "context_dim": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

_SDXL_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
    "adm_in_channels": 32 + 6 * 256,
    "model_channels": 32, "num_res_blocks": [2, 2, 2], "channel_mult": [1, 2, 4],
    "transformer_depth": [0, 0, 1, 1, 1, 1], "transformer_depth_middle": 1,
    "transformer_depth_output": [0, 0, 0, 1, 1, 1, 1, 1, 1],
    "use_linear_in_transformer": True, "context_dim": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

_CLIP_SMALL = {"intermediate_size": 128, "num_attention_heads": 2}


class TinySD15(comfy.supported_models.SD15):
    atelier_native_px = 64
    unet_config = dict(_SD15_UNET)
    unet_extra_config = {"num_heads": 8, "num_head_channels": -1}


class TinySDXL(comfy.supported_models.SDXL):
    atelier_native_px = 128
    unet_config = dict(_SDXL_UNET)
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}


FAMILIES = {
    "sd15": {
        "config": TinySD15,
        "clip_target": (comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel),
        "clip_options": {"clip_l_model_config": {**_CLIP_SMALL, "hidden_size": 64, "intermediate_size": 256,
                                                 "num_hidden_layers": 1, "projection_dim": 64}},
        "vae_scale": 1.0,
        "native_px": 64,
        "latent_format": "SD15",
    },
    "sdxl": {
        "config": TinySDXL,
        "clip_target": (comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel),
        "clip_options": {
            "clip_l_model_config": {**_CLIP_SMALL, "hidden_size": 32, "num_hidden_layers": 3, "projection_dim": 32},
            "clip_g_model_config": {**_CLIP_SMALL, "hidden_size": 32, "num_hidden_layers": 3, "projection_dim": 32},
        },
        "vae_scale": 0.75,
        "native_px": 128,
        "latent_format": "SDXL",
    },
}


def family_of(model_patcher) -> str | None:
    """'sd15' / 'sdxl' / None from a MODEL's latent format (works for real files too)."""
    fmt = model_patcher.model.latent_format
    if isinstance(fmt, comfy.latent_formats.SDXL):
        return "sdxl"
    if isinstance(fmt, comfy.latent_formats.SD15):
        return "sd15"
    return None


def build_model(family: str, seed: int):
    spec = FAMILIES[family]
    cfg = spec["config"](spec["config"].unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip(family: str, seed: int):
    spec = FAMILIES[family]
    target = comfy.supported_models_base.ClipTarget(*spec["clip_target"])
    clip = comfy.sd.CLIP(target=target, model_options={**spec["clip_options"], "dtype": torch.float32})
    seeded_init_(clip.cond_stage_model, seed + 1)
    return clip


def taesd_state_dict(seed: int, vae_scale: float = 1.0) -> dict:
    taesd = comfy.taesd.taesd.TAESD(latent_channels=4)
    seeded_init_(taesd, seed + 2)
    with torch.no_grad():
        taesd.vae_scale.fill_(vae_scale)
    return {k: v.detach().clone() for k, v in taesd.state_dict().items()}


def build_vae(family: str, seed: int):
    return comfy.sd.VAE(sd=taesd_state_dict(seed, FAMILIES[family]["vae_scale"]))


# The tiny VAEs are TAESD-type: the family table knows them by the latent scale they record.
for _fam, _spec in FAMILIES.items():
    register_vae_scale(_fam, _spec["vae_scale"], f"Atelier tiny {_fam}")


def build_family(family: str, seed: int = 0):
    if family not in FAMILIES:
        raise ValueError(f"family: unknown tiny family {family!r}; choose one of {sorted(FAMILIES)}")
    return build_model(family, seed), build_clip(family, seed), build_vae(family, seed)


def write_stock_sd15_checkpoint(path: str, seed: int = 0) -> None:
    """A small checkpoint that the stock CheckpointLoaderSimple detects as SD1.5.

    Detection needs model_channels 320 and context 768 (depth is free, so channel_mult [1]),
    and the loader always builds the full 12-layer CLIP-L: the file carries all of it, or the
    missing layers would stay uninitialised and the images NaN. ~250 MB in fp16.
    """
    unet = dict(_SD15_UNET, model_channels=320, context_dim=768, num_res_blocks=[1], channel_mult=[1],
                transformer_depth=[1], transformer_depth_output=[1, 1])
    cfg = comfy.supported_models.SD15(unet)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    seeded_init_(model.diffusion_model, seed)
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    clip = comfy.sd.CLIP(target=target, model_options={"dtype": torch.float32})
    seeded_init_(clip.cond_stage_model, seed + 1)
    vae = comfy.sd.VAE(sd=taesd_state_dict(seed))
    sd = model.state_dict_for_saving(clip.get_sd(), vae.get_sd(), None)
    sd = {k: (v.half() if v.is_floating_point() and v.ndim > 0 else v).contiguous() for k, v in sd.items()}
    comfy.utils.save_torch_file(sd, path, metadata={"atelier": "stock-loader test checkpoint, random weights"})


# ----------------------------------------------------------------------------- tiny SD2.1-unCLIP family
# Not in FAMILIES (that list is the txt2img families the tiny checkpoint loader offers): an unCLIP model also
# needs a CLIP vision model, and it reads image embeddings of UNCLIP_EMBED_DIM. SD2.1-unCLIP topology at 32
# channels (2 levels, linear transformers); its ADM input is the 32-d image embedding + a 32-d noise-level
# embedding, as SD2.1 unCLIP-h concatenates 1024 + 1024. The text encoder is the sd15 tiny one (context 64);
# latent format SD1.5 (as SD2.x), the sd15 TAESD-type VAE.

UNCLIP_EMBED_DIM = 32

_UNCLIP_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "use_spatial_transformer": True, "legacy": False, "num_classes": "sequential",
    "adm_in_channels": 2 * UNCLIP_EMBED_DIM, "model_channels": 32, "num_res_blocks": [1, 1], "channel_mult": [1, 2],
    "transformer_depth": [1, 1], "transformer_depth_middle": 1, "transformer_depth_output": [1, 1, 1, 1],
    "use_linear_in_transformer": True, "context_dim": 64,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}

# A ComfyUI CLIP vision config at toy size whose projection matches what the tiny unCLIP reads.
TINY_CLIP_VISION = {
    "attention_dropout": 0.0, "dropout": 0.0, "hidden_act": "quick_gelu", "hidden_size": 32, "image_size": 32,
    "initializer_factor": 1.0, "initializer_range": 0.02, "intermediate_size": 64, "layer_norm_eps": 1e-05,
    "model_type": "clip_vision_model", "num_attention_heads": 2, "num_channels": 3, "num_hidden_layers": 2,
    "patch_size": 8, "projection_dim": UNCLIP_EMBED_DIM, "torch_dtype": "float32",
}

# An open_clip architecture (both towers) at toy size, embedding into the same 32 dimensions.
TINY_OPEN_CLIP = {
    "embed_dim": UNCLIP_EMBED_DIM,
    "vision_cfg": {"image_size": 32, "layers": 1, "width": 32, "patch_size": 8, "head_width": 16},
    "text_cfg": {"context_length": 16, "vocab_size": 49408, "width": 32, "heads": 2, "layers": 1},
}


class TinySD21UnCLIP(comfy.supported_models.SD21UnclipH):
    unet_config = dict(_UNCLIP_UNET)
    unet_extra_config = {"num_heads": -1, "num_head_channels": 16}
    noise_aug_config = {"noise_schedule_config": {"timesteps": 1000, "beta_schedule": "squaredcos_cap_v2"},
                        "timestep_dim": UNCLIP_EMBED_DIM}


def build_unclip_model(seed: int):
    cfg = TinySD21UnCLIP(TinySD21UnCLIP.unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    seeded_init_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def build_clip_vision(seed: int):
    """A ComfyUI ClipVisionModel (what Load CLIP Vision returns) of TINY_CLIP_VISION, seeded."""
    import json
    import os
    import tempfile

    import comfy.clip_vision

    fd, path = tempfile.mkstemp(suffix=".json", prefix="atelier_tiny_clip_vision_")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(TINY_CLIP_VISION, f)
        cv = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    seeded_init_(cv.model, seed + 3)
    return cv


def build_unclip_family(seed: int = 0):
    """(MODEL, CLIP, VAE, CLIP_VISION), the outputs of the core unCLIPCheckpointLoader."""
    return build_unclip_model(seed), build_clip("sd15", seed), build_vae("sd15", seed), build_clip_vision(seed)
