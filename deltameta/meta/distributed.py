"""Task-parallel meta-training on ``torch.distributed`` (launched by ``torchrun`` or ``accelerate``).

Each rank runs the inner loops of its share of the meta-batch: rank ``r`` of ``w`` takes the
batch's episodes ``r, r + w, ...`` (see :meth:`~deltameta.tasks.episodes.EpisodeSampler.sample_batch`),
weighting each task by ``1 / meta_batch_size`` as a single process does. The accumulated
meta-gradients (deltas, Meta-SGD learning rates, controller) are then summed over the ranks, which
gives every rank the single-process meta-gradient of the whole meta-batch, and every rank takes
the same optimizer step, so the meta-parameters stay identical without ever being broadcast.

Everything here degrades to a no-op in a plain single process (``WORLD_SIZE`` unset or 1):
:data:`SINGLE` is the context of such a run.

Launchers set ``WORLD_SIZE``, ``RANK``, ``LOCAL_RANK``, ``MASTER_ADDR`` and ``MASTER_PORT``;
:func:`setup` reads them and initialises the process group (``nccl`` on CUDA with one GPU per
process, ``cuda:LOCAL_RANK``; ``gloo`` on CPU).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import hashlib
import json
import logging
import os
from typing import Any, Callable, Iterator, Sequence, TypeVar

import torch

from deltameta.errors import ConfigError, DeltametaError

logger = logging.getLogger(__name__)

T = TypeVar("T")

#: Collective timeout: long enough for rank 0's export while the others wait.
TIMEOUT = datetime.timedelta(minutes=60)
#: Config keys that may differ across ranks (they do not change the trajectory).
RANK_LOCAL_KEYS = ("progress",)


class DistributedError(DeltametaError):
    """Another rank failed, or the distributed environment is unusable."""


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process stands in a (possibly single-process) run.

    Attributes:
        rank: Global rank.
        world_size: Number of processes.
        local_rank: Rank on this machine (selects the GPU).
        comm_device: Device of the tensors handed to collectives (``cuda:N`` for NCCL).
    """

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0
    comm_device: str = "cpu"

    @property
    def enabled(self) -> bool:
        """Whether there is more than one process."""
        return self.world_size > 1

    @property
    def is_main(self) -> bool:
        """Whether this is rank 0 (the one that writes the run directory)."""
        return self.rank == 0

    # -- collectives -------------------------------------------------------------------------

    def barrier(self) -> None:
        """Wait for every rank."""
        if self.enabled:
            torch.distributed.barrier()

    def all_reduce_grads(self, params: Sequence[torch.Tensor]) -> None:
        """Sum ``.grad`` over the ranks, in place.

        A gradient missing (``None``) on one rank counts as zero; it stays ``None`` only when it
        is missing on every rank, as in a single process where no task reached the tensor.

        Args:
            params: The meta-parameters the optimizers step.
        """
        if not self.enabled or not params:
            return
        dist = torch.distributed
        present = torch.tensor([float(p.grad is not None) for p in params], dtype=torch.float32, device=self.comm_device)
        dist.all_reduce(present)
        by_dtype: dict[torch.dtype, list[int]] = {}
        for index, p in enumerate(params):
            by_dtype.setdefault(p.dtype, []).append(index)
        for dtype, indices in by_dtype.items():
            grads = [params[i].grad if params[i].grad is not None else torch.zeros_like(params[i]) for i in indices]
            flat = torch.cat([g.reshape(-1).to(self.comm_device) for g in grads])
            dist.all_reduce(flat)
            offset = 0
            for i in indices:
                p = params[i]
                n = p.numel()
                p.grad = flat[offset:offset + n].view_as(p).to(p.device).clone() if present[i] > 0 else None
                offset += n

    def sum_floats(self, values: Sequence[float]) -> list[float]:
        """Return ``values`` summed over the ranks (float64)."""
        if not self.enabled:
            return [float(v) for v in values]
        tensor = torch.tensor([float(v) for v in values], dtype=torch.float64, device=self.comm_device)
        torch.distributed.all_reduce(tensor)
        return tensor.tolist()

    def gather_tasks(self, tensor: torch.Tensor) -> torch.Tensor:
        """Gather per-task rows ``[n_local, ...]`` from every rank in global meta-batch order.

        Rank ``r`` holds the batch's tasks ``r, r + w, ...``; the result is ``[n_local * w, ...]``
        with task ``i`` at row ``i``. Every rank must hold the same number of tasks.
        """
        if not self.enabled:
            return tensor
        parts = [torch.empty_like(tensor, device=self.comm_device) for _ in range(self.world_size)]
        torch.distributed.all_gather(parts, tensor.detach().to(self.comm_device).contiguous())
        stacked = torch.stack(parts, dim=1).to(tensor.device)  # [n_local, world, ...]
        return stacked.reshape(-1, *tensor.shape[1:])

    def run_on_main(self, fn: Callable[..., T], *args: Any, **kwargs: Any) -> T:
        """Run ``fn`` on rank 0 only and hand its result (or its error) to every rank.

        The other ranks wait, so this is also a barrier. An error raised on rank 0 is raised on
        every rank (a :class:`~deltameta.errors.DeltametaError` as itself, others as
        :class:`DistributedError`), so no rank is left waiting in a collective.
        """
        if not self.enabled:
            return fn(*args, **kwargs)
        payload: list[Any] = [None]
        error: BaseException | None = None
        if self.is_main:
            try:
                payload[0] = ("ok", fn(*args, **kwargs))
            except Exception as caught:  # noqa: BLE001 - relayed to every rank, re-raised below
                error = caught
                relay = caught if isinstance(caught, DeltametaError) else DistributedError(
                    f"rank 0 failed: {type(caught).__name__}: {caught}")
                payload[0] = ("error", relay)
        torch.distributed.broadcast_object_list(payload, src=0, device=_object_device(self))
        if error is not None:
            raise error
        status, value = payload[0]
        if status == "error":
            raise value
        return value

    @contextlib.contextmanager
    def local_main_first(self) -> Iterator[None]:
        """Let local rank 0 of each machine run the block first (downloads, 4-bit preparation)."""
        if not self.enabled:
            yield
            return
        if self.local_rank != 0:
            self.barrier()
        yield
        if self.local_rank == 0:
            self.barrier()

    def check_config(self, config: Any) -> None:
        """Raise on every rank unless every rank resolved the same config.

        Each rank all-gathers the SHA-256 of its resolved config (see :func:`config_digest`) and
        the values; any rank whose digest differs from rank 0's is named with its differing keys.

        Raises:
            ConfigError: the configs differ.
        """
        if not self.enabled:
            return
        digest, values = config_digest(config)
        gathered: list[Any] = [None] * self.world_size
        torch.distributed.all_gather_object(gathered, (digest, values))
        reference_digest, reference = gathered[0]
        for rank, (other_digest, other) in enumerate(gathered):
            if other_digest == reference_digest:
                continue
            keys = sorted(k for k in set(reference) | set(other) if reference.get(k) != other.get(k))
            diffs = ", ".join(f"{k}={other.get(k)!r} (rank 0: {reference.get(k)!r})" for k in keys[:5])
            raise ConfigError(
                f"rank {rank} of {self.world_size} resolved a different config than rank 0: {diffs}"
                f"{' ...' if len(keys) > 5 else ''}. Launch every process with the same recipe and key=value "
                "overrides (and the same files on every machine)."
            )


