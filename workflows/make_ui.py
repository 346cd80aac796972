"""Turn an API-format ComfyUI workflow into a UI-format one, and back.

The API format ({node id: {"class_type", "inputs"}}, what `/prompt` takes) is easy to write and review;
the UI format (what the frontend opens: nodes with positions, sockets, links and `widgets_values`)
is not, because widget values are stored by position and the frontend adds widgets of its own. This
script writes the UI file from the API file and the server's node definitions (`/object_info`), so
both formats always describe the same graph:

    # every workflows/*_api.json -> its UI file, with a running ComfyUI that has this pack installed
    python workflows/make_ui.py --all --server http://127.0.0.1:8188
    # one file, node definitions saved earlier with `curl http://127.0.0.1:8188/object_info > info.json`
    python workflows/make_ui.py workflows/tiny_demo_api.json --object-info info.json

What the UI format needs that the API format does not say (matching what the frontend 1.27 saves):
- `widgets_values`: one value per widget in input order (required, then optional). The frontend adds a
  "control_after_generate" widget ("fixed", "randomize", ...) right after seed-like INT inputs (those
  that declare `control_after_generate`, and any INT named `seed` / `noise_seed`), and an "upload"
  widget (value "image") after LoadImage / LoadVideo file pickers. A widget fed by a link keeps its
  default value in `widgets_values` and also gets an input socket with a `widget` entry.
- `inputs`: the sockets of non-widget inputs (optional ones with `shape: 7`), then the linked widgets.
- positions: nodes are laid out left to right by dependency depth (loaders on the left, outputs on the
  right); sizes are estimates, the frontend enlarges a node that is too small for its widgets.
- `properties.models`: download hints (name, url, directory) for the loader nodes, from
  MODEL_DOWNLOADS below; the frontend offers them when a file is missing.
- a MarkdownNote with the workflow's instructions, from NOTES below.

`ui_to_api()` does the reverse (like the frontend's "Export (API)"); tests/test_workflows.py uses it to
check that every UI file and its API file describe the same graph.

No ComfyUI import: this runs anywhere with Python 3.
"""

from __future__ import annotations

import argparse
import json
import sys
import urllib.request
import uuid
from pathlib import Path

WORKFLOWS_DIR = Path(__file__).resolve().parent

FRONTEND_VERSION = "1.27.10"
WIDGET_TYPES = frozenset({"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"})
SEED_NAMES = ("seed", "noise_seed")  # the frontend gives these a control widget even when not declared
CONTROL_WIDGET = "control_after_generate"
UPLOAD_WIDGET = "upload"
CONTROL_VALUE = "fixed"  # reruns reproduce the result; the user switches to "randomize" in the UI
UPLOAD_VALUE = "image"  # what the frontend stores for its image and video upload buttons
FRONTEND_ONLY_NODE_TYPES = frozenset({"Note", "MarkdownNote", "Reroute", "PrimitiveNode"})
OPTIONAL_SOCKET_SHAPE = 7  # LiteGraph's "hollow circle" shape the frontend gives optional inputs

# ---------------------------------------------------------------------------------------------------------
# Download hints: (ComfyUI model folder, file name as the loader lists it) -> [(name, url)], the files
# the frontend should offer to download when that file is missing. The Hugging Face repositories are
# the ones `python -m sama_core download` uses (sama_core/commands/download.py PLAN).

_HF = "https://huggingface.co"
_WAN_BASE_SHARDS = [f"diffusion_pytorch_model-{k:05d}-of-00006.safetensors" for k in range(1, 7)]
_REPACKAGED = f"{_HF}/Comfy-Org/Wan_2.1_ComfyUI_repackaged/resolve/main/split_files"

