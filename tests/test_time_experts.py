"""Time experts in real ComfyUI (tiny sd15, two experts = two seeds) and the pure routing math."""
from __future__ import annotations

import importlib
import math

import pytest
import torch

from atelier_testlib import load_models, load_tool, txt2img_prompt


# ------------------------------------------------------------------ pure part (no ComfyUI)
def _pure():
    return load_models("time_experts")


def _sd_table():
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    ac = torch.cumprod(1 - betas, 0)
    return ((1 - ac) / ac) ** 0.5


def test_pure_conversions_and_boundaries():
    te = _pure()
    tab = _sd_table()
    assert te.timestep_to_sigma(0, tab) == pytest.approx(float(tab[0]))
    assert te.timestep_to_sigma(999, tab) == pytest.approx(float(tab[-1]))
    for t in (0.0, 1.5, 250.0, 500.0, 731.25, 999.0):
        assert te.sigma_to_timestep(te.timestep_to_sigma(t, tab), tab) == pytest.approx(t, abs=1e-6)
    th = te.parse_boundaries("750, 500, 250", "timestep", 4, tab)
    assert th == sorted(th, reverse=True) and len(th) == 3
    assert te.parse_boundaries("250,500,750", "timestep", 4, tab) == th  # either sorted direction
    assert te.parse_boundaries("1000", "timestep", 2, tab) == [math.inf]
    assert te.parse_boundaries("0", "timestep", 2, tab) == [0.0]
    auto = te.parse_boundaries("", "auto", 4, tab)
    logs = [math.log(float(tab[-1]))] + [math.log(s) for s in auto] + [math.log(float(tab[0]))]
    steps = [a - b for a, b in zip(logs, logs[1:])]
    assert max(steps) - min(steps) < 1e-9  # equal log-SNR parts
    assert te.expert_for_sigma(14.0, th) == 0 and te.expert_for_sigma(0.01, th) == 3
    sig = torch.tensor([10.0, 5.0, 2.0, 1.0, 0.5, 0.0])
    assert te.split_schedule(sig, [1.5]) == [(0, 0, 3), (1, 3, 5)]
    for text, mode, n, msg in [("1200", "timestep", 2, "outside 0..1000"), ("-3", "timestep", 2, "outside"),
                               ("500, 200, 700", "timestep", 4, "not sorted"), ("500, 500", "timestep", 3, "not sorted"),
                               ("500", "timestep", 3, "give exactly 2"), ("abc", "sigma", 2, "not a number"),
                               ("1", "magic", 2, "mode")]:
        with pytest.raises(ValueError, match=msg):
            te.parse_boundaries(text, mode, n, tab)


def test_pure_record_and_drawing():
    te = _pure()
    rec = te.new_record(["a", "b"])
    te.start_run(rec, [3.0, 1.0, 0.0])
    te.record_call(rec, 3.0, 900.0, 0)
    te.record_call(rec, 1.0, 400.0, 1, regions=[{"expert": 0, "label": "cat", "fraction": 0.5}])
    img = te.draw_routes(rec, height=40, col_width=5)
    assert img.shape == (1, 40, 10, 3) and 0 <= float(img.min()) and float(img.max()) <= 1
    assert torch.allclose(img[0, 2, 1], torch.tensor(te.PALETTE[0]))
    assert torch.allclose(img[0, 2, 7], torch.tensor(te.PALETTE[1]))
    # router fit to boundaries reproduces them away from the edge
    gate = te.router_for_boundaries([500.0])
    assert te.router_choose(gate, 900) == 0 and te.router_choose(gate, 100) == 1


# ------------------------------------------------------------------ ComfyUI helpers
# The tiny families' seeded init leaves the GroupNorm scales named "<n>.weight" (ResBlock in/out
# layers, the final "out.0") at zero, so every tiny sd15 UNet predicts eps = 0 and two seeds sample
# identically (reported to the foundation). These tests repair that with a core "diff" patch: a
# safetensors file applied by LoraLoaderModelOnly in graphs, or ModelPatcher.add_patches in Python.
FIX = "atelier_tiny_norm_fix.safetensors"
LORA = "atelier_test_lora.safetensors"


