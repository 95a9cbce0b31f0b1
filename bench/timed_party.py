"""veiltrain's party process with timestamped step phases and peak RSS in its events (bench only).

Started by launch.run_local(entry=...) in place of `python -m veiltrain.party`; the training
code is veiltrain's own. Step events gain `t` (wall clock), `batch`, `step_s` and `phases`
(data, forward, loss, backward, update, rest), checkpoint and end events `vmhwm_kib`. Timing
the step inside the party leaves out the launcher's 0.2 s polling of events.
"""

from __future__ import annotations

import functools
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from veiltrain import losses, mpc, party, trainer
from veiltrain.errors import VeiltrainError
from veiltrain.party_data import PartyData

# Timestamps of the current step, set by the wrappers below (one party process, one thread).
_marks: dict[str, float] = {}
_batch: list[int] = [0]


def peak_rss_kib() -> int:
    """This process's peak resident set (VmHWM) in KiB, 0 where /proc is missing."""
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1])
    except OSError:
        pass
    return 0


def _stamp(name: str) -> None:
    _marks[name] = time.perf_counter()


def _timed_batch(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def batch(self: PartyData, indices: Any) -> Any:
        _marks.clear()
        _stamp("start")  # the step starts with fetching its records
        _batch[0] = len(indices)
        return fn(self, indices)

    return batch


def _timed_from_shares(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def from_shares(*args: Any, **kwargs: Any) -> Any:
        out = fn(*args, **kwargs)
        _stamp("data")  # the second call (labels) ends the data phase
        return out

    return from_shares


def _timed_loss(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def value_and_grad(*args: Any, **kwargs: Any) -> Any:
        _stamp("forward")  # the model's output is the loss's argument
        out = fn(*args, **kwargs)
        _stamp("loss")
        return out

    return value_and_grad


def _timed_sgd(fn: Callable[..., Any]) -> Callable[..., Any]:
    @functools.wraps(fn)
    def sgd_step(*args: Any, **kwargs: Any) -> Any:
        _stamp("backward")
        fn(*args, **kwargs)
        _stamp("update")

    return sgd_step


_PHASES = ("start", "data", "forward", "loss", "backward", "update")


def _step_fields() -> dict[str, Any]:
    if torch.cuda.is_initialized():
        torch.cuda.synchronize()  # CUDA kernels run asynchronously: time the step's real end
    end = time.perf_counter()
    if not all(k in _marks for k in _PHASES):
        return {}
    marks = [_marks[k] for k in _PHASES] + [end]
    names = (*_PHASES[1:], "rest")
    phases = {n: round(b - a, 6) for n, a, b in zip(names, marks[:-1], marks[1:], strict=True)}
    return {"step_s": round(end - _marks["start"], 6), "batch": _batch[0], "phases": phases}


def _timed_emit(fn: Callable[..., None]) -> Callable[..., None]:
    def emit(event: str, **fields: Any) -> None:
        extra: dict[str, Any] = {"t": time.time()}
        if event == "step":
            extra.update(_step_fields())
        if event in ("checkpoint", "done", "dealer-done"):
            extra["vmhwm_kib"] = peak_rss_kib()
        fn(event, **fields, **extra)

    return emit


def _traced(fn: Callable[..., None]) -> Callable[..., None]:
    """run_party printing, into the bench's party log, where a translated failure came from."""

    @functools.wraps(fn)
    def run_party(*args: Any, **kwargs: Any) -> None:
        try:
            fn(*args, **kwargs)
        except VeiltrainError as exc:
            if exc.__cause__ is not None:
                traceback.print_exception(exc.__cause__)
            raise

    return run_party


def install() -> None:
    """Wrap the functions the training loop calls by module attribute (nothing else changes)."""
    PartyData.batch = _timed_batch(PartyData.batch)  # type: ignore[method-assign]
    mpc.from_shares = _timed_from_shares(mpc.from_shares)
    mpc.sgd_step = _timed_sgd(mpc.sgd_step)
    losses.value_and_grad = _timed_loss(losses.value_and_grad)
    # party.py imported emit from trainer by name: both names get the one timed emit.
    timed = _timed_emit(trainer.emit)
    trainer.emit = timed
    party.emit = timed  # type: ignore[attr-defined]
    party.run_party = _traced(party.run_party)


if __name__ == "__main__":
    install()
    sys.exit(party.main())
