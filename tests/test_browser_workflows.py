"""Every example workflow in ComfyUI's real frontend, in a real headless Chromium.

Starts ComfyUI's server (127.0.0.1, free port, private base dir, the pack linked under an
arbitrary name, ATELIER_TINY_MODELS=1), loads each workflow as a file drop does, checks that the
frontend knows every node type and that queueing raises no validation errors, waits for the
outputs, and screenshots the graph. The widgets the frontend shows after loading are read back and
compared with what the file means (the headless converter's reading of it), and each graph must be
readable (titles drawn) as it opens in a 1280x800 window. Skips (saying why) without Chromium locally;
fails under CI.
"""
from __future__ import annotations

import json
import math
import urllib.request

import pytest

from atelier_testlib import IN_CI, ROOT, load_tool

WORKFLOWS = sorted((ROOT / "workflows").glob("*.json"))


@pytest.fixture(scope="module")
def front(comfy_path, comfy, tmp_path_factory):
    # ``comfy`` (the in-process ComfyUI some tests here read workflows with) boots first: it cannot boot once
    # Playwright's sync API runs its event loop in this thread.
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


# ----------------------------------------------------------------------------- widgets as the frontend shows them
CONTROL = "control_after_generate"
CONTROL_MODES = ("fixed", "increment", "decrement", "randomize")

_JS_WIDGETS = """() => window.app.graph._nodes.map(n => ({
  id: n.id, type: n.type, serialized: n.serialize().widgets_values ?? null,
  widgets: (n.widgets || []).map(w => ({name: w.name, value: w.value === undefined ? null : w.value}))}))"""


def _same(a, b) -> bool:
    if isinstance(a, bool) or isinstance(b, bool):
        return a is b
    if isinstance(a, (int, float)) and isinstance(b, (int, float)):
        return math.isclose(a, b, rel_tol=1e-6, abs_tol=1e-9)
    if isinstance(a, str) and isinstance(b, str) and a != b and a[:1] in "{[":
        try:  # a drawing (JSON in a STRING widget) may be re-serialised with other spacing
            return json.loads(a) == json.loads(b)
        except ValueError:
            return False
    if isinstance(a, list) and isinstance(b, list):
        return len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    return a == b


def widget_mismatches(shown: list[dict], wf: dict, meant: dict) -> list[str]:
    """Differences between the widgets the frontend shows and what the file means: each widget named after an
    input has the value the headless converter reads from the file (linked inputs excepted), each seed control
    holds a valid mode ('fixed' in the examples), and saving the loaded node gives the file's widgets_values back."""
    by_id = {n["id"]: n for n in wf["nodes"]}
    bad = []
    for node in shown:
        label = f"#{node['id']} {node['type']}"
        inputs = (meant.get(str(node["id"])) or {}).get("inputs", {})
        for w in node["widgets"]:
            name, value = w["name"], w["value"]
            if name == CONTROL:
                if value != "fixed":
                    bad.append(f"{label}: {CONTROL} shows {value!r} (file: a seed control must be one of {CONTROL_MODES}, "
                               f"'fixed' in the examples)")
            elif name in inputs and not isinstance(inputs[name], list) and not _same(value, inputs[name]):
                bad.append(f"{label}: {name} shows {value!r}, the file means {inputs[name]!r}")
        saved = by_id[node["id"]].get("widgets_values")
        if saved is not None and not _same(node["serialized"], saved):
            bad.append(f"{label}: saved again as {node['serialized']!r}, the file has {saved!r}")
    return bad


def test_widget_values_in_real_frontend_match_the_file(front, comfy):
    """Issue 20.6: the frontend adds a control widget after every seed; a file without its value shifts every later
    widget (Train LEP showed 'control after generate: true', save_every 500 for seed 0, resume true, save_every 100)."""
    problems = {}
    for path in WORKFLOWS:
        wf = json.loads(path.read_text())
        front.load(wf)
        bad = widget_mismatches(front.page.evaluate(_JS_WIDGETS), wf, comfy.to_prompt(wf))
        if bad:
            problems[path.name] = bad
    # A workflow the UI saved while these seeds still had a control carries its value after the seed
    # (web/js/seed_controls.js drops it on load): every value must still land on its own widget.
    wf = json.loads((ROOT / "workflows" / "lep_training.json").read_text())
    old = json.loads(json.dumps(wf))
    train = next(n for n in old["nodes"] if n["type"] == "AtelierTrainLEP")
    front.load(wf)
    names = next(n for n in front.page.evaluate(_JS_WIDGETS) if n["id"] == train["id"])["widgets"]
    train["widgets_values"].insert([w["name"] for w in names].index("seed") + 1, "randomize")
    front.load(old)
    bad = widget_mismatches(front.page.evaluate(_JS_WIDGETS), wf, comfy.to_prompt(wf))
    if bad:
        problems["lep_training.json saved by an older UI"] = bad
    assert not problems, "widgets in the real frontend differ from the files:\n" + "\n".join(
        f"{k}:\n  " + "\n  ".join(v) for k, v in problems.items())