def _zero_norm_keys(tiny):
    m = tiny.build_model("sd15", 0).model
    return [f"diffusion_model.{n}" for n, mod in m.diffusion_model.named_modules()
            if isinstance(mod, torch.nn.GroupNorm) and mod.weight is not None and not bool(mod.weight.any())]


@pytest.fixture(scope="module")
def loras(tiny, tmp_path_factory):
    from safetensors.torch import save_file
    import folder_paths
    d = tmp_path_factory.mktemp("te_loras")
    keys = _zero_norm_keys(tiny)
    sd = tiny.build_model("sd15", 1).model.state_dict()
    save_file({k + ".diff": torch.ones_like(sd[k + ".weight"]) for k in keys}, str(d / FIX))
    g = torch.Generator().manual_seed(7)
    out = {}
    for layer in ("diffusion_model.input_blocks.1.1.transformer_blocks.0.attn1.to_q",
                  "diffusion_model.middle_block.1.transformer_blocks.0.ff.net.2"):
        w = sd[layer + ".weight"]
        out[layer + ".lora_down.weight"] = torch.randn(4, w.shape[1], generator=g) * 0.5
        out[layer + ".lora_up.weight"] = torch.randn(w.shape[0], 4, generator=g) * 0.5
    save_file(out, str(d / LORA))
    folder_paths.add_model_folder_path("loras", str(d))
    return d


def fixed(tiny, seed):
    """A tiny sd15 ModelPatcher with working norms (see FIX)."""
    m = tiny.build_model("sd15", seed)
    sd = m.model.state_dict()
    m.add_patches({k + ".weight": ("diff", (torch.ones_like(sd[k + ".weight"]),)) for k in _zero_norm_keys(tiny)})
    return m


@pytest.fixture(scope="module")
def tmod(pack, loras):
    return importlib.import_module(pack.__name__ + ".nodes.time_experts")


def _graph(boundaries="500", mode="timestep", steps=6, sampler="euler", scheduler="normal", denoise=1.0,
           model_2_seed=1, family_2="sd15"):
    p = txt2img_prompt("sd15", 0, 64, steps, sampler=sampler, scheduler=scheduler, denoise=denoise,
                       model_node=["20", 0])
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": family_2, "seed": model_2_seed}}
    _fix(p)
    p["20"] = {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["1f", 0], "model_2": ["10f", 0],
                                                              "mode": mode, "boundaries": boundaries}}
    p["21"] = {"class_type": "AtelierDrawRoutes", "inputs": {"routes": ["20", 1], "samples": ["5", 0],
                                                             "height": 32, "column_width": 4}}
    return p


def _fix(p):
    for n in ("1", "10"):
        p[n + "f"] = {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [n, 0], "lora_name": FIX,
                                                                       "strength_model": 1.0}}


def _close(x, y, rel=1e-5):
    """Same up to float rounding: the core chain hands the latent over through process_latent_out/in
    (x / 0.18215 * 0.18215), which changes the last bit, and later steps carry that along."""
    return float((x - y).abs().max()) <= rel * float(y.abs().max())


def _latent(run_graph, p, node="5"):
    return run_graph(p, want=[node])["values"][node][0]["samples"].clone()


def _alone(run_graph, seed_node, steps=6, **kw):
    p = _graph(steps=steps, **kw)
    p["5"]["inputs"]["model"] = [seed_node + "f", 0]
    del p["21"], p["20"]
    return _latent(run_graph, p)


def _routes(run_graph, p):
    r = run_graph(p, want=["20", "21"])
    return r["values"]["20"][1], r["values"]["21"][0]


def test_extremes_are_bit_identical_to_each_expert_alone(run_graph, tmod):
    a = _alone(run_graph, "1")
    b = _alone(run_graph, "10")
    assert not torch.equal(a, b)
    assert torch.equal(_latent(run_graph, _graph(boundaries="0")), a)
    assert torch.equal(_latent(run_graph, _graph(boundaries="1000")), b)
    assert torch.equal(_latent(run_graph, _graph(boundaries="1e9", mode="sigma")), b)


def _sigmas(tmod, model, steps, scheduler, denoise=1.0):
    import comfy.samplers
    return comfy.samplers.KSampler(model, steps=steps, device="cpu", sampler="euler", scheduler=scheduler,
                                   denoise=denoise).sigmas


