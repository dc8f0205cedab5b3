"""Data-parallel distillation through ``accelerate`` (one process per device, launched by
``accelerate launch`` or ``torchrun``; no code change between them or with a single process).

Every process loads the frozen model and holds an identical copy of the small trainable
``[num_new_tokens, hidden]`` parameter. One optimizer step uses one *global* batch of
``--token_distillation_batch_size`` snippets drawn from the same seeded shuffle on every process;
process ``r`` of ``W`` takes the snippets ``batch[r::W]``. The per-process losses are weighted by
their share of the global number of loss positions, so that the all-reduced (summed) gradient is the
gradient of the single-process batch loss (see :meth:`DistContext.shard_backward`); every process
then applies the same AdamW update and the copies stay identical.

Main-process-only work: snippet mining (broadcast to the others), logging, the report and saving.
"""

from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import ConfigError

logger = logging.getLogger(__name__)


def launched_world_size() -> int:
    """Number of processes of the launch (``WORLD_SIZE``, set by torchrun and accelerate launch); 1 if unset."""
    try:
        return max(1, int(os.environ.get("WORLD_SIZE", "1")))
    except ValueError:
        return 1


def check_batch_divisible(batch_size: int, world_size: int) -> None:
    """The global batch must split evenly over the processes.

    Raises:
        ConfigError: ``batch_size % world_size != 0``.
    """
    if world_size > 1 and batch_size % world_size:
        lo = max(world_size, batch_size - batch_size % world_size)
        raise ConfigError(
            f"--token_distillation_batch_size {batch_size} (the global batch) does not split over "
            f"{world_size} processes; use a multiple of {world_size} (e.g. {lo} or {lo + world_size}) "
            "or launch a number of processes that divides it")


class DistContext:
    """The process group of a run, or a trivial one-process stand-in.

    Attributes:
        rank: this process's index (0 = main).
        world_size: number of processes.
        device: the torch device this process computes on.
        accelerator: the ``accelerate.Accelerator`` when ``world_size > 1``, else None.
    """

    def __init__(self, device: torch.device, accelerator=None):
        self.accelerator = accelerator
        self.device = device
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world_size = accelerator.num_processes if accelerator is not None else 1

    @classmethod
    def create(cls, device_spec: str, resolve_device: Callable[[str], torch.device]) -> "DistContext":
        """One process (``WORLD_SIZE`` unset or 1): the device from ``resolve_device(device_spec)``.
        Several: an ``accelerate.Accelerator`` (gloo on CPU, NCCL on CUDA) and its per-process device.

        Raises:
            ConfigError: ``--device cuda:N`` (a fixed device) with several processes.
        """
        if launched_world_size() == 1:
            return cls(resolve_device(device_spec))
        spec = str(device_spec)
        if ":" in spec:
            raise ConfigError(f"--device {spec}: with {launched_world_size()} processes each process uses its "
                              "own device; pass --device auto, cuda or cpu")
        from accelerate import Accelerator

        cpu = spec == "cpu" or (spec == "auto" and not torch.cuda.is_available())
        acc = Accelerator(cpu=cpu)
        ctx = cls(acc.device if not cpu else torch.device("cpu"), acc)
        logger.info("data-parallel: process %d of %d on %s (%s)", ctx.rank, ctx.world_size, ctx.device,
                    acc.distributed_type)
        return ctx

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def wait(self) -> None:
        """Barrier (no-op with one process)."""
        if self.accelerator is not None:
            self.accelerator.wait_for_everyone()

    def close(self) -> None:
        """End of a run: wait for every process, then tear the process group down (no-op with one
        process). A process that exited while the group was still alive could be aborted by its
        communication threads at interpreter exit ("terminate called without an active exception")."""
        if self.accelerator is None:
            return
        self.accelerator.wait_for_everyone()
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. to fill a cache), then the others."""
        if self.accelerator is None:
            yield
        else:
            with self.accelerator.main_process_first():
                yield

    def broadcast_from_main(self, make: Callable[[], Any]) -> Any:
        """``make()`` on the main process only; its (picklable) result is sent to every process."""
        if not self.distributed:
            return make()
        from accelerate.utils import broadcast_object_list

        box = [make() if self.is_main else None]
        broadcast_object_list(box, from_process=0)
        return box[0]

    def broadcast_tensor_(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` in place with the main process's values (no-op with one process)."""
        if self.distributed:
            from accelerate.utils import broadcast

            with torch.no_grad():
                t.copy_(broadcast(t.detach().clone(), from_process=0))

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        return self.accelerator.reduce(t, reduction="sum") if self.distributed else t

    def shard(self, idx: Sequence[int]) -> list[int]:
        """This process's part ``idx[rank::world_size]`` of a global batch (balanced within 1)."""
        return list(idx[self.rank:: self.world_size])

    def shard_backward(self, idx: Sequence[int],
                       local_loss: Callable[[list[int]], tuple[torch.Tensor, int]],
                       params: Sequence[torch.nn.Parameter], mean: bool = True) -> float:
        """Backward pass of one global batch split over the processes; returns the global loss.

        ``local_loss(part)`` returns this process's loss, a *mean* over its ``n_r`` loss positions
        (e.g. MSE-on-hiddens), and ``n_r``. With ``N = sum_r n_r`` (all-reduced), the global loss of
        the whole batch is ``L = sum_r (n_r / N) * L_r``; each process back-propagates its term and
        the gradients are summed across processes, so ``params[i].grad`` ends up equal on every
        process and equal (up to float rounding) to the single-process gradient of ``L``.
        A process whose part is empty (short last batch) contributes zero.

        Args:
            idx: snippet indices of the global batch (identical on all processes).
            params: the trainable parameters (their ``.grad`` must be None or zero on entry).
            mean: False when ``local_loss`` is a sum whose shards add up to the global loss (the
                per-token loss); then no position weighting is applied.

        Returns:
            the global batch loss ``L`` (same value on every process).
        """
        part = self.shard(idx)
        dev = params[0].device
        loss, n = local_loss(part) if part else (None, 0)
        total = int(self._sum(torch.tensor([float(n)], device=dev)).item())
        weighted = None
        if loss is not None and n and total:
            weighted = loss * (n / total) if mean else loss
            weighted.backward()
        for p in params:
            g = p.grad if p.grad is not None else torch.zeros_like(p)
            p.grad = self._sum(g.contiguous())
        value = weighted.detach().float().reshape(1) if weighted is not None else torch.zeros(1, device=dev)
        return float(self._sum(value.to(dev)).item())
