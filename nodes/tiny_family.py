"""Tiny model families built from seeded random weights: SD1.5, SDXL (UNets), PixArt-Σ (DiT),
Flux.1 dev / schnell and SD3.5 (flow-matching MMDiTs).

Glue between ComfyUI's own classes (the same ones CheckpointLoaderSimple / UNETLoader build) and a
narrow configuration. The block layout (input/middle/output indices, DiT/double/single/joint blocks)
is that of the real model, so every hook Atelier installs sees the same block numbers and module
names it sees on a real file.

Family facts (``FAMILIES``):
  sd15: UNet model_channels 32, channel_mult 1,2,4,4, 2 res blocks, 1 transformer per attention
        level, context 64 (CLIP-L-shaped text encoder, 1 layer, width 64, real SD1 tokenizer),
        SD1.5 latent format (scale 0.18215), TAESD-type VAE. Native 64 px.
  sdxl: UNet model_channels 32, channel_mult 1,2,4, transformer depth 0,0,1,1,1,1, linear
        projections, context 64 (= CLIP-L 32 + CLIP-G 32, 3 layers each, real tokenizers),
        ADM 32 pooled + 6x256 size embedding, SDXL latent format (scale 0.13025), its own TAESD.
        Native 128 px.
  pixart: ``comfy.supported_models.PixArtSigma`` / ``model_base.PixArt`` / ``PixArtMS`` (self-attention,
        cross-attention to T5 tokens, AdaLN-single ``t_block``): hidden 96, 3 heads, depth 2, patch 2,
        caption 64 (T5-shaped encoder: ComfyUI's PixArt T5 wrapper, 2 layers, d_model 64, gated-GELU,
        the real T5 sentencepiece tokenizer), model_max_length 300 (Σ), no micro-conditioning (Σ);
        SDXL latent format, the tiny sdxl TAESD-type VAE (PixArt-Σ uses the SDXL VAE). EPS, linear betas.
        Native 320 px: ComfyUI's PixArtMS divides by zero on latents under 33 px (images under 264 px). ComfyUI's PixArtMS does not pass transformer_options to its blocks: techniques
        reach PixArt blocks by module (forward hooks on ``diffusion_model.blocks[i]``) or wrappers.
  flux / flux_schnell: ``supported_models.Flux`` / ``FluxSchnell``, ``comfy.ldm.flux.model.Flux``:
        hidden 64, 2 heads (axes_dim 4+14+14 = 32 = hidden/heads; real 16+56+56 = 128), 2 double-stream
        + 2 single-stream blocks, RoPE, qkv bias, ``guidance_embed`` True for flux (FluxGuidance acts),
        False for flux_schnell; context 64 (T5-shaped, 2 layers, d_model 64, padded to 256 tokens as
        Flux's tokenizer does), vec 64 (CLIP-L-shaped pooled, 1 layer, width 64, real SD1 tokenizer);
        Flux latent format (16 ch, scale 0.3611, shift 0.1159), a 16-channel TAESD (TAEF1-type) VAE.
        flux: ModelSamplingFlux (shift from the image size, ModelSamplingFlux node); schnell: flow,
        shift 1.0. Native 128 px (16x16 latent, 8x8 patches).
  sd3:  ``supported_models.SD3`` / ``model_base.SD3`` / MMDiT (joint attention), depth 2 (ComfyUI's
        MMDiT derives hidden = 64*depth = 128, heads = depth = 2), patch 2, RMS q/k norm (SD3.5),
        pos_embed buffer of 64x64 patches (sin-cos, as stored in real files), context_embedder
        4096 -> 128 (the real SD3 context width: ComfyUI pads CLIP-L+G to 4096; the tiny T5 output is
        zero-padded to 4096 the same way), y_embedder 64 (pooled CLIP-L 32 + CLIP-G 32); CLIP-L-,
        CLIP-G- and T5-shaped encoders with the real tokenizers; SD3 latent format (16 ch, scale
        1.5305, shift 0.0609), a 16-channel TAESD (TAESD3-type) VAE; ModelSamplingDiscreteFlow
        shift 3.0. Native 128 px.

The DiT/MMDiT families (and only they) go through ComfyUI's real loaders too: ``write_diffusion_model``
writes a diffusion-model file in the published key layout that core UNETLoader detects (see its
docstring for where ComfyUI's detection hard-codes full-size widths).
"""
from __future__ import annotations

import torch

