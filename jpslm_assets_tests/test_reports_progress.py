"""The progress logger and step timings the long-running stages use for counts, ETA and step durations."""

from __future__ import annotations

import pytest

from jpslm_assets.common.progress import ProgressLogger, StepTimings, format_duration


class FakeClock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_progress_logs_counts_rate_and_eta_with_a_time_throttle() -> None:
    clock, lines = FakeClock(), []
    progress = ProgressLogger(
        "answering tiny-llama|60 f16", total=10, log=lines.append, every_seconds=5, clock=clock
    )
    clock.now += 2.0
    progress.advance()  # the first item always logs
    assert lines == ["answering tiny-llama|60 f16: 1/10 items (10%), 0.50/s, elapsed 2.0s, ETA 18.0s"]
    clock.now += 2.0
    progress.advance()  # 2 s after the last line: throttled
    assert len(lines) == 1
    clock.now += 4.0
    progress.advance(2, detail="question T004")  # 6 s since the last line: logs, with the detail
    assert lines[-1] == (
        "answering tiny-llama|60 f16: 4/10 items (40%), 0.50/s, elapsed 8.0s, ETA 12.0s — question T004"
    )
    clock.now += 1.0
    progress.advance(6)  # the last item always logs
    assert lines[-1].startswith("answering tiny-llama|60 f16: 10/10 items (100%)")
    assert lines[-1].endswith("ETA 0.0s")
    summary = progress.finish()
    assert lines[-1] == "answering tiny-llama|60 f16: finished 10/10 items in 9.0s (1.11/s)"
    assert summary.done == 10 and summary.seconds == pytest.approx(9.0)
    assert summary.as_metadata() == {
        "answering_tiny_llama_60_f16_items": 10,
        "answering_tiny_llama_60_f16_seconds": 9.0,
        "answering_tiny_llama_60_f16_seconds_per_item": 0.9,
    }
    assert progress.finish() is summary  # idempotent, no second closing line
    assert sum("finished" in line for line in lines) == 1
    with pytest.raises(RuntimeError, match="already finished"):
        progress.advance()


def test_progress_before_any_item_has_no_eta_and_bad_arguments_are_named() -> None:
    lines: list[str] = []
    progress = ProgressLogger("judging", total=3, log=lines.append, clock=FakeClock())
    assert progress.eta_seconds() is None
    assert progress.line().endswith("ETA ?")
    with pytest.raises(ValueError, match="judging"):
        progress.advance(-1)
    with pytest.raises(ValueError, match="total for 'training' must be >= 0"):
        ProgressLogger("training", total=-5, log=lines.append)


def test_step_timings_accumulate_repeated_steps_and_log() -> None:
    clock, lines = FakeClock(), []
    timings = StepTimings(clock=clock)
    with timings.step("load model", log=lines.append):
        clock.now += 1.25
    for _ in range(3):
        with timings.step("generate"):
            clock.now += 0.5
    with pytest.raises(KeyError), timings.step("write table"):
        clock.now += 0.1
        raise KeyError("boom")  # a failing step is still timed
    assert lines == ["step 'load model' took 1.2s"]
    assert timings.as_metadata() == {
        "seconds_load_model": 1.25,
        "seconds_generate": 1.5,
        "seconds_write_table": 0.1,
        "seconds_total": 2.85,
    }


@pytest.mark.parametrize(
    ("seconds", "text"),
    [(0.04, "0.0s"), (59.94, "59.9s"), (61, "1m01s"), (3599, "59m59s"), (7380, "2h03m"), (-1, "?")],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text
