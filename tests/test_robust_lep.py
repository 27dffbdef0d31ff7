"""Issue 14 for the latent edge predictor: nothing a user trained is lost, nothing is read from outside its
folder, a long training can be cancelled, a foreign VAE or an unreadable file gives an error naming it.

Every test runs graphs through ComfyUI's real executor on the tiny families (a handful of steps, 64 px). Names
written under ComfyUI's models dir carry a uuid suffix and are removed afterwards.
"""
from __future__ import annotations

import json
import os
import struct
import threading
import time
import uuid
import zlib
from pathlib import Path

import pytest
import torch

from atelier_testlib import load_models  # noqa: E402

world = load_models("world")


# sk (nodes/sketch.py), one_thread: tests/conftest.py
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def names(comfy):
    """Unique LEP names for one test; their predictor and resume files are removed afterwards."""
    import folder_paths
    made: list[str] = []

    def new(tag: str) -> str:
        made.append(f"robust_{tag}_{uuid.uuid4().hex[:8]}")
        return made[-1]
    yield new
    for n in made:
        for kind in ("atelier_lep", "atelier_lep_resume"):
            for d in folder_paths.get_folder_paths(kind):
                p = Path(d) / f"{n}.safetensors"
                if p.exists() or p.is_symlink():
                    p.unlink()


def paths(name: str) -> tuple[Path, Path]:
    import folder_paths
    return (Path(folder_paths.get_folder_paths("atelier_lep")[0]) / f"{name}.safetensors",
            Path(folder_paths.get_folder_paths("atelier_lep_resume")[0]) / f"{name}.safetensors")


@pytest.fixture
def dataset(comfy):
    """dataset(n) -> (folder name relative to the input folder, its real path) with n world images + captions."""
    import shutil
    import folder_paths
    from PIL import Image
    made = []

    def make(n: int = 4, size: int = 64) -> tuple[str, Path]:
        rel = f"lep_robust_{uuid.uuid4().hex[:8]}"
        d = Path(folder_paths.get_input_directory()) / rel
        d.mkdir(parents=True)
        for s in world.iter_samples(7, 0, n, size=size):
            Image.fromarray(s.image).save(d / f"w{s.index:03d}.png")
            (d / f"w{s.index:03d}.txt").write_text(s.caption)
        made.append(d)
        return rel, d
    yield make
    for d in made:
        shutil.rmtree(d, ignore_errors=True)


def train_prompt(folder: str, name: str, family: str = "sd15", **kw) -> dict:
    inputs = {"model": ["1", 0], "clip": ["1", 1], "vae": ["1", 2], "folder": folder, "name": name, "steps": 2,
              "batch_size": 2, "learning_rate": 1e-3, "resolution": 64, "edge_method": "canny", "seed": 0,
              "resume": True, "save_every": 0}
    inputs.update(kw)
    return {"1": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": family, "seed": 0}},
            "2": {"class_type": "AtelierTrainLEP", "inputs": inputs}}


def report_of(run_graph, prompt) -> str:
    return run_graph(prompt, want=["2"])["values"]["2"][1]


def error_of(run_graph, prompt) -> str:
    with pytest.raises(Exception) as e:
        run_graph(prompt)
    return str(e.value)


def meta_of(path: Path) -> dict:
    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        return dict(f.metadata() or {})


# ----------------------------------------------------------------------------- data loss

def test_a_name_holding_another_familys_predictor_is_refused_and_kept(run_graph, names, dataset):
    folder, _ = dataset()
    name = names("family")
    final, _ = paths(name)
    run_graph(train_prompt(folder, name, "sd15"))
    before = final.read_bytes()
    assert meta_of(final)["family"] == "sd15" and meta_of(final)["folder"] == folder
    for resume in (True, False):            # the probe's case (resume on), and training afresh
        msg = error_of(run_graph, train_prompt(folder, name, "sdxl", resume=resume))
        assert f"name: {final}" in msg and "sd15" in msg and "sdxl" in msg, msg
        assert "pick a new name" in msg and "'overwrite'" in msg and "left untouched" in msg, msg
        assert final.read_bytes() == before
    # Another training folder of the same family is another predictor too.
    other, _ = dataset()
    msg = error_of(run_graph, train_prompt(other, name, "sd15", resume=False))
    assert "folder" in msg and folder in msg and other in msg and final.read_bytes() == before, msg
    # The explicit switch replaces it.
    rep = report_of(run_graph, train_prompt(folder, name, "sdxl", overwrite=True))
    assert meta_of(final)["family"] == "sdxl" and "overwrite on" in rep, rep


