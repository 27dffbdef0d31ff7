"""The DiT / flow-matching tiny families (pixart, flux, flux_schnell, sd3) through ComfyUI's own nodes.

Every graph runs in the real executor: the tiny loader (or core UNETLoader on a file written here), core
CLIPTextEncode, FluxGuidance, ModelSamplingFlux / ModelSamplingSD3, EmptySD3LatentImage, KSampler,
SamplerCustomAdvanced + BasicGuider, VAEDecode. Random weights prove plumbing, so the assertions are
shapes, finiteness, bit-identity where nothing should change and a difference where something should.
"""
from __future__ import annotations

import pytest
import torch

DIT = ("pixart", "flux", "flux_schnell", "sd3")
MODEL_CLASS = {"pixart": "PixArt", "flux": "Flux", "flux_schnell": "Flux", "sd3": "SD3"}
CONFIG_CLASS = {"pixart": "PixArtSigma", "flux": "Flux", "flux_schnell": "FluxSchnell", "sd3": "SD3"}
GLUE = {"pixart": "pixart", "flux": "flux", "flux_schnell": "flux", "sd3": "sd3"}


def dit_prompt(tiny, family, *, sampler="euler", scheduler="simple", steps=2, text="a red circle", cfg=1.0,
               size=None, seed=0, noise_seed=1, guidance=None, model_patch=None, loader=None):
    """API prompt: loader (1) -> CLIPTextEncode (2, 3) [-> FluxGuidance (8)] -> KSampler (5) -> VAEDecode (6).
    ``model_patch``: a core model node put between the loader and the sampler (node 9, its ``model`` input
    linked to the loader)."""
    size = size or tiny.FAMILIES[family]["native_px"]
    channels = tiny.FAMILIES[family].get("vae_channels", 4)
    empty = "EmptySD3LatentImage" if channels == 16 else "EmptyLatentImage"
    p = {
        "1": loader or {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": family, "seed": seed}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": empty, "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": noise_seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": 1.0}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    if guidance is not None:
        p["8"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["2", 0], "guidance": guidance}}
        p["5"]["inputs"]["positive"] = ["8", 0]
    if model_patch is not None:
        p["9"] = {"class_type": model_patch[0], "inputs": {"model": ["1", 0], **model_patch[1]}}
        p["5"]["inputs"]["model"] = ["9", 0]
    return p


def _latent(run_graph, prompt):
    return run_graph(prompt, want=["5"])["values"]["5"][0]["samples"]


def small(family):
    """The smallest side a comparison needs: 64 px (4x4 patches) for flux/sd3; pixart draws from 272 px only."""
    return None if family == "pixart" else 64


# ----------------------------------------------------------------------------- core text encoding, samplers, decode

@pytest.mark.parametrize("family,sampler,scheduler", [
    ("pixart", "euler", "normal"), ("flux", "dpmpp_2m", "beta"), ("flux_schnell", "euler", "simple"),
    ("sd3", "dpmpp_2m", "normal"), ("sd3", "euler", "beta"),
])
def test_family_through_core_nodes(run_graph, tiny, glue, family, sampler, scheduler):
    px = tiny.FAMILIES[family]["native_px"]
    r = run_graph(dit_prompt(tiny, family, sampler=sampler, scheduler=scheduler, cfg=2.0,
                             guidance=3.5 if family == "flux" else None), want=["1", "2", "5", "6"])
    model, _, vae = r["values"]["1"]
    assert type(model.model).__name__ == MODEL_CLASS[family]
    assert glue.family_of(model) == GLUE[family] and glue.native_px(model) == px
    glue.check_vae(model, vae)
    latent = r["values"]["5"][0]["samples"]
    assert latent.shape == (1, tiny.FAMILIES[family].get("vae_channels", 4), px // 8, px // 8)
    assert torch.isfinite(latent).all()
    image = r["values"]["6"][0]
    assert image.shape == (1, px, px, 3)
    assert torch.isfinite(image).all() and image.std() > 0.01


@pytest.mark.parametrize("family", DIT)
def test_same_seed_same_weights_and_the_prompt_is_wired(run_graph, tiny, family):
    px = small(family)
    r = run_graph(dit_prompt(tiny, family, text="a red circle", size=px), want=["1", "5"])
    a = r["values"]["5"][0]["samples"]
    fresh = tiny.build_model(family, 0).model.state_dict()  # another build, same seed: the same weights
    assert all(torch.equal(v, fresh[k]) for k, v in r["values"]["1"][0].model.state_dict().items())
    other = tiny.build_model(family, 1).model.state_dict()  # seed 1: other weights
    assert any(not torch.equal(v, other[k]) for k, v in fresh.items())
    c = _latent(run_graph, dit_prompt(tiny, family, text="a blue square on grass", size=px))
    assert (a - c).abs().max() > 1e-3


def test_tiny_weights_are_finite_buffers_included(tiny):
    """ComfyUI allocates some parameters and buffers empty (or from the global RNG): all are filled, seeded."""
    for family in DIT:
        for k, v in tiny.build_model(family, 3).model.state_dict().items():
            assert torch.isfinite(v).all(), (family, k)


def test_real_block_structure(tiny):
    """The blocks a technique hooks on a real file exist, under the same names, on the tiny models."""
    pixart = tiny.build_model("pixart", 0).model.diffusion_model
    assert len(pixart.blocks) == 2 and hasattr(pixart.blocks[0], "cross_attn") and hasattr(pixart, "t_block")
    assert pixart.y_embedder.y_proj.fc1.in_features == tiny.T5_WIDTH
    for family, guided in (("flux", True), ("flux_schnell", False)):
        dm = tiny.build_model(family, 0).model.diffusion_model
        assert len(dm.double_blocks) == 2 and len(dm.single_blocks) == 2
        assert dm.params.guidance_embed is guided and isinstance(dm.guidance_in, torch.nn.Identity) is not guided
        assert sum(dm.params.axes_dim) == dm.hidden_size // dm.num_heads
        assert dm.vector_in.in_layer.in_features == 64 and dm.txt_in.in_features == tiny.T5_WIDTH
    sd3 = tiny.build_model("sd3", 0).model.diffusion_model
    assert len(sd3.joint_blocks) == 2 and sd3.hidden_size == 128 and sd3.num_heads == 2
    assert sd3.context_embedder.in_features == tiny.SD3_CONTEXT and sd3.y_embedder.mlp[0].in_features == 64


def test_text_encoders_have_the_widths_the_models_read(tiny):
    for family in DIT:
        clip = tiny.build_clip(family, 0)
        cond, pooled = clip.encode_from_tokens(clip.tokenize("a red circle"), return_pooled=True)
        assert torch.isfinite(cond).all() and cond.abs().max() > 0
        if family == "pixart":
            assert cond.shape[-1] == tiny.T5_WIDTH and pooled is None
        elif family == "sd3":  # 77 CLIP-L+G tokens then 77 T5 tokens, all 4096 wide; pooled L + G
            assert cond.shape == (1, 154, tiny.SD3_CONTEXT) and pooled.shape == (1, 64)
            assert cond[:, 77:, tiny.T5_WIDTH:].abs().max() == 0 and cond[:, 77:, :tiny.T5_WIDTH].abs().max() > 0
        else:  # T5 tokens padded to 256 as Flux's tokenizer does; pooled CLIP-L
            assert cond.shape == (1, 256, tiny.T5_WIDTH) and pooled.shape == (1, 64)


# ----------------------------------------------------------------------------- flow matching, guidance

def test_flux_guidance_acts_on_flux_and_is_ignored_by_schnell(run_graph, tiny):
    a = _latent(run_graph, dit_prompt(tiny, "flux", guidance=1.0, size=64))
    b = _latent(run_graph, dit_prompt(tiny, "flux", guidance=8.0, size=64))
    assert (a - b).abs().max() > 1e-3
    s0 = _latent(run_graph, dit_prompt(tiny, "flux_schnell", size=64))
    s1 = _latent(run_graph, dit_prompt(tiny, "flux_schnell", guidance=8.0, size=64))  # no guidance embedding: no error,
    assert torch.equal(s0, s1)                                             # and nothing to act on


@pytest.mark.parametrize("family,node,inputs", [
    ("flux", "ModelSamplingFlux", {"max_shift": 2.5, "base_shift": 0.5, "width": 1024, "height": 1024}),
    ("sd3", "ModelSamplingSD3", {"shift": 8.0}),
])
def test_model_sampling_nodes_act(run_graph, tiny, family, node, inputs):
    base = _latent(run_graph, dit_prompt(tiny, family, steps=3, size=64))
    patched = _latent(run_graph, dit_prompt(tiny, family, steps=3, size=64, model_patch=(node, inputs)))
    assert torch.isfinite(patched).all() and (base - patched).abs().max() > 1e-3


def test_flow_schedules(tiny):
    import comfy.model_sampling
    flux, schnell, sd3 = (tiny.build_model(f, 0).model.model_sampling for f in ("flux", "flux_schnell", "sd3"))
    assert isinstance(flux, comfy.model_sampling.ModelSamplingFlux)
    assert isinstance(sd3, comfy.model_sampling.ModelSamplingDiscreteFlow)
    assert float(schnell.shift) == 1.0 and float(sd3.shift) == 3.0
    for ms in (flux, schnell, sd3):
        assert abs(float(ms.sigma_max) - 1.0) < 1e-6  # flow matching: sigma in (0, 1]


def test_flux_sampler_custom_advanced_with_basic_guider_equals_ksampler(run_graph, tiny):
    """BasicGuider (no CFG) is KSampler at cfg 1: same noise, same sigmas, bit for bit."""
    p = dit_prompt(tiny, "flux", cfg=1.0, steps=3, scheduler="simple", guidance=3.5, size=64)
    p.update({
        "10": {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["8", 0]}},
        "11": {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}},
        "12": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "13": {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": 3,
                                                          "denoise": 1.0}},
        "14": {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["11", 0], "guider": ["10", 0],
                                                                 "sampler": ["12", 0], "sigmas": ["13", 0],
                                                                 "latent_image": ["4", 0]}},
        "15": {"class_type": "VAEDecode", "inputs": {"samples": ["14", 0], "vae": ["1", 2]}},
        "16": {"class_type": "PreviewImage", "inputs": {"images": ["15", 0]}},
    })
    r = run_graph(p, want=["5", "14", "15"])
    custom = r["values"]["14"][0]["samples"]
    assert torch.isfinite(custom).all() and torch.isfinite(r["values"]["15"][0]).all()
    assert torch.equal(custom, r["values"]["5"][0]["samples"])