MODEL_DOWNLOADS = {
    # The base is sharded: picking the first shard in Load SAMA Model needs all six next to it.
    ("diffusion_models", f"Wan2.1-T2V-14B/{_WAN_BASE_SHARDS[0]}"): [
        (f"Wan2.1-T2V-14B/{shard}", f"{_HF}/Wan-AI/Wan2.1-T2V-14B/resolve/main/{shard}")
        for shard in _WAN_BASE_SHARDS],
    ("diffusion_models", "SAMA-14B/sama_14b_ema.safetensors"): [
        ("SAMA-14B/sama_14b_ema.safetensors", f"{_HF}/syxbb/SAMA-14B/resolve/main/sama_14b_ema.safetensors")],
    ("vae", "wan_2.1_vae.safetensors"): [
        ("wan_2.1_vae.safetensors", f"{_REPACKAGED}/vae/wan_2.1_vae.safetensors")],
    ("text_encoders", "umt5_xxl_fp16.safetensors"): [
        ("umt5_xxl_fp16.safetensors", f"{_REPACKAGED}/text_encoders/umt5_xxl_fp16.safetensors")],
    ("clip_vision", "sigclip_vision_patch14_384.safetensors"): [
        ("sigclip_vision_patch14_384.safetensors",
         f"{_HF}/Comfy-Org/sigclip_vision_384/resolve/main/sigclip_vision_patch14_384.safetensors")],
}

# Which model folder each loader widget lists (node type, input name) -> folder.
LOADER_FOLDERS = {
    ("SamaLoadModel", "dit_name"): "diffusion_models",
    ("SamaLoadModel", "sama_weights"): "diffusion_models",
    ("VAELoader", "vae_name"): "vae",
    ("CLIPLoader", "clip_name"): "text_encoders",
    ("CLIPVisionLoader", "clip_name"): "clip_vision",
    ("SamaTextEncodeFile", "text_encoder"): "text_encoders",
    ("SamaAnchorEncodeFile", "siglip"): "clip_vision",
}

# ---------------------------------------------------------------------------------------------------------
# The note shown on each workflow's canvas (Markdown), by workflow name (the API file name without _api).

_SAMA14B_FILES = """\
**Model files** (`python -m sama_core download --dir ComfyUI/models` fetches them; or download the
files named in each loader's properties):
- `models/diffusion_models/Wan2.1-T2V-14B/` - the six `diffusion_pytorch_model-0000k-of-00006.safetensors`
  shards of Wan-AI/Wan2.1-T2V-14B (pick the first one as *dit_name*)
- `models/diffusion_models/SAMA-14B/sama_14b_ema.safetensors` (syxbb/SAMA-14B) as *sama_weights*
- `models/text_encoders/umt5_xxl_fp16.safetensors`, `models/vae/wan_2.1_vae.safetensors`
  (Comfy-Org/Wan_2.1_ComfyUI_repackaged)"""

_EDIT_STEPS = """\
1. Put a video in `ComfyUI/input/` and pick it in **Load Video**.
2. Write the edit in **SAMA Text Encode**, e.g. *Make the car red.* (SAMA adds its `[Video edit]` prefix).
3. Queue. **SAMA Frames To 4k+1** pads the clip to 4k+1 frames, **Resize** brings it to 832x480 (use 480x832
   for portrait clips), the result is trimmed back, resized to the source size and saved with the source
   fps and audio."""

NOTES = {
    "sama14b_edit": f"""# SAMA-14B video edit

Instruction-guided video editing with SAMA on Wan2.1-T2V-14B, with ComfyUI's own loaders.

{_EDIT_STEPS}

Defaults are the released ones: 50 steps, cfg 5, shift 5. Lower *denoise* keeps more of the source.
SAMA-14B was trained on clips of up to 81 frames: for longer ones set *window_frames* to 81.

{_SAMA14B_FILES}

The DiT's weights take 28 GB in bf16; *weight_dtype* fp8_e4m3fn halves that.""",

    "sama14b_anchor_edit": f"""# SAMA-14B edit guided by an edited first frame

As the plain edit, plus an anchor: edit the video's **first frame** in any image editor (same size as the
video), put it in `ComfyUI/input/` and pick it in **Load Image**. **SAMA Anchor Encode** turns it into
SAMA's 65 semantic tokens; during the first *anchor_strength* of the steps they replace the predicted
semantics, so the edit follows your picture.

{_EDIT_STEPS}

{_SAMA14B_FILES}
- `models/clip_vision/sigclip_vision_patch14_384.safetensors` (Comfy-Org/sigclip_vision_384)""",

    "sama14b_native_ksampler": f"""# SAMA-14B with the native KSampler

**SAMA In-Context** puts the source video into both conditionings and appends the 65 semantic tokens to
the latent as extra frames, so the stock **KSampler** edits with SAMA. euler / simple / 50 steps / cfg 5
is the released sampler (same result as SAMA Sampler up to float rounding; the noise layout differs, so
a seed gives a different sample). **SAMA Extract Latent** drops the semantic frames before VAE Decode.
Any sampler, scheduler or model patch (LoRA, torch.compile) can be tried here.

{_EDIT_STEPS}

{_SAMA14B_FILES}""",

    "pretext_preview": """# SAMA pretext preview

Shows the motion-alignment perturbations SAMA is pre-trained to undo:
- **cube**: a block of 30% of the frames blanked (never the first frame),
- **speed**: the clip played 2x faster (change *speed*),
- **tube**: 2x2x2 space-time tubes shuffled.

The mask shows what changed and the text is the task instruction SAMA restores it with: feed both
into a SAMA edit (SAMA Text Encode with *use_prefix* off) to fill in frames or retime a clip.

No model files needed. Put a video in `ComfyUI/input/` and pick it in **Load Video**.""",
}

