"""Sequence parallelism for the DiT: one edit's tokens split across the processes of a group.

A 480x832, 81-frame SAMA-14B edit is 65,585 tokens per forward. With P processes, each holds L/P tokens
through every block; everything in a block except self-attention is token-wise (modulation, norms, the FFN,
cross-attention to the replicated text rows), so it runs on the local shard unchanged. Self-attention needs
every token: it switches the split from the sequence to the heads (each process then holds all L tokens of
H/P heads), runs the ordinary attention kernel, and switches back (the "Ulysses" scheme: two all-to-alls per
block, no ring).

The communication is DTensor's: `redistribute` from `Shard(1)` (sequence) to `Shard(2)` (heads) is an
all-to-all on NCCL and an all-gather + chunk on gloo (CPU), and it handles uneven splits (65,585 tokens do
not divide by 2, 4 or 8). Nothing here writes its own collective; this file only says where the split
changes. Uneven head counts work too (DTensor pads), but H divisible by P balances the work (SAMA-14B: 40
heads, P = 2, 4, 5 or 8).

Use (every process runs the same code with the same inputs and seed; see docs/multi_gpu.md):

    torch.distributed.init_process_group("nccl")            # torchrun sets the rank/world variables
    sp = SequenceParallel.from_world(device_type="cuda")
    enable_sequence_parallel(model, sp)                      # model: SamaDiT
    out = model(target, timestep, context, source, semantic)  # the full output on every process

Gradients flow through the split (DTensor's collectives are differentiable), but each process's parameter
(and input) gradients come from its own tokens only: a training loop sums them over the group (the same
all-reduce as data parallelism), after which they equal the single-process gradients (tested).
"""

from __future__ import annotations

import dataclasses
from typing import Callable

import torch

from .errors import SamaInputError


@dataclasses.dataclass
class SequenceParallel:
    """A 1-D device mesh over the processes that share one sequence."""
    mesh: "torch.distributed.device_mesh.DeviceMesh"

    @classmethod
    def from_world(cls, device_type: str = "cuda") -> "SequenceParallel":
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh
        if not dist.is_available() or not dist.is_initialized():
            raise SamaInputError("sequence parallelism needs torch.distributed initialised: launch with "
                                 "`torchrun --nproc_per_node N ...` (the command does the rest)")
        return cls(init_device_mesh(device_type, (dist.get_world_size(),)))

    @property
    def size(self) -> int:
        return self.mesh.size()

    @property
    def rank(self) -> int:
        return self.mesh.get_local_rank()

    # ---- the token split (torch.tensor_split's: the first L % P shards hold one token more)

    def shard(self, tokens: torch.Tensor, dim: int = 1) -> torch.Tensor:
        """This process's contiguous part of the sequence."""
        return tokens.tensor_split(self.size, dim=dim)[self.rank]

    def shard_frequencies(self, freqs):
        """RoPE rows of this process's tokens: the complex (L, hd/2) table or the (cos, sin) pair."""
        if torch.is_tensor(freqs):
            return self.shard(freqs, dim=0)
        return tuple(self.shard(f, dim=0) for f in freqs)

    def _as_dtensor(self, local: torch.Tensor, dim: int, full_length: int):
        from torch.distributed.tensor import DTensor, Shard
        shape = list(local.shape)
        shape[dim] = full_length
        stride = torch.empty(shape, device="meta").stride()
        return DTensor.from_local(local, self.mesh, [Shard(dim)], run_check=False, shape=torch.Size(shape),
                                  stride=stride)

    def gather(self, local: torch.Tensor, full_length: int, dim: int = 1) -> torch.Tensor:
        """The whole sequence on every process (an all-gather)."""
        return self._as_dtensor(local, dim, full_length).full_tensor()

    def attention(self, attention: Callable, full_length: int) -> Callable:
        """`attention` (q, k, v (B, L, H, hd) -> (B, L, H * hd)) run on sequence shards (B, L/P, H, hd):
        heads are re-split across processes around it."""
        from torch.distributed.tensor import Shard

        def by_heads(t):  # (B, L/P, H, hd) sequence shard -> (B, L, H/P, hd) head shard
            return self._as_dtensor(t, 1, full_length).redistribute(self.mesh, [Shard(2)])

        def sharded(q, k, v):
            heads, head_dim = q.shape[2], q.shape[3]
            if heads < self.size:
                raise SamaInputError(f"{self.size} processes share the sequence but the model has {heads} "
                                     f"attention heads: use at most {heads} processes")
            qh, kh, vh = (by_heads(t).to_local() for t in (q, k, v))
            out = attention(qh, kh, vh).unflatten(2, (qh.shape[2], head_dim))  # (B, L, H/P, hd)
            out = self._as_dtensor(out, 2, heads).redistribute(self.mesh, [Shard(1)])
            return out.to_local().flatten(2)  # (B, L/P, H * hd)

        return sharded


def close_process_group(completed: bool = True) -> None:
    """Leave the process group. After a completed run every process first waits for the others: a gloo
    process that tears its group down while a peer is still inside a collective aborts the whole job
    ("terminate called without an active exception", seen in CI). After an error it leaves at once, since
    a failed peer may never reach the barrier."""
    import torch.distributed as dist
    if not dist.is_initialized():
        return
    if completed:
        dist.barrier()
    dist.destroy_process_group()


def enable_sequence_parallel(model, sp: SequenceParallel | None):
    """Run `model` (a SamaDiT) with its tokens split over `sp`'s processes; None turns it off again."""
    model.sequence_parallel = sp
    return model
