"""Flow-matching sigmas and solvers (SAMA_REFERENCE.md section 4).

sigmas = linspace(denoise, 0, steps + 1)[:-1], shifted s*x / (1 + (s-1)*x) (shift s = 5.0);
timestep = sigma * 1000; the last step goes to sigma 0; the model predicts v = noise - x0, and
the Euler update is x_next = x + v * (sigma_next - sigma). Computed in float32 like the released
scheduler, so our timesteps are bit-identical to it.
"""

from __future__ import annotations

import torch

from .errors import SamaInputError

NUM_TRAIN_TIMESTEPS = 1000


def shift_sigmas(sigmas: torch.Tensor, shift: float) -> torch.Tensor:
    return shift * sigmas / (1 + (shift - 1) * sigmas)


def flow_sigmas(steps: int, shift: float = 5.0, denoise: float = 1.0) -> torch.Tensor:
    """(steps + 1,) sigmas from the start sigma down to exactly 0 (the last entry)."""
    if steps < 1:
        raise SamaInputError(f"steps must be at least 1, got {steps}")
    if not 0.0 < denoise <= 1.0:
        raise SamaInputError(f"denoise must be in (0, 1], got {denoise}; 1.0 starts from pure noise")
    if shift <= 0:
        raise SamaInputError(f"shift must be positive, got {shift} (SAMA uses 5.0)")
    sigmas = shift_sigmas(torch.linspace(denoise, 0.0, steps + 1)[:-1], shift)
    return torch.cat([sigmas, sigmas.new_zeros(1)])


def anchor_sigma_cut(strength: float, shift: float) -> float:
    """Semantic anchors are injected while sigma > this: the shifted sigma at progress `strength`
    (strength 0 -> 1.0, never; strength 1 -> 0.0, every step)."""
    strength = min(max(float(strength), 0.0), 1.0)
    return float(shift_sigmas(torch.tensor(1.0 - strength, dtype=torch.float32), shift))


def timesteps_of(sigmas: torch.Tensor) -> torch.Tensor:
    return sigmas * NUM_TRAIN_TIMESTEPS


def add_noise(clean: torch.Tensor, noise: torch.Tensor, sigma) -> torch.Tensor:
    """The flow-matching path: x_sigma = (1 - sigma) * x0 + sigma * noise."""
    return (1 - sigma) * clean + sigma * noise


def predicted_clean(x: torch.Tensor, v: torch.Tensor, sigma) -> torch.Tensor:
    """x0 = x - sigma * v, since v = noise - x0 (used for previews)."""
    return x - sigma * v


def euler_step(x: torch.Tensor, v: torch.Tensor, sigma, sigma_next) -> torch.Tensor:
    return x + v * (sigma_next - sigma)


class EulerSolver:
    """The released sampler's update. sigmas are 0-dim float32 tensors, so the difference is taken in
    float32 exactly as the released scheduler does."""

    def __init__(self, sigmas: torch.Tensor):
        self.sigmas = sigmas

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        return euler_step(x, v, self.sigmas[i], self.sigmas[i + 1])


class UniPCSolver:
    """diffusers' UniPC multistep solver (bh2, order 2) on our sigmas: the solver Wan2.1 itself uses,
    good at 20-30 steps. One instance per stream (it keeps the previous model outputs)."""

    def __init__(self, sigmas: torch.Tensor, order: int = 2):
        from diffusers import UniPCMultistepScheduler
        # flow_shift 1: our sigmas are already shifted; diffusers nudges a first sigma of 1.0 by 1e-6.
        self.scheduler = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True,
                                                 flow_shift=1.0, solver_order=order)
        self.scheduler.set_timesteps(sigmas=sigmas[:-1].double().numpy())
        self.scheduler.set_begin_index(0)  # step by position: integer timesteps can repeat at many steps

    def step(self, x: torch.Tensor, v: torch.Tensor, i: int) -> torch.Tensor:
        return self.scheduler.step(v, self.scheduler.timesteps[i], x, return_dict=False)[0]


# Solvers: name -> class(sigmas) with .step(x, v, step_index). Each sampling run makes one per stream.
SOLVERS = {"euler": EulerSolver, "unipc": UniPCSolver}


def make_solver(name: str, sigmas: torch.Tensor):
    try:
        return SOLVERS[name](sigmas)
    except KeyError:
        raise SamaInputError(f"unknown solver '{name}'; choose one of {', '.join(SOLVERS)}") from None
