"""Where the nodes of a UI workflow go, so that a person can read it: one group per stage (the checkpoint, the face
photo, the identity reference, the generation) from left to right; inside a stage, columns by dependency depth, so
every link runs left to right; in a column, nodes stacked with room for their title bar, widgets and image previews.

This module only places boxes of given sizes (scripts/make_examples.py measures the sizes in the real frontend) and
checks layouts (tests/test_example_workflows.py uses the same rectangles).
"""
from __future__ import annotations

TITLE_HEIGHT = 30  # LiteGraph.NODE_TITLE_HEIGHT: a node's title bar is drawn above its pos
NODE_GAP = 40  # between stacked nodes, and between columns
GROUP_PADDING = 30  # between a group's border and its nodes
GROUP_TITLE_HEIGHT = 46  # a group's title bar (font size 24)
GROUP_GAP = 80  # between groups
STAGES = {  # stage -> (group title, group colour); in flow order
    "model": ("Start here: pick the checkpoint", "#3f789e"),
    "photo": ("1. Face photo", "#8A8"),
    "reference": ("2. Identity reference", "#a1309b"),
    "generation": ("3. Generation", "#b58b2a"),
}
# the loaders of the model every later stage uses (a checkpoint, or a diffusion model with its text encoders and VAE),
# and the sampling shift that both the reference and the generation must see
MODEL_NODES = {"CheckpointLoaderSimple", "LoraLoader", "UNETLoader", "DualCLIPLoader", "CLIPLoader", "VAELoader",
               "LoraLoaderModelOnly", "ModelSamplingAuraFlow"}
REFERENCE_NODES = {"InvAdapterLoader", "InvAdapterEncodeReference", "InvAdapterCombineReferences",
                   "InvAdapterSaveReference", "InvAdapterLoadReference"}


def consumers(api: dict, node_id: str) -> list[tuple[str, str]]:
    """(node id, input name) of every input linked to an output of ``node_id``."""
    return [(i, name) for i, n in api.items() for name, v in n["inputs"].items()
            if isinstance(v, list) and v[0] == node_id]


def stage_of(api: dict) -> dict[str, str]:
    """Each API node's stage: the checkpoint loader (and a LoRA on it) starts; face photos, their crops and previews
    are the photo;
    the adapter, the encoding (with its caption) and saved references are the reference; the rest generates."""
    stages = {}
    for i, node in api.items():
        kind = node["class_type"]
        used_by = [(api[c]["class_type"], name) for c, name in consumers(api, i)]
        sources = [api[v[0]]["class_type"] for v in node["inputs"].values() if isinstance(v, list)]
        if kind in MODEL_NODES:  # the model every later stage uses
            stages[i] = "model"
        elif kind == "InvAdapterFaceCrop" or (kind == "LoadImage" and ("InvAdapterFaceCrop", "image") in used_by) \
                or (kind == "PreviewImage" and sources == ["InvAdapterFaceCrop"]):
            stages[i] = "photo"
        elif kind in REFERENCE_NODES or (kind == "CLIPTextEncode" and
                                          ("InvAdapterEncodeReference", "caption") in used_by):
            stages[i] = "reference"
        else:
            stages[i] = "generation"
    return stages


def node_rect(node: dict) -> tuple[float, float, float, float]:
    """(x, y, w, h) of a UI node as drawn: its body plus the title bar above it."""
    x, y = node["pos"]
    w, h = node["size"]
    return x, y - TITLE_HEIGHT, w, h + TITLE_HEIGHT


def overlap(a, b) -> bool:
    return a[0] < b[0] + b[2] and b[0] < a[0] + a[2] and a[1] < b[1] + b[3] and b[1] < a[1] + a[3]


def upstream(ui: dict, node_id: int) -> list[int]:
    links = {link[0]: link for link in ui["links"]}
    node = next(n for n in ui["nodes"] if n["id"] == node_id)
    return [links[i["link"]][1] for i in node.get("inputs", []) if i.get("link") is not None]