#: The context of a plain single-process run.
SINGLE = DistContext()


def _object_device(ctx: DistContext) -> torch.device | None:
    return torch.device(ctx.comm_device) if ctx.comm_device.startswith("cuda") else None


# ------------------------------------------------------------------------------------------ setup


def env_world() -> tuple[int, int, int]:
    """Return ``(rank, world_size, local_rank)`` from the launcher's environment (``(0, 1, 0)`` if unset).

    Raises:
        ConfigError: malformed or inconsistent values.
    """
    values = {}
    for key, default in (("RANK", 0), ("WORLD_SIZE", 1), ("LOCAL_RANK", None)):
        raw = os.environ.get(key)
        if raw is None or raw == "":
            values[key] = default
            continue
        try:
            values[key] = int(raw)
        except ValueError:
            raise ConfigError(
                f"environment variable {key}={raw!r} is not an integer; launch with torchrun or accelerate launch."
            ) from None
    rank, world = values["RANK"], values["WORLD_SIZE"]
    local = values["LOCAL_RANK"] if values["LOCAL_RANK"] is not None else rank
    if world < 1 or not 0 <= rank < world or local < 0:
        raise ConfigError(f"inconsistent launcher environment RANK={rank}, WORLD_SIZE={world}, LOCAL_RANK={local}.")
    return rank, world, local