_TINY_FILES = """\
**Model files**: the tiny *random* SAMA bundle (`python -m sama_core demo` writes one to
`output/demo/tiny-random-bundle/`; or `sama_core.bundle.write_tiny_random_bundle(folder)`), copied as
- `models/diffusion_models/sama_tiny_dit.safetensors` (bundle `dit.safetensors`)
- `models/text_encoders/sama_tiny_umt5.safetensors` (bundle `text_encoder.safetensors`)
- `models/vae/sama_tiny_vae.safetensors`: a Wan2.1 VAE that **Load VAE** reads. ComfyUI 0.3.64's Load VAE
  only builds the full-width Wan2.1 VAE, so pick `wan_2.1_vae.safetensors` here if you have it (the tiny
  DiT works with it); the bundle's narrow `vae.safetensors` loads only in newer ComfyUI versions."""

_TINY_INTRO = """Runs in seconds on a CPU: a 32x32 edit, 3 steps. The weights are random, so the output is
noise; it shows the graph works end to end (CI runs it). Put a short video in `ComfyUI/input/` named
`sama_tiny_demo.mp4` or pick another one in **Load Video**."""

NOTES.update({
    "tiny_demo": f"""# SAMA tiny demo (random weights)

The SAMA-14B edit graph with the tiny model bundle. {_TINY_INTRO}

{_TINY_FILES}""",
    "tiny_demo_anchor": f"""# SAMA tiny demo with an anchor frame (random weights)

The anchored edit graph with the tiny bundle: **Load Image** (`sama_tiny_anchor.png`) is the edited
first frame, **SAMA Anchor Encode (file)** encodes it with the bundle's small SigLIP (2 heads).
{_TINY_INTRO}

{_TINY_FILES}
- `models/clip_vision/sama_tiny_siglip.safetensors` (bundle `siglip.safetensors`)""",
    "sama_shapes_demo": """# SAMA-Shapes demo (the embedded trained tiny model)

A real instruction edit on a CPU in seconds: the SAMA-14B edit graph with **SAMA-Shapes**, the tiny SAMA
this pack ships (trained by its own `train/` on clips of moving coloured shapes; it edits 64x64 clips of
circles, squares, triangles and stars and knows nothing else). 20 steps, cfg 2 and **FlowEdit** on (the
bundle's defaults): the sampler starts from the source and applies only what the instruction changes, with
the source's own SigLIP tokens from SAMA Anchor Encode (file) (the objects the instruction leaves alone move
less; switch *flowedit* off for the released sampler). **SAMA Keep Unchanged** (threshold 0.2, the bundle's
default too) then gives back the source's own pixels wherever the decoded edit matches the source's round trip
through the VAE: the objects the instruction leaves alone stay sharp instead of this tiny VAE's blur (set 0
to see the edit as decoded).

**Model files**: none to download. The pack adds its bundled `sama_core/assets/sama-shapes/` folder to
ComfyUI's model folders, so the loaders list `sama-shapes/dit.safetensors`,
`sama-shapes/text_encoder.safetensors`, `sama-shapes/vae.safetensors` and `sama-shapes/siglip.safetensors`
(the narrow VAE needs **SAMA Load VAE (any width)**).

**Input**: copy `sama_core/assets/sama-shapes/sample.mp4` to `ComfyUI/input/sama_shapes_sample.mp4`
(the clip the instruction was written for: a cyan circle, a purple circle and a red square on dark
gray; the model removes objects far more reliably than it recolours them), or load another
shapes clip and write your own instruction, e.g. "make the red square blue", "remove the star",
"turn the circle into a triangle", "change the background to stripes".""",
    "sama_shapes_region_demo": """# SAMA-Shapes demo, editing only a region

The SAMA-Shapes demo with a **mask**: white where the edit may change the video. Outside it the sampler
keeps the source's latents at every step, and Image Composite Masked puts the source's own pixels back after
decoding, so the objects the instruction leaves alone stay exactly as they were (instruction alone, this
tiny model blurs and moves them; docs/sama_shapes.md). FlowEdit and SAMA Keep Unchanged are on, as in the
plain demo.

**Inputs**: copy `sama_core/assets/sama-shapes/sample.mp4` to `ComfyUI/input/sama_shapes_sample.mp4` and
`sama_core/assets/sama-shapes/sample_region.png` to `ComfyUI/input/sama_shapes_sample_region.png` (white over
the cyan circle's path, black elsewhere). Load Image (as Mask) reads its *red* channel.

**Your own mask**: paint white on black, at any size (SAMA Sampler and Image Composite Masked stretch it to
the frames), one image for the whole clip; or paint over a frame in Load Image's mask editor and use that
node's MASK output (the painted area is 1). Paint generously around the object's whole path.""",
    "tiny_demo_native_ksampler": f"""# SAMA tiny demo with the native KSampler (random weights)

SAMA In-Context -> KSampler (euler / simple) -> SAMA Extract Latent, with the tiny bundle.
{_TINY_INTRO}

{_TINY_FILES}""",
})

