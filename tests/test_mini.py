"""Atelier Mini: the shipped weights load through the node in a real graph and draw the
requested colours; bad files fail clearly; the training script trains and resumes."""
from __future__ import annotations

import importlib

import pytest
import torch

from atelier_testlib import ROOT, load_tool, txt2img_prompt

# (prompt, colour) pairs x noise seeds: 8 generations of 64 px, 12 steps each.
COLOUR_PROMPTS = [("a red circle", "red"), ("a blue square", "blue"), ("a large yellow circle", "yellow"),
                  ("a green square", "green")]
NOISE_SEEDS = (1, 2)


@pytest.fixture(scope="module")
def mini(pack):
    return importlib.import_module(pack.__name__ + ".nodes.mini")


@pytest.fixture(scope="module")
def metrics(pack):
    return importlib.import_module(pack.__name__ + ".models.metrics")


MINI_PX = {"sd15": 64, "sdxl": 128, "pixart": 288}


def mini_prompt(text: str, family: str = "sd15", noise_seed: int = 1, steps: int = 12, cfg: float = 5.0) -> dict:
    size = MINI_PX[family]
    p = txt2img_prompt(family=family, size=size, steps=steps, text=text, cfg=cfg, noise_seed=noise_seed)
    p["1"] = {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": family}}
    return p


def test_shipped_weights_are_small_safetensors():
    files = sorted((ROOT / "weights").glob("atelier_mini_*.safetensors"))
    assert {f"atelier_mini_{f}.safetensors" for f in MINI_PX} <= {f.name for f in files}
    assert (ROOT / "weights" / "atelier_mini_pixart.safetensors").stat().st_size <= 15 * 1024 * 1024
    assert sum(f.stat().st_size for f in files) <= 40 * 1024 * 1024


@pytest.mark.parametrize("family", ["sd15", "sdxl", "pixart"])
def test_mini_loads_through_node_in_graph(run_graph, tiny, family):
    r = run_graph(mini_prompt("a red circle", family, steps=4), want=["1", "6"])
    model, clip, vae = r["values"]["1"]
    assert tiny.family_of(model) == family
    image = r["values"]["6"][0]
    size = MINI_PX[family]
    assert image.shape == (1, size, size, 3)
    assert torch.isfinite(image).all() and image.std() > 0.01


def test_mini_draws_the_requested_colour_more_often_than_chance(run_graph, metrics):
    hits = []
    for text, colour in COLOUR_PROMPTS:
        for seed in NOISE_SEEDS:
            image = run_graph(mini_prompt(text, noise_seed=seed), want=["6"])["values"]["6"][0][0]
            hits.append(any(d.color == colour for d in metrics.detect_objects(image.numpy())))
    rate = sum(hits) / len(hits)
    chance = metrics.chance_levels((1,))["guess_color"]  # 1/8: a one-object image of a random colour
    assert rate >= max(0.5, 3 * chance), f"requested colour found in {sum(hits)}/{len(hits)} images"


def test_missing_weights_name_the_file_and_the_fix(mini, tmp_path):
    with pytest.raises(mini.MiniWeightsError, match="not found.*train_mini.py --family sd15"):
        mini.load_mini("sd15", tmp_path / "nope.safetensors")


def test_corrupt_weights_give_a_clear_error(mini, tmp_path):
    bad = tmp_path / "atelier_mini_sd15.safetensors"
    good = mini.weights_path("sd15").read_bytes()
    bad.write_bytes(good[: len(good) // 3])  # truncated download
    with pytest.raises(mini.MiniWeightsError, match="corrupt.*atelier_mini_sd15.safetensors"):
        mini.load_mini("sd15", bad)
    bad.write_bytes(b"\x00" * 64)
    with pytest.raises(mini.MiniWeightsError, match="corrupt"):
        mini.load_mini("sd15", bad)


def test_pixart_file_corrupt_or_of_another_family_is_refused(mini, tmp_path):
    bad = tmp_path / "atelier_mini_pixart.safetensors"
    good = mini.weights_path("pixart").read_bytes()
    bad.write_bytes(good[: len(good) // 2])
    with pytest.raises(mini.MiniWeightsError, match="corrupt.*atelier_mini_pixart.safetensors.*--family pixart"):
        mini.load_mini("pixart", bad)
    with pytest.raises(mini.MiniWeightsError, match="not an Atelier Mini pixart file"):
        mini.load_mini("pixart", mini.weights_path("sdxl"))


def test_mini_pixart_predicts_v_and_its_clean_estimate_at_pure_noise_is_in_the_data_range(mini):
    """The shipped Mini-DiT is a V_PREDICTION model (its file says so; an eps file still loads as EPS). On
    PixArt-Σ's schedule (sigma_max 157) the eps weights' clean estimate at the first sampler step was 3x the
    data's std (x0 = x - 157 * eps: blobs painted all over); the v model's stays near the data (std ~1)."""
    import comfy.model_sampling as cms
    model, clip, _vae = mini.load_mini("pixart")
    assert mini.read_weights("pixart")[1]["param"] == "v"
    ms = model.model.model_sampling
    assert isinstance(ms, cms.V_PREDICTION)
    assert isinstance(mini.build_model("pixart", 0, "eps").model.model_sampling, cms.EPS)
    sigma = ms.sigma_max.view(1)
    x = torch.randn(2, 4, 36, 36, generator=torch.Generator().manual_seed(0)) * sigma
    ctx = clip.encode_from_tokens(clip.tokenize("a red circle left of a blue square"))
    with torch.no_grad():
        x0 = torch.cat([model.model.apply_model(x[i:i + 1], sigma, c_crossattn=ctx) for i in range(2)])
    assert 0.2 < x0.std().item() < 1.5 and x0.abs().max().item() < 6, (x0.std().item(), x0.abs().max().item())


def test_mini_pixart_shares_mini_sdxl_latent_space(mini):
    """The DiT draws with Mini sdxl's VAE (same weights), so a PixArt <-> SDXL handoff needs no re-encode."""
    _m, _c, vae_p = mini.load_mini("pixart")
    _m, _c, vae_x = mini.load_mini("sdxl")
    sd_p, sd_x = vae_p.first_stage_model.state_dict(), vae_x.first_stage_model.state_dict()
    assert sd_p.keys() == sd_x.keys() and all(torch.equal(sd_p[k], sd_x[k]) for k in sd_p)


def test_wrong_family_file_is_refused(mini):
    with pytest.raises(mini.MiniWeightsError, match="not an Atelier Mini sd15 file"):
        mini.load_mini("sd15", mini.weights_path("sdxl"))


def test_mini_format_roundtrip(pack):
    fmt = importlib.import_module(pack.__name__ + ".models.mini_format")
    g = torch.Generator().manual_seed(0)
    sd = {"w": torch.randn(64, 128, generator=g), "b": torch.randn(64, generator=g), "s": torch.tensor(0.5),
          "tok": torch.randn(100, 8, generator=g), "i": torch.arange(3)}
    flat = fmt.pack({"unet": sd, "clip": {"tok": sd["tok"]}, "vae": {"s": sd["s"]}},
                    token_ids=torch.tensor([3, 7, 7, 50]), embedding_keys=("clip.tok",))
    assert flat["unet.w.q8"].dtype == torch.int8 and flat["clip.tok.rows"].shape == (3, 8)
    back = fmt.unpack(flat)
    assert (back["unet"]["w"] - sd["w"]).abs().max() <= sd["w"].abs().max() / 127
    assert torch.allclose(back["unet"]["b"], sd["b"], atol=1e-2) and back["vae"]["s"] == 0.5
    assert torch.allclose(back["clip"]["tok"][[3, 7, 50]], sd["tok"][[3, 7, 50]], atol=1e-2)
    assert torch.allclose(back["clip"]["tok"][0], sd["tok"][[3, 7, 50]].mean(0), atol=1e-2)
    del flat["unet.w.q8scale"]
    with pytest.raises(fmt.MiniFormatError, match="unet.w.q8"):
        fmt.unpack(flat)


def _drawn_steps(tm, monkeypatch) -> list:
    """(stream, step) of every per-step generator the trainer draws from here on (stream 1 VAE, 2 UNet/DiT)."""
    drawn, real = [], tm.gen
    monkeypatch.setattr(tm, "gen", lambda seed, stream, step: drawn.append((stream, step)) or real(seed, stream, step))
    return drawn


def test_training_checkpoints_and_resumes_in_a_few_steps(comfy, mini, tmp_path, monkeypatch):
    """The trainer's whole path in a few steps (the loss drop needs more: the slow test below): world data, the
    VAE and UNet phases checkpointed, a resumed run continues from the checkpoint, the file loads."""
    tm = load_tool("train_mini")
    kw = dict(family="sd15", seed=3, vae_steps=2, data=8, batch=2, vae_batch=2, log_every=1,
              ckpt_dir=tmp_path / "ckpt", every=3, lr=2e-3)
    first = tm.train(steps=3, **kw)
    out = tmp_path / "mini.safetensors"
    drawn = _drawn_steps(tm, monkeypatch)
    again = tm.train(steps=5, out=out, resume=True, **kw)
    assert [d for d in drawn if d[0] in (1, 2)] == [(2, 3), (2, 4)]  # only the UNet steps after the checkpoint ran
    assert [s for s, _ in again["unet_curve"]] == list(range(1, 6))  # continued from 3, not restarted
    assert again["unet_curve"][:3] == first["unet_curve"]
    assert again["vae_curve"] == first["vae_curve"]  # the finished VAE phase is not trained again
    top = max(v for _, v in first["unet_curve"])
    # the optimizer moments come back on their own parameters (a shifted state gave NaN)
    assert all(v == v and v < 2 * top for _, v in again["unet_curve"][3:]), again["unet_curve"]
    model, clip, vae_obj = mini.load_mini("sd15", out)
    assert model.model.diffusion_model.input_blocks[0][0].weight.abs().sum() > 0


@pytest.mark.slow
def test_training_reduces_the_loss_and_resumes(comfy, mini, tmp_path):
    tm = load_tool("train_mini")
    kw = dict(family="sd15", seed=3, vae_steps=8, data=48, batch=8, vae_batch=4, log_every=1,
              ckpt_dir=tmp_path / "ckpt", every=10, lr=2e-3)
    first = tm.train(steps=30, **kw)
    vae = [v for _, v in first["vae_curve"]]
    unet = [v for _, v in first["unet_curve"]]
    assert sum(vae[-3:]) < sum(vae[:3])
    assert sum(unet[-8:]) / 8 < 0.85 * sum(unet[:8]) / 8, unet
    out = tmp_path / "mini.safetensors"
    again = tm.train(steps=34, out=out, resume=True, **kw)
    assert [s for s, _ in again["unet_curve"]] == list(range(1, 35))  # continued from 30, not restarted
    assert again["unet_curve"][:30] == first["unet_curve"]
    resumed = [v for _, v in again["unet_curve"][30:]]
    # the optimizer moments come back on their own parameters (a shifted state gave NaN here)
    assert all(v == v and v < 2 * max(unet[-8:]) for v in resumed), resumed
    model, clip, vae_obj = mini.load_mini("sd15", out)
    assert model.model.diffusion_model.input_blocks[0][0].weight.abs().sum() > 0


def test_mini_substitution_maps_checkpoints_by_family_and_keeps_names_apart(pack):
    sub = importlib.import_module(pack.__name__ + ".models.tiny_substitution")
    prompt = {
        "1": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "v1-5-pruned-emaonly.safetensors"}},
        "2": {"class_type": "CheckpointLoaderSimple", "inputs": {"ckpt_name": "sd_xl_base_1.0.safetensors"}},
        "3": {"class_type": "AtelierTrainLEP", "inputs": {"name": "sd15_sketch_lep", "model": ["1", 0]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": 512, "height": 1024, "batch_size": 1}},
    }
    out = sub.substitute_tiny(prompt, mini=True)
    assert out["1"] == {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": "sd15"},
                        "_meta": {"title": "Atelier Mini stand-in for v1-5-pruned-emaonly.safetensors"}}
    assert out["2"]["inputs"] == {"family": "sdxl"}
    assert out["3"]["inputs"]["name"] == "sd15_sketch_lep_mini"  # never reuses a LEP trained on the random model
    assert (out["4"]["inputs"]["width"], out["4"]["inputs"]["height"]) == (64, 128)
    assert sub.substitute_tiny(out, mini=True) == out
    assert sub.substitute_tiny(prompt)["3"]["inputs"]["name"] == "sd15_sketch_lep_tiny"


def test_demo_workflow_draws_with_mini(comfy, metrics):
    """The demo's first workflow, as a user gets it: basic_txt2img on Atelier Mini draws the caption's colours."""
    wf = comfy.load_workflow(ROOT / "workflows" / "basic_txt2img.json")
    prompt = comfy.to_prompt(wf, tiny=True, mini=True)
    assert {n["class_type"] for n in prompt.values()} >= {"AtelierMiniCheckpointLoader"}
    result = comfy.run_workflow(wf, tiny=True, mini=True)
    assert len(result["images"]) == 1
    import numpy as np
    from PIL import Image
    image = np.asarray(Image.open(result["images"][0]).convert("RGB"), dtype=np.float32) / 255.0
    colours = {d.color for d in metrics.detect_objects(image)}
    assert colours & {"red", "blue"}, f"detected {colours} for 'a red circle left of a blue square'"


@pytest.mark.parametrize("param", ["eps", "v", "flow"])
def test_each_parameterisation_is_what_comfy_model_sampling_inverts(comfy, param):
    """The trainer's target, fed to ComfyUI's own model_sampling as the model output, gives back x0 exactly:
    eps (PixArt-Σ's EPS discrete schedule), v (V_PREDICTION), flow matching (CONST, as Flux/SD3)."""
    import comfy.model_sampling as cms
    tm = load_tool("train_mini")
    kinds = {"eps": (cms.ModelSamplingDiscrete, cms.EPS), "v": (cms.ModelSamplingDiscrete, cms.V_PREDICTION),
             "flow": (cms.ModelSamplingDiscreteFlow, cms.CONST)}
    sampling, prediction = kinds[param]
    ms = type("MS", (sampling, prediction), {})(None)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(6, 4, 3, 3, generator=g)
    sigma, xt, target = tm.noised(ms, param, x0, g)
    assert sigma.shape == (6,) and not torch.allclose(xt, x0)
    assert torch.allclose(ms.calculate_denoised(sigma, target, xt), x0, atol=1e-4)


def _check_pixart_file(mini, out):
    """A trained Mini pixart file loads with non-zero weights, and its T5 table keeps only the rows the captions
    use (an unknown word reads their mean)."""
    model, clip, vae = mini.load_mini("pixart", out)
    assert model.model.diffusion_model.final_layer.linear.weight.abs().sum() > 0
    from safetensors import safe_open
    with safe_open(str(out), "pt") as f:
        rows = f.get_tensor("clip.t5xxl.transformer.shared.weight.rows")
    assert rows.shape[0] < 100 and clip.cond_stage_model.t5xxl.transformer.shared.weight.shape[0] == 32128


def test_dit_training_resumes_as_the_same_run_in_a_few_steps(comfy, mini, tmp_path, monkeypatch):
    """The DiT trainer's path in a few steps (the loss drop: the slow test below): a resumed run continues from
    the checkpoint and equals a straight one, the file loads."""
    tm = load_tool("train_mini")
    kw = dict(family="pixart", seed=3, data=4, batch=2, log_every=1, ckpt_dir=tmp_path / "ckpt", every=2, lr=2e-3)
    first = tm.train(steps=2, **kw)
    out = tmp_path / "pixart.safetensors"
    drawn = _drawn_steps(tm, monkeypatch)
    again = tm.train(steps=3, out=out, resume=True, **kw)
    assert [d for d in drawn if d[0] == 2] == [(2, 2)]  # only the step after the checkpoint ran
    assert [s for s, _ in again["unet_curve"]] == [1, 2, 3]  # continued from 2, not restarted
    assert again["unet_curve"][:2] == first["unet_curve"]
    straight = tm.train(steps=3, **{**kw, "ckpt_dir": tmp_path / "straight"})
    assert straight["unet_curve"] == again["unet_curve"]  # a resumed run is the same run
    _check_pixart_file(mini, out)


@pytest.mark.slow
def test_dit_training_reduces_the_loss_and_resumes(comfy, mini, tmp_path):
    tm = load_tool("train_mini")
    kw = dict(family="pixart", seed=3, data=4, batch=4, log_every=1, ckpt_dir=tmp_path / "ckpt", every=8, lr=2e-3)
    first = tm.train(steps=16, **kw)
    loss = [v for _, v in first["unet_curve"]]
    assert sum(loss[-4:]) / 4 < 0.9 * sum(loss[:4]) / 4, loss
    out = tmp_path / "pixart.safetensors"
    again = tm.train(steps=18, out=out, resume=True, **kw)
    assert [s for s, _ in again["unet_curve"]] == list(range(1, 19))  # continued from 16, not restarted
    assert again["unet_curve"][:16] == first["unet_curve"]
    straight = tm.train(steps=18, **{**kw, "ckpt_dir": tmp_path / "straight"})
    assert straight["unet_curve"] == again["unet_curve"]  # a resumed run is the same run
    _check_pixart_file(mini, out)


def test_flow_matching_loss_fits_a_fixed_batch(comfy, mini):
    """The flow loss (for Flux/SD3-type CONST models) trains a DiT: on one fixed batch and noise, 15 Adam
    steps of DiT + T5 lower it well below the start."""
    import comfy.model_sampling as cms
    tm = load_tool("train_mini")
    base = mini.build_model("pixart", 0).model
    base.model_sampling = type("MS", (cms.ModelSamplingDiscreteFlow, cms.CONST), {})(None)
    clip = mini.build_clip("pixart", 0)
    cond = clip.cond_stage_model
    tm.make_trainable_t5(cond)
    key, rows, _empty = tm.caption_tokens(clip, ["a red circle", "a blue square"])
    params = [p for p in list(base.diffusion_model.parameters()) + list(cond.parameters())]
    for p in params:
        p.requires_grad_(True)
    opt = torch.optim.Adam(params, lr=3e-3)
    x0 = torch.randn(2, 4, 36, 36, generator=torch.Generator().manual_seed(1))
    losses = []
    for _ in range(15):
        loss = tm.dit_loss(base, cond, key, "flow", x0, rows, torch.Generator().manual_seed(2))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.7 * losses[0], losses