def _chain(run_graph, split, steps=6, sampler="euler", model_1=("1f", 0), model_2=("10f", 0), extra=None):
    p = txt2img_prompt("sd15", 0, 64, steps, sampler=sampler)
    p["10"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 1}}
    _fix(p)
    common = {"positive": ["2", 0], "negative": ["3", 0], "noise_seed": 1, "steps": steps, "cfg": 7.0,
              "sampler_name": sampler, "scheduler": "normal", "end_at_step": 10000}
    p["5"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "model": list(model_1), "add_noise": "enable",
              "latent_image": ["4", 0], "start_at_step": 0, "end_at_step": split, "return_with_leftover_noise": "enable"}}
    p["8"] = {"class_type": "KSamplerAdvanced", "inputs": {**common, "model": list(model_2), "add_noise": "disable",
              "latent_image": ["5", 0], "start_at_step": split, "return_with_leftover_noise": "disable"}}
    p.update(extra or {})
    p["6"]["inputs"]["samples"] = ["8", 0]
    return _latent(run_graph, p, "8")


def test_boundary_on_a_step_equals_core_two_ksampler_chain(run_graph, tiny, tmod):
    sig = _sigmas(tmod, tiny.build_model("sd15", 0), 6, "normal")
    b = math.sqrt(float(sig[2]) * float(sig[3]))  # steps 0-2 start above b, steps 3-5 below
    routed = _latent(run_graph, _graph(boundaries=f"{b!r}", mode="sigma"))
    chain = _chain(run_graph, 3)
    assert _close(routed, chain), (routed - chain).abs().max()
    assert not _close(routed, _alone(run_graph, "1"), 1e-3)
    # The struct→texture sampler is that chain exactly.
    p = _graph()
    t_b = _pure().sigma_to_timestep(b, tiny.build_model("sd15", 0).get_model_object("model_sampling").sigmas)
    p["30"] = {"class_type": "AtelierStructTextureSampler", "inputs": {
        "structure_model": ["1f", 0], "structure_positive": ["2", 0], "structure_negative": ["3", 0],
        "texture_model": ["10f", 0], "latent_image": ["4", 0], "seed": 1, "steps": 6, "cfg": 7.0,
        "sampler_name": "euler", "scheduler": "normal", "t_struct": int(math.ceil(t_b)), "denoise": 1.0}}
    st = run_graph({**{k: v for k, v in p.items() if k in "1 1f 2 3 4 10 10f 30".split()},
                    "6": {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["1", 2]}},
                    "7": p["7"]}, want=["30"])["values"]["30"]
    assert torch.equal(st[0]["samples"], chain)
    calls = st[1]["runs"][-1]["calls"]
    assert [c["expert"] for c in calls] == [0, 0, 0, 1, 1, 1]


def test_switch_stays_at_the_same_sigma_across_steps_schedulers_and_denoise(run_graph, tiny, tmod):
    te = _pure()
    table = tiny.build_model("sd15", 0).get_model_object("model_sampling").sigmas
    s500 = te.timestep_to_sigma(500, table)
    seen = []
    for steps, sched, den in [(5, "normal", 1.0), (9, "karras", 1.0), (7, "exponential", 0.8)]:
        rec, img = _routes(run_graph, _graph(steps=steps, scheduler=sched, denoise=den))
        calls = rec["runs"][-1]["calls"]
        assert len(calls) == steps
        assert all(c["expert"] == (0 if c["sigma"] >= s500 else 1) for c in calls)
        assert {0, 1} == {c["expert"] for c in calls}
        assert img.shape == (1, 32, 4 * steps, 3)
        hi = min(c["sigma"] for c in calls if c["expert"] == 0)
        lo = max(c["sigma"] for c in calls if c["expert"] == 1)
        assert lo < s500 <= hi
        seen.append((lo, hi))
    # different schedules, one switch sigma: every bracket holds sigma(500)
    assert max(lo for lo, _ in seen) < s500 <= min(hi for _, hi in seen)