# ---------------------------------------------------------------------------------------------------------
# Widgets


def _input_specs(info: dict):
    """[(name, type, options, optional)] of a node's inputs in the frontend's order (required, then
    optional; hidden inputs are not shown)."""
    specs = []
    for section in ("required", "optional"):
        declared = info["input"].get(section, {})
        for name in info.get("input_order", {}).get(section, list(declared)):
            spec = declared[name]
            options = spec[1] if len(spec) > 1 and isinstance(spec[1], dict) else {}
            kind = "COMBO" if isinstance(spec[0], list) else spec[0]
            specs.append((name, kind, options, section == "optional"))
    return specs


def is_widget_type(kind) -> bool:
    return kind in WIDGET_TYPES


def widget_names(info: dict) -> list[str]:
    """The node's widgets in the order of `widgets_values`, with the frontend-added ones
    ("control_after_generate" after seed-like INTs, "upload" after image/video upload pickers)."""
    names = []
    for name, kind, options, _optional in _input_specs(info):
        if not is_widget_type(kind):
            continue
        names.append(name)
        if kind == "INT" and (options.get("control_after_generate") or name in SEED_NAMES):
            names.append(CONTROL_WIDGET)
        if options.get("image_upload") or options.get("video_upload"):
            names.append(UPLOAD_WIDGET)
    return names


def _default_value(kind, options, spec_values):
    if "default" in options:
        return options["default"]
    if kind == "COMBO":
        choices = spec_values if isinstance(spec_values, list) else options.get("options", [])
        return choices[0] if choices else ""
    return {"INT": options.get("min", 0), "FLOAT": options.get("min", 0.0), "STRING": "",
            "BOOLEAN": False}.get(kind)


def _is_link(value) -> bool:
    return (isinstance(value, list) and len(value) == 2
            and isinstance(value[0], str) and isinstance(value[1], int))


# ---------------------------------------------------------------------------------------------------------
# API -> UI


class WorkflowError(ValueError):
    """The workflow does not match the node definitions (unknown node type, input, output slot)."""


def check_api_shape(api) -> None:
    """The API format's structure: {node id: {"class_type": str, "inputs": {name: value or [id, slot]}}},
    every link naming a node of the workflow. A clear WorkflowError otherwise (fuzzed: fuzz/fuzz_inputs.py)."""
    if not isinstance(api, dict) or not api:
        raise WorkflowError("an API workflow is a JSON object of nodes {id: {class_type, inputs}}; this file "
                            "is not (a UI-format file has 'nodes' and 'links': export with 'Save (API)')")
    for node_id, node in api.items():
        if not isinstance(node, dict) or not isinstance(node.get("class_type"), str):
            raise WorkflowError(f"node {node_id!r} has no 'class_type' string")
        if not isinstance(node.get("inputs", {}), dict):
            raise WorkflowError(f"node {node_id!r}: 'inputs' must be an object of input name -> value")
        node.setdefault("inputs", {})
        for input_name, value in node["inputs"].items():
            if _is_link(value) and value[0] not in api:
                raise WorkflowError(f"node {node_id!r} input {input_name!r} links to node {value[0]!r}, which "
                                    "is not in the workflow")
            if _is_link(value) and value[1] < 0:
                raise WorkflowError(f"node {node_id!r} input {input_name!r} links to output slot {value[1]}")


