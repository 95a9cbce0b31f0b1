"""Progress: a rich bar with ETA fed by party events, and which stage this process is in."""

from __future__ import annotations

from collections.abc import Callable
from types import TracebackType
from typing import Any

from rich.progress import (
    BarColumn,
    MofNCompleteColumn,
    Progress,
    TextColumn,
    TimeElapsedColumn,
    TimeRemainingColumn,
)


class TrainingProgress:
    """Counts party 0's steps (every party runs the same steps) into a bar and a callback."""

    def __init__(
        self, total_steps: int, on_fraction: Callable[[float], None] | None = None
    ) -> None:
        self.total = max(1, total_steps)
        self.on_fraction = on_fraction
        self._bar = Progress(
            TextColumn("[bold]training on shares"),
            BarColumn(),
            MofNCompleteColumn(),
            TextColumn("steps"),
            TimeElapsedColumn(),
            TextColumn("ETA"),
            TimeRemainingColumn(),
            transient=False,
        )
        self._task = self._bar.add_task("train", total=self.total)

    def __enter__(self) -> TrainingProgress:
        self._bar.start()
        return self

    def __exit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self._bar.stop()

    def __call__(self, event: dict[str, Any]) -> None:
        """Consume one party event; only party 0's steps move the bar."""
        if event.get("party") != "party 0":
            return
        if event.get("event") == "start":
            done = (int(event["epoch"]) - 1) * int(event["steps_per_epoch"])
            self._bar.update(self._task, completed=done)
        elif event.get("event") == "step":
            self._bar.update(self._task, completed=int(event["global_step"]))
            if self.on_fraction is not None:
                self.on_fraction(int(event["global_step"]) / self.total)


_STAGES: list[str] = []


def entered(stage: str) -> None:
    """Note the stage now running, so that an interrupted run can say which one it was."""
    _STAGES.append(stage)


def current_stage() -> str | None:
    """The stage entered last in this process, if any."""
    return _STAGES[-1] if _STAGES else None
