"""Space experts and paint-with-words on the DiT / MMDiT tiny families (pixart, flux, sd3), in the real ComfyUI.

The node classes run as the executor runs them and sample with core ``common_ksampler`` (KSampler's own code).
Random weights prove plumbing, so the assertions are bit-identity where a setting is a no-op, equality with
attention probabilities computed here independently from the q/k the model itself attended with, model calls
per step, exact zeros where a mask forbids attention, another attention patch still acting in both orders, and
the errors. Small latents: flux/sd3 at 64 px (4x4 tokens), pixart at its smallest drawing size 272 px.
"""
from __future__ import annotations

import importlib
import math

import pytest
import torch

PROMPT = "a red circle and a blue square"
PHRASES = "red circle, blue square"
PX = {"pixart": 272, "flux": 64, "sd3": 64}
#: the map blocks each tiny family should capture (glue.FAMILIES map_blocks, written out here independently):
#: joint attention calls in execution order (flux: double 0, 1, single 0 of 2+2; sd3: joints 0, 1 of 2), pixart blocks
MAP_CALLS = {"flux": [0, 1, 2], "sd3": [0, 1], "pixart": [0, 1]}


@pytest.fixture(scope="module")
def sx(pack):
    return importlib.import_module(pack.__name__ + ".nodes.space_experts")


@pytest.fixture(scope="module")
def families(tiny):
    cache = {}

    def get(name):
        if name not in cache:
            cache[name] = tiny.build_family(name, 0)
        return cache[name]
    return get