@pytest.mark.parametrize("shared_base", [False, True], ids=["two_checkpoints", "one_checkpoint_plus_lora"])
def test_lora_on_one_expert_does_not_leak(run_graph, tiny, tmod, shared_base):
    base_2 = "1f" if shared_base else "10f"
    lora_node = {"40": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [base_2, 0], "lora_name": LORA,
                                                                        "strength_model": 1.0}}}

    def routed(boundaries, mode="timestep"):
        p = _graph(boundaries=boundaries, mode=mode)
        p.update(lora_node)
        p["20"]["inputs"]["model_2"] = ["40", 0]
        return _latent(run_graph, p)

    def alone(node):
        p = _graph()
        p.update(lora_node)
        p["5"]["inputs"]["model"] = [node, 0]
        del p["20"], p["21"]
        return _latent(run_graph, p)

    a, b, b_lora = alone("1f"), alone(base_2), alone("40")
    assert not torch.equal(b, b_lora)  # the LoRA does something
    assert torch.equal(routed("0"), a)  # all steps on expert 1: no LoRA there
    assert torch.equal(routed("1000"), b_lora)
    sig = _sigmas(None, tiny.build_model("sd15", 0), 6, "normal")
    mid = routed(repr(math.sqrt(float(sig[2]) * float(sig[3]))), mode="sigma")
    chain = _chain(run_graph, 3, model_2=("40", 0), extra=lora_node)
    assert _close(mid, chain), (mid - chain).abs().max()
    assert not _close(mid, a, 1e-3) and not _close(mid, b_lora, 1e-3)
    assert torch.equal(alone("1f"), a)  # after the swap the base weights are clean again


def _expert_calls(record):
    return [c["expert"] for c in record["runs"][-1]["calls"]]


def test_other_wrappers_still_run_and_stay_with_their_model(tiny, tmod):
    import comfy.patcher_extension as pe
    import nodes
    _, clip, _ = tiny.build_family("sd15", 0)
    a, b = fixed(tiny, 0), fixed(tiny, 1)
    counts = {"on_b": 0, "routed": 0, "unet_fn": 0}

    def counter(name):
        def w(executor, *args, **kwargs):
            counts[name] += 1
            return executor(*args, **kwargs)
        return w

    b_wrapped = b.clone()
    b_wrapped.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.on_b", counter("on_b"))
    out = tmod.AtelierTimeExperts.execute(model_1=a, model_2=b_wrapped, mode="timestep", boundaries="500")
    routed, record = out.args[0], out.args[1]
    assert not a.get_wrappers(pe.WrappersMP.CALC_COND_BATCH, tmod.KEY)  # the input MODEL is untouched
    downstream = routed.clone()
    downstream.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.downstream", counter("routed"))

    def unet_fn(apply_model, args):
        counts["unet_fn"] += 1
        return apply_model(args["input"], args["timestep"], **args["c"])
    downstream.set_model_unet_function_wrapper(unet_fn)
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    nodes.common_ksampler(downstream, 1, 6, 7.0, "euler", "normal", pos, neg, latent)
    experts = _expert_calls(record)
    assert experts == [0, 0, 0, 1, 1, 1]
    assert counts["routed"] == 6 and counts["unet_fn"] == 6  # added after routing: every expert
    assert counts["on_b"] == experts.count(1)  # on expert 2 before routing: only its calls


def test_bad_input_gets_a_clear_error(comfy, run_graph, tmod):
    err = load_tool("headless").WorkflowError
    with pytest.raises(err, match="latent family.*Coop bridge"):
        run_graph(_graph(family_2="sdxl"))
    with pytest.raises(err, match="outside 0..1000"):
        run_graph(_graph(boundaries="1500"))
    p = _graph(boundaries="500, 800, 200")
    p["11"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 2}}
    p["12"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 3}}
    p["20"]["inputs"].update(model_3=["11", 0], model_4=["12", 0])
    with pytest.raises(err, match="not sorted"):
        run_graph(p)
    p["20"]["inputs"]["boundaries"] = "800, 500, 200"
    rec, _ = _routes(run_graph, p)
    assert sorted(set(_expert_calls(rec))) == [0, 1, 2, 3]
    with pytest.raises(err, match="give exactly 1"):
        run_graph(_graph(boundaries="700, 300"))


