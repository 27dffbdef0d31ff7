"""Drive ComfyUI's real frontend in a real headless Chromium.

``ComfyServer`` starts ``main.py`` on 127.0.0.1 (a free port) with a private base directory whose
``custom_nodes/`` links this pack under an arbitrary name; ``ATELIER_TINY_MODELS=1`` makes the
server run the tiny seeded models in place of checkpoint files. ``Frontend`` opens it with
Playwright driving Debian's ``chromium`` (Playwright's own browser download does not work here),
loads workflows the way a file drop does (``app.loadGraphData``), queues them with the Run
button's path (``app.queuePrompt``) and reads results back.

Used by tests/test_browser_workflows.py and by ``python tools/atelier.py gallery``.
"""
from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path

import comfy_env

ROOT = Path(__file__).resolve().parent.parent
CHROMIUM_CANDIDATES = ("/usr/bin/chromium", "/usr/bin/chromium-browser", "/usr/bin/google-chrome")
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run", "--disable-quic"]


class BrowserUnavailable(RuntimeError):
    pass


def chromium_path() -> str | None:
    env = os.environ.get("ATELIER_CHROMIUM")
    for p in ([env] if env else []) + list(CHROMIUM_CANDIDATES):
        if p and Path(p).is_file():
            return p
    return shutil.which("chromium")


STARTUP_TIMEOUT = 600.0  # seconds; ATELIER_SERVER_TIMEOUT overrides


def startup_timeout() -> float:
    try:
        return float(os.environ.get("ATELIER_SERVER_TIMEOUT", STARTUP_TIMEOUT))
    except ValueError:
        return STARTUP_TIMEOUT


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, comfy_path: Path | None = None, base_dir: Path | None = None, tiny: bool | str = True):
        """``tiny``: True runs the tiny seeded models in place of checkpoints, "mini" Atelier Mini,
        False the real checkpoint files."""
        self.comfy_path = Path(comfy_path) if comfy_path else comfy_env.find_comfyui(verbose=False)
        self.base = Path(base_dir or tempfile.mkdtemp(prefix="atelier_server_"))
        self.port = _free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.tiny = tiny
        self.proc = None
        self.log_path = self.base / "server.log"

    def __enter__(self) -> "ComfyServer":
        custom = self.base / "custom_nodes"
        custom.mkdir(parents=True, exist_ok=True)
        link = custom / f"atelier_{uuid.uuid4().hex[:6]}"
        link.symlink_to(ROOT, target_is_directory=True)
        (self.base / "input").mkdir(exist_ok=True)
        example = self.comfy_path / "input" / "example.png"
        if example.is_file():
            shutil.copy(example, self.base / "input" / "example.png")
        env = dict(os.environ, ATELIER_TINY_MODELS="mini" if self.tiny == "mini" else ("1" if self.tiny else "0"), PYTHONUNBUFFERED="1")
        env.pop("PYTHONSAFEPATH", None)  # main.py imports its siblings from its own folder
        cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(self.port),
               "--base-directory", str(self.base), "--disable-auto-launch",
               "--database-url", f"sqlite:///{self.base / 'comfy.db'}"]
        self._log = open(self.log_path, "w")
        t0 = time.perf_counter()
        self.proc = subprocess.Popen(cmd, cwd=str(self.comfy_path), env=env, stdout=self._log, stderr=subprocess.STDOUT)
        try:
            self._wait_up(t0)
        except BaseException:
            self.__exit__(None, None, None)
            raise
        self.startup_seconds = time.perf_counter() - t0
        print(f"[atelier] ComfyUI server up on port {self.port} in {self.startup_seconds:.1f} s", file=sys.stderr,
              flush=True)
        return self

    def _wait_up(self, t0: float) -> None:
        """Wait until the port takes connections and /system_stats answers, up to STARTUP_TIMEOUT seconds
        (a loaded machine can take minutes to import ComfyUI); the server exiting ends the wait at once."""
        limit = startup_timeout()
        while time.perf_counter() - t0 < limit:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI server exited early (code {self.proc.returncode}) after "
                                   f"{time.perf_counter() - t0:.0f} s; log:\n{self.log_tail()}")
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=2):
                    pass
                self.get_json("/system_stats")
                return
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        raise RuntimeError(f"ComfyUI server did not come up in {limit:.0f} s (ATELIER_SERVER_TIMEOUT raises the "
                           f"bound); log:\n{self.log_tail()}")

    def __exit__(self, *exc):
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
        if getattr(self, "_log", None):
            self._log.close()

    def log_tail(self, n: int = 4000) -> str:
        try:
            return self.log_path.read_text(errors="replace")[-n:]
        except OSError:
            return ""

    def get_json(self, path: str):
        with urllib.request.urlopen(self.url + path, timeout=10) as r:
            return json.loads(r.read().decode())

    def post_json(self, path: str, data):
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"}, method="POST")
        with urllib.request.urlopen(req, timeout=30) as r:
            body = r.read().decode()
            return json.loads(body) if body else None

    def wait_history(self, prompt_id: str, timeout: float = 300) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            hist = self.get_json(f"/history/{prompt_id}")
            if prompt_id in hist and hist[prompt_id].get("status", {}).get("completed") is not None:
                entry = hist[prompt_id]
                if entry["status"].get("status_str") in ("success", "error"):
                    return entry
            time.sleep(0.3)
        raise TimeoutError(f"prompt {prompt_id} did not finish in {timeout} s")