# ----------------------------------------------------------------------------- the family table

def test_family_table_tells_pixart_from_sdxl(tiny, glue):
    pixart, sdxl = tiny.build_model("pixart", 0), tiny.build_model("sdxl", 0)
    assert type(pixart.model.latent_format) is type(sdxl.model.latent_format)
    assert glue.family_of(pixart) == "pixart" and glue.family_of(sdxl) == "sdxl"
    assert glue.family_row(pixart).attention == "dit-cross"
    assert glue.family_row(tiny.build_model("flux", 0)).attention == "mmdit-joint"
    glue.check_vae(pixart, tiny.build_vae("sdxl", 0))  # PixArt-Σ draws with the SDXL VAE
    with pytest.raises(glue.AtelierError, match="vae"):
        glue.check_vae(pixart, tiny.build_vae("sd15", 0))
    with pytest.raises(glue.AtelierError, match="expert.*PixArt"):
        glue.check_same_family(sdxl, pixart, "model", "expert")
    with pytest.raises(glue.AtelierError, match="4-channel latents"):
        glue.check_vae(tiny.build_model("sd3", 0), tiny.build_vae("sdxl", 0))
    assert glue.vae_family(tiny.build_vae("flux", 0)) == "flux" and glue.vae_family(tiny.build_vae("sd3", 0)) == "sd3"
    with pytest.raises(glue.AtelierError, match="Flux VAE"):
        glue.check_vae(tiny.build_model("sd3", 0), tiny.build_vae("flux", 0))


