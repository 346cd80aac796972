"""ComfyUI adapters for SAMA: one small V3 node class per capability, grouped in submodules.

Each submodule listed in `NODE_MODULES` exposes `NODES = [io.ComfyNode subclasses]` and may import
ComfyUI (`comfy_api`, `comfy`, `folder_paths`) at its top. This package itself imports nothing from
ComfyUI at import time, so the pure conversion helpers (`nodes/convert.py`) stay importable and
testable without a ComfyUI install.
"""

import importlib
import logging
from pathlib import Path

logger = logging.getLogger(__name__)

# The embedded tiny model (issue 9) ships inside sama_core; ComfyUI's loaders list it from here.
BUNDLED_ASSETS = Path(__file__).resolve().parents[1] / "sama_core" / "assets"
BUNDLED_MODEL_KINDS = ("diffusion_models", "text_encoders", "vae", "clip_vision")

# Submodules of this package that define nodes. Adding a node file is one line here.
NODE_MODULES = (
    "model",
    "text",
    "anchors",
    "sampler",
    "pretext",
    "frames",
    "keep_unchanged",
)


def load_node_classes(module_names=None):
    """Import each node submodule (default: NODE_MODULES) and collect its `NODES`.

    A submodule that fails to import (a missing dependency, a bug) is logged as an error with its
    traceback and skipped: the nodes of the other submodules still register, and the failure is
    visible in ComfyUI's console instead of nodes silently missing from the menu.
    Returns (node classes, {module name: error text}).
    """
    node_classes = []
    failures = {}
    for name in NODE_MODULES if module_names is None else module_names:
        try:
            module = importlib.import_module(f".{name}", __name__)
            node_classes.extend(module.NODES)
        except Exception as error:  # noqa: BLE001 - report any failure, keep the other modules
            failures[name] = f"{type(error).__name__}: {error}"
            logger.exception("SAMA: nodes/%s.py failed to load, its nodes are NOT registered (%s). "
                             "The other SAMA nodes are still available.", name, failures[name])
    return node_classes, failures


def _with_valid_schema(node_classes):
    """Drop (and log) node classes whose schema ComfyUI rejects.

    ComfyUI's loader validates every class of the list in one loop and gives up on the whole pack at
    the first invalid schema; checking each one here keeps one broken node from hiding all others.
    """
    valid = []
    for node_class in node_classes:
        try:
            node_class.GET_SCHEMA()
            valid.append(node_class)
        except Exception:  # noqa: BLE001 - report any failure, keep the other nodes
            logger.exception("SAMA: node %s has an invalid schema and is NOT registered.",
                             node_class.__name__)
    return valid


def register_bundled_models(assets=BUNDLED_ASSETS):
    """Make the shipped SAMA-Shapes bundle selectable in the loaders with no setup: its folder is added to
    ComfyUI's diffusion_models / text_encoders / vae / clip_vision search paths, so the files appear as
    "sama-shapes/dit.safetensors", "sama-shapes/vae.safetensors", ... (workflows/sama_shapes_demo.json)."""
    import folder_paths  # only inside a ComfyUI process

    if not (assets / "sama-shapes" / "bundle.json").is_file():
        return False
    for kind in BUNDLED_MODEL_KINDS:
        folder_paths.add_model_folder_path(kind, str(assets))
    return True


async def comfy_entrypoint():
    """V3 entry point called by ComfyUI's custom-node loader; returns the pack's ComfyExtension."""
    # Imported here, not at module level: comfy_api only exists inside a ComfyUI process.
    from comfy_api.latest import ComfyExtension

    try:
        register_bundled_models()
    except Exception:  # noqa: BLE001 - the nodes work without the bundled demo model
        logger.exception("SAMA: could not add the bundled SAMA-Shapes model to the model folders")

    class SamaExtension(ComfyExtension):
        async def get_node_list(self):
            node_classes, _failures = load_node_classes()
            return _with_valid_schema(node_classes)

    return SamaExtension()