import comfy.model_management as mm
import comfy.model_patcher
import comfy.sd
import comfy.sd1_clip
import comfy.sdxl_clip
import comfy.supported_models
import comfy.text_encoders.flux
import comfy.text_encoders.pixart_t5
import comfy.text_encoders.sd3_clip
import comfy.supported_models_base
import comfy.taesd.taesd
import comfy.utils

from ..models.seeded_init import seeded_init_
from .glue import family_of as glue_family_of, register_vae_scale

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


# ----------------------------------------------------------------------------- DiT / MMDiT families

# T5-shaped encoder (the T5-XXL layout: gated GELU, relative position buckets; 2 layers at d_model 64).
_T5_SMALL = {"d_ff": 128, "d_kv": 32, "d_model": 64, "num_heads": 2, "num_layers": 2}
T5_WIDTH = _T5_SMALL["d_model"]
SD3_CONTEXT = 4096  # the width ComfyUI's SD3 text encoder pads every stream to

_PIXART_DIT = {
    "image_model": "pixart_sigma", "input_size": 16, "patch_size": 2, "in_channels": 4,
    "hidden_size": 96, "num_heads": 3, "depth": 2, "caption_channels": T5_WIDTH,
    "model_max_length": 300, "micro_condition": False, "pe_interpolation": None,
}

_FLUX_DIT = {
    "image_model": "flux", "in_channels": 16, "out_channels": 16, "patch_size": 2,
    "vec_in_dim": 64, "context_in_dim": T5_WIDTH, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2,
    "depth": 2, "depth_single_blocks": 2, "axes_dim": [4, 14, 14], "theta": 10000, "qkv_bias": True,
    "guidance_embed": True,
}

_SD3_POS_GRID = 64  # pos_embed covers 64x64 patches: up to 1024 px at patch 2

_SD3_MMDIT = {
    "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": 2, "input_size": None,
    "adm_in_channels": 64, "pos_embed_scaling_factor": None,
    "context_embedder_config": {"target": "torch.nn.Linear",
                                "params": {"in_features": SD3_CONTEXT, "out_features": 64 * 2}},
    "num_patches": _SD3_POS_GRID * _SD3_POS_GRID, "pos_embed_max_size": _SD3_POS_GRID,
    "qk_norm": "rms", "x_block_self_attn_layers": [],
}


class TinyPixArtSigma(comfy.supported_models.PixArtSigma):
    # ComfyUI's PixArtMS takes its position-embedding base size as round(latent side / 64) * 64: a latent
    # under 33 px (an image under 264 px) divides by zero, so the smallest round size that draws is 320 px.
    atelier_native_px = 320
    unet_config = dict(_PIXART_DIT)


class TinyFlux(comfy.supported_models.Flux):
    atelier_native_px = 128
    unet_config = dict(_FLUX_DIT)


class TinyFluxSchnell(comfy.supported_models.FluxSchnell):
    atelier_native_px = 128
    unet_config = dict(_FLUX_DIT, guidance_embed=False)


class TinySD3(comfy.supported_models.SD3):
    atelier_native_px = 128
    unet_config = dict(_SD3_MMDIT)


class _PaddedT5XXL(comfy.text_encoders.sd3_clip.T5XXLModel):
    """The T5-shaped encoder of tiny sd3: its tokens zero-padded to SD3's 4096-wide context, as ComfyUI pads
    the CLIP-L/G tokens (SD3ClipModel concatenates both along the token axis, so widths must agree)."""

    def encode_token_weights(self, token_weight_pairs):
        out = super().encode_token_weights(token_weight_pairs)
        return (torch.nn.functional.pad(out[0], (0, SD3_CONTEXT - out[0].shape[-1])),) + tuple(out[1:])


class TinySD3ClipModel(comfy.text_encoders.sd3_clip.SD3ClipModel):
    """ComfyUI's SD3 text encoder (CLIP-L + CLIP-G + T5) with the tiny T5 padded to the SD3 context width."""

    def __init__(self, device="cpu", dtype=None, model_options={}):
        super().__init__(clip_l=True, clip_g=True, t5=False, device=device, dtype=dtype, model_options=model_options)
        self.t5_attention_mask = False
        self.t5xxl = _PaddedT5XXL(device=device, dtype=dtype, model_options=model_options)
        self.dtypes.add(dtype)