# ----------------------------------------------------------------------------- the real loading path (item 2)
#
# Core UNETLoader detects a family from a file's keys and shapes (comfy.model_detection). For sd3 every width
# is read from the shapes, so the tiny sd3 itself loads. For PixArt and Flux ComfyUI hard-codes the full
# widths (tiny_family.DETECTED_CONFIGS): the files written here have those widths and the least depth the
# detection accepts (PixArt 1 block, ~76 MB fp16; Flux 1 double block, ~400 MB fp8, a slow test). They read
# 4096-wide text, which the tiny sd3 text encoder gives (SD3's context width; its pooled vector is 64 wide,
# the width the Flux file's vector_in is written with).
#
# Core CLIPLoader / DualCLIPLoader / TripleCLIPLoader hard-code full-size encoders whatever the file holds:
# the text-encoder json configs (CLIP-L 12 x 768, CLIP-G 32 x 1280, T5-XXL 24 x 4096) are built first, and
# detection needs the last layers' keys (CLIP-G layer 30, T5-XXL block 23); a file with fewer layers loads
# "successfully" with the rest uninitialised. Only a full CLIP-L (123 M parameters, ~123 MB in fp8) is small
# enough to write: CLIPLoader type sd3 with it is the slow test below. T5-XXL (4.7 B) and CLIP-G (695 M), and
# so DualCLIPLoader (flux: CLIP-L + T5-XXL) and TripleCLIPLoader (sd3), cannot be generated here.

