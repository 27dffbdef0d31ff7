"""Space experts composed with what else a user chains: a time expert carrying them across runs, core guidance
nodes that add passes (PAG, SAG), core conditioning nodes on an expert's prompt (issue 15).

Real ComfyUI, real core nodes, tiny seeded models; every test asserts numbers or error text.
"""
from __future__ import annotations

import importlib

import pytest
import torch

from atelier_testlib import txt2img_prompt

TEST_NODE = "ComposeSpaceTestTiny"
PROMPT = "a red circle and a blue square"


@pytest.fixture(scope="module")
def sx(pack):
    return importlib.import_module(pack.__name__ + ".nodes.space_experts")


@pytest.fixture(scope="module")
def fam(tiny, comfy):
    model, clip, vae = tiny.build_family("sd15", 0)

    class Node:
        CATEGORY = "testing"
        RETURN_TYPES = ("MODEL",)
        FUNCTION = "build"

        @classmethod
        def INPUT_TYPES(cls):
            return {"required": {"seed": ("INT", {"default": 0})}}

        def build(self, seed):
            return (tiny.build_model("sd15", seed),)

    comfy.node_classes.setdefault(TEST_NODE, Node)
    return model, clip, vae


def _enc(clip, text):
    return clip.encode_from_tokens_scheduled(clip.tokenize(text))


def _sample(model, clip, positive=None, steps=3, cfg=5.0, seed=1, size=8):
    import nodes
    pos = positive if positive is not None else _enc(clip, PROMPT)
    latent = {"samples": torch.zeros(1, 4, size, size)}
    return nodes.common_ksampler(model, seed, steps, cfg, "euler", "normal", pos, _enc(clip, ""), latent)[0]["samples"]


def _bank(sx, clip, texts, conds=None):
    bank = None
    for i, t in enumerate(texts):
        c = conds[i] if conds is not None else _enc(clip, t)
        bank = sx.AtelierSpaceExpert.execute(c, name=t, experts=bank).args[0]
    return bank


def _space(sx, model, clip, experts, **kw):
    args = dict(prompt=PROMPT, phrases="red circle, blue square", experts=experts, mask_start_t=1000)
    args.update(kw)
    return sx.AtelierSpaceExperts.execute(model, clip, **args).args


# ============================================================================ state between runs


def test_rerun_is_bit_identical_directly(sx, fam):
    import comfy.patcher_extension as pe
    model, clip, _ = fam
    m, pos, _ = _space(sx, model, clip, _bank(sx, clip, ["a green thing", "a yellow thing"]))
    # the model as sampled, and the same model carried by something that never resets it (no OUTER_SAMPLE
    # wrapper, no reset_run_states): the state must notice a new run by itself
    bare = m.clone()
    bare.remove_wrappers_with_key(pe.WrappersMP.OUTER_SAMPLE, sx.KEY)
    for mm in (m, bare):
        first = _sample(mm, clip, positive=pos, seed=1)
        other = _sample(mm, clip, positive=_enc(clip, "a blue square"), seed=7, steps=4)
        again = _sample(mm, clip, positive=pos, seed=1)
        assert not torch.equal(first, other)
        assert torch.equal(first, again), f"rerun differs by {(first - again).abs().max():.3g}"
        assert len(mm.get_attachment(sx.KEY).record) == 3   # the record is this run's, not all runs'


def _time_graph(boundary, seed=1, steps=4):
    p = txt2img_prompt("sd15", size=64, steps=steps, text=PROMPT, model_node=["40", 0], noise_seed=seed)
    p.update({
        "90": {"class_type": TEST_NODE, "inputs": {"seed": 0}},
        "91": {"class_type": TEST_NODE, "inputs": {"seed": 3}},
        "20": {"class_type": "CLIPTextEncode", "inputs": {"text": "a green thing", "clip": ["1", 1]}},
        "21": {"class_type": "AtelierSpaceExpert", "inputs": {"conditioning": ["20", 0], "name": "green"}},
        "24": {"class_type": "AtelierSpaceExperts", "inputs": {
            "model": ["91", 0], "clip": ["1", 1], "prompt": PROMPT, "phrases": "red circle, blue square",
            "experts": ["21", 0], "alpha": 0.2, "routing": "gate", "gate_noise": 0.0, "seed": 0,
            "mask_start_t": 1000, "capture": "mid-resolution", "pww_weight": 0.0}},
        # the space-experts MODEL is the second time expert: only the router ever runs it
        "40": {"class_type": "AtelierTimeExperts", "inputs": {"model_1": ["90", 0], "model_2": ["24", 0],
                                                              "mode": "timestep", "boundaries": str(boundary)}},
    })
    p["5"]["inputs"]["positive"] = ["24", 1]
    return p


def test_rerun_through_a_time_expert_is_bit_identical(fam, run_graph):
    first = run_graph(_time_graph(700), want=["5"])["values"]["5"][0]["samples"]
    other = run_graph(_time_graph(400), want=["5"])["values"]["5"][0]["samples"]
    again = run_graph(_time_graph(700), want=["5"])["values"]["5"][0]["samples"]
    assert not torch.equal(first, other)
    assert torch.equal(first, again), f"rerun differs by {(first - again).abs().max():.3g}"


def test_run_state_is_registered_under_the_hook_key(sx, pack, fam):
    glue = importlib.import_module(pack.__name__ + ".nodes.glue")
    model, clip, _ = fam
    m, pos, _ = _space(sx, model, clip, _bank(sx, clip, ["a green thing"]))
    _sample(m, clip, positive=pos)
    rt = m.get_attachment(sx.KEY)
    assert sx.KEY == glue.hook_key("space_experts")
    assert rt.active_maps is not None and rt.record
    glue.reset_run_states(m.clone().model_options)     # what a router does; the clone deep-copies options
    assert rt.active_maps is None and rt.record == []


