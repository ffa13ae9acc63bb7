"""The processes of one ``fastddim sample`` job: one alone, or the ranks torchrun started.

Under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``, ``MASTER_PORT`` in the environment)
`join` initialises torch.distributed from those variables: NCCL as the default backend when the ranks sample on CUDA,
gloo on the CPU, and always a gloo group for the small control messages the ranks exchange (progress counts and
errors), which never touch the GPU. Nothing here starts or watches processes: torchrun does.

Failures end the whole job, never hang it. Ranks meet at `Team.settle` after every step they take together (setup,
each batch, the end); a rank whose step raised tells the others there, and every rank stops with a one-line error
naming it. The bound: a rank that raises is reported by the others at their next meeting (at most one batch later); a
rank that dies breaks gloo's connections, so the others' next meeting fails at once (torchrun also stops them); a
rank that hangs makes the others' meeting time out after ``timeout`` (``--dist-timeout``, 1800 s by default).
"""

from __future__ import annotations

import datetime
import os
from typing import Any

from fastddim.utils import first_line

__all__ = ["DEFAULT_TIMEOUT_S", "RankFailed", "Team", "join", "launched_by_torchrun"]

DEFAULT_TIMEOUT_S = 1800.0
_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class RankFailed(RuntimeError):
    """Another rank of the job failed (or could not be reached); the message names it and says why."""


def launched_by_torchrun() -> bool:
    """Whether this process is a rank of a torchrun (or other ``env://``) launch."""
    return "RANK" in os.environ and "WORLD_SIZE" in os.environ


def _env_int(name: str) -> int:
    text = os.environ.get(name, "")
    try:
        return int(text)
    except ValueError:
        raise ValueError(f"environment variable {name} must be an integer, got {text!r}") from None


class Team:
    """This process's place in the job: ``rank`` of ``world_size``, and how the ranks exchange messages.

    A team of one (no torchrun) exchanges with itself and never imports torch.distributed.
    """

    def __init__(self, rank: int = 0, world_size: int = 1, local_rank: int = 0, control: Any = None):
        self.rank = rank
        self.world_size = world_size
        self.local_rank = local_rank
        self._control = control

    @property
    def distributed(self) -> bool:
        return self._control is not None

    def exchange(self, value: Any) -> list[Any]:
        """Every rank's ``value`` (picklable), indexed by rank; a collective: every rank must call it.

        Raises:
            RankFailed: another rank is gone or did not answer within the timeout.
        """
        if self._control is None:
            return [value]
        import torch.distributed as dist

        values: list[Any] = [None] * self.world_size
        try:
            dist.all_gather_object(values, value, group=self._control)
        except Exception as exc:  # noqa: BLE001 - gloo raises RuntimeError subclasses that vary by version
            raise RankFailed(f"lost contact with another rank of the job ({first_line(exc)})") from None
        return values

    def settle(self, error: BaseException | None, payload: Any = None) -> list[Any]:
        """Ends a step all ranks take together: shares whether it failed here and ``payload``.

        Args:
            error (`BaseException`, *optional*): what this rank's step raised, or None.
            payload: a small picklable value to share (e.g. images done).

        Returns:
            `list`: every rank's payload, indexed by rank.

        Raises:
            The ``error`` itself on the rank that failed, and `RankFailed` naming the first failed rank on the others.
        """
        message = None if error is None else (first_line(error) or type(error).__name__)
        shared = self.exchange((message, payload))
        if error is not None:
            raise error
        for rank, (other, _) in enumerate(shared):
            if other is not None:
                raise RankFailed(f"rank {rank} of {self.world_size} failed: {other}")
        return [other_payload for _, other_payload in shared]

    def close(self) -> None:
        """Leaves the process group (a no-op for a team of one)."""
        if self._control is None:
            return
        import torch.distributed as dist

        if dist.is_initialized():
            dist.destroy_process_group()
        self._control = None


def join(device_type: str, timeout_s: float = DEFAULT_TIMEOUT_S) -> Team:
    """Joins the torchrun job this process belongs to, or returns a team of one outside torchrun.

    Args:
        device_type (`str`): ``"cuda"`` (NCCL default group, this rank on ``cuda:LOCAL_RANK``) or ``"cpu"`` (gloo).
        timeout_s (`float`, *optional*): how long a collective waits for the other ranks, in seconds.

    Returns:
        `Team`: this rank's team.

    Raises:
        ValueError: malformed torchrun variables, or a LOCAL_RANK without a matching CUDA device.
        RuntimeError: the rendezvous failed (unreachable MASTER_ADDR, timeout).
    """
    if not launched_by_torchrun():
        return Team()
    import torch
    import torch.distributed as dist

    rank, world_size = _env_int("RANK"), _env_int("WORLD_SIZE")
    local_rank = _env_int("LOCAL_RANK") if "LOCAL_RANK" in os.environ else 0
    if not 0 <= rank < world_size:
        raise ValueError(f"RANK={rank} is not in [0, WORLD_SIZE={world_size})")
    if not dist.is_available():
        raise RuntimeError("this torch build has no torch.distributed")
    timeout = datetime.timedelta(seconds=timeout_s)
    if device_type == "cuda":
        if local_rank >= torch.cuda.device_count():
            raise ValueError(f"LOCAL_RANK={local_rank} but only {torch.cuda.device_count()} CUDA device(s) here")
        torch.cuda.set_device(local_rank)
        dist.init_process_group(backend="nccl", timeout=timeout)
        control = dist.new_group(backend="gloo", timeout=timeout)
    else:
        dist.init_process_group(backend="gloo", timeout=timeout)
        control = dist.group.WORLD
    return Team(rank=rank, world_size=world_size, local_rank=local_rank, control=control)
