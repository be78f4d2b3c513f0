"""Progress reporting for long loops (training steps, answering, judging) and per-step timings.

Pure: nothing here knows Dagster. A stage passes its log callable (``context.log.info``) and gets lines such
as ``answering tiny-llama|60 f16: 12/20 (60%), 1.4/s, elapsed 8.6s, ETA 5.7s`` in the run log, and a
summary dict to put into asset metadata.

    progress = ProgressLogger("judging", total=len(rows), log=context.log.info)
    for row in rows:
        ...
        progress.advance()
    metadata.update(progress.finish().as_metadata())

    timings = StepTimings()
    with timings.step("load model"):
        ...
    metadata.update(timings.as_metadata())   # {"seconds_load_model": 1.23, "seconds_total": ...}
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field

LogFn = Callable[[str], object]
Clock = Callable[[], float]


def format_duration(seconds: float) -> str:
    """``42.0s``, ``3m05s`` or ``2h03m``: short enough for a log line, exact enough for an ETA."""
    if seconds < 0 or seconds != seconds:  # negative or NaN: nothing meaningful to show
        return "?"
    if seconds < 60:
        return f"{seconds:.1f}s"
    minutes, secs = divmod(round(seconds), 60)
    if minutes < 60:
        return f"{minutes}m{secs:02d}s"
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m"


@dataclass(frozen=True)
class ProgressSummary:
    """What a finished loop did: counts, wall time and throughput."""

    label: str
    done: int
    total: int
    seconds: float

    @property
    def per_second(self) -> float:
        return self.done / self.seconds if self.seconds > 0 else 0.0

    @property
    def seconds_per_item(self) -> float:
        return self.seconds / self.done if self.done else 0.0

    def as_metadata(self, prefix: str | None = None) -> dict[str, float | int]:
        """Flat numbers for asset metadata, keys prefixed by the label (``answering_seconds``...)."""
        key = _slug(prefix if prefix is not None else self.label)
        return {
            f"{key}_items": self.done,
            f"{key}_seconds": round(self.seconds, 3),
            f"{key}_seconds_per_item": round(self.seconds_per_item, 4),
        }


class ProgressLogger:
    """Logs ``label: done/total (pct), rate, elapsed, ETA`` at most every ``every_seconds`` seconds.

    The first item and the last item always log, so short loops still show start and end; in between the
    time throttle keeps a 5,000-step training run from flooding the run log.
    """

    def __init__(
        self,
        label: str,
        total: int,
        log: LogFn,
        *,
        every_seconds: float = 10.0,
        unit: str = "items",
        clock: Clock = time.monotonic,
    ) -> None:
        if total < 0:
            raise ValueError(f"progress total for {label!r} must be >= 0, got {total}")
        if every_seconds < 0:
            raise ValueError(f"every_seconds for {label!r} must be >= 0, got {every_seconds}")
        self.label = label
        self.total = total
        self.unit = unit
        self._log = log
        self._every = every_seconds
        self._clock = clock
        self._start = clock()
        self._last_logged: float | None = None
        self.done = 0
        self._finished: ProgressSummary | None = None

    @property
    def elapsed(self) -> float:
        return self._clock() - self._start

    def eta_seconds(self) -> float | None:
        """Seconds left at the average rate so far; None before the first item."""
        if self.done == 0:
            return None
        remaining = max(self.total - self.done, 0)
        return self.elapsed / self.done * remaining

    def line(self, detail: str | None = None) -> str:
        elapsed = self.elapsed
        pct = f" ({100.0 * self.done / self.total:.0f}%)" if self.total else ""
        rate = self.done / elapsed if elapsed > 0 else 0.0
        eta = self.eta_seconds()
        text = (
            f"{self.label}: {self.done}/{self.total} {self.unit}{pct}, {rate:.2f}/s, "
            f"elapsed {format_duration(elapsed)}, ETA {format_duration(eta) if eta is not None else '?'}"
        )
        return f"{text} — {detail}" if detail else text

    def advance(self, count: int = 1, detail: str | None = None) -> None:
        """Count ``count`` finished items; log when the throttle allows, on the first and on the last."""
        if self._finished is not None:
            raise RuntimeError(f"progress {self.label!r} was already finished")
        if count < 0:
            raise ValueError(f"cannot advance progress {self.label!r} by {count}")
        self.done += count
        now = self._clock()
        first = self._last_logged is None
        last = self.total > 0 and self.done >= self.total
        if first or last or now - (self._last_logged or 0.0) >= self._every:
            self._last_logged = now
            self._log(self.line(detail))

    def finish(self) -> ProgressSummary:
        """Log a closing line and return the summary (idempotent)."""
        if self._finished is None:
            elapsed = self.elapsed
            self._finished = ProgressSummary(self.label, self.done, self.total, elapsed)
            rate = self._finished.per_second
            self._log(
                f"{self.label}: finished {self.done}/{self.total} {self.unit} in {format_duration(elapsed)} "
                f"({rate:.2f}/s)"
            )
        return self._finished


@dataclass
class StepTimings:
    """Wall time of named steps inside one asset body, for asset metadata ("how long each step took")."""

    clock: Clock = time.monotonic
    seconds: dict[str, float] = field(default_factory=dict)

    @contextmanager
    def step(self, name: str, log: LogFn | None = None) -> Iterator[None]:
        """Time the block; a repeated name accumulates (e.g. one step per batch)."""
        start = self.clock()
        try:
            yield
        finally:
            took = self.clock() - start
            self.seconds[name] = self.seconds.get(name, 0.0) + took
            if log is not None:
                log(f"step {name!r} took {format_duration(took)}")

    def as_metadata(self) -> dict[str, float]:
        """``{"seconds_<step>": s, ..., "seconds_total": s}`` rounded to milliseconds."""
        out = {f"seconds_{_slug(name)}": round(value, 3) for name, value in self.seconds.items()}
        out["seconds_total"] = round(sum(self.seconds.values()), 3)
        return out


def _slug(text: str) -> str:
    slug = re.sub(r"[^0-9a-zA-Z]+", "_", text).strip("_").lower()
    return slug or "step"
