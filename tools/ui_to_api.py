"""Convert a UI-format workflow (what the ComfyUI frontend saves) into the executor's API format.

The mapping of ``widgets_values`` to input names comes from the live node definitions
(``INPUT_TYPES()`` of the registered classes), in the order the frontend creates widgets:
required then optional inputs; an INT with ``control_after_generate`` (and an INT named seed or
noise_seed that does not say, as the frontend does: ``has_control``) and a COMBO with an upload button each
own one extra value. Reroutes, primitive nodes, notes, muted (mode 2) and
bypassed (mode 4) nodes are resolved the way the frontend resolves them when it queues.
"""
from __future__ import annotations

from pure_models import load_models  # tools/pure_models.py

VIRTUAL = {"Note", "MarkdownNote", "Reroute", "PrimitiveNode"}
WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
UPLOAD_FLAGS = ("image_upload", "video_upload", "audio_upload", "animated_image_upload")


class ConversionError(ValueError):
    pass


def _is_widget(spec) -> bool:
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if opts.get("forceInput"):
        return False
    return isinstance(typ, list) or typ in WIDGET_TYPES


# The frontend's legacy rule: an INT named like this gets a control widget unless its input says otherwise.
SEED_NAMES = ("seed", "noise_seed")


def has_control(name: str, spec) -> bool:
    """Does the frontend add a 'control after generate' widget (one more widgets_values entry) after this input?
    Yes when the input asks for it; for an INT named seed/noise_seed also when it does not say
    (``control_after_generate`` absent), as ComfyUI's frontend does."""
    typ = spec[0]
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    if typ != "INT":  # the frontend's FLOAT widget has no control (COMBO controls are not used here)
        return False
    control = opts.get("control_after_generate")
    return name in SEED_NAMES if control is None else bool(control)


def _extra_values(spec, name: str = "") -> int:
    opts = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
    n = 0
    if has_control(name, spec):
        n += 1
    if any(opts.get(f) for f in UPLOAD_FLAGS):
        n += 1
    return n


def _links(workflow: dict) -> dict:
    out = {}
    for link in workflow.get("links", []) or []:
        if isinstance(link, dict):
            out[link["id"]] = (link["origin_id"], link["origin_slot"], link["target_id"], link["target_slot"], link.get("type"))
        else:
            lid, o_id, o_slot, t_id, t_slot, typ = link[:6]
            out[lid] = (o_id, o_slot, t_id, t_slot, typ)
    return out


def _label(node: dict) -> str:
    title = node.get("title")
    return f"#{node.get('id')} {node.get('type')}" + (f" ('{title}')" if title else "")


def convert(workflow: dict, class_mappings: dict) -> dict:
    if (workflow.get("definitions") or {}).get("subgraphs"):
        raise ConversionError("this workflow contains subgraphs; unpack them in the editor before running it headless.")
    nodes = {n["id"]: n for n in workflow.get("nodes", [])}
    links = _links(workflow)

    missing = sorted({f"{n.get('type')} (node {_label(n)})" for n in nodes.values()
                      if n.get("type") not in VIRTUAL and n.get("type") not in class_mappings and n.get("mode", 0) != 2})
    if missing:
        raise ConversionError("the workflow uses node types that are not installed: " + "; ".join(missing) +
                              ". Install the pack that provides them (or update Atelier) and try again.")

    def source_of(link_id, seen=()):
        """Follow a link back through reroutes/bypassed nodes: ('link', node_id, slot) or ('value', v) or None."""
        if link_id is None or link_id not in links:
            return None
        o_id, o_slot, _t, _ts, typ = links[link_id]
        src = nodes.get(o_id)
        if src is None or o_id in seen:
            return None
        seen = seen + (o_id,)
        if src.get("type") == "Reroute":
            inp = (src.get("inputs") or [{}])[0]
            return source_of(inp.get("link"), seen)
        if src.get("type") == "PrimitiveNode":
            vals = src.get("widgets_values") or []
            return ("value", vals[0]) if vals else None
        mode = src.get("mode", 0)
        if mode == 2:
            return None
        if mode == 4:  # bypassed: pass the first input of the same type through
            for inp in src.get("inputs") or []:
                if inp.get("link") is not None and (inp.get("type") == typ or typ in (None, "*")):
                    return source_of(inp["link"], seen)
            return None
        return ("link", str(o_id), o_slot)

    prompt = {}
    for nid, node in nodes.items():
        ctype = node.get("type")
        if ctype in VIRTUAL or node.get("mode", 0) in (2, 4):
            continue
        cls = class_mappings[ctype]
        defs = cls.INPUT_TYPES()
        ordered = list((defs.get("required") or {}).items()) + list((defs.get("optional") or {}).items())
        values = node.get("widgets_values")
        inputs = {}
        if isinstance(values, dict):
            for name, spec in ordered:
                if _is_widget(spec) and name in values:
                    inputs[name] = values[name]
        else:
            values = list(values or [])
            i = 0
            for name, spec in ordered:
                if not _is_widget(spec):
                    continue
                if i < len(values):
                    inputs[name] = values[i]
                i += 1 + _extra_values(spec, name)
        for inp in node.get("inputs") or []:
            src = source_of(inp.get("link"))
            if src is None:
                continue
            if src[0] == "value":
                inputs[inp["name"]] = src[1]
            else:
                inputs[inp["name"]] = [src[1], src[2]]
        prompt[str(nid)] = {"class_type": ctype, "inputs": inputs,
                            "_meta": {"title": node.get("title") or ctype}}
    return prompt


# --tiny substitution lives in the pack (models/tiny_substitution.py) so the server-side tiny mode
# (ATELIER_TINY_MODELS=1, nodes/tiny.py) and this runner share one implementation.
_sub = load_models("tiny_substitution")
substitute_tiny = _sub.substitute_tiny
TINY_SCALED_INPUTS = _sub.TINY_SCALED_INPUTS
