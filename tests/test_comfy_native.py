"""Native ComfyUI samplers on a SAMA model (packed semantic frames) reproduce sama_core's reference loop.

Runs tests/comfy_native_check.py in a fresh process: it imports ComfyUI's modules and this pack as a
package, which must not mix with the test process's own `nodes` / `sama_core` imports.
"""

import json
import os
import subprocess
import sys

import pytest

from conftest import REPO, comfyui_dir


@pytest.fixture(scope="module")
def native_results():
    root = comfyui_dir()
    if root is None or not (root / "comfy").is_dir():
        pytest.skip("ComfyUI not found: set COMFYUI_DIR (default ../shared/ComfyUI)")
    proc = subprocess.run([sys.executable, str(REPO / "tests" / "comfy_native_check.py")],
                          env={**os.environ, "COMFYUI_DIR": str(root), "HF_HUB_OFFLINE": "1"},
                          capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("case", ["plain", "anchor"])
def test_ksampler_euler_simple_matches_the_reference_loop(native_results, case):
    r = native_results[case]
    # Same initial noise, same sigmas: only float rounding differs (comfy derives v from its x0 estimate).
    assert r["video_max_abs_diff"] < 1e-4 * max(1.0, r["video_max_abs"])
    assert r["semantic_max_abs_diff"] < 1e-4


def test_simple_scheduler_equals_sama_sigmas_when_steps_divide_1000(native_results):
    diffs = native_results["sigma_max_abs_diff"]
    assert all(diffs[n] <= 6e-8 for n in ("5", "20", "25", "50"))  # at most 1 float32 ulp
    assert diffs["6"] > 1e-5  # documented: use SAMA Sigmas + SamplerCustomAdvanced for such step counts


@pytest.mark.parametrize("case, width", [("same", 4), ("wide_decoder", 8)])
def test_sama_load_vae_reads_tiny_vaes_and_a_wider_decoder_like_sama_core(native_results, case, width):
    r = native_results["vae"][case]
    assert r["decoder_width"] == width and r["frames"] == [5, 32, 32, 3]
    assert r["max_abs_diff"] < 1e-4
