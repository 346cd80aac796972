"""ComfyUI entry point of the SAMA node pack (the nodes live in `nodes/`).

ComfyUI imports this folder as a package and calls `comfy_entrypoint()` (V3 API). Do not define
NODE_CLASS_MAPPINGS here: ComfyUI 0.3.64 prefers it and would silently ignore the V3 entry point.
"""

# Only when imported as a package, which ComfyUI always does. pytest also imports this file while
# collecting tests/ (the repo root has an __init__.py); from a checkout whose folder name is not a
# Python identifier (e.g. "ComfyUI-SAMA") it imports it as a lone module, where a relative import fails.
if __package__:
    from .nodes import comfy_entrypoint

    __all__ = ["comfy_entrypoint"]
