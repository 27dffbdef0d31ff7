"""Build UI-format workflows (the JSON the ComfyUI frontend saves) from Python.

The example workflows in ``workflows/`` are written with this, against the live node
definitions, so widget order, slot types and links are right by construction::

    g = WorkflowBuilder(class_mappings)
    ck = g.node("CheckpointLoaderSimple", ckpt_name="v1-5-pruned-emaonly.safetensors")
    pos = g.node("CLIPTextEncode", text="a red circle", clip=ck[1])
    g.save("workflows/x.json")
"""
from __future__ import annotations

import json
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


class WorkflowBuilder:
    COLUMN_W, ROW_H = 360, 40

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
        row = sum(1 for d in self.depth.values() if d == depth)
        data = {
            "id": nid, "type": node_type,
            "pos": [40 + depth * self.COLUMN_W, 40 + row * 260],
            "size": [320, 120 + self.ROW_H * max(len(widgets), len(outputs))],
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
        self.nodes.append({"id": nid, "type": "Note", "title": title, "pos": [40, -260], "size": [700, 200],
                           "flags": {}, "order": nid - 1, "mode": 0, "inputs": [], "outputs": [],
                           "properties": {}, "widgets_values": [text], "color": "#432", "bgcolor": "#653"})
        self.depth[nid] = -1

    def to_json(self) -> dict:
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
            "extra": {"ds": {"scale": 0.8, "offset": [0, 300]}, "frontendVersion": "1.27.10"},
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