@pytest.fixture(scope="session")
def dit_files(comfy, tiny, tmp_path_factory):
    """{family: file name} of diffusion-model files in a session folder registered for UNETLoader; the
    full-width Flux file is written on first use by the slow test only."""
    folder = tmp_path_factory.mktemp("diffusion_models")
    comfy.folder_paths.add_model_folder_path("diffusion_models", str(folder))
    names = {}

    def get(family):
        if family not in names:
            name = f"atelier_test_{family}.safetensors"
            tiny.write_diffusion_model(family, str(folder / name), seed=0)
            names[family] = name
        return names[family]
    return get


def _unet_loader(name):
    return {"class_type": "UNETLoader", "inputs": {"unet_name": name, "weight_dtype": "default"}}


def test_unet_loader_loads_the_tiny_sd3_bit_identically(run_graph, tiny, glue, dit_files):
    name = dit_files("sd3")
    ref = dit_prompt(tiny, "sd3", size=64)
    p = dit_prompt(tiny, "sd3", size=64)
    p["20"] = _unet_loader(name)
    p["5"]["inputs"]["model"] = ["20", 0]
    r = run_graph(p, want=["20", "5", "6"])
    model = r["values"]["20"][0]
    assert type(model.model).__name__ == "SD3" and type(model.model.model_config).__name__ == "SD3"
    assert glue.family_of(model) == "sd3"
    assert torch.isfinite(r["values"]["6"][0]).all()
    assert torch.equal(r["values"]["5"][0]["samples"], _latent(run_graph, ref))