# JS run in the page -------------------------------------------------------------------------
_JS_MISSING = """() => {
  const reg = window.LiteGraph.registered_node_types;
  return window.app.graph._nodes.filter(n => !reg[n.type]).map(n => n.type);
}"""

_JS_QUEUE = """async () => {
  const api = window.app.api;
  let captured = null;
  const orig = api.queuePrompt.bind(api);
  api.queuePrompt = async (...args) => { const r = await orig(...args); captured = r; return r; };
  try {
    await window.app.queuePrompt(0, 1);
  } finally {
    api.queuePrompt = orig;
  }
  const errs = window.app.lastNodeErrors || {};
  return {response: captured, nodeErrors: errs, execError: window.app.lastExecutionError || null};
}"""

_JS_NODE_HELP = """(ids) => {
  const out = {};
  for (const id of ids) {
    const t = window.LiteGraph.registered_node_types[id];
    const d = t && t.nodeData;
    if (!d) { out[id] = null; continue; }
    const inputs = Object.assign({}, (d.input||{}).required||{}, (d.input||{}).optional||{});
    const noTip = Object.entries(inputs).filter(([k, v]) => !(v[1] && v[1].tooltip)).map(([k]) => k);
    out[id] = {description: d.description || "", category: d.category, missingTooltips: noTip};
  }
  return out;
}"""


