"""The processes of one run (torch.distributed): which one this is, and the few collective steps a run takes.

A run started by torchrun (`torchrun --nproc-per-node N -m llmq quantize ...`, or `llmq quantize --nproc N`,
which starts torchrun) has one process per rank. Every rank loads the model and walks the same layers; each
takes its share of the calibration windows, the statistics of a group's input are summed over all ranks
(`sum_across`), the group's independent solves are dealt out by cost (`deal_by_cost`) and each result is sent
to every rank (`share`), and rank 0 alone writes. Without torchrun (no WORLD_SIZE) there is one rank and every
function here is the identity.

The backend follows the device: NCCL for CUDA, gloo for the CPU. Multi-node runs use torchrun's rendezvous
flags as they are.
"""

from __future__ import annotations

import os

import torch
import torch.distributed as dist

from llmq.core import log
from llmq.core.errors import LlmqError


def world() -> tuple[int, int]:
    """(this rank, number of ranks); (0, 1) outside a process group."""
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def is_main() -> bool:
    """The rank that writes files and reports progress."""
    return world()[0] == 0


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


# what one more rank costs before it reads a weight (Python, torch and transformers imported, the process group
# joined): about 0.3 GB measured on a CPU here, 0.4 GB with a margin
RANK_BASE_BYTES = 400 << 20


def check_launch(size: int, device: torch.device, windows: int | None) -> None:
    """Refuse, before any process starts, more ranks than the machine can run side by side: one rank per core on
    the CPU (per GPU on CUDA), RANK_BASE_BYTES each within the memory available, a calibration window each."""
    if device.type == "cuda":
        available, what = torch.cuda.device_count(), "GPUs"
    else:
        available, what = os.cpu_count() or 1, "CPU cores"
    if size > available:
        raise LlmqError(f"--nproc {size} is more than this machine's {available} {what} (one process each at most); "
                        f"use --nproc {available} or fewer")
    free = available_memory()
    if free is not None and size * RANK_BASE_BYTES > free:
        raise LlmqError(f"--nproc {size} needs at least {size * RANK_BASE_BYTES / 2**30:.1f} GiB before any weight is "
                        f"read, and {free / 2**30:.1f} GiB are available; use fewer processes")
    if windows is not None and windows < size:
        raise LlmqError(f"{windows} calibration windows cannot be shared by {size} processes; use --samples {size} or "
                        "more, or fewer processes")


def available_memory() -> int | None:
    """MemAvailable from /proc/meminfo (Linux), in bytes; None elsewhere."""
    try:
        with open("/proc/meminfo") as meminfo:
            for line in meminfo:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        return None
    return None


def die_with_launcher() -> None:
    """A rank ends when the process that started it ends (Linux: the kernel sends it SIGKILL), so that a launcher
    killed outright leaves no rank running on. SIGKILL, not SIGTERM: a rank blocked in a collective waiting for a
    peer cannot run a signal handler, and what a killed rank leaves (its stage, its checkpoints) the next run
    cleans up or resumes from. A launcher stopped by SIGTERM or Ctrl-C still stops its ranks through torchrun."""
    import ctypes
    import signal

    launcher = os.getppid()
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except (OSError, AttributeError):
        return  # not Linux: torchrun's own monitoring is all there is
    if os.getppid() != launcher:  # the launcher was gone before the request took effect
        os.kill(os.getpid(), signal.SIGKILL)


def join(device: torch.device) -> torch.device:
    """Join the process group torchrun set up (once), on the backend the device needs; returns this rank's device
    (cuda:LOCAL_RANK when the run is on GPUs). Outside torchrun: the device as given."""
    if not launched_by_torchrun():
        return device
    die_with_launcher()
    if device.type == "cuda":
        device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return device


def leave() -> None:
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def threads_per_rank(size: int) -> int:
    """The torch threads each of `size` ranks on this machine should use: its share of the cores."""
    return max(1, (os.cpu_count() or 1) // size)


def check_threads() -> None:
    """torchrun sets OMP_NUM_THREADS=1 per rank when it is unset; so be it. A CPU run that asks for more threads
    than the machine has cores per rank would only slow itself down: say so once, on rank 0."""
    rank, size = world()
    cores = os.cpu_count() or 1
    if size > 1 and rank == 0 and torch.get_num_threads() * size > cores:
        log.info(f"llmq: {size} ranks x {torch.get_num_threads()} threads on {cores} cores; set OMP_NUM_THREADS="
                 f"{threads_per_rank(size)} for the best speed")


def shard(samples: torch.Tensor) -> torch.Tensor:
    """This rank's calibration windows: every size-th one, starting at its rank (whole windows, so that each
    window's first token stays its first token)."""
    rank, size = world()
    if size == 1:
        return samples
    if samples.shape[0] < size:
        raise LlmqError(f"{samples.shape[0]} calibration windows cannot be shared by {size} processes; use --samples "
                        f"{size} or more, or fewer processes")
    return samples[rank::size]


def sum_across(tensors: list[torch.Tensor], *numbers: float) -> tuple[float, ...]:
    """Sum each tensor over the ranks, in place, and return the numbers summed over the ranks."""
    if world()[1] == 1:
        return numbers
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    if not numbers:
        return ()
    device = tensors[0].device if tensors else torch.device("cpu")
    totals = torch.tensor(numbers, dtype=torch.float64, device=device)
    dist.all_reduce(totals, op=dist.ReduceOp.SUM)
    return tuple(totals.tolist())


def max_across(tensors: list[torch.Tensor]) -> None:
    """Each tensor's elementwise maximum over the ranks, in place."""
    if world()[1] == 1:
        return
    for tensor in tensors:
        dist.all_reduce(tensor, op=dist.ReduceOp.MAX)


def min_across(value: int) -> int:
    """The least of every rank's `value` (the same answer on every rank)."""
    if world()[1] == 1:
        return value
    device = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else "cpu"
    box = torch.tensor([value], dtype=torch.int64, device=device)
    dist.all_reduce(box, op=dist.ReduceOp.MIN)
    return int(box.item())


def deal_by_cost(costs: list[float]) -> list[int]:
    """The rank that does each job: the costliest first, each to the rank with the least work so far (the
    longest-processing-time rule); the same answer on every rank."""
    size = world()[1]
    owners, load = [0] * len(costs), [0.0] * size
    for job in sorted(range(len(costs)), key=lambda j: (-costs[j], j)):
        rank = min(range(size), key=lambda r: (load[r], r))
        owners[job] = rank
        load[rank] += costs[job]
    return owners


def share(value, owner: int):
    """`value` as the owner rank made it, on every rank (the other ranks pass None). Objects go through
    torch.distributed's object broadcast (pickle between the processes of this run; no file is read)."""
    rank, size = world()
    if size == 1:
        return value
    box = [value if rank == owner else None]
    dist.broadcast_object_list(box, src=owner)
    return box[0]


def barrier() -> None:
    if world()[1] > 1:
        dist.barrier()
