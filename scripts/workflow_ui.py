"""API workflow JSON <-> UI workflow JSON (the litegraph graph the browser loads), using a server's /object_info.

    python scripts/workflow_ui.py --url http://127.0.0.1:8188 workflows/api/basic.json > basic_ui.json
prints a plain UI graph (nodes in columns by depth). The shipped UI graphs (example_workflows/) are built on it by
scripts/make_examples.py, which adds the note, model links, groups and a measured layout; ui_to_api reads a UI graph
back (tests check the shipped pairs with it; scripts/comfy_client.py runs UI graphs with it).
"""
from __future__ import annotations

import argparse
import json
import sys
import urllib.request
from pathlib import Path

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}
FRONTEND_ONLY = {"Note", "MarkdownNote"}  # nodes the frontend never sends to the server


def input_specs(info: dict) -> list[tuple[str, str, dict]]:
    """(name, type, options) of a node's inputs in the order the frontend lays out its widgets."""
    specs = []
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            kind = spec[0]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            specs.append((name, "COMBO" if isinstance(kind, list) else kind, options))
    return specs


def is_widget(kind: str) -> bool:
    return kind in WIDGET_TYPES


def widget_values(info: dict, inputs: dict) -> list:
    values = []
    for name, kind, options in input_specs(info):
        if not is_widget(kind) or isinstance(inputs.get(name), list):
            continue
        values.append(inputs.get(name, options.get("default")))
        if options.get("control_after_generate"):
            values.append("fixed")
        if options.get("image_upload"):
            values.append("image")
    return values


def api_to_ui(api: dict, object_info: dict) -> dict:
    ids = sorted(api, key=int)
    depth = {}

    def node_depth(i):
        if i not in depth:
            ups = [v[0] for v in api[i]["inputs"].values() if isinstance(v, list)]
            depth[i] = 1 + max((node_depth(u) for u in ups), default=-1)
        return depth[i]

    links, nodes, rows = [], [], {}
    out_links: dict[tuple[str, int], list[int]] = {}
    for i in ids:
        for name, value in api[i]["inputs"].items():
            if isinstance(value, list):
                links.append([len(links) + 1, int(value[0]), value[1], int(i), name, None])
                out_links.setdefault((value[0], value[1]), []).append(len(links))
    for i in ids:
        node = api[i]
        info = object_info[node["class_type"]]
        d = node_depth(i)
        rows[d] = rows.get(d, -1) + 1
        inputs = []
        for name, kind, options in input_specs(info):
            link = next((l for l in links if l[3] == int(i) and l[4] == name), None)
            if is_widget(kind) and link is None:
                continue
            entry = {"name": name, "type": kind, "link": link[0] if link else None}
            if is_widget(kind):
                entry["widget"] = {"name": name}
            inputs.append(entry)
            if link:
                link[4] = len(inputs) - 1
                link[5] = kind
        outputs = [{"name": oname, "type": otype, "links": out_links.get((i, slot), []), "slot_index": slot}
                   for slot, (otype, oname) in enumerate(zip(info["output"], info["output_name"]))]
        nodes.append({"id": int(i), "type": node["class_type"], "pos": [40 + 360 * d, 40 + 260 * rows[d]],
                      "size": [320, 180], "flags": {}, "order": 0, "mode": 0, "inputs": inputs, "outputs": outputs,
                      "title": node.get("_meta", {}).get("title", info.get("display_name", node["class_type"])),
                      "properties": {"Node name for S&R": node["class_type"]},
                      "widgets_values": widget_values(info, node["inputs"])})
    for order, n in enumerate(sorted(nodes, key=lambda n: (node_depth(str(n["id"])), n["id"]))):
        n["order"] = order
    return {"last_node_id": max(int(i) for i in ids), "last_link_id": len(links), "nodes": nodes, "links": links,
            "groups": [], "config": {}, "extra": {"ds": {"scale": 0.8, "offset": [0, 0]}}, "version": 0.4}


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The inverse, as the frontend's graphToPrompt does it for plain graphs (used to check shipped pairs)."""
    links = {l[0]: l for l in ui["links"]}
    api = {}
    for n in ui["nodes"]:
        if n["type"] in FRONTEND_ONLY:
            continue
        if n["type"] not in object_info:
            raise ValueError(f"node {n['id']} is a {n['type']}, which this server does not have (a missing custom node?)")
        info = object_info[n["type"]]
        values = iter(n.get("widgets_values", []))
        linked = {i["name"]: links[i["link"]] for i in n.get("inputs", []) if i.get("link") is not None}
        inputs = {}
        for name, kind, options in input_specs(info):
            if name in linked:
                inputs[name] = [str(linked[name][1]), linked[name][2]]
            elif is_widget(kind):
                inputs[name] = next(values)
                if options.get("control_after_generate") or options.get("image_upload"):
                    next(values)
        api[str(n["id"])] = {"class_type": n["type"], "inputs": inputs}
    return api


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--url", default="http://127.0.0.1:8188", help="a ComfyUI server with this pack")
    parser.add_argument("file", type=Path, help="an API workflow")
    args = parser.parse_args()
    with urllib.request.urlopen(args.url + "/object_info") as r:
        object_info = json.load(r)
    print(json.dumps(api_to_ui(json.loads(args.file.read_text()), object_info), indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
