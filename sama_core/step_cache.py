"""Step caching: skip whole model evaluations when the input has barely changed (opt-in, approximate).

EasyCache-style (training-free, runtime-adaptive): after a full evaluation we keep the model's
transformation `delta = output - input` and its *transformation rate* k (relative output change per
relative input change between the last two full evaluations). At the next step the expected relative
output change is estimated as k * (relative input change since the last full evaluation); while the
estimate accumulated since that evaluation stays under `threshold`, the step reuses `input + delta`
instead of running the DiT (all CFG passes at once). The first `warmup` steps and the last step always
run the model. Written here because no library applies it to a custom DiT; it wraps the sampler's
single `denoise(x, semantic, sigma)` seam, so it works with any solver and any CFG form.
"""

from __future__ import annotations

import dataclasses
from typing import Callable, Optional

import torch


def relative_change(new: torch.Tensor, old: torch.Tensor) -> float:
    return float((new - old).abs().mean() / old.abs().mean().clamp_min(1e-12))


@dataclasses.dataclass
class StepCache:
    threshold: float                  # accumulated estimated relative output change allowed before recomputing
    total_steps: int
    warmup: int = 2
    calls: int = 0
    skipped: int = 0
    _x: Optional[torch.Tensor] = None          # input of the last full evaluation
    _out: Optional[torch.Tensor] = None        # its output (video velocity)
    _delta: Optional[tuple] = None             # (video, semantic) output - input of the last full evaluation
    _rate: Optional[float] = None
    _accumulated: float = 0.0

    def wrap(self, denoise: Callable) -> Callable:
        def cached(x, sem, sigma):
            step = self.calls
            self.calls += 1
            can_skip = (self._rate is not None and self.warmup <= step < self.total_steps - 1)
            if can_skip:
                estimate = self._accumulated + self._rate * relative_change(x, self._x)
                if estimate < self.threshold:
                    self._accumulated = estimate
                    self.skipped += 1
                    dv, ds = self._delta
                    return x + dv, (None if sem is None else sem + ds)
            v, v_sem = denoise(x, sem, sigma)
            if self._x is not None:
                input_change = relative_change(x, self._x)
                self._rate = relative_change(v, self._out) / max(input_change, 1e-12)
            self._x, self._out = x, v
            self._delta = (v - x, None if sem is None else v_sem - sem)
            self._accumulated = 0.0
            return v, v_sem
        return cached

    @property
    def stats(self) -> dict:
        return {"model_calls": self.calls - self.skipped, "skipped_steps": self.skipped}
