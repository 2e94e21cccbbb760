"""What a ComfyUI user reads about each node, checked over whatever the pack registers (nodes added later are held
to the same rules): in /object_info a description, search aliases and a tooltip on every input and output; the help
page the frontend fetches for the node (web/docs/<NodeName>.md, naming every input and output); and the real
frontend's node search finding the pack for the words people type when they look for an identity adapter."""
import pytest
import requests

from support.host import ROOT
from support.server import PACK_LINK_NAME, PACK_NODES

DOCS = ROOT / "web" / "docs"
# What people search for when they want an identity adapter (names of the packs they know, and what they want).
IDENTITY_QUERIES = ["identity", "face id", "likeness", "instantid", "pulid", "ipadapter", "face swap", "reference"]


def is_pack_node(info: dict) -> bool:
    return (info.get("python_module") == f"custom_nodes.{PACK_LINK_NAME}"
            or str(info.get("category", "")).startswith("InvAdapter"))


@pytest.fixture(scope="module")
def nodes(comfy_client) -> dict:
    found = {name: info for name, info in comfy_client.object_info().items() if is_pack_node(info)}
    assert set(PACK_NODES) <= set(found), "the pack's nodes are not recognised by module or category"
    return found


def node_inputs(info: dict) -> list[tuple[str, dict]]:
    specs = []
    for group in ("required", "optional"):
        for name, spec in info["input"].get(group, {}).items():
            specs.append((name, spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}))
    return specs


def metadata_problems(name: str, info: dict) -> list[str]:
    problems = []
    if not (info.get("description") or "").strip():
        problems.append(f"{name}: no description (io.Schema(description=...))")
    if not info.get("search_aliases"):
        problems.append(f"{name}: no search_aliases (io.Schema(search_aliases=[...]))")
    for input_name, options in node_inputs(info):
        if not (options.get("tooltip") or "").strip():
            problems.append(f"{name}: input '{input_name}' has no tooltip")
    tooltips = info.get("output_tooltips") or []
    for i, output_name in enumerate(info.get("output_name") or info.get("output") or []):
        if i >= len(tooltips) or not (tooltips[i] or "").strip():
            problems.append(f"{name}: output '{output_name}' has no tooltip")
    return problems


def test_every_node_has_a_description_search_aliases_and_tooltips(nodes):
    problems = [p for name, info in sorted(nodes.items()) for p in metadata_problems(name, info)]
    assert not problems, "\n".join(problems)


def help_url(info: dict) -> str:
    """The URL the frontend (1.47, NodeHelpService) asks for a custom node's help in English, after
    /docs/<Node>/en.md: /extensions/<folder of python_module>/docs/<Node>.md, served from the pack's WEB_DIRECTORY."""
    folder = info["python_module"].split(".")[1].split("@")[0]
    return f"/extensions/{folder}/docs/{info['name']}.md"


def test_every_node_has_a_served_help_page_naming_its_inputs_and_outputs(nodes, comfy_server):
    problems = []
    for name, info in sorted(nodes.items()):
        r = requests.get(comfy_server.url + help_url(info), timeout=30)
        if r.status_code != 200 or "text/html" in r.headers.get("content-type", ""):
            problems.append(f"{name}: {help_url(info)} answered {r.status_code}: write web/docs/{name}.md")
            continue
        text = r.text
        if not text.lstrip().startswith("# "):
            problems.append(f"{name}: web/docs/{name}.md does not start with a '# Title' line")
        for input_name, _ in node_inputs(info):
            if f"**{input_name}**" not in text:
                problems.append(f"{name}: web/docs/{name}.md does not describe input '{input_name}' (as **{input_name}**)")
        for output_name in info.get("output_name") or []:
            if f"**{output_name}**" not in text:
                problems.append(f"{name}: web/docs/{name}.md does not describe output '{output_name}' "
                                f"(as **{output_name}**)")
    assert not problems, "\n".join(problems)


def test_no_help_page_without_a_node(nodes):
    stale = sorted(p.name for p in DOCS.glob("*.md") if p.stem not in nodes)
    assert not stale, f"web/docs has pages for nodes the pack does not register: {stale}"


def search(page, query: str) -> list[str]:
    """Display names the frontend's node search box lists for ``query`` (typed as a user types it)."""
    page.evaluate("() => window.app.extensionManager.command.execute('Workspace.SearchBox.Toggle')")
    page.wait_for_selector("[role=option]", timeout=30_000)
    page.keyboard.type(query)
    page.wait_for_timeout(1200)  # the search box debounces typing
    titles = page.evaluate("() => [...document.querySelectorAll('[role=option]')].map(o => o.innerText.split('\\n')[0])")
    page.keyboard.press("Escape")
    page.wait_for_timeout(300)
    return titles


def test_node_search_finds_the_pack_by_what_people_look_for(frontend, nodes):
    display = {info["display_name"] for info in nodes.values()}
    missing = [q for q in IDENTITY_QUERIES if not display & set(search(frontend, q))]
    assert not missing, f"the node search box finds no Inv-Adapter node for {missing}"
    face = display & set(search(frontend, "face"))
    assert len(face) >= 3, f"searching 'face' finds only {sorted(face)}"