def test_works_in_ksampler_advanced_and_sampler_custom_advanced(run_graph, tmod):
    base = _graph()
    ks = _latent(run_graph, base)
    p = _graph()
    p["5"] = {"class_type": "KSamplerAdvanced", "inputs": {
        "model": ["20", 0], "add_noise": "enable", "noise_seed": 1, "steps": 6, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
        "start_at_step": 0, "end_at_step": 10000, "return_with_leftover_noise": "disable"}}
    assert torch.equal(_latent(run_graph, p), ks)
    assert _expert_calls(_routes(run_graph, p)[0]) == [0, 0, 0, 1, 1, 1]
    p = _graph()
    p["5"] = {"class_type": "SamplerCustomAdvanced", "inputs": {
        "noise": ["50", 0], "guider": ["51", 0], "sampler": ["52", 0], "sigmas": ["53", 0], "latent_image": ["4", 0]}}
    p["50"] = {"class_type": "RandomNoise", "inputs": {"noise_seed": 1}}
    p["51"] = {"class_type": "CFGGuider", "inputs": {"model": ["20", 0], "positive": ["2", 0], "negative": ["3", 0],
                                                     "cfg": 7.0}}
    p["52"] = {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}}
    p["53"] = {"class_type": "BasicScheduler", "inputs": {"model": ["20", 0], "scheduler": "normal", "steps": 6,
                                                          "denoise": 1.0}}
    got = _latent(run_graph, p)
    assert torch.allclose(got, ks, atol=1e-5)
    assert _expert_calls(_routes(run_graph, p)[0]) == [0, 0, 0, 1, 1, 1]


def test_each_expert_loaded_once_per_run_not_per_step(tiny, tmod, monkeypatch):
    import comfy.model_management as mm
    import nodes
    _, clip, _ = tiny.build_family("sd15", 0)
    a, b = fixed(tiny, 0), fixed(tiny, 1)
    calls = []
    real = mm.load_models_gpu

    def counting(models, *args, **kwargs):
        calls.append([id(m.model) for m in models])
        return real(models, *args, **kwargs)
    monkeypatch.setattr(mm, "load_models_gpu", counting)
    routed = tmod.AtelierTimeExperts.execute(model_1=a, model_2=b, mode="timestep", boundaries="500").args[0]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    for _ in range(2):
        calls.clear()
        nodes.common_ksampler(routed, 1, 12, 7.0, "euler", "normal", pos, neg, latent)
        # one prepare_sampling call with both experts, one re-request at the single switch
        assert len(calls) == 2, calls
        assert set(calls[0]) == {id(a.model), id(b.model)}
        assert calls[1] == [id(b.model)]


def test_time_router_calibrates_on_denoising_loss(tiny, tmod):
    import nodes
    te = _pure()
    _, clip, _ = tiny.build_family("sd15", 0)
    table = tiny.build_model("sd15", 0).get_model_object("model_sampling").sigmas
    s500 = te.timestep_to_sigma(500, table)

    def spoiled(seed, high):
        """An expert whose x0 prediction is off by 3 on one side of t = 500 only."""
        m = fixed(tiny, seed)

        def fn(apply_model, args):
            out = apply_model(args["input"], args["timestep"], **args["c"])
            bad = (float(args["timestep"][0]) >= s500) == high
            return out + 3.0 if bad else out
        m.set_model_unet_function_wrapper(fn)
        return m
    e1, e2 = spoiled(0, high=False), spoiled(1, high=True)  # e1 good at high noise, e2 at low noise
    # boundaries deliberately wrong (t = 900): calibration must move the switch to 500
    routed = tmod.AtelierTimeExperts.execute(model_1=e1, model_2=e2, mode="timestep", boundaries="900").args[0]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    lat = {"samples": torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(0)) * 0.5}
    out = tmod.AtelierTimeRouter.execute(model=routed, calibration="denoising_loss", levels=6, gate_noise=0.0,
                                         seed=0, positive=pos, latent=lat)
    gated, record, report = out.args
    picks = [line.split("-> ")[1].split()[0] for line in report.splitlines()[1:]]
    assert picks == ["model_2"] * 3 + ["model_1"] * 3, report  # t = 0, 200, 400 | 600, 800, 999
    latent = {"samples": torch.zeros(1, 4, 8, 8)}
    nodes.common_ksampler(gated, 1, 8, 7.0, "euler", "karras", pos, neg, latent)
    calls = record["runs"][-1]["calls"]
    gate = gated.get_attachment(tmod.KEY).gate
    assert [c["expert"] for c in calls] == [te.router_choose(gate, c["timestep"]) for c in calls]
    far = [c for c in calls if abs(c["timestep"] - 500) > 200]
    assert len(far) >= 4 and all(c["expert"] == (0 if c["timestep"] > 500 else 1) for c in far)
    fit = tmod.AtelierTimeRouter.execute(model=routed, calibration="fit_boundaries", levels=8, gate_noise=0.0, seed=0)
    nodes.common_ksampler(fit.args[0], 1, 6, 7.0, "euler", "normal", pos, neg, latent)
    assert _expert_calls(fit.args[1]) == [0, 1, 1, 1, 1, 1]  # t ≥ 900 only for the first step


