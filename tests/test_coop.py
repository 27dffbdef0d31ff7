"""Coop bridge (issue 7) in real ComfyUI on the tiny sd15/sdxl families."""
from __future__ import annotations

import logging

import pytest
import torch
from atelier_testlib import txt2img_prompt

LOG = logging.getLogger("test_coop")


# mc (models/coop.py), nc (nodes/coop.py), one_thread: tests/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


def _ms(kind: str):
    import comfy.model_sampling as ms
    if kind == "eps":
        cls = type("MS", (ms.ModelSamplingDiscrete, ms.EPS), {})
    elif kind == "v":
        cls = type("MS", (ms.ModelSamplingDiscrete, ms.V_PREDICTION), {})
    else:
        cls = type("MS", (ms.ModelSamplingDiscreteFlow, ms.CONST), {})
    return cls(None)


# ------------------------------------------------------------------------ conversions

@pytest.mark.parametrize("kind", ["eps", "v", "flow"])
def test_conversions_round_trip(comfy, mc, kind):
    ms = _ms(kind)
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    eps = torch.randn(2, 4, 8, 8, generator=g, dtype=torch.float64)
    sigmas = [0.05, 0.5, 0.97] if kind == "flow" else [0.03, 1.0, 14.6]
    for sigma in sigmas:
        z = mc.zt_from_x0(ms, sigma, x0, eps)
        out = mc.output_from_x0(ms, sigma, z, x0)                      # what the network would output
        x0_back = ms.calculate_denoised(torch.tensor(sigma, dtype=torch.float64), out, z)  # ComfyUI's own map
        assert torch.allclose(x0_back, x0, rtol=0, atol=1e-9 * max(1.0, sigma))
        eps_back = mc.eps_from_x0(ms, sigma, z, x0_back)
        assert torch.allclose(eps_back, eps, atol=1e-8)
        z_back = mc.zt_from_x0(ms, sigma, x0_back, eps_back)
        assert torch.allclose(z_back, z, rtol=0, atol=1e-9 * max(1.0, sigma))
        # float32 too (what samplers run in): round trip to float precision
        z32 = z.float()
        x0_32 = mc.x0_from_output(ms, sigma, z32, mc.output_from_x0(ms, sigma, z32, x0.float()))
        z32_back = mc.zt_from_x0(ms, sigma, x0_32, mc.eps_from_x0(ms, sigma, z32, x0_32))
        assert (z32_back - z32).abs().max() <= 1e-5 * max(1.0, sigma) * z32.abs().max()
        if kind == "eps":
            assert torch.allclose(out, eps, atol=1e-9)
        if kind == "v":  # ComfyUI's k-diffusion convention is the DDPM v-prediction on z = x/√(1+σ²)
            ab = 1.0 / (1.0 + sigma ** 2)
            z_vp = z / (1 + sigma ** 2) ** 0.5
            v = ab ** 0.5 * eps - (1 - ab) ** 0.5 * x0
            assert torch.allclose(out, v, atol=1e-9)
            assert torch.allclose(mc.vp_x0_from_v(z_vp, v, ab), x0, atol=1e-9)


def test_equivalent_sigma_between_parametrisations(comfy, mc):
    eps, v, flow = _ms("eps"), _ms("v"), _ms("flow")
    for s in (0.1, 1.0, 7.5):
        assert mc.equivalent_sigma(eps, s, v) == s  # one VP schedule: the same sigma, exactly
        sf = mc.equivalent_sigma(eps, s, flow)
        assert 0 < sf < 1
        assert abs(mc.noise_to_signal(flow, sf) - s) < 1e-5 * s
        assert abs(mc.equivalent_sigma(flow, sf, eps) - s) < 1e-4 * s
    ac = torch.cumprod(1 - torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2, 0)
    assert torch.allclose(mc.vp_sigmas(ac).float(), eps.sigmas, rtol=1e-5)


