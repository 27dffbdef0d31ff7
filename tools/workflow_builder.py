"""Build UI-format workflows (the JSON the ComfyUI frontend saves) from Python.

The example workflows in ``workflows/`` are written with this, against the live node
definitions, so widget order, slot types and links are right by construction::

    g = WorkflowBuilder(class_mappings)
    ck = g.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    pos = g.node("CLIPTextEncode", text="a red circle", clip=ck[1])
    g.save("workflows/x.json")

Layout (``to_json``): columns by link depth, each node sized as ComfyUI's frontend sizes it (it enlarges a
node smaller than that on load), columns folded onto each other while the graph is wider than a
1280x800 window shows at a zoom where the frontend still draws titles; the saved view (``extra.ds``)
opens on the whole graph at that zoom. tests/test_browser_workflows.py checks it in the real frontend.
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import ui_to_api


class Out:
    def __init__(self, node: "NodeRef", slot: int):
        self.node, self.slot = node, slot


class NodeRef:
    def __init__(self, builder: "WorkflowBuilder", data: dict, out_types: list[str]):
        self.builder, self.data, self.out_types = builder, data, out_types

    @property
    def id(self) -> int:
        return self.data["id"]

    def __getitem__(self, slot: int) -> Out:
        if not 0 <= slot < len(self.out_types):
            raise IndexError(f"{self.data['type']} has {len(self.out_types)} outputs, not slot {slot}")
        return Out(self, slot)


def _output_types(cls) -> list[str]:
    types = getattr(cls, "RETURN_TYPES", ()) or ()
    return [t if isinstance(t, str) else "COMBO" for t in types]


def _output_names(cls, types) -> list[str]:
    names = getattr(cls, "RETURN_NAMES", None) or types
    return list(names)


# How ComfyUI's frontend (1.27) sizes a node: 20 px per slot row, 24 px per widget, a multiline text box at
# least 54 px, 14 px of padding under widgets (6 without), a 30 px title bar above ``pos``; measured with
# node.computeSize() in the real frontend.
SLOT_H, WIDGET_H, MULTILINE_H, TITLE_H = 20, 24, 54, 30
MIN_W = 210
# Extra room for what a node shows below its widgets: image previews (also after a run), drawing canvases.
EXTRA_H = {"SaveImage": 200, "PreviewImage": 200, "LoadImage": 200, "AtelierSketchCanvas": 230}
PROMPT_H = 90          # a multiline prompt box a bit taller than the minimum, so a prompt reads at a glance
GAP_X, GAP_Y = 40, 30  # between columns; between a node's bottom and the next node's title bar
# The view: a 1280x800 window gives the canvas 1216x722 px (measured); below a zoom of 8/14 (the frontend's default
# 8 px minimum font over its 14 px node text) the frontend stops drawing titles and widgets.
VIEW_W, VIEW_H, MARGIN = 1216, 722, 20
TEXT_ZOOM = 8 / 14
TARGET_ZOOM = 0.65     # lay out for this zoom, a little above TEXT_ZOOM


class WorkflowBuilder:

    def __init__(self, class_mappings: dict):
        self.classes = class_mappings
        self.nodes: list[dict] = []
        self.links: list[list] = []
        self.depth: dict[int, int] = {}
        self.groups: list[dict] = []

    def node(self, node_type: str, title: str | None = None, **kwargs) -> NodeRef:
        if node_type not in self.classes:
            raise KeyError(f"node type {node_type!r} is not registered")
        cls = self.classes[node_type]
        defs = cls.INPUT_TYPES()
        ordered = list((defs.get("required") or {}).items()) + list((defs.get("optional") or {}).items())
        known = {name for name, _ in ordered}
        unknown = set(kwargs) - known
        if unknown:
            raise KeyError(f"{node_type} has no inputs {sorted(unknown)}; it has {sorted(known)}")
        nid = len(self.nodes) + 1
        widgets, inputs, depth = [], [], 0
        for name, spec in ordered:
            value = kwargs.get(name)
            if isinstance(value, Out):
                link_id = len(self.links) + 1
                src = value.node
                typ = src.out_types[value.slot]
                self.links.append([link_id, src.id, value.slot, nid, len(inputs), typ])
                src.data["outputs"][value.slot]["links"].append(link_id)
                entry = {"name": name, "type": typ, "link": link_id}
                if ui_to_api._is_widget(spec):
                    entry["widget"] = {"name": name}
                inputs.append(entry)
                depth = max(depth, self.depth[src.id] + 1)
            elif not ui_to_api._is_widget(spec) and name in (defs.get("required") or {}):
                raise ValueError(f"{node_type}.{name} ({spec[0]}) needs a link")
            elif not ui_to_api._is_widget(spec):
                inputs.append({"name": name, "type": spec[0], "link": None})
            if ui_to_api._is_widget(spec):
                if value is None or isinstance(value, Out):
                    value = _default(spec)  # a linked widget keeps its slot, as in the frontend
                widgets.append(value)
                opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
                if ui_to_api.has_control(name, spec):
                    widgets.append("fixed")  # the frontend's control widget: examples keep their seeds
                if any(opts.get(f) for f in ui_to_api.UPLOAD_FLAGS):
                    widgets.append("image")
        out_types = _output_types(cls)
        outputs = [{"name": n, "type": t, "links": [], "slot_index": i}
                   for i, (n, t) in enumerate(zip(_output_names(cls, out_types), out_types))]
        data = {
            "id": nid, "type": node_type,
            "pos": [0, 0],  # set by _layout
            "size": list(_node_size(cls, node_type, title, ordered, kwargs, inputs, outputs)),
            "flags": {}, "order": nid - 1, "mode": 0,
            "inputs": inputs, "outputs": outputs,
            "properties": {"Node name for S&R": node_type},
            "widgets_values": widgets,
        }
        if title:
            data["title"] = title
        self.nodes.append(data)
        self.depth[nid] = depth
        return NodeRef(self, data, out_types)

    def note(self, text: str, title: str = "About this workflow") -> None:
        nid = len(self.nodes) + 1
        self.nodes.append({"id": nid, "type": "Note", "title": title, "pos": [0, 0], "size": [700, 200],
                           "flags": {}, "order": nid - 1, "mode": 0, "inputs": [], "outputs": [],
                           "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        self.depth[nid] = -1

    # -- layout --------------------------------------------------------------------------------------------
    def _columns(self, balance: str = "") -> list[list[dict]]:
        """Nodes by link depth. ``balance`` "back" / "forward": then each node (last created first, or first
        created first) moves to the lowest column between its own depth and its first consumer's (above the
        consumer there), so no column grows much taller than the others: a loader, an empty latent or a prompt
        sits next to the node it feeds."""
        by_id = {n["id"]: n for n in self.nodes}
        depth = {nid: d for nid, d in self.depth.items() if d >= 0}
        consumers: dict[int, list[int]] = {}
        for _lid, src, _s, dst, _d, _t in self.links:
            consumers.setdefault(src, []).append(dst)
        n_cols = max(depth.values(), default=-1) + 1
        tall = {nid: by_id[nid]["size"][1] + TITLE_H + GAP_Y for nid in depth}
        height = [0.0] * n_cols
        for nid, d in depth.items():
            height[d] += tall[nid]
        for nid in sorted(depth, reverse=balance == "back") if balance else []:
            if not consumers.get(nid):
                continue
            last = min(depth[c] for c in consumers[nid])
            height[depth[nid]] -= tall[nid]
            depth[nid] = min(range(depth[nid], last + 1), key=lambda k: (height[k], k))
            height[depth[nid]] += tall[nid]
        cols = [[] for _ in range(n_cols)]
        for nid in sorted(depth):
            cols[depth[nid]].append(by_id[nid])
        return [c for c in cols if c]

    def _fold(self, cols: list[list[dict]], max_w: float, max_h: float) -> list[list[dict]]:
        """Stack adjacent columns while the graph is wider than ``max_w``: the pair whose stack is lowest goes
        first, and a node goes right under the node that feeds it."""
        src_of: dict[int, list[int]] = {}
        for _lid, src, _s, dst, _d, _t in self.links:
            src_of.setdefault(dst, []).append(src)

        def width(cs):
            return sum(max(n["size"][0] for n in c) for c in cs) + GAP_X * (len(cs) - 1)

        def height(c):
            return sum(n["size"][1] + TITLE_H for n in c) + GAP_Y * (len(c) - 1)

        def merge(a, b):
            ids_a = [n["id"] for n in a]
            anchor = {n["id"]: next((s for s in src_of.get(n["id"], []) if s in ids_a), None) for n in b}
            out = []
            for n in a:
                out.append(n)
                out.extend(m for m in b if anchor[m["id"]] == n["id"])
            out.extend(m for m in b if anchor[m["id"]] is None)
            return out

        while len(cols) > 1 and width(cols) > max_w:
            options = [(height(merge(cols[k], cols[k + 1])), k) for k in range(len(cols) - 1)]
            fitting = [o for o in options if o[0] <= max_h] or options
            _h, k = min(fitting)
            cols = cols[:k] + [merge(cols[k], cols[k + 1])] + cols[k + 2:]
        return cols

    def _layout(self) -> None:
        notes = [n for n in self.nodes if self.depth.get(n["id"]) == -1]
        max_w = (VIEW_W - 2 * MARGIN) / TARGET_ZOOM
        max_h = (VIEW_H - 2 * MARGIN) / TARGET_ZOOM
        widths = {n["id"]: n["size"][0] for n in self.nodes}
        best = None
        for balance in ("", "back", "forward"):  # keep the arrangement that opens at the largest zoom
            for n in self.nodes:
                n["size"][0] = widths[n["id"]]
            cols = self._columns(balance)
            for _ in range(2):  # the note's height depends on the graph's width and the other way round
                graph_w = sum(max(n["size"][0] for n in c) for c in cols) + GAP_X * (len(cols) - 1) if cols else 600
                note_w = max(min(graph_w, 1400), 420)
                note_h = sum(_note_h(n["widgets_values"][0], note_w) + TITLE_H + GAP_Y for n in notes)
                cols = self._fold(self._columns(balance), max_w, max_h - note_h)
            self._place(notes, note_w, cols)
            scale = self.view()["scale"]
            if best is None or scale > best[0] + 1e-9:
                best = (scale, balance, note_w, cols)
        _scale, _balance, note_w, cols = best
        for n in self.nodes:
            n["size"][0] = widths[n["id"]]
        self._place(notes, note_w, cols)

    def _place(self, notes, note_w, cols) -> None:
        y = TITLE_H
        for n in notes:
            n["size"] = [note_w, _note_h(n["widgets_values"][0], note_w)]
            n["pos"] = [0, y]
            y += n["size"][1] + GAP_Y + TITLE_H
        src_of: dict[int, list[int]] = {}
        for _lid, src, _s, dst, _d, _t in self.links:
            src_of.setdefault(dst, []).append(src)
        placed: dict[int, float] = {}
        x = 0
        for col in cols:
            col = self._order(col, src_of, placed)
            col_w = max(n["size"][0] for n in col)
            yy = y
            for n in col:
                placed[n["id"]] = yy
                n["size"][0] = col_w  # one width per column: aligned edges
                n["pos"] = [x, yy]
                yy += n["size"][1] + GAP_Y + TITLE_H
            x += col_w + GAP_X

    @staticmethod
    def _order(col: list[dict], src_of: dict, placed: dict) -> list[dict]:
        """A column top to bottom in the order of what feeds it from the left (so parallel chains keep their
        bands), a node right under an in-column node that feeds it; nodes fed by nothing on the left first."""
        ids = {n["id"] for n in col}
        key = {}
        for n in col:
            ys = [placed[s] for s in src_of.get(n["id"], []) if s in placed]
            if ys:
                key[n["id"]] = sum(ys) / len(ys)
        for _ in range(len(col)):
            for n in col:
                if n["id"] in key:
                    continue
                inner = [key[s] for s in src_of.get(n["id"], []) if s in ids and s in key]
                feeds = [key[m["id"]] for m in col if n["id"] in src_of.get(m["id"], []) and m["id"] in key]
                if inner:
                    key[n["id"]] = max(inner) + 0.5
                elif feeds:
                    key[n["id"]] = min(feeds) - 0.5
        out = sorted(col, key=lambda n: (key.get(n["id"], -1e9), n["id"]))
        moved = True
        while moved:  # a node that feeds one above it in the same column goes just before it
            moved = False
            for i, n in enumerate(out):
                for j in range(i):
                    if out[j]["id"] in src_of.get(n["id"], []) or n["id"] not in src_of.get(out[j]["id"], []):
                        continue
                    out.insert(j, out.pop(i))
                    moved = True
                    break
                if moved:
                    break
        return out

    def view(self) -> dict:
        """extra.ds: the whole graph in a 1280x800 window, at the largest zoom up to 1 that shows it."""
        x0 = min(n["pos"][0] for n in self.nodes)
        y0 = min(n["pos"][1] - TITLE_H for n in self.nodes)
        x1 = max(n["pos"][0] + n["size"][0] for n in self.nodes)
        y1 = max(n["pos"][1] + n["size"][1] for n in self.nodes)
        scale = min(1.0, (VIEW_W - 2 * MARGIN) / (x1 - x0), (VIEW_H - 2 * MARGIN) / (y1 - y0))
        scale = math.floor(scale * 1000) / 1000
        return {"scale": scale, "offset": [MARGIN / scale - x0, MARGIN / scale - y0]}

    def to_json(self) -> dict:
        self._layout()
        for n in self.nodes:
            for o in n["outputs"]:
                if not o["links"]:
                    o["links"] = None
        return {
            "id": "00000000-0000-4000-8000-000000000000",
            "revision": 0,
            "last_node_id": len(self.nodes),
            "last_link_id": len(self.links),
            "nodes": self.nodes,
            "links": self.links,
            "groups": self.groups,
            "config": {},
            "extra": {"ds": self.view(), "frontendVersion": "1.27.10"},
            "version": 0.4,
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n", encoding="utf-8")
        return path


def _default(spec):
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if "default" in opts:
        return opts["default"]
    if isinstance(typ, list):
        return typ[0] if typ else ""
    if typ == "COMBO":
        options = opts.get("options") or [""]
        return options[0]
    return {"INT": 0, "FLOAT": 0.0, "STRING": "", "BOOLEAN": False}.get(typ, None)


def _node_size(cls, node_type, title, ordered, kwargs, inputs, outputs) -> tuple[int, int]:
    """(width, height) of a node's body as the frontend computes it for these widgets and slots."""
    slots = max(sum(1 for i in inputs if "widget" not in i), len(outputs))
    widgets_h, widest = 0, 0
    for name, spec in ordered:
        if not ui_to_api._is_widget(spec):
            continue
        opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
        if spec[0] == "STRING" and opts.get("multiline"):
            widgets_h += PROMPT_H if name in ("text", "prompt") else MULTILINE_H
            continue
        value = kwargs.get(name, _default(spec))
        # the frontend cuts a long value short; its label it shows whole
        widest = max(widest, len(name) + min(12, len(str(value if not isinstance(value, Out) else ""))))
        widgets_h += WIDGET_H * (1 + ui_to_api.has_control(name, spec) + any(opts.get(f) for f in ui_to_api.UPLOAD_FLAGS))
    height = max(slots, 1) * SLOT_H + widgets_h + (14 if widgets_h else 6) + EXTRA_H.get(node_type, 0)
    shown = title or _display_name(cls) or node_type
    labels = max((len(i["name"]) for i in inputs if "widget" not in i), default=0) + \
        max((len(o["name"]) for o in outputs), default=0)
    width = max(MIN_W, 7.6 * len(shown) + 24, 6.6 * widest + 60, 6.6 * labels + 70)
    return int(math.ceil(width / 10) * 10), int(height)


def _display_name(cls) -> str | None:
    schema = getattr(cls, "GET_SCHEMA", None)
    if schema is not None:
        try:
            return schema().display_name
        except Exception:  # noqa: BLE001  a class without a V3 schema
            return None
    return None


def _note_h(text: str, width: float) -> int:
    per_line = max(20, int((width - 20) / 7.2))
    lines = sum(max(1, math.ceil(len(part) / per_line)) for part in str(text).split("\n"))
    return int(max(lines * 16 + 24, SLOT_H + MULTILINE_H + 14))  # the frontend's minimum: 88 px
