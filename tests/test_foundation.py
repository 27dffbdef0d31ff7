"""The pack in real ComfyUI: registration, tiny families, the stock loader path, the runner."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from atelier_testlib import ROOT, load_tool, txt2img_prompt

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


def test_pack_registers_from_any_folder_name(comfy):
    ids = comfy.atelier_node_ids()
    assert "AtelierTinyCheckpointLoader" in ids
    cls = comfy.node_classes["AtelierTinyCheckpointLoader"]
    # Loaded by ComfyUI's loader from the arbitrarily named link the fixture made.
    assert "atelier_pack_" in cls.RELATIVE_PYTHON_MODULE
    assert Path(comfy.pack_path).name.startswith("atelier_pack_")


def test_every_atelier_node_is_documented(comfy):
    for node_id in comfy.atelier_node_ids():
        cls = comfy.node_classes[node_id]
        schema = cls.GET_SCHEMA()
        schema.validate()  # unique input/output ids: ComfyUI refuses the whole pack otherwise
        assert schema.category.startswith("atelier/"), node_id
        assert schema.description and len(schema.description) > 20, f"{node_id} has no description"
        assert schema.display_name, node_id
        for inp in schema.inputs:
            assert getattr(inp, "tooltip", None), f"{node_id}.{inp.id} has no tooltip"


def test_object_info_lists_atelier_nodes(comfy):
    # What /object_info serves is built from the same classes; check the V1 view ComfyUI derives.
    info = comfy.node_classes["AtelierTinyCheckpointLoader"].INPUT_TYPES()
    assert set(info["required"]) == {"family", "seed"}


@pytest.mark.parametrize("family,size,n_in,n_out", [("sd15", 64, 12, 12), ("sdxl", 128, 9, 9)])
def test_tiny_family_through_core_ksampler(run_graph, tiny, family, size, n_in, n_out):
    r = run_graph(txt2img_prompt(family=family, size=size), want=["1", "5", "6"])
    model, clip, vae = r["values"]["1"]
    unet = model.model.diffusion_model
    assert len(unet.input_blocks) == n_in and len(unet.output_blocks) == n_out
    latent = r["values"]["5"][0]["samples"]
    assert latent.shape == (1, 4, size // 8, size // 8)
    image = r["values"]["6"][0]
    assert image.shape == (1, size, size, 3)
    assert torch.isfinite(image).all() and image.std() > 0
    assert tiny.family_of(model) == family


def test_tiny_sd15_block_layout_matches_real_sd15(tiny):
    model = tiny.build_model("sd15", 0).model.diffusion_model
    # Real SD1.5: transformers in input blocks 1,2,4,5,7,8; output blocks 3..11; the middle block.
    with_attn = [i for i, b in enumerate(model.input_blocks) if any("SpatialTransformer" in type(m).__name__ for m in b)]
    assert with_attn == [1, 2, 4, 5, 7, 8]
    out_attn = [i for i, b in enumerate(model.output_blocks) if any("SpatialTransformer" in type(m).__name__ for m in b)]
    assert out_attn == list(range(3, 12))
    assert sum(p.numel() for p in model.parameters()) < 12e6


def test_tiny_weights_are_seeded(tiny):
    a = tiny.build_model("sd15", 3).model.diffusion_model.state_dict()
    b = tiny.build_model("sd15", 3).model.diffusion_model.state_dict()
    c = tiny.build_model("sd15", 4).model.diffusion_model.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert any(not torch.equal(a[k], c[k]) for k in a if a[k].ndim > 1)


def test_families_have_different_latent_spaces(tiny):
    v15 = tiny.build_vae("sd15", 0)
    vxl = tiny.build_vae("sdxl", 0)
    x = torch.rand(1, 64, 64, 3)
    z15, zxl = v15.encode(x), vxl.encode(x)
    assert z15.shape == zxl.shape == (1, 4, 8, 8)
    assert not torch.allclose(z15, zxl)
    assert tiny.build_model("sd15", 0).model.latent_format.scale_factor != \
        tiny.build_model("sdxl", 0).model.latent_format.scale_factor


@pytest.fixture(scope="module")
def stock_checkpoint(comfy, tiny, tmp_path_factory):
    folder = tmp_path_factory.mktemp("checkpoints")
    path = folder / "atelier_stock_test_sd15.safetensors"
    tiny.write_stock_sd15_checkpoint(str(path), seed=0)
    comfy.folder_paths.add_model_folder_path("checkpoints", str(folder))
    return path.name


def test_stock_checkpoint_loader_gives_finite_images(run_graph, stock_checkpoint):
    prompt = txt2img_prompt(size=64, steps=3)
    prompt["1"] = {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": stock_checkpoint}}
    r = run_graph(prompt, want=["1", "2", "6"])
    cond = r["values"]["2"][0][0][0]
    assert cond.shape == (1, 77, 768) and torch.isfinite(cond).all()
    image = r["values"]["6"][0]
    assert image.shape == (1, 64, 64, 3)
    assert torch.isfinite(image).all() and image.std() > 0
    assert r["values"]["1"][0].model.model_config.__class__.__name__ == "SD15"


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_example_workflow_runs_from_ui_file(comfy, path):
    result = comfy.run_workflow(path, tiny=True)
    assert result["images"], f"{path.name} wrote no images"
    for img in result["images"]:
        assert img.is_file() and img.stat().st_size > 0


def test_ui_conversion_maps_widgets_by_live_definitions(comfy):
    wf = json.loads((ROOT / "workflows" / "basic_txt2img.json").read_text())
    prompt = comfy.to_prompt(wf)
    ks = next(n for n in prompt.values() if n["class_type"] == "KSampler")
    # widgets_values = [seed, control_after_generate, steps, cfg, sampler, scheduler, denoise]
    assert ks["inputs"]["seed"] == 42 and ks["inputs"]["steps"] == 8
    assert ks["inputs"]["sampler_name"] == "euler" and ks["inputs"]["denoise"] == 1.0
    assert isinstance(ks["inputs"]["model"], list)
    tiny_prompt = comfy.to_prompt(wf, tiny=True)
    assert not any(n["class_type"] == "CheckpointLoaderSimple" for n in tiny_prompt.values())
    empty = next(n for n in tiny_prompt.values() if n["class_type"] == "EmptyLatentImage")
    assert empty["inputs"]["width"] == 64


def test_unknown_node_type_is_named(comfy):
    headless = load_tool("headless")
    ui = load_tool("ui_to_api")
    wf = json.loads((ROOT / "workflows" / "basic_txt2img.json").read_text())
    wf["nodes"][1]["type"] = "NoSuchNodeAnywhere"
    with pytest.raises((headless.WorkflowError, ui.ConversionError)) as e:
        comfy.run_workflow(wf, tiny=True)
    assert "NoSuchNodeAnywhere" in str(e.value)


def test_missing_model_file_is_named(comfy):
    headless = load_tool("headless")
    wf = json.loads((ROOT / "workflows" / "basic_txt2img.json").read_text())
    with pytest.raises(headless.WorkflowError) as e:
        comfy.run_workflow(wf, tiny=False)
    msg = str(e.value)
    assert "ckpt_name" in msg and "v1-5-pruned-emaonly.safetensors" in msg


def test_cli_runs_workflow_headless(tmp_path, comfy_path):
    env = dict(os.environ, COMFYUI_PATH=str(comfy_path))
    proc = subprocess.run([sys.executable, str(ROOT / "tools" / "atelier.py"), "run", "--tiny", "--out", str(tmp_path),
                           str(ROOT / "workflows" / "basic_txt2img.json")],
                          capture_output=True, text=True, env=env, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert "basic_txt2img.json" in proc.stdout and " ok" in proc.stdout
    assert list(tmp_path.glob("*.png"))


def test_comfyui_path_env_must_be_valid(tmp_path, monkeypatch):
    comfy_env = load_tool("comfy_env")
    monkeypatch.setenv("COMFYUI_PATH", str(tmp_path / "nowhere"))
    with pytest.raises(comfy_env.ComfyNotFound) as e:
        comfy_env.find_comfyui()
    assert "COMFYUI_PATH" in str(e.value)


def test_comfyui_found_from_env(comfy_path, monkeypatch):
    comfy_env = load_tool("comfy_env")
    monkeypatch.setenv("COMFYUI_PATH", str(comfy_path))
    assert comfy_env.find_comfyui(verbose=False) == comfy_path.resolve()


def test_pyproject_dependencies_match_requirements():
    import tomllib
    reqs = [l.strip() for l in (ROOT / "requirements.txt").read_text().splitlines()
            if l.strip() and not l.startswith("#")]
    deps = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["dependencies"]
    assert deps == reqs
    for pinned in ("torch", "torchvision", "numpy"):
        assert pinned in reqs, f"{pinned} must be listed unpinned"


@pytest.mark.parametrize("family", ["sd15", "sdxl"])
def test_tiny_unet_responds_to_input_and_conditioning(tiny, family):
    """Norm scales must be 1 (a zero scale silences whole blocks and the UNet ignores its prompt)."""
    m = tiny.build_model(family, 0).model
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(0))
    sigma = torch.tensor([1.0])
    ctx_a = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(1))
    ctx_b = torch.randn(1, 77, 64, generator=torch.Generator().manual_seed(2))
    extra = {}
    if family == "sdxl":
        extra["y"] = torch.zeros(1, m.adm_channels)
    with torch.no_grad():
        out_a = m.apply_model(x, sigma, c_crossattn=ctx_a, **extra)
        out_b = m.apply_model(x, sigma, c_crossattn=ctx_b, **extra)
    assert out_a.abs().mean() > 1e-3
    assert (out_a - out_b).abs().mean() > 1e-4


def test_partially_invalid_graph_fails_whole(comfy):
    headless = load_tool("headless")
    prompt = txt2img_prompt()
    prompt["8"] = {"class_type": "SaveImage", "inputs": {"images": ["6", 0], "filename_prefix": "x"}}
    prompt["9"] = {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 1]}}  # CLIP as VAE
    prompt["10"] = {"class_type": "PreviewImage", "inputs": {"images": ["9", 0]}}
    with pytest.raises(headless.WorkflowError) as e:
        comfy.run_prompt(prompt)
    assert "9" in str(e.value) or "VAEDecode" in str(e.value)
