"""Fuzzing (hypothesis) of what we parse from users: checkpoint files and their headers, bundle.json,
CLI values. Whatever the input, the only exceptions are our own clear errors (SamaError)."""

import json
import struct

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from sama_core.checkpoints import describe_checkpoint, identify_checkpoint, read_state_dict
from sama_core.commands.edit import parse_lora, parse_range, parse_size
from sama_core.errors import SamaError
from sama_core.loading import load_dit

FUZZ = settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
key_names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz0123456789._", min_size=1, max_size=40)


@pytest.fixture(scope="module")
def valid_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("fuzz") / "valid.safetensors"
    save_file({"blocks.0.self_attn.q.weight": torch.randn(8, 8), "patch_embedding.weight": torch.randn(8, 16, 1, 2, 2)},
              str(path))
    return path.read_bytes()


@FUZZ
@given(st.lists(key_names, max_size=30))
def test_identify_never_crashes(keys):
    kind = identify_checkpoint(keys)
    assert kind is None or isinstance(kind.what, str)
    assert describe_checkpoint(keys) is None or isinstance(describe_checkpoint(keys), str)


@FUZZ
@given(data=st.binary(max_size=2048), suffix=st.sampled_from([".safetensors", ".pth", ".bin", ".ckpt"]))
def test_random_bytes_are_refused_cleanly(tmp_path, data, suffix):
    path = tmp_path / f"random{suffix}"
    path.write_bytes(data)
    with pytest.raises(SamaError):
        read_state_dict(path)


@FUZZ
@given(cut=st.integers(min_value=0, max_value=4000), flip=st.integers(min_value=0, max_value=4000),
       value=st.integers(min_value=0, max_value=255))
def test_damaged_safetensors_are_refused_or_read(tmp_path, valid_file, cut, flip, value):
    data = bytearray(valid_file[: max(cut, 1)] if cut < len(valid_file) else valid_file)
    if flip < len(data):
        data[flip] = value
    path = tmp_path / "damaged.safetensors"
    path.write_bytes(bytes(data))
    try:
        tensors, _ = read_state_dict(path)
    except SamaError:
        return
    assert all(isinstance(t, torch.Tensor) for t in tensors.values())


@FUZZ
@given(header=st.dictionaries(key_names, st.dictionaries(st.sampled_from(["dtype", "shape", "data_offsets"]),
                                                         st.one_of(st.integers(-5, 100), st.text(max_size=5),
                                                                   st.lists(st.integers(-3, 64), max_size=4))),
                              max_size=4))
def test_forged_safetensors_headers(tmp_path, header):
    raw = json.dumps(header).encode()
    path = tmp_path / "forged.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 64)
    try:
        load_dit(path)
    except SamaError:
        pass


@FUZZ
@given(spec=st.dictionaries(st.sampled_from(["dit", "vae", "text_encoder", "siglip", "defaults", "card"]),
                            st.one_of(st.none(), st.text(max_size=12), st.integers(), st.dictionaries(
                                st.text(max_size=6), st.integers(), max_size=2)), max_size=6))
def test_bundle_manifest_mutations(tmp_path, spec):
    from sama_core.pipeline import SamaPipeline
    (tmp_path / "bundle.json").write_text(json.dumps(spec))
    with pytest.raises(SamaError):
        SamaPipeline.from_bundle(tmp_path)


@FUZZ
@given(st.text(max_size=20))
def test_cli_value_parsers(text):
    for parse in (parse_size, parse_range):
        try:
            parse(text)
        except SamaError:
            pass
    path, strength = parse_lora(text or "x")
    assert isinstance(path, str) and isinstance(strength, float)


# ------------------------------------------------------------------ coverage-guided (atheris / libFuzzer)

@pytest.mark.slow
@pytest.mark.parametrize("target", ["checkpoint", "header", "bundle", "train_config", "workflow"])
def test_atheris_finds_no_uncaught_exception(target, tmp_path):
    """A short coverage-guided run of fuzz/fuzz_inputs.py from its seed inputs: libFuzzer exits non-zero and
    writes a crash file at the first exception that is not one of our errors."""
    import os
    import subprocess
    import sys
    from pathlib import Path
    pytest.importorskip("atheris", reason="atheris is in requirements-dev.txt (Linux wheels)")
    repo = Path(__file__).resolve().parents[1]
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1")
    done = subprocess.run([sys.executable, str(repo / "fuzz" / "fuzz_inputs.py"), target, "-runs=1000",
                           "-rss_limit_mb=8192", "-max_len=8192", "-seed=1", f"-artifact_prefix={tmp_path}/"],
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "DONE" in done.stderr and list(tmp_path.glob("crash-*")) == []


def test_a_binary_training_config_is_refused_with_a_message(tmp_path):
    """The first atheris finding: a non-UTF-8 config file raised UnicodeDecodeError from deep inside."""
    from train.config import load_config
    from train.vae_train import load_vae_config
    path = tmp_path / "config.yaml"
    for loader in (load_config, load_vae_config):  # both trainers read configs through one reader
        path.write_bytes(b"seed: 0\n\xff\xfe\x00junk")
        with pytest.raises(SamaError, match="not a UTF-8 text file"):
            loader(path)
        path.write_text("- just\n- a list\n")
        with pytest.raises(SamaError, match="not a mapping of settings"):
            loader(path)


def test_malformed_api_workflows_get_a_workflow_error():
    import sys
    from pathlib import Path
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "workflows"))
    import make_ui
    for api, message in (([], "JSON object of nodes"), ({"1": {"inputs": {}}}, "no 'class_type'"),
                         ({"1": {"class_type": "X", "inputs": []}}, "'inputs' must be an object"),
                         ({"1": {"class_type": "X", "inputs": {"a": ["9", 0]}}}, "links to node '9'")):
        with pytest.raises(make_ui.WorkflowError, match=message):
            make_ui.api_to_ui(api, {"X": {}})
