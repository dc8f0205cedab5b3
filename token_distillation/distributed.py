"""Several processes (one per device, launched by ``torchrun`` or ``accelerate launch``; no code
change between them or with a single process). Two ways of splitting the work:

**Token sharding** (the per-token recipe, :func:`shards_tokens`): a token's trained row depends only
on its own snippets and the initial rows, so each process owns a deterministic subset of the tokens
(:func:`assign_tokens`, balanced by snippet count), builds its own per-token batches of those tokens
at the full batch size, and trains with no communication per step. The rows are gathered once at the
end (:meth:`DistContext.gather_rows_`); held-out evaluation is sharded the same way. The saved rows
do not depend on the number of processes beyond float rounding (see docs/usage.md).

**Data parallelism** (the paper recipe, and per-token runs that cannot be sharded): every process
holds an identical copy of the trainable ``[num_new_tokens, hidden]`` parameter; one optimizer step
uses one *global* batch of ``--token_distillation_batch_size`` snippets drawn from the same seeded
shuffle on every process; process ``r`` of ``W`` takes the snippets ``batch[r::W]``. The
per-process losses are weighted by their share of the global number of loss positions, so that the
all-reduced (summed) gradient is the gradient of the single-process batch loss (see
:meth:`DistContext.shard_backward`); every process then applies the same AdamW update.

Waiting for a slower process (the main process filling a cache, mining or generating snippets,
saving; a shard that finishes later) polls the launcher's key-value store
(:meth:`DistContext.wait`) instead of blocking in a collective, so these waits never hit the
process-group timeout (``--process_group_timeout_minutes``), which bounds single transfers only.
Every collective this module issues is counted (:attr:`DistContext.collectives`), so a test can
check that training steps issue none.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import os
import time
from typing import Any, Callable, Iterator, Sequence

import torch

from .config import ConfigError, LossMethod, Recipe, StoppingCondition
from .interrupts import check_stop

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


def shards_tokens(recipe: Recipe, loss_methods: Sequence[LossMethod], stopping: StoppingCondition,
                  trains_original: bool) -> bool:
    """Whether training with several processes shards the tokens (else: data parallelism).

    Tokens are sharded for the per-token recipe with the hidden-state MSE alone (its loss is a sum
    over tokens, so a token's row depends on its own snippets only), trained for a number of epochs
    (``--stopping_condition max_steps`` counts global steps over all tokens) and without
    ``--train_original_embeddings`` (which the paper's loop trains).
    """
    return (recipe == Recipe.PER_TOKEN and tuple(loss_methods) == (LossMethod.MSE_ON_HIDDENS,)
            and stopping == StoppingCondition.EPOCHS and not trains_original)


def check_distributable(recipe: Recipe, loss_methods: Sequence[LossMethod], stopping: StoppingCondition,
                        trains_original: bool, snippets_per_update: int, batch_size: int | str,
                        world_size: int) -> bool:
    """Start-up check of a run with ``world_size`` processes (before anything loads); returns
    :func:`shards_tokens` for it (False with one process).

    Raises:
        ConfigError: a data-parallel run whose global batch does not split over the processes
            (:func:`check_batch_divisible`), or a per-token run with ``--stopping_condition max_steps``
            and ``--snippets_per_update > 1`` (data parallelism would split a token's group over the
            processes, and its per-token loss would no longer be exact).
    """
    if world_size <= 1:
        return False
    if shards_tokens(recipe, loss_methods, stopping, trains_original):
        return True
    if (recipe == Recipe.PER_TOKEN and snippets_per_update > 1
            and tuple(loss_methods) == (LossMethod.MSE_ON_HIDDENS,) and not trains_original):
        raise ConfigError(f"--snippets_per_update {snippets_per_update} with --stopping_condition max_steps and "
                          f"{world_size} processes: the steps would be split over the processes snippet by snippet, "
                          "which splits a token's group; use --stopping_condition epochs (the tokens are then "
                          "sharded over the processes) or --snippets_per_update 1")
    if batch_size != "auto":  # auto picks a multiple of the processes (token_distillation.memory)
        check_batch_divisible(batch_size, world_size)
    return False


def assign_tokens(counts: Sequence[int], world_size: int) -> list[list[int]]:
    """Deterministic split of tokens over processes, balanced by snippet count.

    Greedy longest-first: tokens in order of decreasing ``counts`` (ties: lower index first) go to
    the process with the least work so far (ties: lower rank). The result depends only on
    ``counts`` and ``world_size``.

    Args:
        counts: ``[num_tokens]`` training snippets per token (the work a token brings).
        world_size: number of processes (>= 1).
    Returns:
        ``world_size`` lists of token indices, each sorted ascending (a process may get none).
    Raises:
        ValueError: ``world_size < 1``.
    """
    if world_size < 1:
        raise ValueError("world_size must be >= 1")
    load = [0] * world_size
    shards: list[list[int]] = [[] for _ in range(world_size)]
    for t in sorted(range(len(counts)), key=lambda i: (-int(counts[i]), i)):
        r = min(range(world_size), key=lambda k: (load[k], k))
        shards[r].append(t)
        load[r] += max(1, int(counts[t]))
    return [sorted(s) for s in shards]


#: seconds between two looks at the store while waiting for the other processes
POLL_SECONDS = 0.2


class DistContext:
    """The process group of a run, or a trivial one-process stand-in.

    Attributes:
        rank: this process's index (0 = main).
        world_size: number of processes.
        device: the torch device this process computes on.
        accelerator: the ``accelerate.Accelerator`` when ``world_size > 1``, else None.
        collectives: number of collective operations (broadcast, reduce, gather, barrier) this
            process has issued through this object; waits on the store are counted in ``waits``.
    """

    def __init__(self, device: torch.device, accelerator=None):
        self.accelerator = accelerator
        self.device = device
        self.rank = accelerator.process_index if accelerator is not None else 0
        self.world_size = accelerator.num_processes if accelerator is not None else 1
        self.collectives = 0
        self.waits = 0

    @classmethod
    def create(cls, device_spec: str, resolve_device: Callable[[str], torch.device],
               timeout_minutes: float = 60.0) -> "DistContext":
        """One process (``WORLD_SIZE`` unset or 1): the device from ``resolve_device(device_spec)``.
        Several: an ``accelerate.Accelerator`` (gloo on CPU, NCCL on CUDA) and its per-process device,
        its process group created with a timeout of ``timeout_minutes`` per collective.

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
        from accelerate.utils import InitProcessGroupKwargs

        cpu = spec == "cpu" or (spec == "auto" and not torch.cuda.is_available())
        pg = InitProcessGroupKwargs(timeout=datetime.timedelta(minutes=float(timeout_minutes)))
        acc = Accelerator(cpu=cpu, kwargs_handlers=[pg])
        ctx = cls(acc.device if not cpu else torch.device("cpu"), acc)
        logger.info("process %d of %d on %s (%s), collective timeout %g min", ctx.rank, ctx.world_size, ctx.device,
                    acc.distributed_type, float(timeout_minutes))
        return ctx

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    def _store(self):
        from torch.distributed import distributed_c10d

        try:
            return distributed_c10d._get_default_store()
        except (RuntimeError, AttributeError, ValueError):  # no store reachable: fall back to a barrier
            return None

    def wait(self, name: str = "wait", stoppable: bool = False) -> None:
        """Wait until every process has reached this point (no-op with one process).

        The wait polls the launcher's key-value store every :data:`POLL_SECONDS` (a cheap request,
        no collective), so it may last any time (a process mining, generating, saving or training a
        larger shard) without hitting the process-group timeout. With ``stoppable``, a stop signal
        received meanwhile (deferred, see :mod:`token_distillation.interrupts`) raises
        ``Interrupted``: only where every process may stop on its own (token sharding), not where
        the processes must take the same decision. A process that dies makes the launcher end the
        others.
        """
        if not self.distributed:
            return
        store = self._store()
        self.waits += 1
        if store is None:
            self.collectives += 1
            self.accelerator.wait_for_everyone()
            return
        key = f"token_distillation/{name}/{self.waits}"
        store.add(key, 1)
        while store.add(key, 0) < self.world_size:
            if stoppable:
                check_stop(f"while waiting for the other processes ({name})")
            time.sleep(POLL_SECONDS)

    def close(self) -> None:
        """End of a run: wait for every process, then tear the process group down (no-op with one
        process). A process that exited while the group was still alive could be aborted by its
        communication threads at interpreter exit ("terminate called without an active exception")."""
        if self.accelerator is None:
            return
        self.wait("close")
        self.collectives += 1
        self.accelerator.wait_for_everyone()  # everyone is here: nobody leaves while another still polls
        import torch.distributed as tdist

        if tdist.is_available() and tdist.is_initialized():
            tdist.destroy_process_group()

    @contextlib.contextmanager
    def main_process_first(self) -> Iterator[None]:
        """The main process runs the block first (e.g. to fill a cache), then the others."""
        if not self.distributed:
            yield
            return
        if not self.is_main:
            self.wait("main-first")
        yield
        if self.is_main:
            self.wait("main-first")

    def broadcast_from_main(self, make: Callable[[], Any]) -> Any:
        """``make()`` on the main process only; its (picklable) result is sent to every process.
        The others wait on the store (:meth:`wait`) while the main process works."""
        if not self.distributed:
            return make()
        from accelerate.utils import broadcast_object_list

        box = [make() if self.is_main else None]
        self.wait("broadcast")
        self.collectives += 1
        broadcast_object_list(box, from_process=0)
        return box[0]

    def broadcast_tensor_(self, t: torch.Tensor) -> None:
        """Overwrite ``t`` in place with the main process's values (no-op with one process)."""
        if self.distributed:
            from accelerate.utils import broadcast

            self.collectives += 1
            with torch.no_grad():
                t.copy_(broadcast(t.detach().clone(), from_process=0))

    def all_gather_objects(self, obj: Any, name: str = "gather") -> list[Any]:
        """Every process's (picklable) ``obj``, in rank order, on every process (``[obj]`` with one).
        Waits on the store (:meth:`wait`, stoppable) first, so a slower process does not make it time out."""
        if not self.distributed:
            return [obj]
        import torch.distributed as tdist

        self.wait(name, stoppable=True)
        self.collectives += 1
        out: list[Any] = [None] * self.world_size
        tdist.all_gather_object(out, obj)
        return out

    def gather_rows_(self, rows: torch.Tensor, owned: Sequence[int]) -> None:
        """Token sharding's end: every process gets every process's trained rows.

        ``rows [num_new, hidden]`` holds this process's trained values at the indices ``owned``
        (the tokens it trained) and anything elsewhere; afterwards it holds, at each index, the
        values of the process that owns it, on every process. Exact: the sum of one value and
        zeros (each index is owned by exactly one process).
        """
        if not self.distributed:
            return
        self.wait("gather-rows", stoppable=True)
        mask = torch.zeros(rows.shape[0], 1, dtype=rows.dtype, device=rows.device)
        if len(owned):
            mask[torch.as_tensor(list(owned), dtype=torch.long, device=rows.device)] = 1
        with torch.no_grad():
            mine = torch.where(mask.bool(), rows.detach(), torch.zeros_like(rows))
            rows.copy_(self._sum(mine.contiguous()))

    def _sum(self, t: torch.Tensor) -> torch.Tensor:
        if not self.distributed:
            return t
        self.collectives += 1
        return self.accelerator.reduce(t, reduction="sum")

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


#: test hook: ``RANK:kill@STEP`` (process RANK kills itself with SIGKILL after training step STEP) or
#: ``RANK:sleep=SECONDS`` (process RANK sleeps that long after every training step)
FAULT_ENV = "TOKEN_DISTILLATION_FAULT"


def inject_faults(checkpointer, rank: int) -> None:
    """For tests of token sharding: make process ``rank`` slow or die, as :data:`FAULT_ENV` says
    (unset: nothing happens). The hook runs after each training step of that process (after its
    checkpoint, if one was due).

    Raises:
        ValueError: a malformed :data:`FAULT_ENV` value.
    """
    spec = os.environ.get(FAULT_ENV, "").strip()
    if not spec:
        return
    try:
        who, what = spec.split(":", 1)
        target = int(who)
        if what.startswith("kill@"):
            kill_at, pause = int(what[5:]), 0.0
        elif what.startswith("sleep="):
            kill_at, pause = -1, float(what[6:])
        else:
            raise ValueError(what)
    except ValueError:
        raise ValueError(f"{FAULT_ENV}={spec!r}: expected RANK:kill@STEP or RANK:sleep=SECONDS") from None
    if target != rank:
        return
    inner = checkpointer.step_done

    def step_done(step, *args, **kw):
        out = inner(step, *args, **kw)
        if pause:
            time.sleep(pause)
        if step == kill_at:
            logger.warning("%s: process %d kills itself after step %d", FAULT_ENV, rank, step)
            os.kill(os.getpid(), 9)
        return out

    checkpointer.step_done = step_done
