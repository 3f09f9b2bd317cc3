"""Several processes, one result: the fit's samples (or evaluations) split over the processes of `accelerate launch`.

    accelerate launch --multi_gpu --num_processes 2 -m timetuner.cli.main fit --nfe 10     # CPU: gloo, GPU: NCCL

Every process runs the same code on its share (`World.shard`) of the same seeded noises; per-sample losses are
summed over processes in float64 (`World.mean`), gradients of the few fitted scalars are summed (`World.sum_`), so
every process takes the same decisions and holds the same τ. Results that only one process needs in full (final
samples for the verdict, reference blocks) are gathered in rank order (`World.gather`); what only the main process
decides or reads from disk is broadcast (`World.broadcast`). Outside a launch `current()` is `SOLO`: one process,
every method an identity, and accelerate is not even imported.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class World:
    """This process's place among the launched ones (rank 0 is the main process) and its device."""

    rank: int = 0
    size: int = 1
    device: torch.device | None = None  # None: the caller's choice (one process)

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def shard(self, n: int) -> tuple[int, int]:
        """Rows lo…hi−1 of n that this process handles: contiguous, in rank order, sizes differing by at most 1."""
        return n * self.rank // self.size, n * (self.rank + 1) // self.size

    def mean(self, per_sample: torch.Tensor, total: int) -> torch.Tensor:
        """Σ per-sample values over every process / `total` (float64, so the order of the sum hardly matters)."""
        value = per_sample.detach().double().sum().reshape(1)
        return self.sum_(value)[0] / total

    def sum_(self, tensor: torch.Tensor) -> torch.Tensor:
        """Sum `tensor` over the processes in place (and return it)."""
        if self.size > 1:
            import torch.distributed as dist

            dist.all_reduce(tensor)
        return tensor

    def gather(self, part: torch.Tensor) -> torch.Tensor:
        """The processes' parts concatenated in rank order along dim 0 (parts may differ in length by rows)."""
        if self.size == 1:
            return part
        import torch.distributed as dist

        sizes = [torch.zeros(1, dtype=torch.long, device=part.device) for _ in range(self.size)]
        dist.all_gather(sizes, torch.tensor([part.shape[0]], device=part.device))
        longest = int(max(s.item() for s in sizes))
        padded = torch.zeros((longest, *part.shape[1:]), dtype=part.dtype, device=part.device)
        padded[: part.shape[0]] = part
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded.contiguous())
        return torch.cat([p[: int(s.item())] for p, s in zip(parts, sizes, strict=True)])

    def gather_objects(self, obj) -> list:
        """Every process's `obj` (picklable), in rank order."""
        if self.size == 1:
            return [obj]
        import torch.distributed as dist

        out = [None] * self.size
        dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj):
        """The main process's `obj` on every process (the others pass anything, e.g. None)."""
        if self.size == 1:
            return obj
        import torch.distributed as dist

        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self) -> None:
        if self.size > 1:
            import torch.distributed as dist

            dist.barrier()


SOLO = World()
_CURRENT: World | None = None


def launched() -> bool:
    """Whether this process was started by a launcher with more than one process (`accelerate launch`, torchrun)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def current(cpu: bool = False) -> World:
    """This process's `World`: from accelerate's `PartialState` under a launch of several processes, else SOLO.

    On a machine without a GPU (or with `cpu`) the processes talk over gloo, with one over NCCL on its own GPU.
    """
    global _CURRENT
    if _CURRENT is None:
        if not launched():
            _CURRENT = SOLO
        else:
            from accelerate import PartialState

            state = PartialState(cpu=cpu or not torch.cuda.is_available())
            _CURRENT = World(state.process_index, state.num_processes, state.device)
    return _CURRENT


def launch_command(processes: int, *args: str, module: str | None = "timetuner.cli.main") -> list[str]:
    """`accelerate launch` of `module` with `args` (module None: args are a script and its arguments) on
    `processes` processes of this machine."""
    import sys

    return [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", str(processes),
            "--num_machines", "1", "--mixed_precision", "no", "--dynamo_backend", "no",
            *(["-m", module] if module else []), *args]


def relaunch(processes: int, command: str) -> int:
    """Run this `timetuner COMMAND …` again under `accelerate launch` on `processes` processes (its own options
    but --processes); the launch's exit code."""
    import subprocess
    import sys

    argv, rest = sys.argv[1:], []
    start = argv.index(command) if command in argv else 0
    skip = False
    for arg in argv[start:]:
        if skip:
            skip = False
        elif arg == "--processes":
            skip = True
        elif not arg.startswith("--processes="):
            rest.append(arg)
    return subprocess.call(launch_command(processes, *rest))