def current() -> DistContext:
    """Return the context of the process group already initialised here, or :data:`SINGLE`."""
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return SINGLE
    _, _, local = env_world()
    comm = f"cuda:{torch.cuda.current_device()}" if dist.get_backend() == "nccl" else "cpu"
    return DistContext(dist.get_rank(), dist.get_world_size(), local, comm)


def resolve_device(device: str, ctx: DistContext) -> str:
    """Resolve the ``device`` key for this rank (``auto``/``cuda`` -> ``cuda:LOCAL_RANK`` when distributed).

    Raises:
        ConfigError: an explicit ``cuda:N`` in a multi-process run (every process would share one GPU).
    """
    from deltameta.base import resolve_device as resolve_single

    if device == "auto":
        device = resolve_single(device)
    if not ctx.enabled or not device.startswith("cuda"):
        return device
    if device != "cuda":
        raise ConfigError(
            f"device={device} with {ctx.world_size} processes would put them all on one GPU; use device=auto "
            "or device=cuda (each process takes cuda:LOCAL_RANK; choose GPUs with CUDA_VISIBLE_DEVICES)."
        )
    return f"cuda:{ctx.local_rank}"


def setup(device: str = "auto") -> tuple[DistContext, bool]:
    """Initialise the process group when launched with ``WORLD_SIZE > 1``.

    Args:
        device: The config's ``device`` key (picks the backend: NCCL for CUDA, gloo for CPU).

    Returns:
        ``(context, created)``: ``created`` says whether this call initialised the group (then the
        caller tears it down with :func:`teardown`).

    Raises:
        ConfigError: bad launcher environment, or CUDA asked for with fewer GPUs than local ranks.
    """
    dist = torch.distributed
    if dist.is_available() and dist.is_initialized():
        return current(), False
    rank, world, local = env_world()
    if world == 1:
        return SINGLE, False
    if not dist.is_available():
        raise ConfigError(f"WORLD_SIZE={world} but this torch build has no torch.distributed.")
    missing = [key for key in ("MASTER_ADDR", "MASTER_PORT") if not os.environ.get(key)]
    if missing:
        raise ConfigError(
            f"WORLD_SIZE={world} is set but {' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not; "
            "launch with torchrun or accelerate launch (see docs/distributed.md)."
        )
    use_cuda = (device == "auto" and torch.cuda.is_available()) or device.startswith("cuda")
    comm = "cpu"
    if use_cuda:
        if local >= torch.cuda.device_count():
            raise ConfigError(
                f"LOCAL_RANK={local} needs GPU {local} but {torch.cuda.device_count()} are visible; start at most one "
                "process per GPU (or use device=cpu)."
            )
        torch.cuda.set_device(local)
        comm = f"cuda:{local}"
    dist.init_process_group("nccl" if use_cuda else "gloo", rank=rank, world_size=world, timeout=TIMEOUT)
    return DistContext(rank, world, local, comm), True


