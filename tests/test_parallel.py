"""Sequence parallelism (sama_core/parallel.py) on CPU processes over gloo: the DiT split across 2 and 3
processes gives the single-process output (fp32), for both RoPE paths, uneven token and head splits, and
gradients; the same through the `edit` command under torchrun."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from sama_core.config import SamaConfig
from sama_core.errors import SamaInputError
from sama_core.parallel import SequenceParallel, close_process_group, enable_sequence_parallel

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(Path(__file__).parent))
from tiny_models import TINY, tiny_dit, tiny_inputs  # noqa: E402

THREE_HEADS = SamaConfig(**{**TINY.to_dict(), "dim": 96, "num_heads": 3})  # head_dim 32; 3 heads over 2 ranks


def _forward(config, rope, backward, sp):
    """The tiny DiT's outputs (and gradients) on fixed inputs, split over `sp` (None: one process)."""
    model = enable_sequence_parallel(tiny_dit(config, rope=rope), sp)
    inputs = tiny_inputs(config, frames=3, size=6, num_semantic=5)  # L = 27 + 5 + 27 = 59: uneven
    if not backward:
        with torch.no_grad():
            out = model(**inputs)
        return {"video": out.video, "semantic": out.semantic}
    inputs["target"].requires_grad_(True)
    out = model(**inputs)
    (out.video.square().mean() + out.semantic.square().mean()).backward()
    return {"video": out.video.detach(), "semantic": out.semantic.detach(), "grad": inputs["target"].grad,
            "weight_grad": model.blocks[0].self_attn.q.weight.grad}


def _worker(rank, world, init_file, out_dir, config_dict, rope, backward):
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    completed = False
    try:
        sp = SequenceParallel.from_world(device_type="cpu")
        result = _forward(SamaConfig.from_dict(config_dict), rope, backward, sp)
        torch.save(result, Path(out_dir) / f"rank{rank}.pt")
        completed = True
    finally:
        close_process_group(completed)


def _run(tmp_path, world, config=TINY, rope="exact", backward=False):
    for attempt in range(2):
        folder = tmp_path / f"attempt{attempt}"
        folder.mkdir()
        try:
            mp.spawn(_worker, args=(world, str(folder / "init"), str(folder), config.to_dict(), rope, backward),
                     nprocs=world, join=True)
            break
        except mp.ProcessExitedException as e:
            # The CPU gloo backend rarely aborts a process ("terminate called without an active exception",
            # SIGABRT) even with the barrier before teardown (sama_core/parallel.py close_process_group): seen
            # once in ~20 CI runs, never reproduced in 5 local reruns. One retry; a real bug fails both times,
            # and the outputs are still compared with the single-process result below.
            if attempt or e.signal_name != "SIGABRT":
                raise
    return [torch.load(folder / f"rank{r}.pt", weights_only=True) for r in range(world)]


def _reference(config=TINY, rope="exact", backward=False):
    return _forward(config, rope, backward, sp=None)


@pytest.mark.parametrize("world,config,rope", [(2, TINY, "exact"), (3, THREE_HEADS, "fast"), (2, THREE_HEADS, "exact")],
                         ids=["2procs-exact-rope", "3procs-fast-rope", "2procs-3heads-uneven"])
def test_split_sequence_gives_the_single_process_output(tmp_path, world, config, rope):
    expected = _reference(config, rope)
    for result in _run(tmp_path, world, config, rope):  # every process holds the whole output
        for key in ("video", "semantic"):
            assert result[key].shape == expected[key].shape
            assert (result[key] - expected[key]).abs().max() <= 1e-5, key


def test_gradients_flow_through_the_split(tmp_path):
    expected = _reference(backward=True)
    results = _run(tmp_path, 2, backward=True)
    for result in results:
        assert (result["video"] - expected["video"]).abs().max() <= 1e-5
    # summed over the processes (the all-reduce a training loop does), they are the whole gradients
    for key in ("grad", "weight_grad"):
        total = sum(r[key] for r in results)
        assert (total - expected[key]).abs().max() <= 1e-5 * expected[key].abs().max(), key


def _more_processes_than_heads(rank, world, init_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    try:
        model = enable_sequence_parallel(tiny_dit(TINY), SequenceParallel.from_world(device_type="cpu"))
        with pytest.raises(SamaInputError, match="2 attention heads: use at most 2 processes"):
            with torch.no_grad():
                model(**tiny_inputs(TINY))
    finally:
        close_process_group()  # every process refused the same way, so all reach the barrier


def test_more_processes_than_heads_is_refused(tmp_path):
    mp.spawn(_more_processes_than_heads, args=(3, str(tmp_path / "init")), nprocs=3, join=True)


def test_without_a_process_group_the_error_says_how_to_launch():
    with pytest.raises(SamaInputError, match="torchrun"):
        SequenceParallel.from_world(device_type="cpu")


# ------------------------------------------------------------------------------------ the edit command

@pytest.fixture(scope="module")
def bundle_and_clip(tmp_path_factory):
    from sama_core.bundle import write_tiny_random_bundle
    from sama_core.video import write_video
    root = tmp_path_factory.mktemp("sp_cli")
    bundle = write_tiny_random_bundle(root / "bundle")
    g = torch.Generator().manual_seed(3)
    clip = write_video(root / "clip.mp4", torch.rand(5, 32, 32, 3, generator=g), 8)
    return bundle, clip


def _edit_args(bundle, clip, out):
    return ["edit", "--model", str(bundle), "--video", str(clip), "--prompt", "make the square red", "--out",
            str(out), "--steps", "2", "--seed", "4"]


@pytest.mark.slow
def test_edit_command_under_torchrun_equals_one_process(bundle_and_clip, tmp_path):
    from sama_core.__main__ import main as cli
    from sama_core.video import read_video
    bundle, clip = bundle_and_clip
    assert cli(_edit_args(bundle, clip, tmp_path / "one.mp4")) == 0
    env = dict(os.environ, OMP_NUM_THREADS="1", HF_HUB_OFFLINE="1",
               PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    import socket
    with socket.socket() as free:  # torchrun's rendezvous port (0 is not accepted there)
        free.bind(("127.0.0.1", 0))
        port = free.getsockname()[1]
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", str(port),
               "-m", "sama_core", *_edit_args(bundle, clip, tmp_path / "two.mp4"), "--sequence-parallel"]
    done = subprocess.run(command, cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    one, _ = read_video(tmp_path / "one.mp4")
    two, _ = read_video(tmp_path / "two.mp4")
    assert one.shape == two.shape
    # The same frames up to the lossy H.264 encode: fp32 differences of ~1e-6 between the split and the whole
    # computation can flip an 8-bit level before encoding, which x264 may turn into a few levels in a block
    # (seen: 4-5/255 in one run of three, mean 0.13/255). The model-level equality is checked to 1e-5 above;
    # here: close everywhere, equal on average.
    diff = (one - two).abs()
    assert diff.max() <= 16 / 255 and diff.mean() <= 0.5 / 255, (float(diff.max()), float(diff.mean()))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["one.mp4", "two.mp4"]  # rank 1 wrote nothing here


def test_sequence_parallel_without_torchrun_says_how_to_launch(bundle_and_clip, tmp_path, capsys, monkeypatch):
    from sama_core.__main__ import main as cli
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    bundle, clip = bundle_and_clip
    assert cli([*_edit_args(bundle, clip, tmp_path / "x.mp4"), "--sequence-parallel"]) != 0
    assert "torchrun --nproc_per_node N" in capsys.readouterr().err
    assert not (tmp_path / "x.mp4").exists()