def _depths(api: dict) -> dict[str, int]:
    """Longest path from a node without inputs, per node: the column it is drawn in."""
    depths: dict[str, int] = {}

    def depth(node_id, visiting=()):
        if node_id in depths:
            return depths[node_id]
        if node_id in visiting:
            raise WorkflowError(f"the workflow has a cycle through node {node_id}")
        sources = [v[0] for v in api[node_id]["inputs"].values() if _is_link(v)]
        depths[node_id] = 1 + max((depth(s, visiting + (node_id,)) for s in sources), default=-1)
        return depths[node_id]

    for node_id in api:
        depth(node_id)
    return depths


def _topological_order(api: dict, depths: dict[str, int]) -> list[str]:
    return sorted(api, key=lambda nid: (depths[nid], _id_key(nid)))


def _id_key(node_id: str):
    return (0, int(node_id)) if node_id.isdigit() else (1, node_id)


# Rough body sizes (the frontend grows a node to fit its widgets; these keep the layout readable).
_MEDIA_HEIGHT = {"LoadVideo": 280, "LoadImage": 280, "SaveVideo": 280, "SaveImage": 260, "PreviewImage": 260,
                 "MaskPreview": 260, "PreviewAny": 120}
_ROW, _WIDGET_ROW, _MULTILINE = 22, 26, 90
_COLUMN_GAP, _ROW_GAP, _TITLE = 70, 50, 30


def _node_size(class_type, info, sockets: int, outputs: int) -> list[int]:
    widgets = [(kind, options) for _n, kind, options, _o in _input_specs(info) if is_widget_type(kind)]
    height = _ROW * max(sockets, outputs, 1) + 10
    for kind, options in widgets:
        height += _MULTILINE if kind == "STRING" and options.get("multiline") else _WIDGET_ROW
        if kind == "INT" and options.get("control_after_generate"):
            height += _WIDGET_ROW
    height += _MEDIA_HEIGHT.get(class_type, 0)
    width = 360 if any(k == "STRING" and o.get("multiline") for k, o in widgets) else 320
    return [width, height]


def _model_hints(class_type: str, inputs: dict) -> list[dict]:
    hints = []
    for (node_type, input_name), folder in LOADER_FOLDERS.items():
        value = inputs.get(input_name)
        if node_type == class_type and isinstance(value, str):
            for name, url in MODEL_DOWNLOADS.get((folder, value), []):
                hints.append({"name": name, "url": url, "directory": folder})
    return hints