def _flux_row(config, **extra) -> dict:
    """A tiny Flux family's row (dev and schnell differ in their model config and the VAE they share): a fresh
    dict and text-encoder class per call, as each row had its own."""
    return {
        "config": config,
        "clip_target": (comfy.text_encoders.flux.FluxTokenizer, comfy.text_encoders.flux.flux_clip()),
        "clip_options": {"t5xxl_model_config": dict(_T5_SMALL),
                         "clip_l_model_config": {**_CLIP_SMALL, "hidden_size": 64, "intermediate_size": 256,
                                                 "num_hidden_layers": 1, "projection_dim": 64}},
        "vae_scale": 0.5, "vae_shift": 0.1, "vae_channels": 16,
        **extra,
        "native_px": 128,
        "latent_format": "Flux",
    }


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
    "pixart": {
        "config": TinyPixArtSigma,
        "clip_target": (comfy.text_encoders.pixart_t5.PixArtTokenizer, comfy.text_encoders.pixart_t5.PixArtT5XXL),
        "clip_options": {"t5xxl_model_config": dict(_T5_SMALL)},
        "vae_scale": 0.75,  # the tiny sdxl VAE: PixArt-Σ draws in the SDXL latent space with the SDXL VAE
        "vae_family": "sdxl",
        "native_px": 320,
        "latent_format": "SDXL",
    },
    "flux": _flux_row(TinyFlux),
    "flux_schnell": _flux_row(TinyFluxSchnell, vae_family="flux"),  # flux's VAE: one latent space
    "sd3": {
        "config": TinySD3,
        "clip_target": (comfy.text_encoders.sd3_clip.SD3Tokenizer, TinySD3ClipModel),
        "clip_options": {
            "clip_l_model_config": {**_CLIP_SMALL, "hidden_size": 32, "num_hidden_layers": 3, "projection_dim": 32},
            "clip_g_model_config": {**_CLIP_SMALL, "hidden_size": 32, "num_hidden_layers": 3, "projection_dim": 32},
            "t5xxl_model_config": dict(_T5_SMALL),
        },
        "vae_scale": 0.6, "vae_shift": 0.05, "vae_channels": 16,
        "native_px": 128,
        "latent_format": "SD3",
    },
}

#: the glue family (row of ``glue.FAMILIES``) of each tiny family: flux_schnell is a Flux model
GLUE_FAMILY = {name: ("flux" if name == "flux_schnell" else name) for name in FAMILIES}


def family_of(model_patcher) -> str | None:
    """The glue family of a MODEL ('sd15' / 'sdxl' / 'pixart' / 'flux' / 'sd3' / None; flux_schnell is 'flux'),
    as ``glue.family_of`` reads it (works for real files too)."""
    return glue_family_of(model_patcher)