def teardown(synchronize: bool = True) -> None:
    """Destroy the process group (after :func:`setup` created it).

    Args:
        synchronize: First wait for every rank (a barrier), so that no rank closes its connections while
            a peer still finishes its last writes; gloo can otherwise abort that peer at exit
            ("terminate called without an active exception") after a run that succeeded. False after an
            error, when peers may be gone; a barrier that fails because a peer left is logged and skipped.
    """
    dist = torch.distributed
    if not (dist.is_available() and dist.is_initialized()):
        return
    if synchronize:
        try:
            dist.barrier()
        except RuntimeError as error:  # a peer that failed and left: tear down all the same
            logger.warning("process group teardown: the final barrier failed (%s); destroying it anyway", error)
    dist.destroy_process_group()


@contextlib.contextmanager
def torn_down_after(created: bool = True) -> Iterator[None]:
    """Run the body, then (if ``created``) :func:`teardown`: synchronised after success, at once after an error.

    Args:
        created: Whether the caller's :func:`setup` created the group (``False``: leave it to its owner).
    """
    failed = False
    try:
        yield
    except BaseException:
        failed = True
        raise
    finally:
        if created:
            teardown(synchronize=not failed)


# ------------------------------------------------------------------------------------------ checks


def check_divisible(meta_batch_size: int, world_size: int) -> None:
    """Raise unless the meta-batch splits evenly over the processes.

    Raises:
        ConfigError: ``meta_batch_size`` is not a multiple of ``world_size``.
    """
    if meta_batch_size % world_size:
        lower = meta_batch_size - meta_batch_size % world_size
        raise ConfigError(
            f"meta_batch_size={meta_batch_size} cannot be split evenly over {world_size} processes; use a multiple of "
            f"{world_size} (e.g. meta_batch_size={lower or world_size} or {lower + world_size}) or launch a number "
            f"of processes that divides {meta_batch_size}."
        )


def config_digest(config: Any) -> tuple[str, dict[str, Any]]:
    """Return the SHA-256 of the resolved config (without :data:`RANK_LOCAL_KEYS`) and its values."""
    values = {k: v for k, v in dataclasses.asdict(config).items() if k not in RANK_LOCAL_KEYS}
    text = json.dumps(values, sort_keys=True, default=str)
    return hashlib.sha256(text.encode("utf-8")).hexdigest(), values


def check_run(config: Any, ctx: DistContext) -> None:
    """Check a config for a run on ``ctx``: divisible meta-batch, the same config on every rank.

    Raises:
        ConfigError: see :func:`check_divisible` and :meth:`DistContext.check_config`.
    """
    if not ctx.enabled:
        return
    check_divisible(config.meta_batch_size, ctx.world_size)
    ctx.check_config(config)


def reduce_task_result(ctx: DistContext, result: Any, tasks: int, total: int) -> Any:
    """Turn this rank's mean :class:`~deltameta.meta.algorithms.TaskResult` over ``tasks`` tasks
    into the mean over the whole meta-batch of ``total`` tasks (the same on every rank)."""
    if not ctx.enabled:
        return result
    sums = ctx.sum_floats([result.support_before * tasks, result.support_after * tasks, result.query_after * tasks,
                           result.tokens, 0.0 if result.finite else 1.0])
    return dataclasses.replace(result, support_before=sums[0] / total, support_after=sums[1] / total,
                               query_after=sums[2] / total, tokens=int(sums[3]), finite=sums[4] == 0)


class NullMetricsLog:
    """What ranks other than 0 log to: nothing (rank 0 writes ``metrics.jsonl``)."""

    def __init__(self) -> None:
        self.rows: list[dict[str, Any]] = []

    def log(self, row: dict[str, Any]) -> None:
        """Drop ``row``."""

    def close(self) -> None:
        """Nothing to flush."""