# ============================================================================ extra passes (PAG, SAG)


def _pag(model, scale=3.0):
    from comfy_extras.nodes_pag import PerturbedAttentionGuidance
    return PerturbedAttentionGuidance.execute(model, scale).args[0]


def _sag(model, scale=0.5):
    from comfy_extras.nodes_sag import SelfAttentionGuidance
    return SelfAttentionGuidance.execute(model, scale, 2.0).args[0]


@pytest.mark.parametrize("order", ["pag_after", "pag_before"])
def test_pag_changes_space_experts_as_much_as_plain(sx, fam, order):
    model, clip, _ = fam
    bank = _bank(sx, clip, ["a green thing", "a yellow thing"])
    # 128 px: at 64 px the middle block is 1x1 and PAG's perturbed attention is the identity
    plain = _sample(model, clip, steps=4, size=16)
    d_pag = (_sample(_pag(model), clip, steps=4, size=16) - plain).abs().mean()
    m, pos, _ = _space(sx, model, clip, bank)
    se_only = _sample(m, clip, positive=pos, steps=4, size=16)
    both = _pag(m) if order == "pag_after" else _space(sx, _pag(model), clip, bank)[0]
    d_both = (_sample(both, clip, positive=pos, steps=4, size=16) - se_only).abs().mean()
    assert d_pag > 0 and not torch.equal(se_only, plain)
    assert d_both < 3 * d_pag, f"PAG moves space experts {float(d_both / d_pag):.1f}x as much as a plain model"
    # the perturbed pass neither adds steps to the route record nor changes which masks a step used
    assert len(both.get_attachment(sx.KEY).record) == 4


def test_sag_changes_space_experts_as_much_as_plain(sx, fam):
    model, clip, _ = fam
    bank = _bank(sx, clip, ["a green thing", "a yellow thing"])
    plain = _sample(model, clip, size=16)
    d_sag = (_sample(_sag(model), clip, size=16) - plain).abs().mean()
    m, pos, _ = _space(sx, model, clip, bank)
    se_only = _sample(m, clip, positive=pos, size=16)
    both = _sag(m)
    d_both = (_sample(both, clip, positive=pos, size=16) - se_only).abs().mean()
    assert d_sag > 0
    assert d_both < 2 * d_sag, f"SAG moves space experts {float(d_both / d_sag):.1f}x as much as a plain model"
    # SAG's blurred pass of the negative prompt is not a step of its own and is not painted by the experts
    assert len(both.get_attachment(sx.KEY).record) == 3


# ============================================================================ core conditioning nodes on an expert


def test_timestep_range_on_an_expert_is_honoured(sx, fam):
    import nodes
    model, clip, _ = fam
    green = _enc(clip, "a green thing")
    full = _space(sx, model, clip, _bank(sx, clip, ["green"], [green]))
    whole = nodes.ConditioningSetTimestepRange().set_range(green, 0.0, 1.0)[0]
    late = nodes.ConditioningSetTimestepRange().set_range(green, 0.5, 1.0)[0]
    never = nodes.ConditioningSetTimestepRange().set_range(green, 0.0, 0.0)[0]
    out_full = _sample(full[0], clip, positive=full[1], steps=4)
    m_whole = _space(sx, model, clip, _bank(sx, clip, ["green"], [whole]))[0]
    assert torch.equal(_sample(m_whole, clip, positive=full[1], steps=4), out_full)
    m_late, pos, setup = _space(sx, model, clip, _bank(sx, clip, ["green"], [late]))
    out_late = _sample(m_late, clip, positive=pos, steps=4)
    assert not torch.equal(out_late, out_full)
    # the expert paints only inside its range: no coverage above the range's start noise level
    ms = model.get_model_object("model_sampling")
    hi = float(ms.percent_to_sigma(0.5))
    rec = m_late.get_attachment(sx.KEY).record
    assert any(r["sigma"] > hi for r in rec) and any(r["sigma"] <= hi for r in rec)
    assert all(not r["coverage"] for r in rec if r["sigma"] > hi)
    assert all(r["coverage"] for r in rec[1:] if r["sigma"] <= hi)
    # a range no step falls in: the expert never acts (the image of the model without experts)
    m_never = _space(sx, model, clip, _bank(sx, clip, ["green"], [never]))[0]
    assert torch.equal(_sample(m_never, clip, positive=full[1], steps=4),
                       _sample(model, clip, steps=4))


def test_mask_and_combine_on_an_expert_are_refused(sx, pack, fam):
    import nodes
    errors = importlib.import_module(pack.__name__ + ".models.errors")
    _model, clip, _ = fam
    green, yellow = _enc(clip, "a green thing"), _enc(clip, "a yellow thing")
    masked = nodes.ConditioningSetMask().append(green, torch.ones(1, 64, 64), "default", 1.0)[0]
    with pytest.raises(errors.AtelierError, match=r"^conditioning: .*ConditioningSetMask") as e:
        sx.AtelierSpaceExpert.execute(masked, name="green")
    assert e.value.input == "conditioning" and "Regions" in str(e.value)
    combined = nodes.ConditioningCombine().combine(green, yellow)[0]
    with pytest.raises(errors.AtelierError, match=r"^conditioning: .*2 prompts") as e:
        sx.AtelierSpaceExpert.execute(combined, name="green")
    assert "one Atelier Space Expert per prompt" in str(e.value)
    area = nodes.ConditioningSetArea().append(green, 64, 64, 0, 0, 1.0)[0]
    with pytest.raises(errors.AtelierError, match=r"^conditioning: .*area"):
        sx.AtelierSpaceExpert.execute(area, name="green")