def test_struct_texture_across_families_uses_the_coop_bridge(run_graph, tmod):
    err = load_tool("headless").WorkflowError
    p = _graph()
    p["60"] = {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sdxl", "seed": 5}}
    p["61"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "a red circle", "clip": ["60", 1]}}
    p["62"] = {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["60", 1]}}
    p["30"] = {"class_type": "AtelierStructTextureSampler", "inputs": {
        "structure_model": ["1f", 0], "structure_positive": ["2", 0], "structure_negative": ["3", 0],
        "texture_model": ["60", 0], "texture_positive": ["61", 0], "texture_negative": ["62", 0],
        "latent_image": ["4", 0], "seed": 1, "steps": 6, "cfg": 7.0, "sampler_name": "euler",
        "scheduler": "normal", "t_struct": 500, "denoise": 1.0, "texture_scale": 2.0}}
    p["6"] = {"class_type": "VAEDecode", "inputs": {"samples": ["30", 0], "vae": ["60", 2]}}
    for k in ("5", "20", "21"):
        del p[k]
    with pytest.raises(err, match="Coop bridge.*connect both"):
        run_graph(p)
    p["30"]["inputs"].update(structure_vae=["1", 2], texture_vae=["60", 2])
    lat, rec = run_graph(p, want=["30"])["values"]["30"]
    assert lat["samples"].shape == (1, 4, 16, 16)  # 64 px sd15 → 128 px sdxl
    calls = rec["runs"][-1]["calls"]
    experts = [c["expert"] for c in calls]
    assert experts[0] == 0 and experts[-1] == 1 and experts == sorted(experts)
    assert all(c["timestep"] >= 499 for c in calls if c["expert"] == 0)


# ------------------------------------------------------------------ issue 15: what is added after the node
def _after(p, node: dict, boundaries: str | None = None, size: int | None = None):
    """The routed graph with ``node`` (a core node taking the routed MODEL as "model") between Time Experts and
    the KSampler."""
    p["45"] = {"class_type": node["class_type"], "inputs": {**node["inputs"], "model": ["20", 0]}}
    p["5"]["inputs"]["model"] = ["45", 0]
    if boundaries is not None:
        p["20"]["inputs"]["boundaries"] = boundaries
    if size is not None:
        p["4"]["inputs"].update(width=size, height=size)
    return p


def _on(p, node: dict, model, size: int | None = None):
    """The plain graph: ``node`` on ``model`` (a node id), then the KSampler, no routing."""
    p["46"] = {"class_type": node["class_type"], "inputs": {**node["inputs"], "model": [model, 0]}}
    p["5"]["inputs"]["model"] = ["46", 0]
    for k in ("20", "21"):
        p.pop(k, None)
    if size is not None:
        p["4"]["inputs"].update(width=size, height=size)
    return p


_LORA_AFTER = {"class_type": "LoraLoaderModelOnly", "inputs": {"lora_name": LORA, "strength_model": 1.0}}