def _enc(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _latent(family, px=None):
    px = px or PX[family]
    ch = 4 if family == "pixart" else 16
    return {"samples": torch.zeros(1, ch, px // 8, px // 8)}


def _sample(family, model, clip, positive=None, steps=2, cfg=1.0, seed=1, px=None):
    import nodes
    pos = positive if positive is not None else _enc(clip, PROMPT)
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "simple", pos, _enc(clip, ""),
                                 _latent(family, px))[0]["samples"]


def _bank(sx, clip, texts):
    bank = None
    for t in texts:
        bank = sx.AtelierSpaceExpert.execute(_enc(clip, t), name=t, experts=bank).args[0]
    return bank


def _space(sx, model, clip, experts=None, **kw):
    args = dict(prompt=PROMPT, phrases=PHRASES, experts=experts, mask_start_t=1000)
    args.update(kw)
    return sx.AtelierSpaceExperts.execute(model, clip, **args).args


def _halves(px):
    side = px // 8
    m = torch.zeros(2, side, side)
    m[0, :, : side // 2] = 1
    m[1, :, side // 2:] = 1
    return m


def _pww(sx, model, clip, weight, px, experts=None):
    regions = sx.AtelierRegionsFromMasks.execute(_halves(px), PHRASES).args[0]
    return sx.AtelierPaintWithWords.execute(model, clip, PROMPT, regions, weight=weight, experts=experts).args


# ============================================================================ no-op settings


@pytest.mark.parametrize("family", ["pixart", "flux", "sd3"])
def test_no_op_settings_are_bit_identical_and_real_ones_act(sx, families, family):
    model, clip, _ = families(family)
    cfg = 2.0 if family == "sd3" else 1.0
    plain = _sample(family, model, clip, cfg=cfg)
    m0, pos0, _ = _space(sx, model, clip)                              # no experts
    assert torch.equal(_sample(family, m0, clip, positive=pos0, cfg=cfg), plain)
    bank = _bank(sx, clip, ["a green thing", "a yellow thing"])
    m1, pos1, _ = _space(sx, model, clip, bank, alpha=1.5)             # every mask empty; maps still captured
    assert torch.equal(_sample(family, m1, clip, positive=pos1, cfg=cfg), plain)
    assert m1.get_attachment(sx.KEY).active_maps is not None
    m2, pos2, _ = _space(sx, model, clip, bank, mask_start_t=0)        # masks never trusted: capture only
    assert torch.equal(_sample(family, m2, clip, positive=pos2, cfg=cfg), plain)
    m3, pos3, _ = _pww(sx, model, clip, 0.0, PX[family])               # paint-with-words weight 0
    assert torch.equal(_sample(family, m3, clip, positive=pos3, cfg=cfg), plain)
    assert "optimized_attention_override" not in model.model_options.get("transformer_options", {})
    # real settings act
    m4, pos4, _ = _pww(sx, model, clip, 2.0, PX[family])
    assert not torch.equal(_sample(family, m4, clip, positive=pos4, cfg=cfg), plain)
    m5, pos5, _ = _space(sx, model, clip, bank, alpha=0.2)
    assert not torch.equal(_sample(family, m5, clip, positive=pos5, cfg=cfg), plain)


# ============================================================================ maps


def _with_override(model, fn):
    """Another pack's attention override on a clone (the single transformer_options slot, chaining what was there)."""
    m = model.clone()
    to = dict(m.model_options.get("transformer_options", {}))
    prev = to.get("optimized_attention_override")

    def chained(func, *args, **kwargs):
        return fn(func if prev is None else (lambda *a, **kw: prev(func, *a, **kw)), *args, **kwargs)
    to["optimized_attention_override"] = chained
    m.model_options["transformer_options"] = to
    return m


def _recorder(calls):
    def fn(func, *args, **kwargs):
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        if not kwargs.get("skip_reshape", False):
            q, k = (t.reshape(t.shape[0], t.shape[1], heads, -1).transpose(1, 2) for t in (q, k))
        calls.append((q.clone(), k.clone(), kwargs.get("mask")))
        return func(*args, **kwargs)
    return fn


#: token positions of "red circle" / "blue square" in the context (T5 pieces: '▁', 'a', '▁red', '▁circle', '▁and',
#: '▁', 'a', '▁blue', '▁square'; CLIP: BOS a red circle and a blue square; SD3 = 77 CLIP tokens then T5)
GROUPS = {"flux": [[2, 3], [7, 8]], "pixart": [[2, 3], [7, 8]], "sd3": [[2, 3, 79, 80], [6, 7, 84, 85]]}


def _indep_maps(probs_list, groups, hw):
    maps = []
    for p in probs_list:  # (B, H, N, keys)
        mean = p.mean(dim=1)
        maps.append(torch.stack([mean[..., g].mean(-1) for g in groups], dim=1))
    return torch.stack(maps).mean(0).reshape(maps[0].shape[0], len(groups), *hw)


@pytest.mark.parametrize("family", ["flux", "sd3"])
def test_joint_maps_equal_thresholded_attention_computed_independently(sx, families, family):
    model, clip, _ = families(family)
    calls = []
    base = _with_override(model, _recorder(calls))
    bank = _bank(sx, clip, ["a green thing"])
    m, pos, setup = _space(sx, base, clip, bank)
    assert setup.groups == GROUPS[family]
    _sample(family, m, clip, positive=pos, steps=1)
    rt = m.get_attachment(sx.KEY)
    n_txt = pos[0][0].shape[1]
    n_img = (PX[family] // 16) ** 2
    joint = [c for c in calls if c[0].shape[2] == n_txt + n_img]
    assert len(joint) == {"flux": 4, "sd3": 2}[family]  # every joint block called the other override once
    probs = []
    for j in MAP_CALLS[family]:
        q, k, _ = joint[j]
        logits = q[:, :, n_txt:].double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1])
        probs.append(logits.softmax(-1)[..., :n_txt])  # image queries x the prompt's text keys, joint softmax
    side = PX[family] // 16
    want = _indep_maps(probs, GROUPS[family], (side, side))
    got = rt.active_maps
    assert got.shape == want.shape and torch.allclose(got.double(), want, rtol=1e-4, atol=1e-7)
    for alpha in (0.2, 0.5, 0.9):
        thr = want >= alpha * want.flatten(2).amax(-1)[..., None, None]
        assert torch.equal(sx.se.masks_from_maps(got, alpha), thr)


def test_pixart_maps_equal_cross_attention_computed_independently(sx, families):
    model, clip, _ = families("pixart")
    seen = []
    dm = model.model.diffusion_model
    handles = [b.cross_attn.register_forward_hook(lambda mod, inp, out: seen.append((mod, inp[0], inp[1])))
               for b in dm.blocks]
    try:
        bank = _bank(sx, clip, ["a green thing"])
        m, pos, setup = _space(sx, model, clip, bank)
        assert setup.groups == GROUPS["pixart"]
        _sample("pixart", m, clip, positive=pos, steps=1)
    finally:
        for h in handles:
            h.remove()
    probs = []
    for mod, x, y in [seen[j] for j in MAP_CALLS["pixart"]]:
        B, N, C = x.shape
        hd = C // mod.num_heads
        q = mod.q_linear(x).view(B, N, mod.num_heads, hd).transpose(1, 2).double()
        k = mod.kv_linear(y.reshape(B, -1, C))[..., :C].reshape(B, -1, mod.num_heads, hd).transpose(1, 2).double()
        probs.append((q @ k.transpose(-1, -2) / math.sqrt(hd)).softmax(-1))
    side = PX["pixart"] // 16
    want = _indep_maps(probs, GROUPS["pixart"], (side, side))
    got = m.get_attachment(sx.KEY).active_maps
    assert got.shape == want.shape and torch.allclose(got.double(), want, rtol=1e-4, atol=1e-7)


# ============================================================================ experts on joint attention


def test_joint_experts_one_pass_and_no_leak_outside_their_region(sx, families):
    """Flux: model calls per step constant as experts grow; an expert's text tokens get exactly zero attention
    from image tokens outside its region and from the base prompt's tokens; its region sees it."""
    import comfy.patcher_extension
    model, clip, _ = families("flux")
    n_calls = []

    def counting(executor, *args, **kwargs):
        n_calls.append(1)
        return executor(*args, **kwargs)
    counted = model.clone()
    counted.add_wrapper_with_key(comfy.patcher_extension.WrappersMP.APPLY_MODEL, "test.count", counting)
    _sample("flux", counted, clip, steps=3)
    plain_calls = len(n_calls)
    side = PX["flux"] // 8
    masks = torch.zeros(2, side, side)
    masks[0, :side // 2, :side // 2] = 1       # top-left quadrant
    masks[1, side // 2:, side // 2:] = 1       # bottom-right quadrant
    regions = sx.AtelierRegionsFromMasks.execute(masks, PHRASES).args[0]
    texts = ["a green thing", "a yellow thing", "a purple thing", "an orange thing"]
    for n in (1, 4):
        calls = []
        m, pos, _ = _space(sx, _with_override(counted, _recorder(calls)), clip, _bank(sx, clip, texts[:n]),
                           regions=regions, routing="in order")
        n_calls.clear()
        out = _sample("flux", m, clip, positive=pos, steps=3)
        assert len(n_calls) == plain_calls and torch.isfinite(out).all()
        rec = m.get_attachment(sx.KEY).record
        assert len(rec) == 3 and all(r["coverage"] for r in rec)
    # the last run: 4 experts, phrase 0 -> expert 0 (top-left), phrase 1 -> expert 1 (bottom-right)
    T, Te, N = 256, 256, (side // 2) ** 2
    q, k, mask = calls[0]
    assert q.shape[2] == T + 4 * Te + N and mask is not None
    probs = (q.double() @ k.double().transpose(-1, -2) / math.sqrt(q.shape[-1]) + mask.double()).softmax(-1)
    img = T + 4 * Te
    grid = torch.zeros(side // 2, side // 2, dtype=torch.long)
    grid[: side // 4, : side // 4] = 1
    grid[side // 4:, side // 4:] = 2
    grid = grid.flatten()
    for e, region in ((0, 1), (1, 2)):
        span = slice(T + e * Te, T + (e + 1) * Te)
        inside = probs[0, :, img:][:, grid == region][..., span]
        outside = probs[0, :, img:][:, grid != region][..., span]
        assert outside.abs().max() == 0 and inside.sum(-1).min() > 0
        assert probs[0, :, :T, span].abs().max() == 0                      # the base prompt never sees it
        assert probs[0, :, img:][:, grid == region][..., :T].abs().max() == 0  # its region paints without the base
    for e in (2, 3):                                                        # experts with no phrase: invisible
        assert probs[0, :, img:, T + e * Te:T + (e + 1) * Te].abs().max() == 0
    assert probs[0, :, img:][:, grid == 0][..., :T].sum(-1).min() > 0       # uncovered pixels keep the base prompt


# ============================================================================ composability


def test_another_attention_override_still_acts_in_either_order(sx, families):
    model, clip, _ = families("flux")
    hits = []

    def other(func, *args, **kwargs):
        hits.append(1)
        return func(*args, **kwargs) * 1.02

    bank = _bank(sx, clip, ["a green thing", "a yellow thing"])
    m_only, pos, _ = _space(sx, model, clip, bank, alpha=0.2, pww_weight=1.0)
    ours = _sample("flux", m_only, clip, positive=pos)
    before = _space(sx, _with_override(model, other), clip, bank, alpha=0.2, pww_weight=1.0)[0]
    a = _sample("flux", before, clip, positive=pos)
    n_a, hits[:] = len(hits), []
    after = _with_override(m_only, other)
    b = _sample("flux", after, clip, positive=pos)
    assert n_a > 0 and len(hits) == n_a                      # the other override ran at every joint attention
    assert torch.equal(a, b) and not torch.equal(a, ours)     # in either order, and it changes the result
    plain_other = _sample("flux", _with_override(model, other), clip)
    assert not torch.equal(a, plain_other)                    # ours still acts with it

    # a core double-block replacement patch (patches_replace["dit"]) on top: both still act
    def replace(args, extra):
        out = extra["original_block"](args)
        out["img"] = out["img"] * 1.01
        return out
    r = after.clone()
    r.set_model_patch_replace(replace, "dit", "double_block", 0)
    c = _sample("flux", r, clip, positive=pos)
    assert not torch.equal(c, b) and len(hits) > n_a


def test_pixart_another_forward_hook_still_acts_in_either_order(sx, families):
    model, clip, _ = families("pixart")
    m, pos, _ = _pww(sx, model, clip, 2.0, PX["pixart"])
    ours = _sample("pixart", m, clip, positive=pos)
    cross = model.model.diffusion_model.blocks[0].cross_attn
    results = []
    for prepend in (False, True):                      # the other hook before / after ours
        h = cross.register_forward_hook(lambda mod, inp, out: out * 1.05 + 0.01, prepend=prepend)
        try:
            other_only = _sample("pixart", model, clip)
            results.append(_sample("pixart", m, clip, positive=pos))
        finally:
            h.remove()
        assert not torch.equal(results[-1], ours) and not torch.equal(results[-1], other_only)
    assert torch.equal(_sample("pixart", m, clip, positive=pos), ours)  # nothing stays on the shared model


# ============================================================================ errors, gate, MoE sampler


def test_errors_name_the_input(sx, families):
    model, clip, _ = families("flux")
    with pytest.raises(ValueError, match="does not occur in the prompt"):
        _space(sx, model, clip, _bank(sx, clip, ["x"]), phrases="green triangle")
    with pytest.raises(ValueError, match="sentencepiece"):           # T5 is case-sensitive: 'Red' is not '▁red'
        _space(sx, model, clip, _bank(sx, clip, ["x"]), prompt="a Red circle and a blue square")
    sd3, sd3_clip, _ = families("sd3")                               # CLIP finds it (lower-cased), T5 does not
    with pytest.raises(ValueError, match=r"sentencepiece.*t5xxl"):
        _space(sx, sd3, sd3_clip, _bank(sx, sd3_clip, ["x"]), prompt="a Red circle and a blue square")
    with pytest.raises(Exception, match=r"experts.*'sd3 prompt'"):                 # another family's prompt
        _space(sx, model, clip, sx.AtelierSpaceExpert.execute(_enc(sd3_clip, "x"), name="sd3 prompt").args[0])
    a = sx.AtelierRegionsFromMasks.execute(torch.ones(1, 8, 8), "red circle").args[0]
    with pytest.raises(ValueError, match="same size"):
        sx.AtelierRegionsFromMasks.execute(torch.ones(1, 8, 16), "blue square", regions=a)
    regions = sx.AtelierRegionsFromMasks.execute(_halves(128)[:, :, :12], PHRASES).args[0]  # 16x12 on a square
    m, pos, space = sx.AtelierPaintWithWords.execute(model, clip, PROMPT, regions, weight=1.0).args
    with pytest.raises(ValueError, match="aspect"):
        sx.AtelierMoESampler.execute(m, pos, _enc(clip, ""), _latent("flux"), 1, 1, 1.0, "euler", "simple",
                                     space=space)


def test_gate_and_moe_sampler_routes_on_flux(sx, families):
    model, clip, vae = families("flux")
    bank = _bank(sx, clip, ["a blue square", "a red circle"])
    m, pos, space = _space(sx, model, clip, bank, routing="gate")
    assert len(space.route) == 2 and len(space.scores) == 2
    latent, pic = sx.AtelierMoESampler.execute(model, pos, _enc(clip, ""), _latent("flux"), 1, 3, 1.0, "euler",
                                               "simple", space=space, vae=vae).args
    assert torch.isfinite(latent["samples"]).all()
    assert pic.shape[1] > PX["flux"] and pic.shape[2] == PX["flux"]  # the picture and the routes strip under it
