import pathlib

import pytest

REPO = pathlib.Path(__file__).resolve().parents[1]
SHARED = REPO.parent / "shared"
GOLDEN = SHARED / "golden"


def comfyui_dir():
    """The real ComfyUI tree for host tests: $COMFYUI_DIR, else ../shared/ComfyUI; None when absent (tests skip)."""
    from comfy_host import find_comfyui
    return find_comfyui()


@pytest.fixture(scope="session")
def golden_dir():
    if not (GOLDEN / "tiny_sama.safetensors").exists():
        pytest.skip(f"golden tensors not found at {GOLDEN} (they live in ../shared/golden)")
    return GOLDEN


@pytest.fixture(scope="module")
def bundle(tmp_path_factory):
    """A tiny random model bundle with the default settings (one per test module); a module that needs other
    defaults defines its own `bundle`."""
    from sama_core.bundle import write_tiny_random_bundle
    return write_tiny_random_bundle(tmp_path_factory.mktemp("bundle") / "tiny")


@pytest.fixture(scope="module")
def pipe(bundle):
    """That bundle as a CPU pipeline."""
    from sama_core.pipeline import SamaPipeline
    return SamaPipeline.from_bundle(bundle, device="cpu")


@pytest.fixture
def fresh_accelerate_state():
    """accelerate keeps process-wide singletons; tests that build Accelerators start from a clean state
    (files opt in with `pytestmark = pytest.mark.usefixtures("fresh_accelerate_state")`)."""
    from accelerate.state import AcceleratorState, GradientState
    AcceleratorState._reset_state(True)
    GradientState._reset_state()
    yield
