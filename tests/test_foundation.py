"""The pack in real ComfyUI: registration, tiny families, the stock loader path, the runner."""
from __future__ import annotations

import asyncio
import importlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from atelier_testlib import ROOT, load_tool, txt2img_prompt

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


# A second boot in a child process, from another link to this checkout: registered ids, the module
# path and web directory ComfyUI gives the pack, all keyed by that folder's name.
_SECOND_BOOT = """
import json, logging, sys
sys.path.insert(0, sys.argv[1])
logging.basicConfig(level=logging.ERROR)
import headless
h = headless.Headless(comfy_path=sys.argv[2], pack_path=sys.argv[3], output_dir=sys.argv[4] + '/out',
                      input_dir=sys.argv[4] + '/in', user_dir=sys.argv[4] + '/user', cpu=True)
ids = h.atelier_node_ids()
print(json.dumps({'pkg': h.pack_module.__name__, 'ids': ids,
                  'rel': sorted({h.node_classes[i].RELATIVE_PYTHON_MODULE for i in ids}),
                  'modules': sorted({h.node_classes[i].__module__ for i in ids}),
                  'web': h.nodes.EXTENSION_WEB_DIRS.get(h.pack_path.rsplit('/', 1)[-1])}))
"""


def _pack_node_ids(pack) -> set[str]:
    """Ids of the nodes every feature module of the pack exports (nodes/<feature>.py NODES)."""
    features = importlib.import_module(pack.__name__ + ".nodes").FEATURES
    mods = [importlib.import_module(f"{pack.__name__}.nodes.{f}") for f in features]
    return {n.GET_SCHEMA().node_id for m in mods for n in m.NODES}