def place(ui: dict, stages: dict[int, str], sizes: dict[int, tuple[float, float]]) -> None:
    """Set every node's pos and size and the workflow's groups (``stages``: node id -> key of STAGES; ``sizes``: node
    id -> body size without the title bar)."""
    nodes = {n["id"]: n for n in ui["nodes"]}
    for node_id, size in sizes.items():
        nodes[node_id]["size"] = [round(size[0]), round(size[1])]
    top = 0
    x = 0
    groups = []
    for stage, (title, color) in STAGES.items():
        members = [i for i in nodes if stages[i] == stage]
        if not members:
            continue
        depth: dict[int, int] = {}

        def local_depth(i):
            if i not in depth:
                ups = [u for u in upstream(ui, i) if stages.get(u) == stage]
                depth[i] = 1 + max((local_depth(u) for u in ups), default=-1)
            return depth[i]

        columns: dict[int, list[int]] = {}
        for i in members:
            columns.setdefault(local_depth(i), []).append(i)
        column_x = x + GROUP_PADDING
        bottom = top
        for d in sorted(columns):
            # notes first; then nodes fed from higher up go higher (fewer crossing links); unfed nodes last
            def barycentre(i):
                ups = [nodes[u] for u in upstream(ui, i) if "placed" in nodes[u]]
                ys = [u["pos"][1] + u["size"][1] / 2 for u in ups]
                return (nodes[i]["type"] not in ("Note", "MarkdownNote"), sum(ys) / len(ys) if ys else float("inf"), i)

            y = top + GROUP_TITLE_HEIGHT + GROUP_PADDING + TITLE_HEIGHT
            for i in sorted(columns[d], key=barycentre):
                nodes[i]["pos"] = [column_x, y]
                nodes[i]["placed"] = True
                y += nodes[i]["size"][1] + NODE_GAP + TITLE_HEIGHT
                bottom = max(bottom, nodes[i]["pos"][1] + nodes[i]["size"][1])
            column_x += max(nodes[i]["size"][0] for i in columns[d]) + NODE_GAP
        right = column_x - NODE_GAP + GROUP_PADDING
        groups.append({"id": len(groups) + 1, "title": title, "color": color, "font_size": 24, "flags": {},
                       "bounding": [x, top, right - x, bottom + GROUP_PADDING - top]})
        x = right + GROUP_GAP
    for node in nodes.values():
        node.pop("placed", None)
    ui["groups"] = groups


OPEN_SCALE = 0.8  # the zoom a graph opens at when the whole of it would need less: the frontend draws no text
# below about 0.6 (LiteGraph's low-quality threshold), so a fitted 14-node graph opens as blank boxes
OPEN_MARGIN = (80, 80)  # screen pixels left of and above the graph: clear of the sidebar and the tab bar


def open_view(ui: dict, width: float, height: float) -> None:
    """extra.ds (the canvas offset and zoom saved with a workflow): the whole graph in a width x height canvas if it
    fits at OPEN_SCALE or more, else OPEN_SCALE with the graph's top-left corner (the Start here group and its note)
    in view."""
    boxes = [g["bounding"] for g in ui["groups"]] or [node_rect(n) for n in ui["nodes"]]
    left, top = min(b[0] for b in boxes), min(b[1] for b in boxes)
    right, bottom = max(b[0] + b[2] for b in boxes), max(b[1] + b[3] for b in boxes)
    fit = min((width - 2 * OPEN_MARGIN[0]) / (right - left), (height - 2 * OPEN_MARGIN[1]) / (bottom - top))
    scale = min(1.0, max(fit, OPEN_SCALE))
    ui.setdefault("extra", {})["ds"] = {"scale": round(scale, 4),
                                        "offset": [round(OPEN_MARGIN[0] / scale - left, 1),
                                                   round(OPEN_MARGIN[1] / scale - top, 1)]}


def layout_problems(ui: dict) -> list[str]:
    """What makes a UI workflow hard to read: overlapping nodes, nodes outside their group, links running right to
    left, overlapping groups, repeated titles."""
    problems = []
    nodes = {n["id"]: n for n in ui["nodes"]}
    title = lambda n: f"'{n.get('title', n['type'])}' (#{n['id']})"  # noqa: E731
    rects = {i: node_rect(n) for i, n in nodes.items()}
    ids = sorted(rects)
    for a_index, a in enumerate(ids):
        for b in ids[a_index + 1:]:
            if overlap(rects[a], rects[b]):
                problems.append(f"{title(nodes[a])} overlaps {title(nodes[b])}")
    groups = ui.get("groups", [])
    for g_index, g in enumerate(groups):
        for h in groups[g_index + 1:]:
            if overlap(g["bounding"], h["bounding"]):
                problems.append(f"groups '{g['title']}' and '{h['title']}' overlap")
    for i, r in rects.items():
        inside = [g for g in groups if g["bounding"][0] <= r[0] and r[0] + r[2] <= g["bounding"][0] + g["bounding"][2]
                  and g["bounding"][1] + GROUP_TITLE_HEIGHT <= r[1] and r[1] + r[3] <= g["bounding"][1] + g["bounding"][3]]
        if groups and not inside:
            problems.append(f"{title(nodes[i])} is in no group (or crosses a group's border or title)")
    for link in ui["links"]:
        source, target = rects[link[1]], rects[link[3]]
        if source[0] + source[2] >= target[0]:
            problems.append(f"the link {title(nodes[link[1]])} -> {title(nodes[link[3]])} runs right to left")
    titles = [n.get("title", n["type"]) for n in nodes.values()]
    for repeated in sorted({t for t in titles if titles.count(t) > 1}):
        problems.append(f"several nodes are titled '{repeated}'")
    return problems