def test_equivalent_sigma_above_the_targets_schedule_is_its_sigma_max(comfy, mc):
    """PixArt-Σ's DDPM schedule reaches sigma 157, SDXL's 14.6: a level above what the target was trained at maps
    to the target's sigma_max (a model called far above it draws garbage), as pure flow noise does; below it the
    same VP sigma stays exact."""
    from types import SimpleNamespace
    import comfy.model_sampling as ms
    import comfy.supported_models as sm
    cls = type("MS", (ms.ModelSamplingDiscrete, ms.V_PREDICTION), {})
    pixart = cls(SimpleNamespace(sampling_settings=sm.PixArtSigma.sampling_settings))  # ComfyUI's own row
    sdxl, flow = _ms("eps"), _ms("flow")
    assert float(pixart.sigma_max) > 150 and abs(float(sdxl.sigma_max) - 14.61) < 0.01
    for s in (157.0, 57.0, 23.5):
        assert mc.equivalent_sigma(pixart, s, sdxl) == float(sdxl.sigma_max)
    assert mc.equivalent_sigma(pixart, 3.0, sdxl) == 3.0
    assert mc.equivalent_sigma(sdxl, 14.0, pixart) == 14.0
    assert mc.equivalent_sigma(flow, 1.0, sdxl) == float(sdxl.sigma_max)
    assert 0 < mc.equivalent_sigma(pixart, 157.0, flow) < 1


# ------------------------------------------------------------------ graphs and nodes

