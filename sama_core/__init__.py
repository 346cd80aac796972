"""sama_core: SAMA (Semantic Anchoring + Motion Alignment) on the Wan2.1 video DiT.

Plain PyTorch; never imports ComfyUI. Used by the node pack (`nodes/`), the CLI
(`python -m sama_core`) and training (`train/`).
"""

__version__ = "0.1.0"
