"""Every workflow in workflows/ is well formed and references only nodes that exist (ours or core).

Without ComfyUI: structure (UI links and node slots agree; API links point at existing nodes) and every
SAMA node type is one the pack declares. With ComfyUI (the `comfy_server` fixture): every node type,
input name, output type and link type against the running server's /object_info, which lists exactly
the core nodes that import on this install plus the nodes our pack registered.
"""

import json
from pathlib import Path

import pytest

from comfy_host import FRONTEND_ONLY_NODE_TYPES, WORKFLOWS_DIR, declared_pack_nodes

pytest_plugins = ["comfy_host"]  # the session-scoped `comfy_server` fixture

WORKFLOWS = sorted(WORKFLOWS_DIR.glob("*.json"))
UI_NODE_KEYS = ("id", "type", "pos", "size", "flags", "order", "mode", "properties")


def _load(path: Path):
    return json.loads(path.read_text())


def _is_ui(workflow) -> bool:
    return isinstance(workflow, dict) and isinstance(workflow.get("nodes"), list)


def _ui_graphs(workflow):
    """The top-level graph and every subgraph definition (newer frontends nest graphs)."""
    yield workflow
    yield from workflow.get("definitions", {}).get("subgraphs", [])


def _subgraph_ids(workflow) -> set:
    return {graph["id"] for graph in workflow.get("definitions", {}).get("subgraphs", [])}


def _node_types(workflow) -> list[str]:
    if _is_ui(workflow):
        return [node["type"] for graph in _ui_graphs(workflow) for node in graph["nodes"]]
    return [node["class_type"] for node in workflow.values()]


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _is_link(value) -> bool:
    """An API input that is a link: [source node id, output slot]."""
    return (isinstance(value, list) and len(value) == 2
            and isinstance(value[0], str) and isinstance(value[1], int))


def _links_by_id(graph) -> dict:
    """{link id: (from node, from slot, to node, to slot, type)}.

    UI links are 6-lists, subgraph links are dicts."""
    links = {}
    for link in graph.get("links", []):
        if isinstance(link, dict):
            links[link["id"]] = tuple(link[key] for key in
                                      ("origin_id", "origin_slot", "target_id", "target_slot", "type"))
        else:
            links[link[0]] = tuple(link[1:6])
    return links


def _same_type(link_type, socket_type) -> bool:
    """A link's type equals its sockets' types, except that the frontend types a link into an any-type
    ("*") input, such as PreviewAny's, as "*" while the output it starts at keeps its own type."""
    return link_type == socket_type or "*" in (link_type, socket_type)


