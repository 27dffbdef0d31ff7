"""Every example workflow in ComfyUI's real frontend, in a real headless Chromium.

Starts ComfyUI's server (127.0.0.1, free port, private base dir, the pack linked under an
arbitrary name, ATELIER_TINY_MODELS=1), loads each workflow as a file drop does, checks that the
frontend knows every node type and that queueing raises no validation errors, waits for the
outputs, and screenshots the graph. Skips (saying why) without Chromium locally; fails under CI.
"""
from __future__ import annotations

import json
import urllib.request

import pytest

from atelier_testlib import IN_CI, ROOT, load_tool

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def front(comfy_path, tmp_path_factory):
    browser = load_tool("browser")
    if browser.chromium_path() is None:
        msg = "Chromium not installed: browser tests skipped (apt-get install chromium; setup does it under CI)"
        if IN_CI:
            pytest.fail(msg)
        pytest.skip(msg)
    base = tmp_path_factory.mktemp("server")
    with browser.ComfyServer(comfy_path=comfy_path, base_dir=base) as srv:
        try:
            f = browser.Frontend(srv)
        except browser.BrowserUnavailable as e:
            if IN_CI:
                pytest.fail(str(e))
            pytest.skip(str(e))
        f.shots = tmp_path_factory.mktemp("screenshots")
        f.base = base
        f.last_output = {}
        yield f
        f.close()


@pytest.mark.parametrize("path", WORKFLOWS, ids=[p.name for p in WORKFLOWS])
def test_workflow_runs_in_real_frontend(front, path):
    browser = load_tool("browser")
    wf = json.loads(path.read_text())
    errors_before = len(front.page_errors)
    r = browser.run_workflow_in_browser(front, wf)
    assert front.page_errors[errors_before:] == [], "the frontend threw while loading/running the workflow"
    assert r["missing"] == [], f"frontend does not know node types {r['missing']}"
    assert r["node_errors"] == {}, f"validation errors shown in the UI: {r['node_errors']}"
    status = r["history"]["status"]
    assert status["status_str"] == "success", f"execution failed: {status.get('messages')}\n{front.server.log_tail()}"
    images = browser.output_images(r["history"])
    assert images, "no output images"
    front.last_output[path.name] = images[0]
    shot = front.screenshot(front.shots / f"{path.stem}.png")
    assert shot.stat().st_size > 10_000


def test_broken_workflow_is_caught(front):
    browser = load_tool("browser")
    wf = json.loads((ROOT / "workflows" / "basic_txt2img.json").read_text())
    wf["nodes"][2]["type"] = "AtelierNodeThatDoesNotExist"
    r = browser.run_workflow_in_browser(front, wf)
    assert "AtelierNodeThatDoesNotExist" in r["missing"]


def test_output_png_restores_the_graph(front):
    browser = load_tool("browser")
    wf = json.loads((ROOT / "workflows" / "basic_txt2img.json").read_text())
    r = browser.run_workflow_in_browser(front, wf)
    img = browser.output_images(r["history"])[0]
    png = front.base / "output" / img.get("subfolder", "") / img["filename"]
    assert png.is_file()
    front.load({"nodes": [], "links": [], "version": 0.4, "last_node_id": 0, "last_link_id": 0})
    assert front.graph_types() == []
    front.load_file(png)
    assert front.graph_types() == sorted(n["type"] for n in wf["nodes"])


def test_node_help_shows_in_frontend(front):
    with urllib.request.urlopen(front.server.url + "/object_info", timeout=30) as resp:
        info = json.loads(resp.read())
    ids = sorted(k for k in info if k.startswith("Atelier"))
    assert ids, "no Atelier nodes in /object_info"
    assert all(info[k]["category"].startswith("atelier/") for k in ids)
    helps = front.node_help(ids)
    for node_id, h in helps.items():
        assert h is not None, f"{node_id} not registered in the frontend"
        assert len(h["description"]) > 20, f"{node_id}: no description in the frontend"
        assert h["missingTooltips"] == [], f"{node_id}: inputs without tooltip {h['missingTooltips']}"