@pytest.mark.parametrize("shared_base", [False, True], ids=["two_checkpoints", "one_checkpoint_plus_lora"])
def test_lora_added_after_the_node_acts_on_every_expert(run_graph, tiny, tmod, shared_base):
    # expert 2: another checkpoint, or expert 1's checkpoint with a LoRA at half strength
    half = {"44": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1f", 0], "lora_name": LORA,
                                                                   "strength_model": 0.5}}}
    e2 = "44" if shared_base else "10f"

    def graph(boundaries="500", mode="timestep"):
        p = _graph(boundaries=boundaries, mode=mode)
        p.update(half)
        p["20"]["inputs"]["model_2"] = [e2, 0]
        return p

    def alone(model):
        p = graph()
        return _latent(run_graph, _on(p, _LORA_AFTER, model))

    b_plain = _latent(run_graph, _on(graph(), {"class_type": "LoraLoaderModelOnly", "inputs": {
        "lora_name": LORA, "strength_model": 0.0}}, e2))
    b_lora = alone(e2)
    assert not torch.equal(b_plain, b_lora)  # the LoRA does something on expert 2
    assert torch.equal(_latent(run_graph, _after(graph(), _LORA_AFTER, "1000")), b_lora)
    assert torch.equal(_latent(run_graph, _after(graph(), _LORA_AFTER, "0")), alone("1f"))
    # on a step boundary: the core chain with the LoRA on both models
    sig = _sigmas(None, tiny.build_model("sd15", 0), 6, "normal")
    mid = _latent(run_graph, _after(graph(repr(math.sqrt(float(sig[2]) * float(sig[3]))), "sigma"), _LORA_AFTER))
    extra = {**half, "47": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": ["1f", 0], "lora_name": LORA,
                                                                            "strength_model": 1.0}},
             "48": {"class_type": "LoraLoaderModelOnly", "inputs": {"model": [e2, 0], "lora_name": LORA,
                                                                    "strength_model": 1.0}}}
    chain = _chain(run_graph, 3, model_1=("47", 0), model_2=("48", 0), extra=extra)
    assert _close(mid, chain), (mid - chain).abs().max()
    # the routed MODEL without the LoRA is unchanged (nothing stuck to the experts)
    assert torch.equal(_latent(run_graph, graph("1000")), b_plain)


@pytest.mark.parametrize("sampling", ["v_prediction", "lcm"])
def test_model_sampling_added_after_the_node_acts_on_every_expert(run_graph, tmod, sampling):
    node = {"class_type": "ModelSamplingDiscrete", "inputs": {"sampling": sampling, "zsnr": False}}
    b_patched = _latent(run_graph, _on(_graph(), node, "10f"))
    assert not torch.equal(b_patched, _alone(run_graph, "10"))
    assert torch.equal(_latent(run_graph, _after(_graph(), node, "1000")), b_patched)
    assert torch.equal(_latent(run_graph, _after(_graph(), node, "0")), _latent(run_graph, _on(_graph(), node, "1f")))


def test_pag_after_the_node_perturbs_every_expert(run_graph, tmod):
    # 128 px: at 64 px the tiny UNet's middle block is 1x1 and PAG's perturbed self-attention is the identity
    pag = {"class_type": "PerturbedAttentionGuidance", "inputs": {"scale": 3.0}}
    b_pag = _latent(run_graph, _on(_graph(), pag, "10f", size=128))
    b = _latent(run_graph, _on(_graph(), {"class_type": "PerturbedAttentionGuidance", "inputs": {"scale": 0.0}},
                               "10f", size=128))
    assert (b_pag - b).abs().max() > 1e-3  # PAG does something on expert 2
    assert torch.equal(_latent(run_graph, _after(_graph(), pag, "1000", size=128)), b_pag)


def test_run_state_of_every_expert_is_reset_at_each_routed_run(tiny, tmod, pack):
    import comfy.patcher_extension as pe
    import nodes
    glue = importlib.import_module(pack.__name__ + ".nodes.glue")
    _, clip, _ = tiny.build_family("sd15", 0)
    a, b = fixed(tiny, 0), fixed(tiny, 1).clone()
    log = []
    glue.register_run_state(b, "test.state", lambda: log.append("reset"))

    def on_b(executor, *args, **kwargs):
        log.append("call")
        return executor(*args, **kwargs)
    b.add_wrapper_with_key(pe.WrappersMP.APPLY_MODEL, "test.on_b", on_b)
    routed = tmod.AtelierTimeExperts.execute(model_1=a, model_2=b, mode="timestep", boundaries="500").args[0]
    pos = clip.encode_from_tokens_scheduled(clip.tokenize("a red circle"))
    neg = clip.encode_from_tokens_scheduled(clip.tokenize(""))
    for _ in range(2):
        nodes.KSampler().sample(routed, 1, 6, 7.0, "euler", "normal", pos, neg, {"samples": torch.zeros(1, 4, 8, 8)})
    n = log.count("call")
    assert n >= 2 and log == (["reset"] + ["call"] * (n // 2)) * 2, log