def test_there_are_workflows_in_both_formats():
    formats = {_is_ui(_load(path)) for path in WORKFLOWS}
    assert formats == {True, False}, "workflows/ needs at least one UI-format and one API-format workflow"


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_is_well_formed(path):
    workflow = _load(path)
    if not _is_ui(workflow):
        assert isinstance(workflow, dict) and workflow, "an API workflow is a non-empty {id: node} object"
        for node_id, node in workflow.items():
            assert isinstance(node.get("class_type"), str) and isinstance(node.get("inputs"), dict), node_id
            for name, value in node["inputs"].items():
                if _is_link(value):
                    assert value[0] in workflow, f"node {node_id} input {name}: no node {value[0]}"
                    assert value[1] >= 0
        return

    # The fields and types the frontend's loader requires (comfyui-frontend 1.27 zod schema zComfyWorkflow).
    assert workflow.get("version") == 0.4
    assert _is_number(workflow.get("last_link_id")) and isinstance(workflow.get("last_node_id"), (int, str))
    assert isinstance(workflow.get("links"), list)
    for graph in _ui_graphs(workflow):
        nodes = {node["id"]: node for node in graph["nodes"]}
        assert len(nodes) == len(graph["nodes"]), "duplicate node ids"
        for link in graph.get("links", []):
            if not isinstance(link, dict):
                assert len(link) == 6, link
                assert all(isinstance(link[i], int) for i in (0, 2, 4)), link
                assert isinstance(link[5], (str, list, int)), link
        links = _links_by_id(graph)
        for node in graph["nodes"]:
            missing = [key for key in UI_NODE_KEYS if key not in node]
            assert not missing, f"node {node.get('id')} lacks {missing}"
            for key in ("pos", "size"):
                assert len(node[key]) == 2 and all(_is_number(v) for v in node[key]), (node["id"], key)
            assert isinstance(node["flags"], dict) and isinstance(node["properties"], dict)
            for model in node["properties"].get("models", []):  # download hints shown by the frontend
                assert {"name", "url", "directory"} <= set(model), f"node {node['id']} model entry {model}"
            for slot, socket in enumerate(node.get("inputs", [])):
                if socket.get("link") is not None:
                    link = links[socket["link"]]
                    assert link[2:4] == (node["id"], slot), (
                        f"node {node['id']} input {socket['name']}: link {socket['link']} ends elsewhere")
                    assert _same_type(link[4], socket["type"]), (node["id"], socket["name"], link)
            for slot, socket in enumerate(node.get("outputs", [])):
                for link_id in socket.get("links") or []:
                    assert links[link_id][0:2] == (node["id"], slot), (
                        f"node {node['id']} output {socket['name']}: link {link_id} starts elsewhere")
                    assert _same_type(links[link_id][4], socket["type"]), (node["id"], socket["name"])
        # Subgraph links may start/end at the subgraph's own input/output pseudo-nodes (negative ids).
        for link_id, (source, _, target, _, _) in links.items():
            assert (source in nodes or source < 0) and (target in nodes or target < 0), f"link {link_id}"
        if graph is workflow:
            assert workflow["last_node_id"] >= max(nodes)
            assert workflow["last_link_id"] >= max(links, default=0)


@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_sama_node_types_are_declared_by_the_pack(path):
    declared = declared_pack_nodes()
    sama_types = {t for t in _node_types(_load(path)) if t.lower().startswith("sama")}
    assert sama_types <= set(declared), f"unknown SAMA node types {sama_types - set(declared)}"


@pytest.mark.comfy_host
@pytest.mark.parametrize("path", WORKFLOWS, ids=lambda p: p.name)
def test_workflow_matches_the_running_server(path, comfy_server):
    workflow = _load(path)
    object_info = comfy_server.object_info()
    if _is_ui(workflow):
        _check_ui_against(workflow, object_info)
    else:
        _check_api_against(workflow, object_info)


def _declared_inputs(info) -> dict:
    return {**info["input"].get("required", {}), **info["input"].get("optional", {})}


def _check_api_against(workflow, object_info):
    unknown = {node["class_type"] for node in workflow.values()} - set(object_info)
    assert not unknown, f"node types not on the server: {unknown}"
    for node_id, node in workflow.items():
        info = object_info[node["class_type"]]
        declared = _declared_inputs(info)
        unknown_inputs = set(node["inputs"]) - set(declared)
        assert not unknown_inputs, f"node {node_id} ({node['class_type']}): unknown inputs {unknown_inputs}"
        missing = set(info["input"].get("required", {})) - set(node["inputs"])
        assert not missing, f"node {node_id} ({node['class_type']}) lacks required inputs {missing}"
        for name, value in node["inputs"].items():
            if not _is_link(value):
                continue
            source = object_info[workflow[value[0]]["class_type"]]
            assert value[1] < len(source["output"]), f"node {node_id} input {name}: no output slot {value[1]}"
            expected = declared[name][0]
            if isinstance(expected, str) and expected != "*":
                assert source["output"][value[1]] == expected, f"node {node_id} input {name}: type mismatch"