def _full_width_graph(tiny, family, name, steps=2):
    """UNETLoader(file) drawing with the tiny sd3 text encoder (4096-wide tokens) and the family's tiny VAE."""
    p = dit_prompt(tiny, family, steps=steps, cfg=1.0, guidance=3.5 if family == "flux" else None,
                   size=256 if family != "pixart" else None)
    p["20"] = _unet_loader(name)
    p["21"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd3", "seed": 0}}
    p["5"]["inputs"]["model"] = ["20", 0]
    p["2"]["inputs"]["clip"] = p["3"]["inputs"]["clip"] = ["21", 1]
    return p


def test_unet_loader_detects_full_width_pixart(run_graph, tiny, glue, dit_files):
    r = run_graph(_full_width_graph(tiny, "pixart", dit_files("pixart")), want=["20", "6"])
    model = r["values"]["20"][0]
    assert type(model.model).__name__ == "PixArt" and type(model.model.model_config).__name__ == "PixArtSigma"
    assert glue.family_of(model) == "pixart"  # not sdxl, though the latent format is SDXL's
    dm = model.model.diffusion_model
    assert dm.hidden_size == 1152 and len(dm.blocks) == 1 and not dm.micro_conditioning
    image = r["values"]["6"][0]
    assert image.shape == (1, 320, 320, 3) and torch.isfinite(image).all() and image.std() > 0.01


@pytest.mark.slow
@pytest.mark.parametrize("family", ["flux", "flux_schnell"])
def test_unet_loader_detects_full_width_flux(run_graph, tiny, glue, dit_files, family):
    """~400 MB files (1 double block at Flux's hard-coded 3072 width, fp8): a slow test."""
    r = run_graph(_full_width_graph(tiny, family, dit_files(family), steps=1), want=["20", "6"])
    model = r["values"]["20"][0]
    config = type(model.model.model_config).__name__
    assert type(model.model).__name__ == "Flux" and config == ("Flux" if family == "flux" else "FluxSchnell")
    assert glue.family_of(model) == "flux"
    assert model.model.diffusion_model.params.guidance_embed is (family == "flux")
    image = r["values"]["6"][0]
    assert image.shape == (1, 256, 256, 3) and torch.isfinite(image).all() and image.std() > 0.01


@pytest.mark.slow
def test_clip_loader_sd3_clip_l_drives_the_pixart_file(run_graph, comfy, tiny, glue, dit_files, tmp_path_factory):
    """Core CLIPLoader (type sd3) on a full-size CLIP-L file (~123 MB fp8) gives SD3's 4096-wide tokens (CLIP-L
    zero-padded) and 768 + 1280 pooled; the full-width PixArt file draws with it. Real loaders on both sides."""
    folder = tmp_path_factory.mktemp("text_encoders")
    tiny.write_clip_l(str(folder / "atelier_test_clip_l.safetensors"), seed=0)
    comfy.folder_paths.add_model_folder_path("text_encoders", str(folder))
    p = _full_width_graph(tiny, "pixart", dit_files("pixart"))
    p["21"] = {"class_type": "CLIPLoader", "inputs": {"clip_name": "atelier_test_clip_l.safetensors", "type": "sd3",
                                                      "device": "default"}}
    p["2"]["inputs"]["clip"] = p["3"]["inputs"]["clip"] = ["21", 0]
    r = run_graph(p, want=["2", "6"])
    cond, extra = r["values"]["2"][0][0]
    assert cond.shape == (1, 77, 4096) and torch.isfinite(cond).all()
    assert cond[..., 768:].abs().max() == 0 and cond[..., :768].abs().max() > 0
    assert extra["pooled_output"].shape == (1, 2048) and torch.isfinite(extra["pooled_output"]).all()
    image = r["values"]["6"][0]
    assert image.shape == (1, 320, 320, 3) and torch.isfinite(image).all() and image.std() > 0.01


def test_conditioning_width_checked_on_dit_families(tiny, glue):
    """A prompt encoded with another family's text encoder is refused up front, naming the input (the tiny
    encoders other than sd3's are all 64 wide, so the tiny sd3 / flux prompts are the foreign ones)."""
    enc = {f: tiny.build_clip(f, 0) for f in ("pixart", "flux", "sd3")}
    cond = {f: c.encode_from_tokens_scheduled(c.tokenize("a red circle")) for f, c in enc.items()}
    for family in ("pixart", "flux", "sd3"):
        model = tiny.build_model(family, 0)
        glue.check_conditioning(model, cond[family], "model", "positive")
        other = "sd3" if family != "sd3" else "flux"
        with pytest.raises(glue.AtelierError, match="positive.*wide text"):
            glue.check_conditioning(model, cond[other], "model", "positive")