class Frontend:
    """A Playwright page on the server's real frontend."""

    def __init__(self, server: ComfyServer, viewport=(1600, 1000)):
        exe = chromium_path()
        if exe is None:
            raise BrowserUnavailable("chromium is not installed (Debian: apt-get install chromium)")
        try:
            from playwright.sync_api import sync_playwright
        except ImportError as e:
            raise BrowserUnavailable(f"playwright is not installed ({e}); pip install playwright") from None
        self.server = server
        self._pw = sync_playwright().start()
        self.browser = self._pw.chromium.launch(executable_path=exe, headless=True, args=CHROMIUM_ARGS)
        self.page = self.browser.new_page(viewport={"width": viewport[0], "height": viewport[1]})
        self.console_errors: list[str] = []
        self.page_errors: list[str] = []  # uncaught JS exceptions
        self.page.on("console", lambda m: self.console_errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.page_errors.append(str(e)))
        # Skip the first-visit template browser.
        for key, value in (("Comfy.TutorialCompleted", True), ("Comfy.Workflow.ShowMissingModelsWarning", False)):
            try:
                server.post_json(f"/settings/{key}", value)
            except Exception:
                pass
        # Generous waits: on a busy 2-core machine the frontend's first load has taken over 60 s.
        self.page.goto(server.url, wait_until="domcontentloaded", timeout=180_000)
        self.page.wait_for_function("() => window.app && window.app.graph && window.LiteGraph", timeout=180_000)
        self.page.wait_for_timeout(500)
        self.close_dialogs()

    def close(self):
        try:
            self.browser.close()
        finally:
            self._pw.stop()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close_dialogs(self):
        for _ in range(3):
            closed = self.page.evaluate("""() => {
              const btns = [...document.querySelectorAll('.p-dialog-header-close, .p-dialog-close-button, button[aria-label="Close"]')];
              btns.forEach(b => b.click());
              return btns.length;
            }""")
            if not closed:
                break
            self.page.wait_for_timeout(200)

    def load(self, workflow: dict) -> list[str]:
        """Load a UI workflow as a file drop would; returns node types the frontend doesn't know."""
        self.page.evaluate("async (wf) => { await window.app.loadGraphData(wf); }", workflow)
        self.page.wait_for_timeout(300)
        self.close_dialogs()
        return self.page.evaluate(_JS_MISSING)

    def load_file(self, path: Path, mime: str = "image/png") -> None:
        """Drop a file (e.g. an output PNG carrying its workflow) on the app."""
        data = list(Path(path).read_bytes())
        self.page.evaluate("""async ([bytes, name, mime]) => {
            const file = new File([new Uint8Array(bytes)], name, {type: mime});
            await window.app.handleFile(file);
        }""", [data, Path(path).name, mime])
        self.page.wait_for_timeout(500)
        self.close_dialogs()

    def graph_types(self) -> list[str]:
        return self.page.evaluate("() => window.app.graph._nodes.map(n => n.type).sort()")

    def queue(self) -> dict:
        return self.page.evaluate(_JS_QUEUE)

    def node_help(self, ids: list[str]) -> dict:
        return self.page.evaluate(_JS_NODE_HELP, ids)

    def fit_view(self):
        self.page.evaluate("""() => {
            const c = window.app.canvas, nodes = window.app.graph._nodes;
            if (!c || !c.ds || !nodes.length) return;
            let x0 = 1e9, y0 = 1e9, x1 = -1e9, y1 = -1e9;
            for (const n of nodes) {
                x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - 30);
                x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
            }
            const s = Math.min(c.canvas.width / (x1 - x0 + 80), c.canvas.height / (y1 - y0 + 80), 1.2);
            c.ds.scale = s; c.ds.offset = [-x0 + 40 / s, -y0 + 40 / s];
            c.setDirty(true, true);
        }""")
        self.page.wait_for_timeout(300)

    def screenshot(self, path: Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        # the minimap panel covers the bottom-right corner, where a workflow's output image often is
        self.page.evaluate("""async () => {
            try { await window.app.extensionManager.setting.set('Comfy.Minimap.Visible', false); } catch (e) {}
        }""")
        self.page.wait_for_timeout(200)
        self.fit_view()
        self.page.screenshot(path=str(path))
        return path


def run_workflow_in_browser(front: Frontend, workflow: dict, timeout: float = 300) -> dict:
    """Load, queue and wait. Returns {'missing', 'node_errors', 'history', 'seconds'}."""
    t0 = time.perf_counter()
    missing = front.load(workflow)
    if missing:
        return {"missing": missing, "node_errors": {}, "history": None, "seconds": 0.0}
    q = front.queue()
    resp = q.get("response") or {}
    node_errors = q.get("nodeErrors") or (resp.get("node_errors") if isinstance(resp, dict) else {}) or {}
    if node_errors or not isinstance(resp, dict) or "prompt_id" not in resp:
        return {"missing": [], "node_errors": node_errors or {"queue": resp}, "history": None, "seconds": 0.0}
    history = front.server.wait_history(resp["prompt_id"], timeout=timeout)
    # Let the frontend receive the "executed" messages and draw the previews.
    front.page.wait_for_timeout(800)
    return {"missing": [], "node_errors": {}, "history": history, "seconds": time.perf_counter() - t0}


def output_images(history: dict) -> list[dict]:
    out = []
    for node_out in (history or {}).get("outputs", {}).values():
        out.extend(i for i in node_out.get("images", []) or [] if isinstance(i, dict))
    return out


def make_gallery(workflows: list[Path], out_dir: Path, comfy_path: Path | None = None, mode: bool | str = "mini",
                 timeout: float = 900) -> list[dict]:
    """Run every workflow in the real frontend and save a screenshot of the graph with its result
    (``mode``: "mini" draws with Atelier Mini, True with the tiny seeded models; ``timeout``: seconds per workflow:
    flux_sketch_fast, which trains its LEP on the first run, took 235-250 s on the busy 2-core machine)."""
    rows = []
    with ComfyServer(comfy_path=comfy_path, tiny=mode) as srv, Frontend(srv) as front:
        for path in workflows:
            wf = json.loads(Path(path).read_text())
            r = run_workflow_in_browser(front, wf, timeout=timeout)
            ok = not r["missing"] and not r["node_errors"] and r["history"] and \
                r["history"]["status"]["status_str"] == "success"
            shot = front.screenshot(Path(out_dir) / f"{Path(path).stem}.png")
            rows.append({"workflow": Path(path).name, "seconds": round(r["seconds"], 2),
                         "images": len(output_images(r["history"])), "ok": bool(ok), "screenshot": str(shot)})
    return rows
