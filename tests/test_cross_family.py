"""Issue 18 items 1-3 on the tiny DiT/flow families (flux, flux_schnell, sd3, pixart) in real ComfyUI: time experts on
flow schedules, struct→texture and the Coop bridge between latent spaces and parametrisations (flow ↔ ε), the
noise-aware upscale on 16-channel latents, and the VAE family check.

Random weights prove plumbing: the assertions are bit-identity where nothing may change, noise levels (the
noise-to-signal ratio each model sees), noise whiteness, shapes and finiteness."""
from __future__ import annotations

import importlib
import math

import pytest
import torch
from atelier_testlib import load_models, load_tool

SIXTEEN = ("flux", "flux_schnell", "sd3")
#: ComfyUI's PixArtMS needs a latent of at least 33 px (tiny_family.TinyPixArtSigma): its smallest round size
PX = {"pixart": 320}


# mc (models/coop.py), nc (nodes/coop.py), glue, one_thread: tests/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def tmod(pack):
    return importlib.import_module(pack.__name__ + ".nodes.time_experts")


def _empty(family, size):
    return {"class_type": "EmptySD3LatentImage" if family in SIXTEEN else "EmptyLatentImage",
            "inputs": {"width": size, "height": size, "batch_size": 1}}


def _model(p, nid, family, seed, text="a red circle"):
    """Loader ``nid`` with its positive ``nid``p and negative ``nid``n."""
    p[nid] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": family, "seed": seed}}
    p[nid + "p"] = {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": [nid, 1]}}
    p[nid + "n"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": [nid, 1]}}


def _ks(model, pos, neg, latent, steps=4, cfg=2.0, scheduler="simple", seed=1):
    return {"class_type": "KSampler", "inputs": {
        "model": model, "positive": pos, "negative": neg, "latent_image": latent, "seed": seed, "steps": steps,
        "cfg": cfg, "sampler_name": "euler", "scheduler": scheduler, "denoise": 1.0}}


def _out(p, src, vae):
    p["o" + src] = {"class_type": "VAEDecode", "inputs": {"samples": [src, 0], "vae": vae}}
    p["po" + src] = {"class_type": "PreviewImage", "inputs": {"images": ["o" + src, 0]}}


def _samples(run_graph, p, nid):
    return run_graph(p, want=[nid])["values"][nid][0]["samples"].clone()


# ------------------------------------------------------------------ 1. time experts on flow schedules

def test_flow_timesteps_are_noise_levels_whatever_the_shift(comfy, tiny, tmod):
    te = load_models("time_experts")
    for fam in SIXTEEN:
        ts = tmod._timesteps(tiny.build_model(fam, 0))
        assert ts.kind == "flow"
        assert ts.to_sigma(500) == 0.5 and ts.from_sigma(0.25) == 250.0
        assert te.parse_boundaries("500", "timestep", 2, ts) == [0.5]
        assert te.parse_boundaries("", "auto", 2, ts) == pytest.approx([0.5], abs=1e-12)
        four = te.parse_boundaries("", "auto", 4, ts)
        assert four[1] == pytest.approx(0.5) and four[0] == pytest.approx(1 - four[2])  # symmetric in log-SNR
        assert te.parse_boundaries("0", "timestep", 2, ts) == [0.0]
        assert te.parse_boundaries("1000", "timestep", 2, ts) == [math.inf]
    assert tmod._timesteps(tiny.build_model("pixart", 0)).kind == "table"  # PixArt-Σ is a DDPM model
    # the shift moves the steps, never the boundary
    import comfy_extras.nodes_model_advanced as adv
    flux = tiny.build_model("flux", 0)
    shifted = adv.ModelSamplingFlux().patch(flux, 3.0, 0.5, 1024, 1024)[0]
    sd3 = adv.ModelSamplingSD3().patch(tiny.build_model("sd3", 0), 8.0)[0]
    for m in (flux, shifted, sd3):
        assert tmod._timesteps(m).to_sigma(500) == 0.5
    assert float(shifted.get_model_object("model_sampling").percent_to_sigma(0.5)) != \
        float(flux.get_model_object("model_sampling").percent_to_sigma(0.5))


def _te_graph(fam_1, seed_1, fam_2, seed_2, boundaries="500", mode="timestep", size=64, steps=4, shift=None):
    p = {}
    _model(p, "1", fam_1, seed_1)
    p["2"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": fam_2, "seed": seed_2}}
    p["4"] = _empty(fam_1, size)
    model_1 = ["1", 0]
    if shift is not None:
        p["9"] = {"class_type": shift[0], "inputs": {"model": ["1", 0], **shift[1]}}
        model_1 = ["9", 0]
    p["20"] = {"class_type": "AtelierTimeExperts", "inputs": {"model_1": model_1, "model_2": ["2", 0], "mode": mode,
                                                              "boundaries": boundaries}}
    # SamplerCustomAdvanced on model_1's schedule, so an expert alone samples on the same sigmas (Flux dev and
    # schnell have different shifts: KSampler on schnell alone would take schnell's own schedule)
    p["50"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    p["51"] = {"class_type": "CFGGuider", "inputs": {"model": ["20", 0], "positive": ["1p", 0], "negative": ["1n", 0],
                                                     "cfg": 2.0}}
    p["52"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["53"] = {"class_type": "BasicScheduler", "inputs": {"model": model_1, "scheduler": "simple", "steps": steps,
                                                          "denoise": 1.0}}
    p["5"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["50", 0], "guider": ["51", 0], "sampler": ["52", 0], "sigmas": ["53", 0], "latent_image": ["4", 0]}}
    _out(p, "5", ["1", 2])
    return p


def _alone(p, node):
    q = {k: v for k, v in p.items() if k != "20"}
    q["51"] = dict(q["51"], inputs=dict(q["51"]["inputs"], model=[node, 0]))
    return q


@pytest.mark.parametrize("fam_1,fam_2", [("flux", "flux_schnell"), ("sd3", "sd3"), ("pixart", "pixart")],
                         ids=["flux_dev+schnell", "sd3+sd3", "pixart+pixart"])
def test_extremes_bit_identical_to_each_expert_alone_on_dits(run_graph, fam_1, fam_2):
    size = PX.get(fam_1, 64)
    p = _te_graph(fam_1, 0, fam_2, 1, size=size)
    a, b = _samples(run_graph, _alone(p, "1"), "5"), _samples(run_graph, _alone(p, "2"), "5")
    assert not torch.equal(a, b)
    if fam_1 == fam_2:  # one schedule: the core KSampler on each expert is the same thing
        q = _alone(p, "2")
        q["5"] = _ks(["2", 0], ["1p", 0], ["1n", 0], ["4", 0])
        assert torch.equal(_samples(run_graph, q, "5"), b)
    assert torch.equal(_samples(run_graph, _te_graph(fam_1, 0, fam_2, 1, "0", size=size), "5"), a)
    assert torch.equal(_samples(run_graph, _te_graph(fam_1, 0, fam_2, 1, "1000", size=size), "5"), b)
    assert torch.equal(_samples(run_graph, _te_graph(fam_1, 0, fam_2, 1, "1e9", "sigma", size=size), "5"), b)


@pytest.mark.parametrize("family,shift", [
    ("flux", None), ("flux", ("ModelSamplingFlux", {"max_shift": 2.0, "base_shift": 0.5, "width": 1024,
                                                    "height": 1024})),
    ("sd3", ("ModelSamplingSD3", {"shift": 8.0}))], ids=["flux", "flux_shifted", "sd3_shift8"])
def test_flow_boundary_is_the_same_noise_level_on_any_shift(run_graph, family, shift):
    p = _te_graph(family, 0, family if family != "flux" else "flux_schnell", 1, steps=12, shift=shift)
    r = run_graph(p, want=["20", "5"])
    calls = r["values"]["20"][1]["runs"][-1]["calls"]
    assert len(calls) == 12 and {c["expert"] for c in calls} == {0, 1}
    assert all(c["expert"] == (0 if c["sigma"] >= 0.5 else 1) for c in calls)
    assert all(c["timestep"] == pytest.approx(1000 * c["sigma"]) for c in calls)
    assert "sigma 0.5 (t≈500.0)" in r["values"]["20"][2]


def test_time_router_calibrates_on_a_dit(tiny, tmod, mc):
    """Flux dev + schnell experts, each spoiled (x0 off by 3) on one side of sigma 0.5; boundaries deliberately at
    t = 900: the denoising-loss calibration moves the switch to t = 500."""
    import nodes
    _, clip, _ = tiny.build_family("flux", 0)

    def spoiled(family, seed, high):
        m = tiny.build_model(family, seed)

        def fn(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            s = float(args["timestep"][0])
            if (s >= 0.5) == high:  # x0 = x - sigma·v (CONST): move x0 by +3
                out = out - 3.0 / s
            return out
        m.set_model_unet_function_wrapper(fn)
        return m
    e1, e2 = spoiled("flux", 0, high=False), spoiled("flux_schnell", 1, high=True)
    routed = tmod.AtelierTimeExperts.execute(model_1=e1, model_2=e2, mode="timestep", boundaries="900").args[0]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    lat = {"samples": torch.randn(1, 16, 4, 4, generator=torch.Generator().manual_seed(0)) * 0.5}
    out = tmod.AtelierTimeRouter.execute(model=routed, calibration="denoising_loss", levels=6, gate_noise=0.0,
                                         seed=0, positive=pos, latent=lat)
    gated, record, report = out.args
    picks = [line.split("-> ")[1].split()[0] for line in report.splitlines()[1:]]
    assert report.splitlines()[1].startswith("t=   1.0")  # flow: no level at sigma 0 (no noise, no error)
    assert picks == ["model_2"] * 3 + ["model_1"] * 3, report
    nodes.common_ksampler(gated, 1, 8, 1.0, "euler", "simple", pos, neg, {"samples": torch.zeros(1, 16, 4, 4)})
    calls = record["runs"][-1]["calls"]
    assert len(calls) == 8
    assert all(c["expert"] == (0 if c["timestep"] > 500 else 1) for c in calls if abs(c["timestep"] - 500) > 200)


# ------------------------------------------------------------------ 2. struct→texture and the bridge across families

PAIRS = [("flux", 64, "sdxl", 128), ("sdxl", 128, "flux", 64), ("sd3", 64, "sd15", 64), ("sd15", 64, "sd3", 64),
         ("pixart", 320, "sdxl", 320), ("sdxl", 320, "pixart", 320)]


def _st_graph(fam_s, px_s, fam_t, px_t, t_struct=500, steps=6, vaes=True):
    p = {}
    _model(p, "1", fam_s, 0)
    _model(p, "2", fam_t, 5, text="a blue square")
    p["4"] = _empty(fam_s, px_s)
    inputs = {"structure_model": ["1", 0], "structure_positive": ["1p", 0], "structure_negative": ["1n", 0],
              "texture_model": ["2", 0], "texture_positive": ["2p", 0], "texture_negative": ["2n", 0],
              "latent_image": ["4", 0], "seed": 1, "steps": steps, "cfg": 2.0, "sampler_name": "euler",
              "scheduler": "simple", "t_struct": t_struct, "denoise": 1.0, "texture_scale": px_t / px_s}
    if vaes:
        inputs.update(structure_vae=["1", 2], texture_vae=["2", 2])
    p["30"] = {"class_type": "AtelierStructTextureSampler", "inputs": inputs}
    _out(p, "30", ["2", 2])
    return p


@pytest.mark.parametrize("fam_s,px_s,fam_t,px_t", PAIRS, ids=[f"{a}_to_{c}" for a, _, c, _ in PAIRS])
def test_struct_texture_hands_over_at_the_same_noise_to_signal_ratio(run_graph, mc, fam_s, px_s, fam_t, px_t):
    r = run_graph(_st_graph(fam_s, px_s, fam_t, px_t), want=["1", "2", "30"])["values"]
    lat, rec = r["30"]
    s_model, t_model = r["1"][0], r["2"][0]
    c_t = t_model.model.latent_format.latent_channels
    assert lat["samples"].shape == (1, c_t, px_t // 8, px_t // 8) and torch.isfinite(lat["samples"]).all()
    calls = rec["runs"][-1]["calls"]
    experts = [c["expert"] for c in calls]
    assert experts == sorted(experts) and experts[0] == 0 and experts[-1] == 1
    last_s = [c for c in calls if c["expert"] == 0][-1]
    first_t = next(c for c in calls if c["expert"] == 1)
    ms_s, ms_t = s_model.get_model_object("model_sampling"), t_model.get_model_object("model_sampling")
    sched = [float(v) for v in rec["runs"][-1]["sample_sigmas"]]
    split = sched[sched.index(last_s["sigma"]) + 1]  # the structure stage ends at the next sigma
    assert mc.noise_to_signal(ms_t, first_t["sigma"]) == pytest.approx(mc.noise_to_signal(ms_s, split), rel=1e-6)
    # t_struct 500 on the structure's own schedule, whatever its kind (the texture model's own timestep at the same
    # noise level is another number: SDXL's t at sigma 1 is not Flux's 500)
    assert all(c["timestep"] >= 499.9 for c in calls if c["expert"] == 0) and last_s["sigma"] > split
    if {fam_s, fam_t} & {"flux", "sd3"}:  # a flow sigma and an eps sigma: sigma_eps = sigma_flow / (1 - sigma_flow)
        flow, eps = (split, first_t["sigma"]) if fam_s in ("flux", "sd3") else (first_t["sigma"], split)
        assert eps == pytest.approx(flow / (1 - flow), rel=1e-6)


def test_same_latent_space_other_schedule_needs_no_vae(run_graph, mc):
    """PixArt-Σ → SDXL: one latent space, two noise schedules: handed over at the equivalent sigma without a VAE
    (the leftover latent unchanged), and each model samples on its own schedule."""
    r = run_graph(_st_graph("pixart", 320, "sdxl", 320, vaes=False), want=["30"])["values"]["30"]
    assert r[0]["samples"].shape == (1, 4, 40, 40) and torch.isfinite(r[0]["samples"]).all()
    err = load_tool("headless").WorkflowError
    with pytest.raises(err, match="structure_vae/texture_vae: this handoff \\(latent family Flux → SDXL\\)"):
        run_graph(_st_graph("flux", 64, "sdxl", 64, vaes=False))


@pytest.mark.parametrize("fam_a,fam_b", [("flux", "sdxl"), ("sd3", "sd15"), ("pixart", "sdxl"), ("sdxl", "flux")])
def test_coop_guider_across_families(tiny, nc, fam_a, fam_b):
    import comfy.samplers
    ma, ca, va = tiny.build_family(fam_a, 0)
    mb, cb, vb = tiny.build_family(fam_b, 5)
    enc = lambda c, t: c.encode_from_tokens_scheduled(c.tokenize(t))  # noqa: E731
    A = (ma, va, enc(ca, "a red circle"), enc(ca, ""))
    B = (mb, vb, enc(cb, "a blue square"), enc(cb, ""))
    ch = ma.model.latent_format.latent_channels
    side = 40 if "pixart" in (fam_a, fam_b) else 8
    lat = {"samples": torch.zeros(1, ch, side, side)}

    def run(d, k=1):
        g = nc.make_coop_guider(A[0], A[1], A[2], A[3], 2.0, B[0], B[1], B[2], B[3], 2.0, d, k, 0.0, 1.0)
        return nc._run_guider(g, A[0], lat, 11, 4, "euler", "simple", 1.0)["samples"], g.stats
    alone, s1 = run(1.0)
    assert s1 == {"bridges": 0, "reused": 0, "a_only": 0}
    cfg = comfy.samplers.CFGGuider(ma)
    cfg.set_conds(A[2], A[3])
    cfg.set_cfg(2.0)
    assert torch.equal(alone, nc._run_guider(cfg, ma, lat, 11, 4, "euler", "simple", 1.0)["samples"])
    fused, s = run(0.5, 2)
    assert s["bridges"] == 2 and s["reused"] == 2
    assert fused.shape == alone.shape and torch.isfinite(fused).all() and (fused - alone).abs().max() > 1e-4


def test_resolution_bridge_sampler_flux_to_sdxl(run_graph, mc):
    p = {}
    _model(p, "1", "flux", 0)
    _model(p, "2", "sdxl", 5)
    p["4"] = _empty("flux", 64)
    p["20"] = {"class_type": "AtelierResolutionBridgeSampler", "inputs": {
        "model_low": ["1", 0], "vae_low": ["1", 2], "positive_low": ["1p", 0], "negative_low": ["1n", 0],
        "model_high": ["2", 0], "vae_high": ["2", 2], "positive_high": ["2p", 0], "negative_high": ["2n", 0],
        "latent_image": ["4", 0], "seed": 1, "steps": 6, "sampler_name": "euler", "scheduler": "simple",
        "cfg_low": 1.0, "cfg_high": 5.0, "switch_at": 0.5, "scale": 2.0, "resize_method": "bicubic"}}
    _out(p, "20", ["2", 2])
    r = run_graph(p, want=["1", "2", "20"])["values"]
    out, bridged = r["20"]
    assert out["samples"].shape == bridged["samples"].shape == (1, 4, 16, 16)
    assert torch.isfinite(out["samples"]).all()
    # the bridged latent (SDXL leftover form x0 + sigma·n) carries fresh white noise at the equivalent level
    ms_f = r["1"][0].get_model_object("model_sampling")
    import comfy.samplers
    s_f = float(comfy.samplers.calculate_sigmas(ms_f, "simple", 6)[3])
    s_x = s_f / (1 - s_f)
    z = r["2"][0].model.process_latent_in(bridged["samples"])
    assert 0.9 * s_x < float(z.std()) < 2.0 * s_x + 1.0


# ------------------------------------------------------------------ 3. noise-aware upscale on 16-channel latents

def _flux_leftover(upscaler, end_at=2, steps=8, custom=False):
    p = {}
    _model(p, "1", "flux", 0)
    p["4"] = _empty("flux", 64)
    p["g"] = {"class_type": "FluxGuidance", "inputs": {"conditioning": ["1p", 0], "guidance": 3.5}}
    common = {"model": ["1", 0], "noise_seed": 4, "steps": steps, "cfg": 1.0, "sampler_name": "euler",
              "scheduler": "simple", "positive": ["g", 0], "negative": ["1n", 0]}
    if custom:  # Flux's SamplerCustomAdvanced path: BasicGuider, SplitSigmas, DisableNoise for the second half
        p["40s"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "simple", "steps": steps,
                                                               "denoise": 1.0}}
        p["40t"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["40s", 0], "step": end_at}}
        p["40g"] = {"class_type": "BasicGuider", "inputs": {"model": ["1", 0], "conditioning": ["g", 0]}}
        p["40n"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 4}}
        p["40d"] = {"class_type": "DisableNoise", "inputs": {}}
        p["40k"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
        p["40"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["40n", 0], "guider": ["40g", 0], "sampler": ["40k", 0], "sigmas": ["40t", 0],
            "latent_image": ["4", 0]}}
    else:
        p["40"] = {"class_type": "KSamplerAdvanced", "inputs": {
            **common, "add_noise": "enable", "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": end_at,
            "return_with_leftover_noise": "enable"}}
    if upscaler == "atelier":
        p["41"] = {"class_type": "AtelierNoiseAwareLatentUpscale", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "positive": ["g", 0], "negative": ["1n", 0], "samples": ["40", 0],
            "cfg": 1.0, "steps": steps, "sampler_name": "euler", "scheduler": "simple", "end_at_step": end_at,
            "scale": 2.0, "resize_method": "bicubic", "seed": 8}}
        if custom:
            p["41"]["inputs"]["sigmas"] = ["40t", 1]
    else:
        p["41"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["40", 0], "upscale_method": "bilinear",
                                                               "scale_by": 2.0}}
    if custom:
        p["42"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
            "noise": ["40d", 0], "guider": ["40g", 0], "sampler": ["40k", 0], "sigmas": ["40t", 1],
            "latent_image": ["41", 0]}}
    else:
        p["42"] = {"class_type": "KSamplerAdvanced", "inputs": {
            **common, "add_noise": "disable", "latent_image": ["41", 0], "start_at_step": end_at,
            "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    _out(p, "42", ["1", 2])
    return p


@pytest.mark.parametrize("custom", [False, True], ids=["ksampler_advanced", "sampler_custom_advanced"])
def test_noise_aware_upscale_keeps_16_channel_noise_white(run_graph, mc, custom):
    ours = run_graph(_flux_leftover("atelier", custom=custom), want=["1", "41", "42"])["values"]
    core = run_graph(_flux_leftover("core", custom=custom), want=["41"])["values"]
    up, up_core = ours["41"][0]["samples"], core["41"][0]["samples"]
    assert up.shape == up_core.shape == (1, 16, 16, 16)
    out = ours["42"][0]["samples"]
    assert out.shape == (1, 16, 16, 16) and torch.isfinite(out).all()
    ac_ours, ac_core = mc.spatial_autocorrelation(up), mc.spatial_autocorrelation(up_core)
    assert ac_core > 0.5 and abs(ac_ours) < 0.15, (ac_ours, ac_core)
    # re-noised at the leftover level: ComfyUI's flow leftover form is x0 + sigma/(1 - sigma)·noise
    import comfy.samplers
    model = ours["1"][0]
    s = float(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "simple", 8)[2])
    r = s / (1 - s)
    std = float(model.model.process_latent_in(up).std())
    assert 0.9 * r < std < 1.6 * r


def test_noise_aware_upscale_sigmas_input_equals_the_steps_path(run_graph):
    a = _samples(run_graph, _flux_leftover("atelier", custom=True), "41")
    p = _flux_leftover("atelier", custom=True)
    del p["41"]["inputs"]["sigmas"]  # the level from steps / scheduler / end_at_step instead
    assert torch.equal(_samples(run_graph, p, "41"), a)
    p = _flux_leftover("atelier", custom=True)
    p["41"]["inputs"]["end_at_step"] = 5  # ignored: the connected sigmas say where the latent is
    assert torch.equal(_samples(run_graph, p, "41"), a)


# ------------------------------------------------------------------ the VAE family check

def _full_kl_vae(channels):
    """A full AutoencoderKL VAE as ComfyUI builds it from a file (structure from the state dict's shapes)."""
    import comfy.sd
    sd = {"decoder.conv_in.weight": torch.zeros(512, channels, 3, 3),
          "encoder.down.2.downsample.conv.weight": torch.zeros(512, 512, 3, 3)}
    return comfy.sd.VAE(sd=sd)


def test_vae_check_knows_full_16_channel_vaes_by_structure(tiny, glue):
    kl16, kl4 = _full_kl_vae(16), _full_kl_vae(4)
    flux, sd3, sdxl = (tiny.build_model(f, 0) for f in ("flux", "sd3", "sdxl"))
    assert glue.vae_families(kl16) == ("sd3", "flux") and glue.vae_families(kl4) == ("sd15", "sdxl", "pixart")
    glue.check_vae(flux, kl16)
    glue.check_vae(sd3, kl16)
    with pytest.raises(glue.AtelierError, match="vae: this VAE makes 16-channel latents.*SD3/Flux"):
        glue.check_vae(sdxl, kl16)
    with pytest.raises(glue.AtelierError, match="vae: this VAE makes 4-channel latents.*SD1.5/SDXL/PixArt"):
        glue.check_vae(flux, kl4)
    assert glue.vae_families(tiny.build_vae("flux", 0)) == ("flux",)  # TAEF1-type: by its recorded scale


def test_wrong_vae_in_a_cross_family_handoff_names_the_input(run_graph):
    err = load_tool("headless").WorkflowError
    p = _st_graph("flux", 64, "sdxl", 64)
    p["30"]["inputs"]["texture_vae"] = ["1", 2]
    with pytest.raises(err, match="texture_vae: this VAE makes 16-channel latents \\(Flux\\) but texture_model \\(SDXL\\)"):
        run_graph(p)
    p = _st_graph("sd3", 64, "sd15", 64)
    p["30"]["inputs"]["structure_vae"] = ["x", 2]
    p["x"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "flux", "seed": 0}}
    with pytest.raises(err, match="structure_vae: this is a Flux VAE but structure_model is SD3"):
        run_graph(p)
