"""Find (or install) the ComfyUI that Atelier runs in, and link the pack into it.

Standard library only: this runs before anything else is installed.

Search order (first hit wins):
  1. the ``COMFYUI_PATH`` environment variable;
  2. an enclosing ``custom_nodes/`` folder (the pack installed the usual way);
  3. comfy-cli's workspace: its configured default, else ``~/comfy/ComfyUI`` (Linux default);
  4. with ``install=True``: ``comfy --skip-prompt --workspace <ws> install`` (needs internet).
"""
from __future__ import annotations

import configparser
import os
import shutil
import subprocess
import sys
from pathlib import Path

PACK_ROOT = Path(__file__).resolve().parent.parent
LINK_NAME = "atelier"
DEFAULT_WORKSPACE = Path.home() / "comfy" / "ComfyUI"


class ComfyNotFound(RuntimeError):
    pass


def is_comfyui(path: Path) -> bool:
    """A ComfyUI tree is recognised by its files, like comfy-cli does (no .git needed)."""
    path = Path(path)
    return (path / "main.py").is_file() and (path / "nodes.py").is_file() and (path / "comfy").is_dir()


def _comfy_cli_default_workspace() -> Path | None:
    """comfy-cli keeps `comfy set-default` in its config.ini; honour it when present."""
    candidates = [
        Path(os.environ.get("XDG_CONFIG_HOME", Path.home() / ".config")) / "comfy-cli" / "config.ini",
        Path.home() / "Library" / "Application Support" / "comfy-cli" / "config.ini",
        Path(os.environ.get("LOCALAPPDATA", Path.home())) / "comfy-cli" / "config.ini",
    ]
    for cfg_path in candidates:
        if cfg_path.is_file():
            cfg = configparser.ConfigParser()
            try:
                cfg.read(cfg_path)
                ws = cfg.get("DEFAULT", "default_workspace", fallback=None)
            except configparser.Error:
                ws = None
            if ws:
                return Path(ws).expanduser()
    return None


def candidates() -> list[tuple[str, Path]]:
    out: list[tuple[str, Path]] = []
    env = os.environ.get("COMFYUI_PATH")
    if env:
        out.append(("COMFYUI_PATH", Path(env).expanduser()))
    # The pack folder (not its resolved target: a symlinked install counts as enclosed).
    for here in (Path(__file__).absolute().parent.parent, PACK_ROOT):
        if here.parent.name == "custom_nodes":
            out.append(("enclosing custom_nodes/", here.parent.parent))
    ws = _comfy_cli_default_workspace()
    if ws is not None:
        out.append(("comfy-cli default workspace", ws))
    out.append(("comfy-cli workspace ~/comfy/ComfyUI", DEFAULT_WORKSPACE))
    return out


def find_comfyui(install: bool = False, verbose: bool = True, env: dict | None = None) -> Path:
    """The first ComfyUI of ``candidates()``; with ``install``, comfy-cli installs one when none is found
    (``env``: the environment comfy-cli runs with, e.g. PYTHONPATH to a tools folder holding it)."""
    tried = []
    for why, path in candidates():
        if is_comfyui(path):
            if verbose:
                print(f"[atelier] ComfyUI found at {path} ({why})", file=sys.stderr)
            return path.resolve()
        tried.append(f"  - {why}: {path} ({'no ComfyUI there' if path.exists() else 'missing'})")
        if why == "COMFYUI_PATH":
            # An explicit path that is wrong is an error, not something to silently skip.
            raise ComfyNotFound(f"COMFYUI_PATH={path} is not a ComfyUI folder (no main.py/nodes.py/comfy/). "
                                "Point it at the folder that holds ComfyUI's main.py, or unset it.")
    if install:
        return install_comfyui(DEFAULT_WORKSPACE, tried, env=env)
    raise ComfyNotFound("ComfyUI was not found. Looked in:\n" + "\n".join(tried) +
                        "\nFix: set COMFYUI_PATH to your ComfyUI folder, install the pack inside "
                        "ComfyUI/custom_nodes/, or run `python tools/atelier.py setup` to install "
                        "ComfyUI with comfy-cli (needs internet).")


def install_comfyui(workspace: Path, tried: list[str], env: dict | None = None) -> Path:
    comfy = shutil.which("comfy")
    cmd_prefix = [comfy] if comfy else [sys.executable, "-m", "comfy_cli"]
    gpu = "--nvidia" if shutil.which("nvidia-smi") else "--cpu"
    cmd = cmd_prefix + ["--skip-prompt", "--workspace", str(workspace), "install", gpu]
    print(f"[atelier] ComfyUI not found; installing it with comfy-cli: {' '.join(cmd)}", file=sys.stderr)
    try:
        rc = subprocess.call(cmd, env=env)
    except OSError as e:
        rc = f"could not start ({e})"
    if rc == 0 and is_comfyui(workspace):
        return workspace.resolve()
    raise ComfyNotFound("ComfyUI was not found and `comfy install` failed (exit "
                        f"{rc}); it needs internet access to GitHub. Looked in:\n" + "\n".join(tried) +
                        "\nFix: install ComfyUI yourself and set COMFYUI_PATH to it.")


def link_pack(comfy_path: Path, name: str = LINK_NAME) -> Path:
    """Make the pack visible as ComfyUI/custom_nodes/<name>. Returns the path ComfyUI loads."""
    custom_nodes = Path(comfy_path) / "custom_nodes"
    custom_nodes.mkdir(parents=True, exist_ok=True)
    # Already inside custom_nodes (a normal install): nothing to link.
    for entry in custom_nodes.iterdir():
        try:
            if entry.resolve() == PACK_ROOT:
                return entry
        except OSError:
            continue
    link = custom_nodes / name
    if link.is_symlink():
        # A link from an earlier checkout (or a dangling one): point it at this checkout.
        old_target = os.readlink(link)
        link.unlink()
        print(f"[atelier] re-pointing {link} (was -> {old_target})", file=sys.stderr)
    elif link.exists():
        print(f"[atelier] {link} is a separate install of a pack; leaving it alone. ComfyUI will load "
              f"that copy, not {PACK_ROOT}.", file=sys.stderr)
        return link
    link.symlink_to(PACK_ROOT, target_is_directory=True)
    print(f"[atelier] linked {link} -> {PACK_ROOT}", file=sys.stderr)
    return link


if __name__ == "__main__":
    print(find_comfyui())
