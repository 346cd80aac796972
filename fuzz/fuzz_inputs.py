"""Coverage-guided fuzzing (atheris / libFuzzer) of the files users hand us.

    python fuzz/fuzz_inputs.py checkpoint [libFuzzer flags, e.g. -runs=100000 -max_len=4096 CORPUS_DIR]
    python fuzz/fuzz_inputs.py header | bundle | train_config | workflow

Targets:
    checkpoint    arbitrary bytes as a .safetensors / .pth file -> sama_core.checkpoints.read_state_dict
    header        a safetensors file whose JSON header is the fuzzer's text -> sama_core.loading.load_dit
    bundle        the fuzzer's text as bundle.json -> sama_core.pipeline.read_bundle_spec
    train_config  the fuzzer's text as a training YAML -> train.config.load_config
    workflow      the fuzzer's text as an API workflow JSON -> workflows/make_ui.py's converter

The contract checked: whatever the input, the code either succeeds or raises one of our errors (SamaError,
which carries a message for the user); anything else (a KeyError, a TypeError from deep inside a library,
a crash) is a finding. tests/test_fuzz.py runs every target for a few hundred inputs; the hypothesis tests
there cover the same entry points with structured inputs.
"""

from __future__ import annotations

import json
import os
import struct
import sys
import tempfile
from pathlib import Path

import atheris

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))
os.environ.setdefault("HF_HUB_OFFLINE", "1")

with atheris.instrument_imports(include=["sama_core", "train", "make_ui"]):
    from sama_core.checkpoints import read_state_dict
    from sama_core.errors import SamaError
    from sama_core.loading import load_dit
    from sama_core.pipeline import read_bundle_spec
    from train.config import load_config
    sys.path.insert(0, str(REPO / "workflows"))
    import make_ui

SCRATCH = Path(tempfile.mkdtemp(prefix="sama-fuzz-"))
FAILURE_CLASSES = (SamaError, make_ui.WorkflowError)


def _expected(call):
    try:
        call()
    except FAILURE_CLASSES:
        pass


SUFFIXES = (".safetensors", ".pth", ".bin", ".ckpt")


def checkpoint(data: bytes) -> None:
    if not data:
        return
    path = SCRATCH / f"input{SUFFIXES[data[0] % len(SUFFIXES)]}"  # first byte: the file name's suffix
    path.write_bytes(data[1:])
    _expected(lambda: read_state_dict(path))


def header(data: bytes) -> None:
    raw = data
    path = SCRATCH / "forged.safetensors"
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + b"\0" * 256)
    _expected(lambda: load_dit(path))


def bundle(data: bytes) -> None:
    path = SCRATCH / "bundle.json"
    path.write_bytes(data)
    _expected(lambda: read_bundle_spec(path))


def train_config(data: bytes) -> None:
    path = SCRATCH / "config.yaml"
    path.write_bytes(data)
    _expected(lambda: load_config(path))


_OBJECT_INFO = None


def workflow(data: bytes) -> None:
    global _OBJECT_INFO
    if _OBJECT_INFO is None:
        _OBJECT_INFO = json.loads((REPO / "fuzz" / "object_info_sample.json").read_text())
    try:
        api = json.loads(data)
    except ValueError:
        return  # not JSON: the converter is never reached (json reports it)
    _expected(lambda: make_ui.api_to_ui(api, _OBJECT_INFO, name="fuzz"))


TARGETS = {"checkpoint": checkpoint, "header": header, "bundle": bundle, "train_config": train_config,
           "workflow": workflow}


def seed_inputs(name: str) -> list[bytes]:
    """Valid inputs of a target to start from (random bytes almost never make valid JSON or safetensors)."""
    if name == "checkpoint" or name == "header":
        import torch
        from safetensors.torch import save
        blob = save({"blocks.0.self_attn.q.weight": torch.ones(4, 4),
                     "patch_embedding.weight": torch.zeros(4, 16, 1, 2, 2)}, metadata={"k": "v"})
        if name == "header":
            size = struct.unpack("<Q", blob[:8])[0]
            return [blob[8:8 + size]]
        return [bytes([0]) + blob, bytes([1]) + b"PK\x03\x04" + b"\0" * 32]
    if name == "bundle":
        return [json.dumps({"dit": "dit.safetensors", "vae": "vae.safetensors", "text_encoder": "te.safetensors",
                            "siglip": "siglip.safetensors", "siglip_heads": 2,
                            "defaults": {"steps": 20, "guidance": 1.0}, "card": {"name": "x"}}).encode()]
    if name == "train_config":
        return [p.read_bytes() for p in sorted((REPO / "train" / "configs").glob("*.yaml"))]
    return [p.read_bytes() for p in sorted((REPO / "workflows").glob("*_api.json"))]


def main(argv=None) -> None:
    argv = list(sys.argv if argv is None else argv)
    if len(argv) < 2 or argv[1] not in TARGETS:
        sys.exit(f"usage: python fuzz/fuzz_inputs.py {{{'|'.join(TARGETS)}}} [libFuzzer flags] [CORPUS_DIR]")
    name = argv.pop(1)
    if not any(not a.startswith("-") for a in argv[1:]):  # no corpus folder given: start from the seeds
        corpus = SCRATCH / f"corpus-{name}"
        corpus.mkdir()
        for i, seed in enumerate(seed_inputs(name)):
            (corpus / f"seed{i}").write_bytes(seed)
        argv.append(str(corpus))
    atheris.Setup(argv, TARGETS[name])
    atheris.Fuzz()


if __name__ == "__main__":
    main()