def test_files_that_cannot_be_compared_are_not_replaced(run_graph, names, dataset, sk):
    """A foreign safetensors file, and an LEP of an older version that records no training folder."""
    from safetensors.torch import save_file
    folder, _ = dataset()
    name = names("foreign")
    final, _ = paths(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    save_file({"w": torch.ones(3)}, str(final))
    before = final.read_bytes()
    msg = error_of(run_graph, train_prompt(folder, name))
    assert f"name: {final}" in msg and "not an Atelier latent edge predictor" in msg and final.read_bytes() == before

    old = names("older")
    old_final, _ = paths(old)
    run_graph(train_prompt(folder, old, seed=3))
    tensors, meta = sk.glue.load_safetensors(old_final, "x")
    save_file(tensors, str(old_final), metadata={k: v for k, v in meta.items() if k not in ("folder", "seed")})
    before = old_final.read_bytes()
    msg = error_of(run_graph, train_prompt(folder, old, seed=3, resume=False))    # would train again and replace
    assert f"name: {old_final}" in msg and "records no folder" in msg and old_final.read_bytes() == before, msg
    rep = report_of(run_graph, train_prompt(folder, old, seed=3, save_every=5))  # loading it destroys nothing
    assert rep.startswith("already trained") and "records no folder" in rep and old_final.read_bytes() == before


def test_a_resume_checkpoint_of_another_training_is_refused_and_kept(run_graph, names, dataset, comfy):
    import comfy.model_management as mm
    import comfy.utils
    folder, _ = dataset()
    name = names("resume")
    final, ckpt = paths(name)

    def cancel_after_two(value, total, preview, node_id=None):   # the user presses Cancel after step 2
        if value == 2:
            mm.interrupt_current_processing()
    saved_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(cancel_after_two)
    try:
        msg = error_of(run_graph, train_prompt(folder, name, steps=6, save_every=1))
    finally:
        comfy.utils.set_progress_bar_global_hook(saved_hook)
        mm.interrupt_current_processing(False)
    assert "interrupted" in msg and ckpt.is_file() and not final.exists(), msg
    meta = meta_of(ckpt)
    assert meta["step"] == "2" and meta["family"] == "sd15" and meta["folder"] == folder
    before = ckpt.read_bytes()
    for resume in (True, False):
        msg = error_of(run_graph, train_prompt(folder, name, "sdxl", steps=6, resume=resume))
        assert f"name: {ckpt}" in msg and "sd15" in msg and "sdxl" in msg and "'overwrite'" in msg, msg
        assert ckpt.read_bytes() == before and not final.exists()
    other, _ = dataset()
    msg = error_of(run_graph, train_prompt(other, name, steps=6))
    assert f"name: {ckpt}" in msg and other in msg and ckpt.read_bytes() == before, msg
    # Its own training resumes from it, as before.
    rep = report_of(run_graph, train_prompt(folder, name, steps=6, save_every=1, seed=0))
    assert "resumed at 2" in rep and final.is_file() and not ckpt.exists(), rep


def test_already_trained_says_loudly_which_inputs_were_ignored(run_graph, names, dataset, caplog):
    folder, _ = dataset()
    name = names("ignored")
    final, _ = paths(name)
    run_graph(train_prompt(folder, name, steps=2))
    before = final.read_bytes()
    with caplog.at_level("WARNING"):
        rep = report_of(run_graph, train_prompt(folder, name, steps=2, learning_rate=5e-4, batch_size=3,
                                                edge_method="sobel", seed=9))
    assert rep.startswith("ALREADY TRAINED - INPUTS IGNORED"), rep
    for part in ("learning_rate 0.0005 (the file used 0.001)", "batch_size 3 (the file used 2)",
                 "edge_method sobel (the file used canny)", "seed 9 (the file used 0)", "pick a new name",
                 "set resume off"):
        assert part in rep, (part, rep)
    assert final.read_bytes() == before
    assert any("IGNORED" in r.getMessage() and "learning_rate" in r.getMessage() and r.levelname == "WARNING"
               for r in caplog.records)
    same = report_of(run_graph, train_prompt(folder, name, steps=1))   # nothing differs but fewer steps
    assert "IGNORED" in same and "steps 1 (the file has 2)" in same and "learning_rate" not in same, same


def test_old_ui_workflows_load_and_the_switch_is_the_last_widget(comfy):
    wf = json.loads((Path(__file__).resolve().parent.parent / "workflows" / "lep_training.json").read_text())
    node = next(n for n in wf["nodes"] if n["type"] == "AtelierTrainLEP")
    (nid, train), = [(k, v) for k, v in comfy.to_prompt(wf, tiny=True).items() if v["class_type"] == "AtelierTrainLEP"]
    assert train["inputs"].get("overwrite") is False            # today's file carries the switch, off, last
    node["widgets_values"] = list(node["widgets_values"])[:-1]  # the same node as a UI before the switch saved it
    prompt = comfy.to_prompt(wf, tiny=True)
    train = prompt[nid]
    assert "overwrite" not in train["inputs"] and train["inputs"]["save_every"] == node["widgets_values"][-1]
    comfy.validate(prompt)                         # a saved workflow without the new widget still validates
    node["widgets_values"] = list(node["widgets_values"]) + [True]
    train = comfy.to_prompt(wf, tiny=True)[nid]
    assert train["inputs"]["overwrite"] is True and train["inputs"]["save_every"] == node["widgets_values"][-2]


# ----------------------------------------------------------------------------- paths

def test_links_leading_out_of_the_folder_are_not_followed(run_graph, names, dataset, tmp_path):
    from PIL import Image
    folder, d = dataset(3)
    outside = tmp_path / "outside"
    outside.mkdir()
    for i, s in enumerate(world.iter_samples(8, 0, 2, size=64)):
        Image.fromarray(s.image).save(outside / f"secret{i}.png")
    (outside / "secret.txt").write_text("a secret caption")
    (d / "evil.png").symlink_to(outside / "secret0.png")
    (d / "linked").symlink_to(outside, target_is_directory=True)
    (d / "w000.txt").unlink()
    (d / "w000.txt").symlink_to(outside / "secret.txt")
    name = names("links")
    final, _ = paths(name)
    rep = report_of(run_graph, train_prompt(folder, name))
    assert meta_of(final)["images"] == "3", rep                # only the three real images were read
    assert "skipped 3 file(s)" in rep and "evil.png: links outside the folder" in rep, rep
    assert "linked: links outside the folder" in rep and "w000.txt: caption links outside the folder" in rep, rep
    # A folder input that is itself a link out of the input folder, or an absolute path elsewhere: refused.
    import folder_paths
    link = Path(folder_paths.get_input_directory()) / f"lep_link_{uuid.uuid4().hex[:8]}"
    link.symlink_to(outside, target_is_directory=True)
    try:
        for text in (link.name, str(outside)):
            msg = error_of(run_graph, train_prompt(text, names("linkfolder")))
            assert f"folder: {text} is outside the folders Atelier may use" in msg and str(outside) in msg, msg
    finally:
        link.unlink()


# ----------------------------------------------------------------------------- cancel and size

def test_cancel_stops_a_big_training_within_seconds(run_graph, names, dataset, comfy):
    """A training whose single step runs the UNet over a batch of 64 at 256 px (about a minute on this CPU):
    Cancel pressed a few seconds into a step must stop it within seconds, not at the end of the step."""
    import comfy.model_management as mm
    import comfy.utils
    folder, _ = dataset(4)
    name = names("cancel")
    final, ckpt = paths(name)
    out, seen = {}, []
    started = threading.Event()

    def on_progress(value, total, preview, node_id=None):   # the frontend's progress bar, as main.py installs it
        seen.append((value, time.monotonic()))
        started.set()

    def run():
        try:
            run_graph(train_prompt(folder, name, steps=1000, batch_size=64, resolution=256, save_every=0))
            out["result"] = "finished"
        except Exception as e:  # noqa: BLE001  (the executor's error, checked below)
            out["result"] = str(e)
    saved_hook = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(on_progress)
    th = threading.Thread(target=run, daemon=True)
    th.start()
    took = None
    try:
        assert started.wait(timeout=300), ("the training never reported progress", out)
        time.sleep(3.0)                      # inside the step that follows the first progress report
        assert th.is_alive(), out
        mm.interrupt_current_processing()
        t1 = time.monotonic()
        th.join(timeout=600)
        took = time.monotonic() - t1
        print(f"Cancel took {took:.1f} s; progress {[(v, round(t - t1, 1)) for v, t in seen]}")
    finally:
        mm.interrupt_current_processing()    # whatever failed above, stop the training before leaving
        th.join(timeout=600)
        mm.interrupt_current_processing(False)
        comfy.utils.set_progress_bar_global_hook(saved_hook)
    assert "interrupted at node 2" in out.get("result", ""), out
    assert took < 30, f"Cancel took {took:.1f} s"
    assert not final.exists()


def test_an_absurd_size_is_refused_up_front_with_the_estimate(run_graph, names, dataset):
    folder, _ = dataset(2)
    msg = error_of(run_graph, train_prompt(folder, names("huge"), resolution=2048, batch_size=256))
    assert "batch_size, resolution:" in msg and "GiB" in msg and "lower these inputs" in msg, msg
    needed = float(msg.split("needs about ")[1].split(" GiB")[0])
    assert needed > 100, msg                 # 256 x 256x256 latent pixels x ~960 feature channels, in fp32


# ----------------------------------------------------------------------------- foreign VAE

def test_a_foreign_vae_is_refused_by_training_and_guidance(run_graph, names, dataset):
    folder, _ = dataset(2)
    name = names("vae")
    prompt = train_prompt(folder, name)
    prompt["3"] = {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": "sdxl"}}
    prompt["2"]["inputs"]["vae"] = ["3", 2]
    msg = error_of(run_graph, prompt)
    assert "vae: this is a SDXL VAE but model is SD1.5" in msg, msg
    assert not paths(name)[0].exists()
    run_graph(train_prompt(folder, name))           # a proper sd15 predictor, then the wrong VAE for guidance
    canvas = json.dumps({"version": 1, "width": 64, "height": 64, "background": "",
                         "strokes": [{"mode": "draw", "size": 4, "points": [[10, 10], [50, 50]]}]})
    guide = {
        "1": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": "sd15", "seed": 0}},
        "3": {"class_type": "AtelierMiniCheckpointLoader", "inputs": {"family": "sdxl"}},
        "4": {"class_type": "AtelierLEPLoader", "inputs": {"lep_name": f"{name}.safetensors"}},
        "5": {"class_type": "AtelierSketchCanvas", "inputs": {"width": 64, "height": 64, "sketch": canvas}},
        "6": {"class_type": "AtelierSketchGuidance", "inputs": {
            "model": ["1", 0], "lep": ["4", 0], "vae": ["3", 2], "sketch": ["5", 0], "beta": 1.6,
            "start_percent": 0.0, "end_percent": 0.5, "grad_every": 1}},
        "7": {"class_type": "KSamplerSelect", "inputs": {"sampler_name": "euler"}},
        "8": {"class_type": "BasicScheduler", "inputs": {"model": ["6", 0], "scheduler": "normal", "steps": 2,
                                                         "denoise": 1.0}},
        "9": {"class_type": "PreviewAny", "inputs": {"source": ["8", 0]}},
    }
    msg = error_of(run_graph, guide)
    assert "vae: this is a SDXL VAE but model is SD1.5" in msg, msg


# ----------------------------------------------------------------------------- unreadable files

def test_corrupt_predictor_and_checkpoint_files_are_named(run_graph, names, dataset):
    folder, _ = dataset(2)
    name = names("corrupt")
    final, ckpt = paths(name)
    final.parent.mkdir(parents=True, exist_ok=True)
    final.write_bytes(b"\xff" * 64)                  # header length far beyond the file: "header too large"
    load = {"4": {"class_type": "AtelierLEPLoader", "inputs": {"lep_name": final.name}},
            "9": {"class_type": "PreviewAny", "inputs": {"source": ["4", 0]}}}
    msg = error_of(run_graph, load)
    assert f"lep_name: {final.name} ({final}) is not a readable latent edge predictor file" in msg, msg
    assert "train it again" in msg, msg
    msg = error_of(run_graph, train_prompt(folder, name))     # training must not silently replace it either
    assert f"name: {final}" in msg and "not a readable safetensors file" in msg and final.read_bytes() == b"\xff" * 64

    other = names("corrupt_ckpt")
    o_final, o_ckpt = paths(other)
    o_ckpt.parent.mkdir(parents=True, exist_ok=True)
    o_ckpt.write_bytes(b"\xff" * 64)
    msg = error_of(run_graph, train_prompt(folder, other))
    assert f"name: {o_ckpt}" in msg and "not a readable resume checkpoint" in msg, msg
    assert o_ckpt.read_bytes() == b"\xff" * 64 and not o_final.exists()


def _png_claiming(width: int, height: int) -> bytes:
    """A PNG whose header claims a huge size (PIL refuses it as a decompression bomb on open)."""
    def chunk(kind, data):
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", zlib.compress(b"\x00" * 16)) + \
        chunk(b"IEND", b"")


def test_unreadable_images_are_skipped_and_listed(run_graph, names, dataset):
    folder, d = dataset(3)
    (d / "broken.png").write_bytes(b"this is not an image")
    (d / "bomb.png").write_bytes(_png_claiming(30000, 30000))
    name = names("images")
    rep = report_of(run_graph, train_prompt(folder, name))
    assert meta_of(paths(name)[0])["images"] == "3", rep
    assert "skipped 2 file(s)" in rep and "broken.png: cannot identify image file" in rep, rep
    assert "bomb.png:" in rep and "decompression bomb" in rep, rep
    # Nothing readable: one clear error naming the folder and the files.
    bad, d2 = dataset(1)
    (d2 / "w000.png").write_bytes(b"garbage")
    msg = error_of(run_graph, train_prompt(bad, names("noimages")))
    assert "folder: none of the 1 images" in msg and "w000.png" in msg and "replace them" in msg, msg