def _coop_prompt(d=0.5, k=1, b_scale=1.0, a_family="sd15", b_family="sdxl", size=64, steps=4, b_vae=None,
                 start=0.0, end=1.0, seed=3):
    p = txt2img_prompt(family=a_family, size=size, steps=steps)
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": b_family, "seed": 5}}
    p["11"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a blue square", "clip": ["10", 1]}}
    p["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 1]}}
    p["20"] = {"class_type": "AtelierCoopSampler", "inputs": {
        "model_a": ["1", 0], "vae_a": ["1", 2], "positive_a": ["2", 0], "negative_a": ["3", 0], "cfg_a": 7.0,
        "model_b": ["10", 0], "vae_b": b_vae or ["10", 2], "positive_b": ["11", 0], "negative_b": ["12", 0],
        "cfg_b": 5.0, "fusion_d": d, "bridge_every": k, "start_percent": start, "end_percent": end,
        "b_scale": b_scale, "resize_method": "bicubic", "latent_image": ["4", 0], "seed": seed, "steps": steps,
        "sampler_name": "euler", "scheduler": "normal", "denoise": 1.0}}
    p["5"]["inputs"]["seed"] = seed
    p["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["1", 2]}}
    p["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    return p


def test_d1_is_bit_identical_to_model_a_alone(run_graph):
    r = run_graph(_coop_prompt(d=1.0), want=["5", "20"])
    core = r["values"]["5"][0]["samples"]
    coop_out = r["values"]["20"][0]["samples"]
    assert coop_out.shape == core.shape == (1, 4, 8, 8)
    assert torch.equal(coop_out, core)


def test_d1_guider_is_bit_identical_to_cfg_guider(run_graph):
    p = _coop_prompt(d=1.0)
    del p["20"], p["21"], p["22"]
    p["30"] = {"class_type": "AtelierCoopGuider", "inputs": {
        "model_a": ["1", 0], "vae_a": ["1", 2], "positive_a": ["2", 0], "negative_a": ["3", 0], "cfg_a": 7.0,
        "model_b": ["10", 0], "vae_b": ["10", 2], "positive_b": ["11", 0], "negative_b": ["12", 0], "cfg_b": 5.0,
        "fusion_d": 1.0, "bridge_every": 1, "start_percent": 0.0, "end_percent": 1.0, "b_scale": 1.0,
        "resize_method": "bicubic"}}
    p["31"] = {"class_type": "CFGGuider", "inputs": {"model": ["1", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 7.0}}
    p["32"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 9}}
    p["33"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["34"] = {"class_type": "BasicScheduler", "inputs": {"model": ["1", 0], "scheduler": "normal", "steps": 4,
                                                          "denoise": 1.0}}
    for nid, guider in (("35", "30"), ("36", "31")):
        p[nid] = {"class_type": "SamplerCustomAdvanced", "inputs": {"noise": ["32", 0], "guider": [guider, 0],
                                                                     "sampler": ["33", 0], "sigmas": ["34", 0],
                                                                     "latent_image": ["4", 0]}}
    for nid, src in (("37", "35"), ("38", "36")):
        p[nid] = {"class_type": "VAEDecode", "inputs": {"samples": [src, 0], "vae": ["1", 2]}}
        p["p" + nid] = {"class_type": "PreviewImage", "inputs": {"images": [nid, 0]}}
    r = run_graph(p, want=["35", "36"])
    assert torch.equal(r["values"]["35"][0]["samples"], r["values"]["36"][0]["samples"])


def test_fusion_runs_b_and_changes_the_result(run_graph):
    r = run_graph(_coop_prompt(d=0.5), want=["5", "20"])
    core, fused = r["values"]["5"][0]["samples"], r["values"]["20"][0]["samples"]
    assert torch.isfinite(fused).all()
    assert (fused - core).abs().max() > 1e-3


def _tiny_pair(tiny, fam_a="sd15", fam_b="sdxl"):
    ma, ca, va = tiny.build_family(fam_a, 0)
    mb, cb, vb = tiny.build_family(fam_b, 5)
    enc = lambda c, t: c.encode_from_tokens_scheduled(c.tokenize(t))
    return (ma, va, enc(ca, "a red circle"), enc(ca, "")), (mb, vb, enc(cb, "a blue square"), enc(cb, ""))


def _guided(nc, A, B, d, k, b_scale=1.0, size=8, steps=6, start=0.0, end=1.0):
    g = nc.make_coop_guider(A[0], A[1], A[2], A[3], 7.0, B[0], B[1], B[2], B[3], 5.0, d, k, start, end, b_scale)
    lat = {"samples": torch.zeros(1, 4, size, size)}
    out = nc._run_guider(g, A[0], lat, 11, steps, "euler", "normal", 1.0)
    return out["samples"], g.stats


def test_bridge_every_k_window_and_d0(tiny, nc):
    A, B = _tiny_pair(tiny)
    out1, s_1 = _guided(nc, A, B, 1.0, 1, steps=4)
    assert s_1 == {"bridges": 0, "reused": 0, "a_only": 0}          # d = 1: B never runs
    out0, s_0 = _guided(nc, A, B, 0.0, 1, steps=4)
    assert s_0 == {"bridges": 4, "reused": 0, "a_only": 0}
    assert torch.isfinite(out0).all() and (out0 - out1).abs().mean() > 1e-3   # d = 0 follows B
    _, s3 = _guided(nc, A, B, 0.5, 3, steps=4)
    assert s3 == {"bridges": 2, "reused": 2, "a_only": 0}            # steps 0 and 3 bridge
    _, sw = _guided(nc, A, B, 0.5, 1, steps=4, start=0.0, end=0.5)
    assert sw["bridges"] == 2 and sw["a_only"] == 2 and sw["reused"] == 0
    # B at twice A's resolution (SD1.5 64 px with SDXL at 128 px): the bridge resizes through pixels
    out, s2 = _guided(nc, A, B, 0.3, 2, b_scale=2.0, steps=4)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all() and s2["bridges"] == 2


# ------------------------------------------------------------ the resolution bridge

def _codecs(nc, model, vae):
    c = nc._Codec(model, vae)
    return c.decode, c.encode


def test_resolution_bridge_noise_is_white(tiny, nc, mc):
    low, lv = tiny.build_model("sd15", 0), tiny.build_vae("sd15", 0)
    high, hv = tiny.build_model("sdxl", 5), tiny.build_vae("sdxl", 5)
    ms_l, ms_h = low.model.model_sampling, high.model.model_sampling
    dec_l, _ = _codecs(nc, low, lv)
    _, enc_h = _codecs(nc, high, hv)
    g = torch.Generator().manual_seed(1)
    yy, xx = torch.meshgrid(torch.linspace(0, 1, 128), torch.linspace(0, 1, 128), indexing="ij")
    img = torch.stack([xx, yy, 0.5 * (xx + yy)]).unsqueeze(0)              # a smooth picture
    x0_low = _codecs(nc, low, lv)[1](img)                                     # (1, 4, 16, 16)
    sigma = float(ms_l.sigmas[500])
    eps = torch.randn(x0_low.shape, generator=g)
    z_low = mc.zt_from_x0(ms_l, sigma, x0_low, eps)
    z_high, z0_high, _ = mc.resolution_bridge(x0_low, dec_l, enc_h, 2.0, ms_h, sigma, seed=3)
    assert z_high.shape == (1, 4, 32, 32)
    a, s = mc.noise_coeffs(ms_h, sigma)
    ac_bridge = mc.spatial_autocorrelation((z_high - a * z0_high) / s)
    up = torch.nn.functional.interpolate(z_low, scale_factor=2, mode="bilinear", align_corners=False)
    up_x0 = torch.nn.functional.interpolate(x0_low, scale_factor=2, mode="bilinear", align_corners=False)
    ac_bilinear = mc.spatial_autocorrelation(up - up_x0)
    ac_bilinear_whole = mc.spatial_autocorrelation(up)
    ac_bridge_whole = mc.spatial_autocorrelation(z_high)
    LOG.warning("resolution bridge noise autocorrelation %.4f (whole latent %.4f) vs bilinear z_t upsampling "
                "%.4f (whole latent %.4f), sigma %.3f", ac_bridge, ac_bridge_whole, ac_bilinear, ac_bilinear_whole,
                sigma)
    assert abs(ac_bridge) < 0.06
    assert ac_bilinear > 0.4
    assert ac_bilinear_whole > 0.4 > abs(ac_bridge_whole) + 0.2
    assert abs(mc.spatial_autocorrelation(eps)) < 0.1


def test_resolution_bridge_sampler_node(run_graph, nc, mc):
    """The node is: the core KSamplerAdvanced to the switch (leftover noise), the models/ resolution bridge of
    its clean estimate, and the core SamplerCustom on the high model's own schedule from there — exactly."""
    p = txt2img_prompt(family="sd15", size=64, steps=6)
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sdxl", "seed": 5}}
    p["11"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["10", 1]}}
    p["12"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["10", 1]}}
    p["20"] = {"class_type": "AtelierResolutionBridgeSampler", "inputs": {
        "model_low": ["1", 0], "vae_low": ["1", 2], "positive_low": ["2", 0], "negative_low": ["3", 0],
        "model_high": ["10", 0], "vae_high": ["10", 2], "positive_high": ["11", 0], "negative_high": ["12", 0],
        "latent_image": ["4", 0], "seed": 1, "steps": 6, "sampler_name": "euler", "scheduler": "normal",
        "cfg_low": 7.0, "cfg_high": 5.0, "switch_at": 0.5, "scale": 2.0, "resize_method": "bicubic"}}
    p["21"] = {"class_type": "VAEDecode", "inputs": {"samples": ["20", 0], "vae": ["10", 2]}}
    p["22"] = {"class_type": "PreviewImage", "inputs": {"images": ["21", 0]}}
    # the same thing from core nodes: stage 1 to step 3 of 6 with leftover noise ...
    p["30"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["1", 0], "add_noise": "enable", "noise_seed": 1, "steps": 6, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "start_at_step": 0, "end_at_step": 3, "return_with_leftover_noise": "enable"}}
    # ... and stage 2 from the node's bridged latent on the high model's schedule from step 3, no new noise
    p["31"] = {"class_type": "BasicScheduler", "inputs": {"model": ["10", 0], "scheduler": "normal", "steps": 6,
                                                          "denoise": 1.0}}
    p["32"] = {"class_type": "SplitSigmas", "inputs": {"sigmas": ["31", 0], "step": 3}}
    p["33"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["34"] = {"class_type": "SamplerCustom", "inputs": {
        "model": ["10", 0], "add_noise": False, "noise_seed": 0, "cfg": 5.0, "positive": ["11", 0],
        "negative": ["12", 0], "sampler": ["33", 0], "sigmas": ["32", 1], "latent_image": ["20", 1]}}
    for nid, src, vae in (("35", "30", "1"), ("36", "34", "10")):  # outputs, so the executor runs them
        p[nid] = {"class_type": "VAEDecode", "inputs": {"samples": [src, 0], "vae": [vae, 2]}}
        p["p" + nid] = {"class_type": "PreviewImage", "inputs": {"images": [nid, 0]}}
    r = run_graph(p, want=["1", "2", "3", "10", "20", "21", "30", "34"])["values"]
    out, bridged = r["20"]
    assert out["samples"].shape == bridged["samples"].shape == (1, 4, 16, 16)
    assert torch.isfinite(out["samples"]).all()
    assert r["21"][0].shape == (1, 128, 128, 3)
    assert torch.equal(out["samples"], r["34"][0]["samples"])
    # the bridge is models/coop.resolution_bridge of the low model's clean estimate at the switch
    import comfy.sample
    import comfy.samplers
    low, vae_low = r["1"][0], r["1"][2]
    high, vae_high = r["10"][0], r["10"][2]
    sigma = float(nc._schedule(low, 6, "euler", "normal")[3])
    z_low = r["30"][0]["samples"]
    x0 = comfy.sample.sample_custom(low, torch.zeros_like(z_low), 7.0, comfy.samplers.sampler_object("euler"),
                                    torch.tensor([sigma, 0.0]), r["2"][0], r["3"][0], z_low, disable_pbar=True,
                                    seed=2)
    ms_h = high.model.model_sampling
    with torch.no_grad():
        z_t, z0, n = mc.resolution_bridge(
            x0, lambda z: vae_low.decode(z).movedim(-1, 1),
            lambda px: high.model.process_latent_in(vae_high.encode(px.movedim(1, -1)).float()), 2.0, ms_h, sigma,
            seed=2)
        want = high.model.process_latent_out(ms_h.inverse_noise_scaling(torch.tensor(sigma), z_t))
    assert torch.equal(bridged["samples"], want)
    # fresh white noise at the switch level, not the low latent's noise upscaled
    assert abs(mc.spatial_autocorrelation(n)) < 0.1


def _leftover_prompt(upscaler: str, end_at=2, steps=8):
    p = txt2img_prompt(family="sd15", size=64, steps=steps)
    del p["5"], p["6"], p["7"]
    ksa = {"model": ["1", 0], "add_noise": "enable", "noise_seed": 4, "steps": steps, "cfg": 7.0,
           "sampler_name": "euler", "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0],
           "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": end_at, "return_with_leftover_noise": "enable"}
    p["40"] = {"class_type": "KSamplerAdvanced", "inputs": ksa}
    if upscaler == "atelier":
        p["41"] = {"class_type": "AtelierNoiseAwareLatentUpscale", "inputs": {
            "model": ["1", 0], "vae": ["1", 2], "positive": ["2", 0], "negative": ["3", 0], "samples": ["40", 0],
            "cfg": 7.0, "steps": steps, "sampler_name": "euler", "scheduler": "normal", "end_at_step": end_at,
            "scale": 2.0, "resize_method": "bicubic", "seed": 8}}
    else:
        p["41"] = {"class_type": "LatentUpscaleBy", "inputs": {"samples": ["40", 0], "upscale_method": "bilinear",
                                                               "scale_by": 2.0}}
    p["42"] = {"class_type": "KSamplerAdvanced", "inputs": dict(ksa, add_noise="disable", latent_image=["41", 0],
                                                                start_at_step=end_at, end_at_step=10000,
                                                                return_with_leftover_noise="disable")}
    p["43"] = {"class_type": "VAEDecode", "inputs": {"samples": ["42", 0], "vae": ["1", 2]}}
    p["44"] = {"class_type": "PreviewImage", "inputs": {"images": ["43", 0]}}
    return p


def test_noise_aware_upscale_after_ksampler_advanced(run_graph, mc):
    ours = run_graph(_leftover_prompt("atelier"), want=["1", "40", "41", "42"])["values"]
    core = run_graph(_leftover_prompt("core"), want=["41"])["values"]
    up, up_core = ours["41"][0]["samples"], core["41"][0]["samples"]
    assert up.shape == up_core.shape == (1, 4, 16, 16)
    assert ours["42"][0]["samples"].shape == (1, 4, 16, 16) and torch.isfinite(ours["42"][0]["samples"]).all()
    # at step 2 of 8 the latent is mostly noise: its autocorrelation is the noise's
    ac_ours, ac_core = mc.spatial_autocorrelation(up), mc.spatial_autocorrelation(up_core)
    LOG.warning("leftover latent at step 2/8 upscaled x2: autocorrelation %.4f (noise-aware) vs %.4f (LatentUpscaleBy "
                "bilinear)", ac_ours, ac_core)
    assert ac_core > 0.4 and abs(ac_ours) < 0.2
    # re-noised at the leftover level: internal std = sqrt(sigma^2 + var(x0)) >= sigma
    import comfy.samplers
    model = ours["1"][0]
    sigma = float(comfy.samplers.calculate_sigmas(model.get_model_object("model_sampling"), "normal", 8)[2])
    std_int = float(model.model.process_latent_in(up).std())
    assert 0.9 * sigma < std_int < 2.0 * sigma


def test_bridge_latent_public_function(tiny, nc):
    low, clip, lv = tiny.build_family("sd15", 0)
    high, _, hv = tiny.build_family("sdxl", 5)
    g = torch.Generator().manual_seed(0)
    lat = {"samples": torch.randn(1, 4, 8, 8, generator=g) * 3}
    den = torch.randn(1, 4, 8, 8, generator=g)
    out, s_to = nc.bridge_latent(lat, 2.5, low, lv, high, hv, scale=2.0, seed=1, denoised=den)
    assert out["samples"].shape == (1, 4, 16, 16) and s_to == 2.5
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    out2, _ = nc.bridge_latent(lat, 2.5, low, lv, high, hv, scale=1.5, seed=1, positive=pos, negative=pos, cfg=1.0)
    assert out2["samples"].shape == (1, 4, 12, 12)


# ---------------------------------------------------------------------------- errors

def test_clear_errors(tiny, nc, mc):
    A, B = _tiny_pair(tiny)
    with pytest.raises(ValueError, match="vae_a: this is a SDXL VAE but model_a is SD1.5"):
        nc.make_coop_guider(A[0], B[1], A[2], A[3], 7.0, B[0], B[1], B[2], B[3], 5.0, 0.5, 1, 0.0, 1.0)
    with pytest.raises(ValueError, match="vae_b"):
        nc.make_coop_guider(A[0], A[1], A[2], A[3], 7.0, B[0], A[1], B[2], B[3], 5.0, 0.5, 1, 0.0, 1.0)
    for bad in (1.5, -0.1, float("nan")):
        with pytest.raises(ValueError, match="fusion_d"):
            nc.make_coop_guider(A[0], A[1], A[2], A[3], 7.0, B[0], B[1], B[2], B[3], 5.0, bad, 1, 0.0, 1.0)
    with pytest.raises(ValueError, match="model_b: shares its weights"):
        nc.make_coop_guider(A[0], A[1], A[2], A[3], 7.0, A[0].clone(), A[1], A[2], A[3], 5.0, 0.5, 1, 0.0, 1.0)
    with pytest.raises(ValueError, match="scale: 1.3 times a 8x8 latent.*nearest that works: 1.25"):
        mc.target_size(8, 8, 1.3)
    lat = {"samples": torch.zeros(1, 4, 8, 8)}
    with pytest.raises(ValueError, match="scale"):
        nc.bridge_latent(lat, 1.0, A[0], A[1], B[0], B[1], scale=1.3, denoised=lat["samples"])
    with pytest.raises(ValueError, match="vae_to"):
        nc.bridge_latent(lat, 1.0, A[0], A[1], B[0], A[1], scale=2.0, denoised=lat["samples"])
    with pytest.raises(ValueError, match="b_scale"):
        _guided(nc, A, B, 0.5, 1, b_scale=1.3)


def test_errors_reach_the_ui(comfy, run_graph):
    p = _coop_prompt(d=0.5, b_vae=["1", 2])      # SD1.5's VAE given as model B's (SDXL) VAE
    with pytest.raises(Exception, match="vae_b: this is a SD1.5 VAE but model_b is SDXL"):
        run_graph(p)
    p = _coop_prompt(d=1.5)                      # the validator rejects it before anything runs
    with pytest.raises(Exception, match="fusion_d"):
        run_graph(p)
