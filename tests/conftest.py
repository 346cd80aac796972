import os
import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden"


def comfyui_dir():
    """The real ComfyUI tree for host tests: $COMFYUI_DIR, else ../shared/ComfyUI when present."""
    env = os.environ.get("COMFYUI_DIR")
    if env:
        return pathlib.Path(env)
    default = SHARED / "ComfyUI"
    return default if default.exists() else None


@pytest.fixture(scope="session")
def golden_dir():
    if not (GOLDEN / "tiny_sama.safetensors").exists():
        pytest.skip(f"golden tensors not found at {GOLDEN} (they live in ../shared/golden)")
    return GOLDEN
