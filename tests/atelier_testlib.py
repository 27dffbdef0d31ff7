"""Helpers shared by the tests (imported as `from atelier_testlib import ...`)."""
from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TOOLS = ROOT / "tools"
# Never import the repo root as a path entry: its nodes/ would shadow ComfyUI's nodes module.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != ROOT]
if str(TOOLS) not in sys.path:
    sys.path.insert(0, str(TOOLS))

import comfy_env  # noqa: E402,F401  (re-exported to conftest)
from pure_models import load_models  # noqa: E402,F401  (tools/pure_models.py: models/ as `atelier_models`)

IN_CI = os.environ.get("CI", "").lower() in ("1", "true", "yes")


def load_tool(name: str):
    """Import tools/<name>.py by path."""
    spec = importlib.util.spec_from_file_location(name, TOOLS / f"{name}.py")
    mod = sys.modules.get(name)
    if mod is None:
        mod = importlib.util.module_from_spec(spec)
        sys.modules[name] = mod
        spec.loader.exec_module(mod)
    return mod


def txt2img_prompt(family="sd15", seed=0, size=64, steps=4, text="a red circle", cfg=7.0, sampler="euler",
                   scheduler="normal", denoise=1.0, noise_seed=1, model_node=None):
    """API prompt for the plain core graph on a tiny family. Node ids: 1 loader, 5 KSampler, 6 decode."""
    p = {
        "1": {"class_type": "AtelierTinyCheckpointLoader", "inputs": {"family": family, "seed": seed}},
        "2": {"class_type": "CLIPTextEncode", "inputs": {"text": text, "clip": ["1", 1]}},
        "3": {"class_type": "CLIPTextEncode", "inputs": {"text": "", "clip": ["1", 1]}},
        "4": {"class_type": "EmptyLatentImage", "inputs": {"width": size, "height": size, "batch_size": 1}},
        "5": {"class_type": "KSampler", "inputs": {
            "model": model_node or ["1", 0], "positive": ["2", 0], "negative": ["3", 0], "latent_image": ["4", 0],
            "seed": noise_seed, "steps": steps, "cfg": cfg, "sampler_name": sampler, "scheduler": scheduler,
            "denoise": denoise}},
        "6": {"class_type": "VAEDecode", "inputs": {"samples": ["5", 0], "vae": ["1", 2]}},
        "7": {"class_type": "PreviewImage", "inputs": {"images": ["6", 0]}},
    }
    return p