def api_to_ui(api: dict, object_info: dict, name: str = "workflow", note: str | None = None) -> dict:
    """The UI-format workflow (frontend schema version 0.4) of an API-format workflow.

    object_info: the server's /object_info (at least the node types the workflow uses).
    note: Markdown for a MarkdownNote above the graph (default: NOTES[name], if any).
    """
    note = NOTES.get(name) if note is None else note
    check_api_shape(api)
    unknown = sorted({n["class_type"] for n in api.values()} - set(object_info))
    if unknown:
        raise WorkflowError(f"node types not in object_info: {unknown} (is the SAMA pack installed?)")

    depths = _depths(api)
    order = _topological_order(api, depths)
    numeric_ids = {nid: int(nid) if nid.isdigit() else None for nid in api}
    next_free = max([i for i in numeric_ids.values() if i is not None], default=0) + 1
    for nid in order:  # string ids that are not numbers get fresh numbers
        if numeric_ids[nid] is None:
            numeric_ids[nid], next_free = next_free, next_free + 1

    # Links, in the order of the nodes they end at (as the frontend numbers them when wiring by hand).
    links, incoming, outgoing = [], {}, {nid: {} for nid in api}
    for nid in order:
        node = api[nid]
        info = object_info[node["class_type"]]
        declared = {name: (kind, options) for name, kind, options, _ in _input_specs(info)}
        for input_name, value in node["inputs"].items():
            if input_name not in declared:
                raise WorkflowError(f"node {nid} ({node['class_type']}) has no input '{input_name}'")
            if not _is_link(value):
                continue
            source_id, slot = value
            if source_id not in api:
                raise WorkflowError(f"node {nid} input '{input_name}' links to missing node {source_id}")
            source_outputs = object_info[api[source_id]["class_type"]]["output"]
            if slot >= len(source_outputs):
                raise WorkflowError(f"node {nid} input '{input_name}': node {source_id} has no output {slot}")
            link_id = len(links) + 1
            # The frontend types a link into an any-type input (PreviewAny) as "*".
            link_type = "*" if declared[input_name][0] == "*" else source_outputs[slot]
            links.append([link_id, numeric_ids[source_id], slot, numeric_ids[nid], None, link_type])
            incoming[(nid, input_name)] = link_id
            outgoing[source_id].setdefault(slot, []).append(link_id)

    ui_nodes = {}
    link_by_id = {link[0]: link for link in links}
    for index, nid in enumerate(order):
        node = api[nid]
        class_type = node["class_type"]
        info = object_info[class_type]
        specs = _input_specs(info)
        sockets, linked_widgets, values = [], [], []
        for input_name, kind, options, optional in specs:
            link_id = incoming.get((nid, input_name))
            if not is_widget_type(kind):
                socket = {"name": input_name, "type": kind, "link": link_id}
                if optional:
                    socket["shape"] = OPTIONAL_SOCKET_SHAPE
                sockets.append(socket)
                continue
            spec_values = info["input"]["optional" if optional else "required"][input_name][0]
            value = node["inputs"].get(input_name)
            if value is None or link_id is not None:
                value = _default_value(kind, options, spec_values)
            values.append(value)
            if kind == "INT" and (options.get("control_after_generate") or input_name in SEED_NAMES):
                values.append(CONTROL_VALUE)
            if options.get("image_upload") or options.get("video_upload"):
                values.append(UPLOAD_VALUE)
            if link_id is not None:
                linked_widgets.append({"name": input_name, "type": kind, "widget": {"name": input_name},
                                       "link": link_id})
        inputs = sockets + linked_widgets
        for slot, socket in enumerate(inputs):
            if socket["link"] is not None:
                link_by_id[socket["link"]][4] = slot
        outputs = [{"name": out_name, "type": out_type, "links": outgoing[nid].get(slot)}
                   for slot, (out_type, out_name) in enumerate(zip(info["output"], info["output_name"]))]
        properties = {"Node name for S&R": class_type}
        hints = _model_hints(class_type, node["inputs"])
        if hints:
            properties["models"] = hints
        ui = {"id": numeric_ids[nid], "type": class_type, "pos": [0, 0],
              "size": _node_size(class_type, info, len(inputs), len(outputs)), "flags": {}, "order": index,
              "mode": 0, "inputs": inputs, "outputs": outputs, "properties": properties,
              "widgets_values": values}
        title = node.get("_meta", {}).get("title")
        if title and title != info.get("display_name", class_type):
            ui["title"] = title
        ui_nodes[nid] = ui

    _lay_out(api, order, depths, ui_nodes)
    nodes = [ui_nodes[nid] for nid in order]
    if note:
        nodes.append(_note_node(next_free, len(nodes), note))
    return {
        "id": str(uuid.uuid5(uuid.NAMESPACE_URL, f"comfyui-sama/workflows/{name}")),
        "revision": 0,
        "last_node_id": max(n["id"] for n in nodes),
        "last_link_id": len(links),
        "nodes": nodes,
        "links": links,
        "groups": [],
        "config": {},
        "extra": {"ds": {"scale": 0.75, "offset": [60, 420]}, "frontendVersion": FRONTEND_VERSION},
        "version": 0.4,
    }


def _lay_out(api, order, depths, ui_nodes) -> None:
    """Columns by depth; inside a column, nodes sorted by where their inputs come from (fewer crossings)."""
    columns: dict[int, list[str]] = {}
    for nid in order:
        columns.setdefault(depths[nid], []).append(nid)
    x = 0
    for depth in sorted(columns):
        def source_y(nid):
            ys = [ui_nodes[v[0]]["pos"][1] for v in api[nid]["inputs"].values() if _is_link(v)]
            return (sum(ys) / len(ys) if ys else 0.0, _id_key(nid))
        y = 0
        for nid in sorted(columns[depth], key=source_y):
            ui_nodes[nid]["pos"] = [x, y]
            y += ui_nodes[nid]["size"][1] + _TITLE + _ROW_GAP
        x += max(ui_nodes[nid]["size"][0] for nid in columns[depth]) + _COLUMN_GAP


