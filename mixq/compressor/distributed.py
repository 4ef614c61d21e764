"""torch.distributed support for quantizers: one calibration, identical on every rank.

Only ``torch.distributed`` collectives are used. What a quantizer needs:

* :func:`unwrap_parallel` — a model wrapped in ``DistributedDataParallel`` is quantized through its
  inner module (logged); ``nn.DataParallel`` is refused (it replicates the model on every forward,
  so the wrappers' state would live in throw-away replicas).
* :func:`use_distributed` — whether ranges are synchronised: ``None`` means "when a process group
  with more than one rank is initialised", ``True`` demands one.
* :func:`all_reduce_range` (min of mins, max of maxes: exact), :func:`all_reduce_sum` and
  :func:`check_same_on_all_ranks` (a digest compared with ``all_gather_object``, naming the ranks
  that differ from rank 0).
* :func:`collective` — a failed collective (a peer crashed, was killed or timed out) becomes a
  :class:`RankLostError` that says so.
* :func:`hide_from_ddp` — the quantizer's buffers, which it keeps identical itself, are not
  broadcast by DDP at every forward.
"""
from __future__ import annotations

import contextlib
import hashlib
import json
import logging
from typing import Any, Iterable, Iterator, Optional, Tuple

import torch
import torch.distributed as dist
import torch.nn as nn

from .config import ConfigError

logger = logging.getLogger(__name__)


class RankLostError(RuntimeError):
    """A collective failed: a rank was lost (crashed, killed, or timed out) while ranges were synchronised."""


class RankMismatchError(ConfigError):
    """Ranks disagree on something that must be identical (resolved layer configs, calibration)."""


class DistributedSetupError(RuntimeError):
    """Distributed quantization was asked for where no usable process group exists."""


def unwrap_parallel(model: nn.Module) -> nn.Module:
    """``model.module`` for a ``DistributedDataParallel`` model (logged), ``model`` otherwise;
    ``nn.DataParallel`` is refused with a pointer to DDP."""
    if isinstance(model, nn.parallel.DistributedDataParallel):
        logger.info("the model is wrapped in DistributedDataParallel: quantizing its inner module (model.module) "
                    "in place; keep training through the DDP wrapper")
        return model.module
    if isinstance(model, nn.DataParallel):
        raise ConfigError("the model is wrapped in nn.DataParallel, which copies the model on every forward, so the "
                          "quantizer's ranges would not survive; use DistributedDataParallel (one process per GPU, "
                          "torchrun) or pass model.module")
    return model


def hide_from_ddp(model: nn.Module, names: Iterable[str]) -> None:
    """Keep a ``DistributedDataParallel`` built on ``model`` later from broadcasting these buffers
    at every forward: the quantizer keeps them identical itself, and a lost rank is then reported
    by the quantizer's own collective."""
    ignored = set(getattr(model, "_ddp_params_and_buffers_to_ignore", ()))
    nn.parallel.DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, sorted(ignored | set(names)))


def initialized() -> bool:
    """Whether a default process group is initialised."""
    return dist.is_available() and dist.is_initialized()


def use_distributed(requested: Optional[bool]) -> bool:
    """Resolve a quantizer's ``distributed`` argument: ``None`` -> True where a process group of more
    than one rank is initialised; ``True`` -> that group must exist (else a clear error)."""
    if requested is None:
        return initialized() and dist.get_world_size() > 1
    if requested is True and not initialized():
        raise DistributedSetupError(
            "distributed=True needs the default process group: call torch.distributed.init_process_group("
            "'nccl' on GPUs, 'gloo' on CPUs) in every rank (launched by torchrun) before building the quantizer")
    return bool(requested)


def rank() -> int:
    """This process's rank (0 without a process group)."""
    return dist.get_rank() if initialized() else 0


@contextlib.contextmanager
def collective(what: str) -> Iterator[None]:
    """Run collectives; a RuntimeError they raise becomes a :class:`RankLostError` naming ``what``."""
    try:
        yield
    except RuntimeError as exc:
        raise RankLostError(
            f"rank {rank()}: a rank was lost during range synchronisation ({what}): the collective failed "
            f"({' '.join(str(exc).split())[:300]}). A peer crashed, was killed or timed out; restart all ranks "
            "from the last checkpoint (torchrun --max-restarts restarts them)") from exc


def _comm_device() -> torch.device:
    """Where collective tensors must live: the current GPU for NCCL, the CPU otherwise."""
    if dist.get_backend() == "nccl":
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def all_reduce_range(lo: torch.Tensor, hi: torch.Tensor, what: str) -> Tuple[torch.Tensor, torch.Tensor]:
    """(min over ranks of ``lo``, max over ranks of ``hi``), element-wise and exact, in one
    collective (``MAX`` of ``[-lo, hi]``; negation is exact). A rank without data passes
    ``(+inf, -inf)``."""
    n = lo.numel()
    both = torch.cat([-lo.detach().reshape(-1), hi.detach().reshape(-1)]).to(_comm_device(), torch.float32)
    with collective(what):
        dist.all_reduce(both, op=dist.ReduceOp.MAX)
    both = both.to(lo.device)
    return (-both[:n]).reshape(lo.shape), both[n:].reshape(hi.shape)


def all_reduce_sum(t: torch.Tensor, what: str) -> torch.Tensor:
    """The element-wise sum of ``t`` over ranks (a new tensor on ``t``'s device)."""
    total = t.detach().to(_comm_device(), copy=True)
    with collective(what):
        dist.all_reduce(total, op=dist.ReduceOp.SUM)
    return total.to(t.device)


def digest(obj: Any) -> str:
    """SHA-256 of ``obj``'s canonical JSON (sorted keys; sets sorted; other objects by ``repr``)."""
    def default(o: Any) -> Any:
        return sorted(o, key=repr) if isinstance(o, (set, frozenset)) else repr(o)
    text = json.dumps(obj, sort_keys=True, default=default, separators=(",", ":"))
    return hashlib.sha256(text.encode()).hexdigest()


def check_same_on_all_ranks(value: str, what: str, fix: str) -> None:
    """Compare ``value`` (a digest) across ranks; raise :class:`RankMismatchError` naming the
    ranks that differ from rank 0, on every rank."""
    values = [None] * dist.get_world_size()
    with collective(f"comparing the {what} across ranks"):
        dist.all_gather_object(values, value)
    differ = [r for r, v in enumerate(values) if v != values[0]]
    if differ:
        raise RankMismatchError(f"ranks {differ} have a different {what} than rank 0 "
                          f"({', '.join(f'rank {r}: {str(v)[:12]}' for r, v in enumerate(values))}); {fix}")


def broadcast_outcome(error: Optional[str], what: str) -> None:
    """Rank 0 tells every rank whether ``what`` succeeded there (``error`` None) or failed; the
    other ranks raise RuntimeError with rank 0's reason."""
    box = [error]
    with collective(what):
        dist.broadcast_object_list(box, src=0)
    if box[0] is not None and rank() != 0:
        raise RuntimeError(f"rank 0 failed {what}: {box[0]}")