def _check_ui_against(workflow, object_info):
    allowed = set(object_info) | FRONTEND_ONLY_NODE_TYPES | _subgraph_ids(workflow)
    unknown = set(_node_types(workflow)) - allowed
    assert not unknown, f"node types not on the server: {unknown}"
    for graph in _ui_graphs(workflow):
        for node in graph["nodes"]:
            if node["type"] not in object_info:
                continue
            info = object_info[node["type"]]
            declared = _declared_inputs(info)
            for socket in node.get("inputs", []):
                assert socket["name"] in declared, (
                    f"node {node['id']} ({node['type']}): unknown input {socket['name']}")
            for slot, socket in enumerate(node.get("outputs", [])):
                assert slot < len(info["output"]) and socket["type"] == info["output"][slot], (
                    f"node {node['id']} ({node['type']}) output {slot}: {socket['type']} vs {info['output']}")


# --------------------------------------------------------------------------------------------------------
# UI and API files describe the same graph (workflows/make_ui.py writes the UI files from the API ones)


def _make_ui():
    """workflows/make_ui.py as a module (workflows/ is not a package)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("sama_workflows_make_ui", WORKFLOWS_DIR / "make_ui.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pairs():
    """(UI file, API file) for every NAME.json that has a NAME_api.json."""
    return [(path, path.with_name(path.stem + "_api.json")) for path in WORKFLOWS
            if _is_ui(_load(path)) and path.with_name(path.stem + "_api.json").exists()]


def test_every_ui_workflow_has_an_api_twin():
    ui_files = {path for path in WORKFLOWS if _is_ui(_load(path))}
    assert ui_files == {ui for ui, _api in _pairs()}, "each NAME.json needs a NAME_api.json (and vice versa)"
    assert {api for _ui, api in _pairs()} == {path for path in WORKFLOWS if not _is_ui(_load(path))}


@pytest.mark.comfy_host
@pytest.mark.parametrize("pair", _pairs(), ids=lambda pair: pair[0].name)
def test_ui_workflow_and_its_api_file_are_the_same_graph(pair, comfy_server):
    """The UI file exported to API format (widget values matched to inputs by the server's widget order,
    links to [node, slot]) equals the API file: same nodes, links and values."""
    ui_path, api_path = pair
    make_ui = _make_ui()
    exported = make_ui.ui_to_api(_load(ui_path), comfy_server.object_info())
    api = {node_id: {"class_type": node["class_type"], "inputs": node["inputs"]}
           for node_id, node in _load(api_path).items()}
    assert exported == api


@pytest.mark.comfy_host
def test_widget_order_rule_matches_workflows_saved_by_the_frontend(comfy_server):
    """make_ui's widget list (with the frontend's control_after_generate / upload widgets) has as many
    entries as the widgets_values the real frontend saved for the same node types in ComfyUI's workflow
    templates (the comfyui-workflow-templates package ComfyUI installs)."""
    import collections

    templates = pytest.importorskip("comfyui_workflow_templates")
    template_dir = Path(templates.__file__).parent / "templates"
    make_ui = _make_ui()
    object_info = comfy_server.object_info()
    ours = {node["type"] for path in WORKFLOWS if _is_ui(_load(path)) for node in _load(path)["nodes"]}
    ours &= set(object_info)
    counts = collections.defaultdict(collections.Counter)  # node type -> {len(widgets_values): templates}
    for path in sorted(template_dir.glob("*.json")):
        try:
            workflow = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            continue
        if not _is_ui(workflow):
            continue
        for graph in _ui_graphs(workflow):
            for node in graph["nodes"]:
                if node["type"] in ours and isinstance(node.get("widgets_values"), list):
                    counts[node["type"]][len(node["widgets_values"])] += 1
    checked = {node_type: seen.most_common(1)[0][0] for node_type, seen in counts.items()}
    assert {"KSampler", "LoadImage", "LoadVideo", "CLIPLoader", "SaveVideo"} <= set(checked), sorted(checked)
    for node_type, saved_count in checked.items():
        names = make_ui.widget_names(object_info[node_type])
        assert len(names) == saved_count, f"{node_type}: the frontend saved {saved_count}, we list {names}"