def _note_node(node_id: int, order: int, text: str) -> dict:
    lines = text.count("\n") + 1
    height = lines * 20 + 60
    return {"id": node_id, "type": "MarkdownNote", "pos": [0, -(height + 60)], "size": [760, height],
            "flags": {}, "order": order, "mode": 0, "inputs": [], "outputs": [], "properties": {},
            "widgets_values": [text], "title": "About this workflow"}


# ---------------------------------------------------------------------------------------------------------
# UI -> API (what the frontend's "Export (API)" produces, for checks)


def ui_to_api(ui: dict, object_info: dict) -> dict:
    """The API-format prompt of a UI workflow (top-level graph; frontend-only nodes dropped).

    Widget values are matched to inputs by the widget order of `widget_names`; a widget fed by a link
    becomes that link. Bypassed/muted nodes, reroutes, primitive nodes and subgraphs are not supported.
    """
    if ui.get("definitions", {}).get("subgraphs"):
        raise WorkflowError("ui_to_api does not expand subgraphs")
    links = {link[0]: link for link in ui["links"]}
    api = {}
    for node in ui["nodes"]:
        if node["type"] in ("Note", "MarkdownNote"):
            continue
        if node["type"] in FRONTEND_ONLY_NODE_TYPES or node.get("mode", 0) != 0:
            raise WorkflowError(f"node {node['id']} ({node['type']}, mode {node.get('mode')}): not supported")
        info = object_info[node["type"]]
        names = widget_names(info)
        values = node.get("widgets_values", [])
        if len(values) != len(names):
            raise WorkflowError(f"node {node['id']} ({node['type']}) has {len(values)} widget values, "
                                f"its widgets are {names}: the node changed since the UI file was written; "
                                "regenerate it with `python workflows/make_ui.py --all --server URL`")
        by_name = dict(zip(names, values))
        linked = {s["name"]: links[s["link"]] for s in node.get("inputs", []) if s.get("link") is not None}
        inputs = {}
        for input_name, kind, _options, _optional in _input_specs(info):
            if input_name in linked:
                link = linked[input_name]
                inputs[input_name] = [str(link[1]), link[2]]
            elif is_widget_type(kind):
                inputs[input_name] = by_name[input_name]
        api[str(node["id"])] = {"class_type": node["type"], "inputs": inputs}
    return api


# ---------------------------------------------------------------------------------------------------------
# Command line


def fetch_object_info(server: str) -> dict:
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(server.rstrip("/") + "/object_info", timeout=60) as response:
        return json.loads(response.read())


def ui_path_for(api_path: Path) -> Path:
    if not api_path.name.endswith("_api.json"):
        raise SystemExit(f"{api_path}: API workflow files are named NAME_api.json")
    return api_path.with_name(api_path.name[: -len("_api.json")] + ".json")


def write_ui(api_path: Path, object_info: dict, out: Path | None = None) -> Path:
    out = out or ui_path_for(api_path)
    name = ui_path_for(api_path).stem
    ui = api_to_ui(json.loads(api_path.read_text()), object_info, name=name)
    out.write_text(json.dumps(ui, indent=2, ensure_ascii=False) + "\n")
    return out


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("api_files", nargs="*", type=Path,
                        help="NAME_api.json files (the UI file is NAME.json)")
    parser.add_argument("--all", action="store_true",
                        help="every workflows/*_api.json with a note in NOTES (hand-made UI files are kept)")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--server", help="a running ComfyUI with the pack, e.g. http://127.0.0.1:8188")
    source.add_argument("--object-info", type=Path, help="a saved /object_info JSON")
    parser.add_argument("-o", "--output", type=Path, help="output file (one input file only)")
    args = parser.parse_args(argv)

    files = list(args.api_files)
    if args.all:
        files += [p for p in sorted(WORKFLOWS_DIR.glob("*_api.json")) if ui_path_for(p).stem in NOTES]
    if not files:
        parser.error("give NAME_api.json files or --all")
    if args.output and len(files) != 1:
        parser.error("-o needs exactly one input file")
    object_info = fetch_object_info(args.server) if args.server else json.loads(args.object_info.read_text())
    for api_path in files:
        print(f"{api_path.name} -> {write_ui(api_path, object_info, args.output).name}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
