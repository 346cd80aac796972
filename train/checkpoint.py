"""Training checkpoints: accelerate's save_state (model, optimizer, RNG states) plus our EMA and trainer
state, written into a temporary folder that is renamed to `checkpoint-<step>` only when complete.

    output_dir/checkpoint-<step>/
        model.safetensors, optimizer.bin, random_states_<rank>.pkl   (accelerate)
        ema.safetensors (or ema-rank<r>.safetensors when FSDP shards the weights)
        trainer_state.json   step, data position, counters, config fingerprint

A crash mid-write leaves only `.tmp-checkpoint-<step>`, which `--resume latest` ignores. The data
position is the number of global batches consumed (= the step), so a resumed run replays the exact batch
sequence; sigma and noise come from each sample's seed, so no RNG stream needs restoring for them.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from pathlib import Path
from typing import Optional

from safetensors.torch import load_file, save_file

from sama_core.errors import SamaError, SamaFileNotFoundError, SamaInputError

log = logging.getLogger(__name__)

PREFIX = "checkpoint-"
STATE_FILE = "trainer_state.json"
_NAME = re.compile(r"^checkpoint-(\d+)$")


def list_checkpoints(output_dir) -> list[tuple[int, Path]]:
    """Complete checkpoints, oldest first."""
    out = []
    root = Path(output_dir)
    if not root.is_dir():
        return out
    for p in root.iterdir():
        m = _NAME.match(p.name)
        if m and p.is_dir() and (p / STATE_FILE).exists():
            out.append((int(m.group(1)), p))
    return sorted(out)


def resolve_resume(output_dir, resume: Optional[str]) -> Optional[Path]:
    """`latest` -> the newest complete checkpoint (None: start fresh); a path -> that checkpoint."""
    if not resume:
        return None
    if resume == "latest":
        found = list_checkpoints(output_dir)
        if not found:
            log.info("--resume latest: no checkpoint in %s yet, starting from step 0", output_dir)
            return None
        return found[-1][1]
    path = Path(resume)
    if not (path / STATE_FILE).exists():
        raise SamaFileNotFoundError(f"--resume {resume}: not a complete checkpoint folder (no {STATE_FILE}); give "
                                    f"'latest' or a {PREFIX}<step> folder from the output directory")
    return path


def _ema_file(ema, rank: int) -> str:
    return f"ema-rank{rank}.safetensors" if getattr(ema, "sharded", False) else "ema.safetensors"


def load_dit_with_ema(dit_file, checkpoint):
    """The DiT of `dit_file` (its config; fp32) with the EMA weights of a checkpoint-<step> folder: how the
    convergence curves and `train.probe` look at a checkpoint without exporting it."""
    import torch

    from sama_core.loading import load_dit
    ema_file = Path(checkpoint) / _ema_file(None, 0)
    if not ema_file.is_file():
        raise SamaInputError(f"{checkpoint} has no {ema_file.name}: give a {PREFIX}<step> folder written by "
                             "`python -m train` (with EMA on, one process)")
    model = load_dit(dit_file, dtype=torch.float32)
    params = dict(model.named_parameters())
    with torch.no_grad():
        for name, tensor in load_file(str(ema_file)).items():
            if name not in params:
                raise SamaInputError(f"{checkpoint} does not belong to the DiT {dit_file}: it has '{name}'")
            params[name].copy_(tensor)
    return model


class CheckpointWriteError(SamaError, OSError):
    """A checkpoint could not be written (disk full, permissions); the previous ones are intact."""


def save_checkpoint(accelerator, output_dir, step: int, ema, state: dict, keep: int) -> Path:
    """Write checkpoint-<step> atomically. If writing fails (e.g. the disk is full) the partial folder is
    removed and a CheckpointWriteError names the last complete checkpoint, which stays loadable."""
    try:
        return _write_checkpoint(accelerator, output_dir, step, ema, state, keep)
    except OSError as e:
        tmp = Path(output_dir) / f".tmp-{PREFIX}{step}"
        if accelerator.is_main_process:
            shutil.rmtree(tmp, ignore_errors=True)
        complete = list_checkpoints(output_dir)
        last = complete[-1][1].name if complete else "none yet"
        raise CheckpointWriteError(
            f"could not write {PREFIX}{step} in {output_dir} ({e.strerror or e}); the last complete checkpoint "
            f"({last}) is intact: free disk space, then continue with --resume latest") from e


def _write_checkpoint(accelerator, output_dir, step: int, ema, state: dict, keep: int) -> Path:
    output_dir = Path(output_dir)
    final = output_dir / f"{PREFIX}{step}"
    tmp = output_dir / f".tmp-{PREFIX}{step}"
    if accelerator.is_main_process and tmp.exists():
        shutil.rmtree(tmp)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(tmp))
    if ema is not None and (accelerator.is_main_process or getattr(ema, "sharded", False)):
        save_file(ema.state_dict(), str(tmp / _ema_file(ema, accelerator.process_index)))
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        # The state file is written last: its presence marks a complete folder even before the rename.
        (tmp / STATE_FILE).write_text(json.dumps({**state, "step": step}, indent=1))
        if final.exists():
            shutil.rmtree(final)
        os.replace(tmp, final)
        for _, old in list_checkpoints(output_dir)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
            log.info("removed old checkpoint %s", old.name)
        log.info("saved %s", final)
    accelerator.wait_for_everyone()
    return final


def load_checkpoint(accelerator, path, ema) -> dict:
    path = Path(path)
    state = json.loads((path / STATE_FILE).read_text())
    accelerator.load_state(str(path))
    if ema is not None:
        ema_path = path / _ema_file(ema, accelerator.process_index)
        if not ema_path.exists():
            raise SamaInputError(f"{path} has no EMA weights ({ema_path.name}) but ema.enabled is true; resume "
                                 "with ema.enabled=false or from a checkpoint written with EMA")
        ema.load_state_dict(load_file(str(ema_path)))
    log.info("resumed from %s (step %d)", path, state["step"])
    return state
