"""Progress off a terminal: LogProgress writes "n/total, rate, ETA" lines every interval and a "done" line."""

from __future__ import annotations

import io
import logging
from types import SimpleNamespace

import pytest
from tqdm.auto import tqdm

from madfh_pipeline import progress as progress_module
from madfh_pipeline.progress import LogProgress, progress

LOGGER = "madfh_pipeline.progress"


class Clock:
    """A monotonic clock the test advances by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock(monkeypatch: pytest.MonkeyPatch) -> Clock:
    fake = Clock()
    monkeypatch.setattr(progress_module, "time", SimpleNamespace(monotonic=fake))  # this module's clock only
    return fake


def _lines(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == LOGGER]


def test_logs_once_per_interval_with_count_rate_and_eta(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        bar = LogProgress(total=10, desc="fit patchcore", unit="img", interval=5.0)
        for _ in range(3):
            clock.now += 1.0
            bar.update()
        assert _lines(caplog) == []  # 3 s < interval: nothing yet
        clock.now += 2.0
        bar.update()  # 5 s after the start: 4 of 10 at 0.8 img/s, 6 left → 7.5 s
        assert _lines(caplog) == ["fit patchcore: 4/10 img (40 %), 0.80 img/s, ETA 8 s"]
        clock.now += 1.0
        bar.update(2)  # only 1 s since the last line
        assert len(_lines(caplog)) == 1
        clock.now += 4.0
        bar.update()
        assert _lines(caplog)[-1] == "fit patchcore: 7/10 img (70 %), 0.70 img/s, ETA 4 s"


def test_close_logs_one_done_line(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        bar = LogProgress(total=4, desc="score autoencoder", unit="img", interval=1000.0)
        clock.now += 8.0
        bar.update(4)
        bar.close()
        bar.close()  # idempotent
    assert _lines(caplog) == ["score autoencoder: done, 4 img in 8 s (0.50 img/s)"]


def test_nothing_done_logs_nothing(caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        LogProgress(total=3, desc="idle").close()
    assert _lines(caplog) == []


def test_iteration_yields_every_item_counts_and_closes(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        bar = LogProgress(["a", "b", "c"], desc="walk", interval=0.0)
        assert bar.total == 3  # taken from the iterable's length
        seen = []
        for item in bar:
            clock.now += 1.0
            seen.append(item)
    assert seen == ["a", "b", "c"]
    assert bar.n == 3 and bar.closed
    lines = _lines(caplog)
    assert lines[-1].startswith("walk: done, 3 it in 3 s")
    assert lines[0] == "walk: 1/3 it (33 %), 1.00 it/s, ETA 2 s"  # interval 0: a line per item


def test_unknown_total_and_context_manager(clock: Clock, caplog: pytest.LogCaptureFixture) -> None:
    with caplog.at_level(logging.INFO, logger=LOGGER):
        with LogProgress(iter(range(100)), desc="stream", interval=1.0) as bar:
            assert bar.total is None
            clock.now += 2.0
            bar.update(10)
    assert _lines(caplog) == ["stream: 10 it, 5.00 it/s", "stream: done, 10 it in 2 s (5.00 it/s)"]
    with pytest.raises(TypeError, match="without an iterable"):
        iter(LogProgress(total=1)).__next__()


def test_progress_is_a_log_off_a_terminal_and_a_bar_on_one(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TQDM_DISABLE", raising=False)
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())  # not a TTY (CI, nohup, a log file)
    assert isinstance(progress(total=2, desc="x"), LogProgress)

    class FakeTerminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    monkeypatch.setattr(progress_module.sys, "stderr", FakeTerminal())
    bar = progress(total=2, desc="x")
    assert isinstance(bar, tqdm)
    bar.close()
    monkeypatch.setenv("TQDM_DISABLE", "1")
    assert isinstance(progress(total=2, desc="x"), LogProgress)


def test_the_interval_is_passed_on(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(progress_module.sys, "stderr", io.StringIO())
    assert progress(total=1, desc="x", interval=0.5).interval == 0.5
    assert progress(total=1, desc="x").interval == LogProgress(total=1).interval == progress_module.DEFAULT_INTERVAL
