"""Processes of a fuse run: the ranks torchrun starts (gloo on CPU, NCCL on GPUs), and a pool of
worker processes on one machine when there is no torchrun."""

from __future__ import annotations

import datetime
import os
from typing import Any, Callable, Sequence


def world() -> tuple[int, int]:
    """(rank, world size) of this process; (0, 1) outside torchrun."""
    return int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))


def local() -> tuple[int, int]:
    """(local rank, processes on this machine)."""
    return int(os.environ.get("LOCAL_RANK", 0)), int(os.environ.get("LOCAL_WORLD_SIZE", world()[1]))


def init_distributed() -> bool:
    """Join the process group torchrun set up; True when there is more than one process."""
    import torch
    import torch.distributed as dist

    rank, size = world()
    if size <= 1:
        return False
    if not dist.is_initialized():
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(local()[0] % torch.cuda.device_count())
        # a process that has finished its share waits for the slowest at each stage's end
        dist.init_process_group("nccl" if cuda else "gloo", timeout=datetime.timedelta(hours=24))
    return True


def distributed() -> bool:
    import torch.distributed as dist

    return dist.is_available() and dist.is_initialized()


def barrier() -> None:
    if distributed():
        import torch.distributed as dist

        dist.barrier()


def cpus() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        return os.cpu_count() or 1


class Workers:
    """``function(*task)`` for every task of a batch: here, or on ``count`` spawned processes
    (fresh interpreters: nothing of this process's state but ``initargs`` reaches them), started
    on the first batch that has work for more than one and kept for the batches after it."""

    def __init__(self, count: int, initializer: Callable[..., None], initargs: tuple = ()):
        self.count, self.initializer, self.initargs = count, initializer, initargs
        self.pool = None
        self.here = False

    def __enter__(self) -> "Workers":
        return self

    def __exit__(self, *exc) -> None:
        if self.pool is not None:
            self.pool.shutdown(cancel_futures=True)

    def run(self, function: Callable[..., Any], tasks: Sequence[tuple],
            progress: Callable[[], None] | None = None) -> None:
        if self.pool is None and (self.count <= 1 or len(tasks) <= 1):
            if not self.here:
                self.initializer(*self.initargs)
                self.here = True
            for task in tasks:
                function(*task)
                if progress is not None:
                    progress()
            return
        if self.pool is None:
            import multiprocessing
            from concurrent.futures import ProcessPoolExecutor

            self.pool = ProcessPoolExecutor(self.count, mp_context=multiprocessing.get_context("spawn"),
                                            initializer=self.initializer, initargs=self.initargs)
        for future in [self.pool.submit(function, *task) for task in tasks]:
            future.result()
            if progress is not None:
                progress()