def test_pack_registers_from_any_folder_name(comfy, comfy_path, pack, tmp_path):
    link = Path(comfy.pack_path)
    # The fixture's folder: a random name (not "atelier", not the checkout's), a link to this checkout.
    assert link.is_symlink() and link.resolve() == ROOT
    assert link.name not in ("atelier", ROOT.name)
    # ComfyUI imported the pack as a package named after that path, and every Atelier node it
    # registered is a class of that package, from this checkout's nodes/.
    assert pack.__name__ == str(link).replace(".", "_x_")
    ids = comfy.atelier_node_ids()
    assert "AtelierTinyCheckpointLoader" in ids and set(ids) == _pack_node_ids(pack)
    for node_id in ids:
        cls = comfy.node_classes[node_id]
        assert cls.RELATIVE_PYTHON_MODULE == f"custom_nodes.{link.name}", node_id
        assert cls.__module__.startswith(pack.__name__ + ".nodes."), (node_id, cls.__module__)
        assert Path(sys.modules[cls.__module__].__file__).resolve().parent == ROOT / "nodes", node_id
    assert Path(comfy.nodes.EXTENSION_WEB_DIRS[link.name]).resolve() == ROOT / "web" / "js"

    # The same checkout under another random name, with a dot and a dash, in a fresh ComfyUI.
    other = tmp_path / "custom_nodes" / f"My-Pack.v{os.getpid()}_{tmp_path.name[-6:]}"
    other.parent.mkdir()
    other.symlink_to(ROOT, target_is_directory=True)
    proc = subprocess.run([sys.executable, "-c", _SECOND_BOOT, str(ROOT / "tools"), str(comfy_path), str(other),
                           str(tmp_path)], capture_output=True, text=True, timeout=300, cwd=str(tmp_path),
                          env=dict(os.environ, PYTHONSAFEPATH="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    got = json.loads(proc.stdout.strip().splitlines()[-1])
    assert got["ids"] == ids
    assert got["pkg"] == str(other).replace(".", "_x_")
    assert got["rel"] == [f"custom_nodes.{other.name}"]
    assert got["modules"] and all(m.startswith(got["pkg"] + ".nodes.") for m in got["modules"])
    assert Path(got["web"]).resolve() == ROOT / "web" / "js"


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


def _asked_shape(prompt: dict, node_id: str):
    """(batch, height, width) of the picture output node ``node_id`` saves, as the workflow asks for it:
    the EmptyLatentImage its decoded latent starts from, times the ``scale``/``texture_scale`` of the
    latent nodes in between; None when the picture is not a decoded latent (a diagram, a loaded image)."""
    link = prompt[node_id]["inputs"].get("images")
    while isinstance(link, list) and prompt[link[0]]["class_type"] != "VAEDecode":
        link = prompt[link[0]]["inputs"].get("images")  # image pass-through nodes (metrics)
    if not isinstance(link, list):
        return None
    link, scale = prompt[link[0]]["inputs"]["samples"], 1.0
    while isinstance(link, list):
        inputs = prompt[link[0]]["inputs"]
        if prompt[link[0]]["class_type"] in ("EmptyLatentImage", "EmptySD3LatentImage"):
            return inputs["batch_size"], round(inputs["height"] * scale), round(inputs["width"] * scale)
        scale *= float(inputs.get("scale", 1.0)) * float(inputs.get("texture_scale", 1.0))
        link = next((inputs[k] for k in ("samples", "latent_image", "latent") if isinstance(inputs.get(k), list)), None)
    return None


def _run_pictures(comfy, path):
    """Run a workflow (tiny) from an empty executor cache: the prompt, the IMAGE tensor each
    image-saving output node received, and the pixels of every picture file written, per node."""
    from PIL import Image

    comfy.executor.reset()  # a real second run, not the executor's cached outputs
    result = comfy.run_workflow(path, tiny=True)
    prompt = comfy.to_prompt(comfy.load_workflow(path), tiny=True)
    cache = comfy.executor.caches.outputs
    tensors, files = {}, {}
    for node_id, out in result["outputs"].items():
        src = prompt[node_id]["inputs"].get("images")
        if isinstance(src, list):
            tensors[node_id] = cache.get(src[0])[src[1]][0]
        paths = comfy.output_files({node_id: out})
        if paths:
            files[node_id] = [np.asarray(Image.open(f).convert("RGB")) for f in paths]
    return prompt, tensors, files


def determinism_cover(types: dict[str, set[str]]) -> set[str]:
    """The workflows (names) whose second run is checked: a few that together run every node type any
    example workflow runs (greedy set cover: most types not yet covered first, then fewer types, then
    name). Running all of them twice doubled the module's time for no node the cover leaves unchecked."""
    left, chosen = set().union(*types.values()), set()
    while left:
        name = min(types, key=lambda n: (-len(types[n] & left), len(types[n]), n))
        chosen.add(name)
        left -= types[name]
    return chosen


@pytest.fixture(scope="module")
def run_twice(comfy) -> set[str]:
    """Names of the example workflows run twice for determinism (every node type of their tiny prompts)."""
    return determinism_cover({p.name: {n["class_type"] for n in comfy.to_prompt(comfy.load_workflow(p), tiny=True).values()}
                              for p in WORKFLOWS})


def test_determinism_cover_runs_every_node_type_twice():
    types = {"a": {"X", "Y"}, "b": {"Y", "Z"}, "c": {"X", "Y", "Z"}, "d": {"W"}, "e": {"X"}}
    assert determinism_cover(types) == {"c", "d"}
    assert determinism_cover({"a": {"X"}}) == {"a"}


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_example_workflow_runs_from_ui_file(comfy, path, run_twice):
    prompt, tensors, files = _run_pictures(comfy, path)
    assert files, f"{path.name} wrote no images"
    for node_id, t in tensors.items():
        assert torch.isfinite(t).all(), (path.name, node_id)
        asked = _asked_shape(prompt, node_id)
        if asked is not None:
            assert tuple(t.shape) == (*asked, 3), (path.name, node_id, tuple(t.shape), asked)
        for i in range(t.shape[0]):
            assert t[i].std() > 1e-3, f"{path.name} node {node_id} image {i} is constant"
    for node_id, pics in files.items():
        for pic in pics:
            assert pic.std() > 0, f"{path.name} node {node_id} saved a constant picture"
        if node_id in tensors:
            assert [p.shape for p in pics] == [tuple(x.shape) for x in tensors[node_id]], (path.name, node_id)
    # Seeds fixed in the workflow: a second run from scratch gives the same pixels, bit for bit (the
    # workflows of the determinism cover: together they run every node type of the examples).
    if path.name not in run_twice:
        return
    _, tensors2, files2 = _run_pictures(comfy, path)
    assert tensors2.keys() == tensors.keys() and files2.keys() == files.keys()
    for node_id, t in tensors.items():
        assert torch.equal(t, tensors2[node_id]), f"{path.name} node {node_id}: two runs differ"
    for node_id, pics in files.items():
        assert len(pics) == len(files2[node_id]) and all(
            np.array_equal(a, b) for a, b in zip(pics, files2[node_id])), f"{path.name} node {node_id}: two runs differ"


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
    # torch/torchvision are ComfyUI's: listing them makes `pip install -r requirements.txt` in a bare
    # environment pull the registry's default (CUDA) build (issue 20, item 10).
    for left_to_comfyui in ("torch", "torchvision", "torchaudio"):
        assert left_to_comfyui not in reqs, f"{left_to_comfyui} is ComfyUI's to install"
    assert "numpy" in reqs, "numpy must be listed unpinned"


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
    # ComfyUI's own validator accepts the prompt: it would run outputs 7 and 8 and silently drop 10.
    ok, _, outputs, node_errors = asyncio.run(comfy.execution.validate_prompt("check", prompt, None))
    assert ok and sorted(outputs) == ["7", "8"] and list(node_errors) == ["9"]
    out_dir = Path(comfy.folder_paths.get_output_directory())
    before = set(out_dir.glob("x_*.png"))
    with pytest.raises(headless.WorkflowError) as e:
        comfy.run_prompt(prompt)
    # The headless runner refuses the whole graph, naming the one bad link, and runs nothing.
    head, *lines = str(e.value).splitlines()
    assert head == "Some nodes failed validation" and len(lines) == 1
    assert lines[0].startswith("  node 9 (VAEDecode) input vae: ")
    assert "received_type(CLIP) mismatch input_type(VAE)" in lines[0]
    assert set(out_dir.glob("x_*.png")) == before
