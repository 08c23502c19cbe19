"""Work shared by several processes (devices of one machine, or several machines).

``stego features``, ``stego eval`` and ``stego predict`` take ``--devices N --num-nodes M``
like ``stego train``: :func:`launch` starts the processes with Lightning Fabric's ``ddp``
strategy (its launcher reruns the command once per extra device; on several machines the
command is started on each, as for training) and each process gets a :class:`ProcessGroup`
saying which share of the items is its own. The processes meet at barriers and sum tensors
over the process group (NCCL on GPUs, gloo on CPUs).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, TypeVar

import torch

__all__ = ["ProcessGroup", "ONE_PROCESS", "launch", "thread_map"]

S = TypeVar("S")
T = TypeVar("T")


def thread_map(job: Callable[[S], T], items: Iterable[S], workers: int) -> Iterator[T]:
    """``job(item)`` of each item, in order, run by ``workers`` threads at most two items a
    thread ahead of the caller: for work that releases the GIL (Pillow's decoding and encoding,
    zlib, numpy). A failure, or the caller stopping (an interruption), cancels what has not
    started and waits for what has."""
    workers = max(1, workers)
    pool = ThreadPoolExecutor(workers)
    pending: deque[Future[T]] = deque()
    try:
        for item in items:
            pending.append(pool.submit(job, item))
            if len(pending) >= 2 * workers:
                yield pending.popleft().result()
        while pending:
            yield pending.popleft().result()
    finally:
        pool.shutdown(wait=True, cancel_futures=True)


@dataclass(frozen=True)
class ProcessGroup:
    """This process's place among ``world`` processes, and its device.

    ``fabric``: the :class:`lightning.fabric.Fabric` joining them (None for one process).
    """

    rank: int = 0
    world: int = 1
    device: str = "cpu"
    fabric: Any = None

    @property
    def main(self) -> bool:
        """Whether this process prints and writes what is written once."""
        return self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This process's items: every ``world``-th, from the ``rank``-th."""
        return list(items[self.rank :: self.world])

    def block(self, n: int, run: int) -> range:
        """This process's positions of ``n`` items: one stretch of whole runs of ``run`` items
        (rank 0 the first), so that batches of ``run`` are those one process makes."""
        runs = -(-n // run)
        size = -(-runs // self.world) * run
        start = min(n, self.rank * size)
        return range(start, min(n, start + size))

    def stretch(self, items: Sequence[T], run: int) -> list[T]:
        """This process's stretch of ``items`` (:meth:`block`), taken once every process has
        listed them: the list may depend on files that the others are about to write."""
        self.barrier()
        return [items[i] for i in self.block(len(items), run)]

    def barrier(self) -> None:
        if self.fabric is not None:
            self.fabric.barrier()

    def sum(self, tensor: torch.Tensor) -> torch.Tensor:
        """``tensor`` summed over the processes (the same shape in each)."""
        if self.fabric is None:
            return tensor
        return self.fabric.all_reduce(tensor, reduce_op="sum")

    def gather(self, obj: Any) -> list[Any]:
        """Every process's ``obj`` (picklable), in rank order."""
        if self.fabric is None:
            return [obj]
        out: list[Any] = [None] * self.world
        torch.distributed.all_gather_object(out, obj)
        return out

    def on_main(self, job: Callable[[], T]) -> T | None:
        """``job()`` run in the main process only, the others waiting for it; its result there
        (None in the others). A failure there is raised in every process (the others as
        :class:`StegoError`), so none waits for ever."""
        if self.fabric is None:
            return job()
        result, error = None, None
        if self.main:
            try:
                result = job()
            except Exception as exc:  # raised below, once the others know
                error = exc
        failed = self.gather(None if error is None else f"{type(error).__name__}: {error}")[0]
        if error is not None:
            raise error
        if failed is not None:
            from stego.errors import StegoError

            raise StegoError(f"the main process (rank 0) failed: {failed}")
        return result

    def concat(self, items: list[T]) -> list[T]:
        """Every process's ``items`` one after the other, in rank order."""
        return [item for part in self.gather(items) for item in part]


ONE_PROCESS = ProcessGroup()


def launch(
    *,
    devices: int = 1,
    num_nodes: int = 1,
    accelerator: str = "auto",
    device: str | None = None,
    wait: timedelta = timedelta(minutes=30),
) -> ProcessGroup:
    """Start ``devices`` processes on this machine (of ``devices x num_nodes`` in all) and
    return this one's group. With one process in all, nothing starts: the group runs on
    ``device`` (default: :func:`stego.device.resolve_device`). ``wait``: how long a process
    waits for the others at a barrier before failing (Lightning's default: 30 min)."""
    from stego.device import resolve_device
    from stego.errors import StegoError

    if devices < 1 or num_nodes < 1:
        raise StegoError(f"--devices and --num-nodes must be >= 1, got {devices} and {num_nodes}")
    if devices * num_nodes == 1:
        return ProcessGroup(device=resolve_device(device))
    from lightning.fabric import Fabric
    from lightning.fabric.strategies import DDPStrategy

    ddp = DDPStrategy(timeout=wait)
    fabric = Fabric(accelerator=accelerator, devices=devices, num_nodes=num_nodes, strategy=ddp)
    fabric.launch()
    return ProcessGroup(fabric.global_rank, fabric.world_size, str(fabric.device), fabric)