# ----------------------------------------------------------------------------- readable graphs
WINDOW = (1280, 800)

_JS_LAYOUT = """() => {
  const c = window.app.canvas, ds = c.ds, dpr = window.devicePixelRatio || 1;
  const view = [c.canvas.width / dpr, c.canvas.height / dpr];
  const rects = window.app.graph._nodes.map(n => ({id: n.id, title: n.title, rect: [...n.boundingRect]}));
  const threshold = c.min_font_size_for_lod / (LiteGraph.NODE_TEXT_SIZE * Math.sqrt(dpr));
  const saved = {scale: ds.scale, offset: [...ds.offset]};
  // The frontend's own fit (Zoom to fit uses the same bounds, then leaves a 25 % margin) without the margin.
  let b = [Infinity, Infinity, -Infinity, -Infinity];
  for (const o of c.positionableItems) {
    const r = o.boundingRect;
    b = [Math.min(b[0], r[0]), Math.min(b[1], r[1]), Math.max(b[2], r[0] + r[2]), Math.max(b[3], r[1] + r[3])];
  }
  ds.fitToBounds([b[0] - 10, b[1] - 10, b[2] - b[0] + 20, b[3] - b[1] + 20], {zoom: 1});
  const fit = ds.scale;
  ds.scale = saved.scale; ds.offset = saved.offset;
  c.setDirty(true, true); c.draw(true, true);
  return {saved, fit, threshold, lowQuality: c.low_quality, view, rects};
}"""


def layout_problems(r: dict) -> list[str]:
    """What keeps a loaded graph from being read: a fitted zoom below the one where titles are drawn, a saved
    view that opens elsewhere (too small, or nodes outside the window), nodes on top of each other."""
    bad = []
    if r["fit"] < r["threshold"]:
        bad.append(f"fits the window only at zoom {r['fit']:.2f}; titles are drawn from {r['threshold']:.2f}")
    s, (ox, oy) = r["saved"]["scale"], r["saved"]["offset"]
    if s < r["threshold"] or r["lowQuality"]:
        bad.append(f"opens at zoom {s:.2f} (titles are drawn from {r['threshold']:.2f})")
    w, h = r["view"]
    for n in r["rects"]:
        x, y, rw, rh = n["rect"]
        sx0, sy0, sx1, sy1 = (x + ox) * s, (y + oy) * s, (x + rw + ox) * s, (y + rh + oy) * s
        if sx0 < -1 or sy0 < -1 or sx1 > w + 1 or sy1 > h + 1:
            bad.append(f"#{n['id']} {n['title']!r} is outside the {w:.0f}x{h:.0f} view it opens in "
                       f"({sx0:.0f},{sy0:.0f})-({sx1:.0f},{sy1:.0f})")
    rects = r["rects"]
    for i, a in enumerate(rects):
        for b in rects[i + 1:]:
            ax, ay, aw, ah = a["rect"]
            bx, by, bw, bh = b["rect"]
            if min(ax + aw, bx + bw) - max(ax, bx) > 1 and min(ay + ah, by + bh) - max(ay, by) > 1:
                bad.append(f"#{a['id']} {a['title']!r} overlaps #{b['id']} {b['title']!r}")
    return bad


def test_workflows_are_readable_in_a_1280x800_window(front):
    """Issue 20.8: knn_two_databases fitted a window only at 47 %, where the frontend draws no text. Each example
    opens (its saved view) and fits a 1280x800 window at a zoom where titles are drawn, nodes apart."""
    front.page.set_viewport_size({"width": WINDOW[0], "height": WINDOW[1]})
    try:
        front.page.wait_for_timeout(300)
        problems = {}
        for path in WORKFLOWS:
            front.load(json.loads(path.read_text()))
            bad = layout_problems(front.page.evaluate(_JS_LAYOUT))
            if bad:
                problems[path.name] = bad
    finally:
        front.page.set_viewport_size({"width": 1600, "height": 1000})
    assert not problems, "graphs not readable in a 1280x800 window:\n" + "\n".join(
        f"{k}:\n  " + "\n  ".join(v) for k, v in problems.items())
