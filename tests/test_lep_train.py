"""The LEP training loop by itself (models/lep_train.py, pure torch): a toy feature function stands in for the
UNet, so these run without ComfyUI. The node (nodes/sketch.train_lep) is tested through ComfyUI in
test_sketch.py / test_robust_lep.py."""
from __future__ import annotations

import ast
import inspect

import pytest
import torch
from safetensors.torch import load_file

from atelier_testlib import load_models  # noqa: E402

T, L = load_models("lep_train", "lep")


pytestmark = pytest.mark.usefixtures("one_thread")  # tests/conftest.py


def test_the_module_runs_on_one_torch_thread():
    """tests/conftest.py's one_thread holds an opted-in module to one torch thread, whatever OMP_NUM_THREADS says."""
    assert torch.get_num_threads() == 1


def toy(n=6, channels=12, hw=4):
    """A dataset of ``n`` latents with edge targets and a 'UNet' that is a fixed linear map of the noised latent.
    Returns (features, targets, calls): ``calls`` records every batch the loop asked for."""
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(n, 4, hw, hw, generator=g)
    w = torch.randn(channels, 4, generator=g)
    targets = torch.tanh(x0.roll(1, dims=-1))
    calls = []

    def features(idx, t, noise):
        a = (t.float() / 1000.0).view(-1, 1, 1, 1)
        z = (1 - a) * x0[idx] + a * torch.randn(x0[idx].shape, generator=noise)
        calls.append((list(idx), t.tolist()))
        return torch.einsum("oc,bchw->bohw", w, z), z.clone()
    return features, targets, calls


def state_of(run):
    sd = {f"lep.{k}": v for k, v in run.lep.state_dict().items()}
    sd.update({f"head.{k}": v for k, v in run.head.state_dict().items()})
    sd.update(T.adam_tensors(run.lep, run.opt, "adam."))
    sd.update(T.adam_tensors(run.head, run.opt_head, "adam_head."))
    return sd


def assert_same(a, b):
    assert set(a) == set(b)
    bad = [k for k in a if not torch.equal(a[k], b[k])]
    assert not bad, bad[:5]


def test_the_module_imports_no_comfyui():
    tree = ast.parse(inspect.getsource(T))
    names = [a.name for n in ast.walk(tree) if isinstance(n, ast.Import) for a in n.names]
    names += [n.module or "" for n in ast.walk(tree) if isinstance(n, ast.ImportFrom)]
    assert not [m for m in names if m.split(".")[0] in ("comfy", "comfy_api", "folder_paths", "nodes", "server")]


def test_training_lowers_both_losses_and_is_deterministic():
    runs = []
    for _ in range(2):
        features, targets, _ = toy()
        runs.append(T.LEPTraining(features, targets, learning_rate=1e-2, seed=3, device="cpu").run(40, 4))
    a, b = runs
    assert a.step == 40 and len(a.losses) == len(a.head_losses) == 40
    assert sum(a.losses[-8:]) < 0.8 * sum(a.losses[:8]), a.losses
    assert sum(a.head_losses[-8:]) < 0.8 * sum(a.head_losses[:8]), a.head_losses
    assert a.losses == b.losses and a.head_losses == b.head_losses
    assert_same(state_of(a), state_of(b))
    assert a.final_loss == pytest.approx(sum(a.losses[-20:]) / 20, rel=1e-12)
    assert not a.lep.training and not a.head.training


def test_the_loop_calls_progress_interrupt_and_saves_on_schedule():
    features, targets, calls = toy()
    seen, saved, checks = [], [], []
    run = T.LEPTraining(features, targets, learning_rate=1e-3, seed=0, device="cpu")
    run.run(7, 3, save_every=3, save=lambda r: saved.append(r.step), progress=lambda d, t: seen.append((d, t)),
            check_interrupt=lambda: checks.append(1))
    assert seen == [(i, 7) for i in range(8)]
    assert saved == [3, 6]                              # never at the end: the finished file replaces it
    assert len(checks) == 14                            # before each step and between the LEP and head updates
    assert len(calls) == 8 and calls[0] == ([0], [500]) and all(len(i) == 3 for i, _ in calls[1:])


def test_a_resumed_training_continues_bit_exactly(tmp_path):
    """Interrupted at step 6 with a checkpoint at step 4, then resumed in a fresh process-like object: the
    result equals the uninterrupted run bit for bit (weights, batch-norm buffers, Adam state, losses)."""
    features, targets, calls_full = toy()
    full = T.LEPTraining(features, targets, learning_rate=1e-2, seed=5, device="cpu").run(10, 2)

    path = tmp_path / "resume.safetensors"
    ident = {"family": "toy", "channels": 12, "folder": "."}
    features, targets, _ = toy()
    first = T.LEPTraining(features, targets, learning_rate=1e-2, seed=5, device="cpu")

    def stop(done, total):
        if done == 6:
            raise KeyboardInterrupt                     # what Cancel does mid-run

    with pytest.raises(KeyboardInterrupt):
        first.run(10, 2, save_every=4, save=lambda r: r.save_checkpoint(path, ident), progress=stop)

    tensors = load_file(str(path))
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        meta = f.metadata()
    assert meta == {"atelier": "lep_resume", "step": "4", "family": "toy", "channels": "12", "folder": "."}
    assert {"rng.batches", "rng.noise", "losses", "head_losses"} <= set(tensors)

    features, targets, calls_resumed = toy()
    resumed = T.LEPTraining(features, targets, learning_rate=1e-2, seed=5, device="cpu")
    assert resumed.restore(tensors, meta) is True
    assert resumed.step == 4 and resumed.losses == full.losses[:4]
    resumed.run(10, 2)
    assert resumed.losses == full.losses and resumed.head_losses == full.head_losses
    assert_same(state_of(resumed), state_of(full))
    assert calls_resumed[1:] == calls_full[5:]          # the same batches and timesteps after the probe


def test_an_older_checkpoint_without_random_state_still_resumes(tmp_path):
    features, targets, _ = toy()
    run = T.LEPTraining(features, targets, learning_rate=1e-2, seed=1, device="cpu").run(3, 2)
    t = {k: v for k, v in run.checkpoint_tensors().items() if not k.startswith(("rng.", "head"))}
    t.update({k: v for k, v in run.checkpoint_tensors().items() if k == "head_losses"})
    features, targets, _ = toy()
    again = T.LEPTraining(features, targets, learning_rate=1e-2, seed=1, device="cpu")
    assert again.restore(t, {"step": "3"}) is False     # no head in it: the head starts afresh
    assert again.step == 3 and again.losses == run.losses
    again.run(5, 2)
    assert again.step == 5 and len(again.losses) == 5
    with pytest.raises((RuntimeError, KeyError)):
        T.LEPTraining(*toy()[:2], learning_rate=1e-2, seed=1, device="cpu").restore({"losses": t["losses"]},
                                                                                    {"step": "3"})