def build_model(family: str, seed: int):
    spec = FAMILIES[family]
    cfg = spec["config"](spec["config"].unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    seeded_init_(model.diffusion_model, seed)
    _init_buffers_(model.diffusion_model, seed)
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


@torch.no_grad()
def _init_buffers_(dm, seed: int) -> None:
    """Buffers that real files carry and ComfyUI fills with torch.empty or the global RNG: MMDiT's fixed
    sin-cos ``pos_embed``, PixArt's learned null caption ``y_embedder.y_embedding`` (seeded here)."""
    pos = getattr(dm, "pos_embed", None)
    if torch.is_tensor(pos) and getattr(dm, "pos_embed_max_size", None):
        from comfy.ldm.modules.diffusionmodules.mmdit import get_2d_sincos_pos_embed
        grid = get_2d_sincos_pos_embed(pos.shape[-1], dm.pos_embed_max_size)
        pos.copy_(torch.from_numpy(grid).reshape(pos.shape).to(pos.dtype))
    null = getattr(getattr(dm, "y_embedder", None), "y_embedding", None)
    if torch.is_tensor(null):
        gen = torch.Generator().manual_seed(int(seed) + 7)
        null.copy_(torch.randn(null.shape, generator=gen).div_(null.shape[-1] ** 0.5).to(null.dtype))


def build_clip(family: str, seed: int):
    spec = FAMILIES[family]
    target = comfy.supported_models_base.ClipTarget(*spec["clip_target"])
    clip = comfy.sd.CLIP(target=target, model_options={**spec["clip_options"], "dtype": torch.float32})
    seeded_init_(clip.cond_stage_model, seed + 1)
    return clip


def taesd_state_dict(seed: int, vae_scale: float = 1.0, latent_channels: int = 4, vae_shift: float = 0.0) -> dict:
    """A seeded TAESD-type VAE's state dict (4 latent channels; 16 for the TAEF1/TAESD3-type VAEs of the
    flux/sd3 families, which ComfyUI's VAE class recognises by ``taesd_decoder.1.weight``'s input width)."""
    taesd = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
    seeded_init_(taesd, seed + 2)
    with torch.no_grad():
        taesd.vae_scale.fill_(vae_scale)
        taesd.vae_shift.fill_(vae_shift)
    return {k: v.detach().clone() for k, v in taesd.state_dict().items()}


def build_vae(family: str, seed: int):
    spec = FAMILIES[family]
    return comfy.sd.VAE(sd=taesd_state_dict(seed, spec["vae_scale"], spec.get("vae_channels", 4),
                                            spec.get("vae_shift", 0.0)))


# The tiny VAEs are TAESD-type: the family table knows them by the latent scale they record (a family that
# shares another's latent space and VAE, pixart -> sdxl, flux_schnell -> flux, registers nothing new).
for _fam, _spec in FAMILIES.items():
    if "vae_family" not in _spec:
        register_vae_scale(GLUE_FAMILY[_fam], _spec["vae_scale"], f"Atelier tiny {_fam}")


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


# ----------------------------------------------------------------------------- DiT files for core UNETLoader

#: What core UNETLoader (comfy.model_detection.detect_unet_config, v0.3.64) reads from a file's shapes and
#: what it hard-codes at full size, per family; ``write_diffusion_model`` writes the smallest file it loads.
#:   sd3:    everything from shapes (hidden = 64 * depth from x_embedder, context/pooled widths, pos_embed,
#:           q/k norm): the tiny sd3 itself loads (2.1 M values with pos_embed, 8.6 MB in fp32), bit-identical
#:           to the tiny loader's MODEL.
#:   pixart: hidden 1152, 16 heads, 4 latent channels, patch 2 and caption width 4096 (the PixArtMS default) are
#:           hard-coded; depth is counted and model_max_length read from y_embedding: one block at full width
#:           (38 M parameters, 76 MB in fp16). It reads 4096-wide text (T5-XXL's width).
#:   flux / flux_schnell: hidden 3072, 24 heads, context 4096, axes 16/56/56, mlp 4.0 are hard-coded; depth and
#:           single-stream depth are counted, vec_in read from its shape, guidance_in's presence tells dev from
#:           schnell; the detection key is a double block's q/k norm, so one double block at full width is the
#:           least: 1 double + 0 single blocks, vec_in 64 (402 M parameters, 402 MB in fp8 e4m3fn; 2.9 GB peak
#:           memory to write).
#: The tiny sd3 text encoder gives what these full-width files read: 4096-wide tokens and a 64-wide pooled vector.
DETECTED_CONFIGS = {
    "pixart": (comfy.supported_models.PixArtSigma, {
        "image_model": "pixart_sigma", "num_heads": 16, "patch_size": 2, "hidden_size": 1152, "in_channels": 4,
        "depth": 1, "model_max_length": 300, "micro_condition": False}),
    "flux": (comfy.supported_models.Flux, {
        "image_model": "flux", "in_channels": 16, "patch_size": 2, "out_channels": 16, "vec_in_dim": 64,
        "context_in_dim": 4096, "hidden_size": 3072, "mlp_ratio": 4.0, "num_heads": 24, "depth": 1,
        "depth_single_blocks": 0, "axes_dim": [16, 56, 56], "theta": 10000, "qkv_bias": True,
        "guidance_embed": True}),
}
DETECTED_CONFIGS["flux_schnell"] = (comfy.supported_models.FluxSchnell,
                                    dict(DETECTED_CONFIGS["flux"][1], guidance_embed=False))


def write_diffusion_model(family: str, path: str, seed: int = 0) -> dict:
    """Write a diffusion-model file (Load Diffusion Model / UNETLoader, models/diffusion_models) that core
    detection loads as ``family`` ('pixart', 'flux', 'flux_schnell', 'sd3'), in the key layout of published
    files: PixArt-Σ and BFL Flux files carry the bare module keys, SD3.5 single files the
    ``model.diffusion_model.`` prefix. See ``DETECTED_CONFIGS`` for the widths ComfyUI hard-codes. Seeded
    random weights; returns {"params", "dtype"}. Generate it where it is used (a test fixture), never commit it.
    """
    if family == "sd3":
        model = build_model("sd3", seed).model
        sd, dtype = model.state_dict_for_saving(None, None, None), torch.float32
    elif family in DETECTED_CONFIGS:
        cls, unet = DETECTED_CONFIGS[family]
        cfg = cls(unet)
        cfg.set_inference_dtype(torch.float32, None)
        dm = cfg.get_model({}).diffusion_model
        seeded_init_(dm, seed)
        _init_buffers_(dm, seed)
        sd = dm.state_dict()
        dtype = torch.float16 if family == "pixart" else torch.float8_e4m3fn
        del dm
    else:
        raise ValueError(f"family: no diffusion-model file for {family!r}; choose one of "
                         f"{sorted(set(DETECTED_CONFIGS) | {'sd3'})}")
    sd = {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}
    comfy.utils.save_torch_file(sd, path, metadata={"atelier": f"{family} loader test file, random weights"})
    return {"params": sum(v.numel() for v in sd.values()), "dtype": str(dtype)}


def write_clip_l(path: str, seed: int = 0) -> dict:
    """A full-size CLIP-L text-encoder file (the layout of the published clip_l.safetensors: ``text_model.*``,
    ``text_projection.weight``) for core CLIPLoader / DualCLIPLoader, seeded random weights in fp8 e4m3fn
    (~123 MB). ComfyUI builds its text encoders at full size whatever a file holds (CLIP-L 12 x 768, CLIP-G
    32 x 1280, T5-XXL 24 x 4096) and detects CLIP-G / T5-XXL by their last layers' keys, so CLIP-L, 123 M
    parameters, is the only one that can be generated here; T5-XXL (4.7 B) and CLIP-G (695 M) cannot."""
    te = comfy.sd1_clip.SDClipModel(device="cpu", dtype=torch.float32)
    seeded_init_(te.transformer, seed + 1)
    sd = {k: (v.to(torch.float8_e4m3fn) if v.is_floating_point() else v).contiguous()
          for k, v in te.transformer.state_dict().items()}
    del te
    comfy.utils.save_torch_file(sd, path, metadata={"atelier": "clip_l loader test file, random weights"})
    return {"params": sum(v.numel() for v in sd.values())}

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


def build_clip_vision(seed: int, config: dict | None = None):
    """A ComfyUI ClipVisionModel (what Load CLIP Vision returns) of ``config`` (TINY_CLIP_VISION), seeded."""
    import json
    import os
    import tempfile

    import comfy.clip_vision

    fd, path = tempfile.mkstemp(suffix=".json", prefix="atelier_tiny_clip_vision_")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(TINY_CLIP_VISION if config is None else config, f)
        cv = comfy.clip_vision.ClipVisionModel(path)
    finally:
        os.unlink(path)
    seeded_init_(cv.model, seed + 3)
    return cv


def build_unclip_family(seed: int = 0):
    """(MODEL, CLIP, VAE, CLIP_VISION), the outputs of the core unCLIPCheckpointLoader."""
    return build_unclip_model(seed), build_clip("sd15", seed), build_vae("sd15", seed), build_clip_vision(seed)

# ----------------------------------------------------------------------------- tiny Flux Redux (issue 18.4)
# Flux Redux is a style model (Load Style Model -> STYLE_MODEL) over a SigLIP vision model (Load CLIP Vision,
# sigclip_vision_patch14_384: 27 layers, width 1152, 384 px at patch 14 = 729 patch tokens, no class token,
# post-layernorm on every token). core StyleModelApply passes the CLIP vision output's last_hidden_state to
# ComfyUI's ReduxImageEncoder, which maps each token 1152 -> 3 x 4096 -> 4096 (SiLU) into Flux's T5 context
# width, and appends the tokens to the text tokens. Tiny: SigLIP width 48 (not the tiny CLIP vision's 32, so a
# model of another space is told apart by width here as at full size: SigLIP 1152 vs CLIP ViT-L 1024, ViT-H 1280,
# ViT-bigG 1664), 2 layers, 32 px at patch 8 = 16 tokens; Redux 48 -> 3 x 64 -> 64 (the tiny flux context width).
# Core comfy.sd.load_style_model builds the Redux at full size whatever the file holds, so the tiny one is
# loaded as that function does it (detected by 'redux_down.weight', load_state_dict, comfy.sd.StyleModel) with
# its widths read from the file's shapes.

TINY_SIGLIP = {
    "num_channels": 3, "hidden_act": "gelu_pytorch_tanh", "hidden_size": 48, "image_size": 32,
    "intermediate_size": 96, "model_type": "siglip_vision_model", "num_attention_heads": 2, "num_hidden_layers": 2,
    "patch_size": 8, "image_mean": [0.5, 0.5, 0.5], "image_std": [0.5, 0.5, 0.5],
}


def build_siglip_vision(seed: int):
    """A ComfyUI ClipVisionModel of TINY_SIGLIP (what Load CLIP Vision returns for sigclip_vision_patch14_384), seeded."""
    return build_clip_vision(seed, TINY_SIGLIP)


def redux_state_dict(seed: int, siglip_width: int = TINY_SIGLIP["hidden_size"], context: int = T5_WIDTH) -> dict:
    """A seeded ReduxImageEncoder's state dict in the published flux1-redux-dev key layout (redux_up, redux_down)."""
    import comfy.ldm.flux.redux

    enc = comfy.ldm.flux.redux.ReduxImageEncoder(redux_dim=siglip_width, txt_in_features=context,
                                                 dtype=torch.float32)
    seeded_init_(enc, seed + 5)
    return {k: v.detach().clone().contiguous() for k, v in enc.state_dict().items()}


def load_style_model(sd: dict):
    """A STYLE_MODEL from a Redux state dict, as core comfy.sd.load_style_model loads one, the widths read from
    the shapes (core hard-codes 1152 -> 4096)."""
    import comfy.ldm.flux.redux

    if "redux_down.weight" not in sd or "redux_up.weight" not in sd:
        raise ValueError("style_model: not a Redux state dict (no redux_up / redux_down weights)")
    enc = comfy.ldm.flux.redux.ReduxImageEncoder(redux_dim=int(sd["redux_up.weight"].shape[1]),
                                                 txt_in_features=int(sd["redux_down.weight"].shape[0]),
                                                 dtype=torch.float32)
    enc.load_state_dict(sd)
    return comfy.sd.StyleModel(enc)

# ----------------------------------------------------------------------------- tiny SDXL revision (issue 18.4)
# SDXL "revision": an SDXL checkpoint reads a CLIP image embedding (unclip_conditioning, from clip_vision_g:
# ViT-bigG, projection 1280) in place of its pooled CLIP-G text vector; ComfyUI's model_base.SDXL hard-codes a
# 1280-wide noise augmentor and keeps the first 1280 values. The tiny sdxl's pooled vector is 32 wide (ComfyUI's
# CLIP text projection is square: pooled width = text width), so revision has its own variant: the tiny sdxl UNet
# with ADM 1280 + 6 x 256, the tiny sdxl text encoders with the pooled CLIP-G vector zero-padded to 1280 (as the
# tiny sd3's T5 tokens are padded to SD3's context width), and a tiny CLIP vision model with a 1280-d projection
# (TINY_CLIP_G_VISION).

REVISION_EMBED_DIM = 1280
TINY_CLIP_G_VISION = dict(TINY_CLIP_VISION, projection_dim=REVISION_EMBED_DIM)


class TinySDXLRevision(TinySDXL):
    unet_config = dict(_SDXL_UNET, adm_in_channels=REVISION_EMBED_DIM + 6 * 256)


class _RevisionSDXLClipModel(comfy.sdxl_clip.SDXLClipModel):
    """The tiny sdxl text encoders, the pooled CLIP-G vector zero-padded to REVISION_EMBED_DIM."""

    def encode_token_weights(self, token_weight_pairs):
        out, pooled = super().encode_token_weights(token_weight_pairs)
        return out, torch.nn.functional.pad(pooled, (0, REVISION_EMBED_DIM - pooled.shape[-1]))


def build_revision_family(seed: int = 0):
    """(MODEL, CLIP, VAE, CLIP_VISION) of tiny SDXL revision: what CheckpointLoaderSimple (an SDXL file) and
    CLIPVisionLoader (clip_vision_g) give a revision workflow."""
    cfg = TinySDXLRevision(TinySDXLRevision.unet_config)
    cfg.set_inference_dtype(torch.float32, None)
    model = cfg.get_model({})
    seeded_init_(model.diffusion_model, seed)
    patcher = comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                               offload_device=mm.unet_offload_device())
    spec = FAMILIES["sdxl"]
    clip = comfy.sd.CLIP(target=comfy.supported_models_base.ClipTarget(spec["clip_target"][0], _RevisionSDXLClipModel),
                         model_options={**spec["clip_options"], "dtype": torch.float32})
    seeded_init_(clip.cond_stage_model, seed + 1)
    return patcher, clip, build_vae("sdxl", seed), build_clip_vision(seed, TINY_CLIP_G_VISION)
