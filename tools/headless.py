"""Run ComfyUI workflows headless, in this process, through ComfyUI's own executor.

Used by the CLI (``tools/atelier.py run|demo``), the tests and the benches. It boots ComfyUI the
way ``main.py`` does (argument parsing, folders, built-in extra nodes), loads the pack through
ComfyUI's own custom-node loader, converts UI-format workflows (what users save and share) into
the executor's API format using the *live* node definitions, validates them with ComfyUI's
validator and executes them with ``execution.PromptExecutor``.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import sys
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
PACK_ROOT = HERE.parent

# The repo has a `nodes/` package; ComfyUI has a top-level `nodes` module. Never let the repo
# root (or the tools folder) shadow it.
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() not in (PACK_ROOT, HERE)]
sys.path.insert(0, str(HERE))

import comfy_env  # noqa: E402  (tools/comfy_env.py)
import ui_to_api  # noqa: E402  (tools/ui_to_api.py)

log = logging.getLogger("atelier.headless")


class WorkflowError(RuntimeError):
    """A workflow could not be converted, validated or executed; the message says why."""


class _HeadlessServer:
    """The few members of PromptServer that the executor touches."""

    def __init__(self):
        self.client_id = None
        self.last_node_id = None
        self.last_prompt_id = None
        self.sockets_metadata = {}
        self.events: list[tuple[str, dict]] = []
        self.listener = None  # fn(event, data), see Headless.listen

    def send_sync(self, event, data, sid=None):
        self.events.append((event, data))
        if self.listener is not None:
            self.listener(event, data)

    def queue_updated(self):
        pass


class Headless:
    """One in-process ComfyUI. Only one can exist per process (ComfyUI is a singleton)."""

    _booted: "Headless | None" = None

    def __init__(self, comfy_path: str | os.PathLike | None = None, output_dir: str | None = None,
                 input_dir: str | None = None, user_dir: str | None = None, pack_path: str | None = None,
                 cpu: bool | None = None, extra_args: list[str] | None = None, base_dir: str | None = None):
        """``base_dir``: ComfyUI's ``--base-directory`` (models/, input/, output/, temp/, user/ all under
        it, nothing read from or written into the ComfyUI folder's own); the other ``*_dir`` override it."""
        if Headless._booted is not None:
            raise RuntimeError("ComfyUI is already booted in this process; reuse Headless.current().")
        self.comfy_path = Path(comfy_path) if comfy_path else comfy_env.find_comfyui(verbose=False)
        argv = ["main.py", "--disable-auto-launch"]
        if cpu is None:
            cpu = not _cuda_available()
        if cpu:
            argv.append("--cpu")
        for flag, value in (("--base-directory", base_dir), ("--output-directory", output_dir), ("--input-directory", input_dir),
                            ("--user-directory", user_dir)):
            if value:
                Path(value).mkdir(parents=True, exist_ok=True)
                argv += [flag, str(value)]
        argv += list(extra_args or [])
        self._boot(argv, pack_path)
        Headless._booted = self

    @classmethod
    def current(cls) -> "Headless | None":
        return cls._booted

    # -- boot -------------------------------------------------------------------------------
    def _boot(self, argv: list[str], pack_path: str | None):
        t0 = time.perf_counter()
        sys.path.insert(0, str(self.comfy_path))
        saved_argv = sys.argv
        sys.argv = argv
        try:
            import comfy.options
            comfy.options.enable_args_parsing()
            from comfy.cli_args import args  # parses sys.argv
            # As main.py does, import ComfyUI's top-level `utils` package first: a later import
            # puts comfy/ on sys.path, where comfy/utils.py would shadow it.
            import utils.extra_config  # noqa: F401
        finally:
            sys.argv = saved_argv
        import folder_paths
        if args.output_directory:
            folder_paths.set_output_directory(os.path.abspath(args.output_directory))
        if args.input_directory:
            folder_paths.set_input_directory(os.path.abspath(args.input_directory))
        if args.user_directory:
            folder_paths.set_user_directory(os.path.abspath(args.user_directory))
        import execution
        import nodes
        self.args = args
        self.folder_paths = folder_paths
        self.execution = execution
        self.nodes = nodes
        # Same order as main.py: core extra nodes, then custom nodes.
        asyncio.run(nodes.init_extra_nodes(init_custom_nodes=False, init_api_nodes=False))
        # The pack is loaded from this checkout through ComfyUI's own loader, whatever is linked
        # into ComfyUI/custom_nodes (that link is for the user's server; see `setup`).
        self.pack_path = str(pack_path or PACK_ROOT)
        ok = asyncio.run(nodes.load_custom_node(self.pack_path))
        if not ok:
            raise WorkflowError(f"ComfyUI could not load the Atelier pack from {self.pack_path}; see the log above.")
        # ComfyUI registers a folder package under its path (dots escaped) in sys.modules.
        self.pack_module = sys.modules[self.pack_path.replace(".", "_x_")]
        self.server = _HeadlessServer()
        self.executor = execution.PromptExecutor(self.server, cache_type=execution.CacheType.CLASSIC)
        self.boot_seconds = time.perf_counter() - t0
        log.info("ComfyUI booted in %.1fs from %s", self.boot_seconds, self.comfy_path)

    def listen(self, fn) -> None:
        """Call ``fn(event, data)`` for what a server would send its clients: the executor's events
        ("executing", "executed", ...) and "progress" ({"node", "value", "max"}) from every node's
        ``comfy.utils.ProgressBar``, as main.py's hook does (Cancel is honoured there too). ``None`` stops it."""
        import comfy.model_management
        import comfy.utils
        self.server.listener = fn
        if fn is None:
            comfy.utils.set_progress_bar_global_hook(None)
            return
        from comfy_execution.utils import get_executing_context

        def hook(value, total, preview_image, prompt_id=None, node_id=None):
            ctx = get_executing_context()
            if node_id is None:
                node_id = ctx.node_id if ctx is not None else self.server.last_node_id
            comfy.model_management.throw_exception_if_processing_interrupted()
            fn("progress", {"node": node_id, "value": value, "max": total})
        comfy.utils.set_progress_bar_global_hook(hook)

    # -- node definitions ---------------------------------------------------------------------
    @property
    def node_classes(self) -> dict:
        return self.nodes.NODE_CLASS_MAPPINGS

    def atelier_node_ids(self) -> list[str]:
        return sorted(k for k in self.node_classes if k.startswith("Atelier"))

    # -- workflows ----------------------------------------------------------------------------
    def load_workflow(self, path: str | os.PathLike) -> dict:
        path = Path(path)
        try:
            return json.loads(path.read_text(encoding="utf-8"))
        except FileNotFoundError:
            raise WorkflowError(f"workflow file not found: {path}") from None
        except json.JSONDecodeError as e:
            raise WorkflowError(f"workflow {path} is not valid JSON ({e}).") from None

    def to_prompt(self, workflow: dict, tiny: bool = False, mini: bool = False) -> dict:
        """UI-format workflow -> API-format prompt, using the live node definitions; ``tiny``
        points the checkpoint loaders at the tiny seeded models, ``tiny`` + ``mini`` at Atelier Mini."""
        if "nodes" not in workflow:  # already API format
            prompt = json.loads(json.dumps(workflow))
        else:
            prompt = ui_to_api.convert(workflow, self.node_classes)
        if tiny:
            prompt = ui_to_api.substitute_tiny(prompt, mini=mini)
        return prompt

    def validate(self, prompt: dict) -> list[str]:
        valid = asyncio.run(self.execution.validate_prompt(str(uuid.uuid4()), prompt, None))
        ok, error, outputs, node_errors = valid
        # ComfyUI runs the outputs that validate and silently drops the others; a headless run
        # must not pass with half its graph skipped, so any node error fails it.
        if not ok or node_errors:
            error = error or {"message": "Some nodes failed validation", "details": ""}
            raise WorkflowError(format_validation_error(prompt, error, node_errors))
        return outputs

    def run_prompt(self, prompt: dict, extra_data: dict | None = None) -> dict:
        """Validate and execute an API-format prompt; returns {'outputs': ..., 'seconds': ...}."""
        outputs = self.validate(prompt)
        prompt_id = str(uuid.uuid4())
        t0 = time.perf_counter()
        self.executor.execute(prompt, prompt_id, extra_data or {}, outputs)
        seconds = time.perf_counter() - t0
        if not self.executor.success:
            raise WorkflowError(format_execution_error(self.executor.status_messages))
        return {"prompt_id": prompt_id, "outputs": self.executor.history_result["outputs"], "seconds": seconds}

    def run_workflow(self, workflow: dict | str | os.PathLike, tiny: bool = False, extra_data: dict | None = None,
                     mini: bool = False, edit_prompt=None) -> dict:
        """``edit_prompt(prompt) -> prompt``: changes the API prompt before it runs (the demo's own
        settings); the workflow embedded in saved PNGs stays the file's."""
        if not isinstance(workflow, dict):
            workflow = self.load_workflow(workflow)
        prompt = self.to_prompt(workflow, tiny=tiny, mini=mini)
        if edit_prompt is not None:
            prompt = edit_prompt(prompt)
        # Like the frontend: the workflow travels with the prompt, so saved PNGs carry it.
        extra = {"extra_pnginfo": {"workflow": workflow}} if "nodes" in workflow else {}
        extra.update(extra_data or {})
        result = self.run_prompt(prompt, extra)
        result["images"] = self.output_files(result["outputs"])
        return result

    def output_files(self, outputs: dict) -> list[Path]:
        files = []
        for node_out in outputs.values():
            for item in node_out.get("images", []) or []:
                if not isinstance(item, dict) or "filename" not in item:
                    continue
                base = {"output": self.folder_paths.get_output_directory(),
                        "temp": self.folder_paths.get_temp_directory(),
                        "input": self.folder_paths.get_input_directory()}.get(item.get("type", "output"))
                if base:
                    files.append(Path(base) / item.get("subfolder", "") / item["filename"])
        return files


def _cuda_available() -> bool:
    try:
        import torch
        return torch.cuda.is_available()
    except Exception:
        return False


def format_validation_error(prompt: dict, error: dict, node_errors: dict) -> str:
    lines = [f"{error.get('message', 'invalid prompt')}: {error.get('details', '')}".rstrip(": ")]
    for node_id, info in (node_errors or {}).items():
        ctype = info.get("class_type") or prompt.get(node_id, {}).get("class_type", "?")
        for err in info.get("errors", []):
            extra = err.get("extra_info", {}) or {}
            what = extra.get("input_name")
            lines.append(f"  node {node_id} ({ctype}){' input ' + what if what else ''}: "
                         f"{err.get('message', '')} - {err.get('details', '')}")
    return "\n".join(lines)


def format_execution_error(messages: list) -> str:
    for event, data in messages:
        if event == "execution_error":
            return (f"node {data.get('node_id')} ({data.get('node_type')}) failed: "
                    f"{data.get('exception_type', '')}: {data.get('exception_message', '').strip()}")
        if event == "execution_interrupted":
            return f"interrupted at node {data.get('node_id')} ({data.get('node_type')})"
    return "execution failed (no error message was recorded)"
