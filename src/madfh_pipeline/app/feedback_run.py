"""Start the feedback pipeline from the dashboard, stream its log, and read the report it writes.

The pipeline runs as a child process (``kedro run --env demo --pipelines=feedback_<category>`` by default), never
inside the app: models, worker pools and a Kedro session stay out of the long-running server (DESIGN.md §5). A
thread copies the child's output lines into a bounded buffer that the page polls; one run per category at a time,
shared by every browser session of the server, so two operators cannot start the same retraining twice.

The report (``<data root>/08_reporting/<category>/feedback/report.json``) is written by the lead's feedback pipeline;
its shape is fixed here and in docs/review_app.md::

    {"before": {"false_alarm_rate": 0.31, "image_auroc": 0.88, "threshold": 31.0},
     "after":  {"false_alarm_rate": 0.12, "image_auroc": 0.91, "threshold": 33.4},
     "recall": 0.95, ...any other keys, shown as they are}
"""

from __future__ import annotations

import json
import logging
import math
import os
import shutil
import subprocess
import sys
import threading
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

logger = logging.getLogger(__name__)

#: Metrics every side (before/after) of the report must carry: a number, or null when it could not be computed.
REPORT_METRICS: tuple[str, ...] = ("false_alarm_rate", "image_auroc", "threshold")
#: Log lines kept per run (the page shows the tail; the full log is the pipeline's own logging).
LOG_LINES = 2000
#: Variables the child gets on top of the app's environment (the project runs offline; see the Makefile).
CHILD_ENV = {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}


class FeedbackRunError(RuntimeError):
    """The feedback pipeline could not be started; the message says why."""


class FeedbackReportError(ValueError):
    """No usable feedback report: absent, not JSON, or not of the documented shape."""


def resolve_command(args: list[str]) -> list[str]:
    """``args`` with its program found on PATH or next to this Python (the venv's ``bin/``, where ``kedro`` is).

    ``make ui`` runs the app with ``.venv/bin/streamlit`` without activating the venv, so a bare ``kedro`` is often
    not on PATH; the venv's own folder is the one place it must be.
    """
    if not args:
        raise FeedbackRunError("The feedback command is empty.")
    program = args[0]
    if os.sep in program:
        return args
    found = shutil.which(program) or shutil.which(program, path=str(Path(sys.executable).parent))
    if found is None:
        raise FeedbackRunError(
            f"Cannot start the feedback pipeline: '{program}' is neither on PATH nor in {Path(sys.executable).parent}."
        )
    return [found, *args[1:]]


@dataclass
class FeedbackRun:
    """One run of the feedback pipeline: the child process and the last lines it printed."""

    category: str
    args: list[str]
    started_by: str
    started_at: datetime
    report_path: Path
    process: subprocess.Popen[str]
    lines: deque[str] = field(default_factory=lambda: deque(maxlen=LOG_LINES))
    _reader: threading.Thread | None = None

    @property
    def returncode(self) -> int | None:
        return self.process.poll()

    @property
    def running(self) -> bool:
        """True while the child runs or its last output lines are still being copied."""
        return self.returncode is None or (self._reader is not None and self._reader.is_alive())

    def log_tail(self, count: int = 200) -> list[str]:
        return list(self.lines)[-count:]

    def stop(self) -> None:
        """Ask the child to stop (SIGTERM; Kedro finishes the node it is in)."""
        if self.returncode is None:
            logger.warning("Stopping the feedback pipeline of %s (pid %d).", self.category, self.process.pid)
            self.process.terminate()

    def _copy_output(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.lines.append(line.rstrip("\n"))
        self.process.wait()
        logger.info("Feedback pipeline of %s ended with exit code %s.", self.category, self.process.returncode)

    def report(self) -> FeedbackReport:
        """The report this run wrote; one older than the run's start is refused (it would be last round's)."""
        report = read_feedback_report(self.report_path)
        if report.modified < self.started_at:
            raise FeedbackReportError(
                f"The feedback pipeline finished but did not write a new report: {self.report_path} is from "
                f"{report.modified:%Y-%m-%d %H:%M:%S} UTC, before this run started."
            )
        return report


class FeedbackRuns:
    """The feedback runs of this server process, one per category at a time (thread-safe)."""

    def __init__(self) -> None:
        self._runs: dict[str, FeedbackRun] = {}
        self._lock = threading.Lock()

    def get(self, category: str) -> FeedbackRun | None:
        with self._lock:
            return self._runs.get(category)

    def start(self, category: str, args: list[str], cwd: Path, operator: str, report_path: Path) -> FeedbackRun:
        """Start the pipeline for ``category``; refused while a run of that category is still going."""
        if not operator.strip():
            raise FeedbackRunError("Enter your name before starting the feedback pipeline.")
        command = resolve_command(args)
        with self._lock:
            current = self._runs.get(category)
            if current is not None and current.running:
                raise FeedbackRunError(
                    f"The feedback pipeline of {category} is already running (started by {current.started_by} at "
                    f"{current.started_at:%H:%M:%S} UTC)."
                )
            started_at = datetime.now(UTC).replace(microsecond=0)
            process = subprocess.Popen(
                command,
                cwd=cwd,
                stdout=subprocess.PIPE,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                bufsize=1,
                env={**os.environ, **CHILD_ENV},
            )
            run = FeedbackRun(category, command, operator.strip(), started_at, report_path, process)
            run._reader = threading.Thread(target=run._copy_output, name=f"feedback-log-{category}", daemon=True)
            run._reader.start()
            self._runs[category] = run
        logger.info("Feedback pipeline of %s started by %s: %s (pid %d).", category, operator, command, process.pid)
        return run


@dataclass(frozen=True)
class FeedbackReport:
    """The feedback pipeline's before/after numbers, and whatever else its report says."""

    path: Path
    modified: datetime
    before: dict[str, Any]
    after: dict[str, Any]
    extra: dict[str, Any]


def _metric(value: Any, where: str) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise FeedbackReportError(f"{where} must be a number or null, got {value!r}.")
    return float(value)


def read_feedback_report(path: Path) -> FeedbackReport:
    """Read and check a feedback report; every problem is a :class:`FeedbackReportError` with a clear message."""
    if not path.is_file():
        raise FeedbackReportError(
            f"No feedback report at {path}: the feedback pipeline has not run for this category yet "
            "(or it is not installed: it must write this file)."
        )
    try:
        content = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise FeedbackReportError(f"The feedback report {path} is not valid JSON: {exc}.") from exc
    if not isinstance(content, dict):
        raise FeedbackReportError(f"The feedback report {path} must be a JSON object.")
    sides: dict[str, dict[str, Any]] = {}
    for side in ("before", "after"):
        block = content.get(side)
        if not isinstance(block, dict):
            raise FeedbackReportError(f"The feedback report {path} has no '{side}' object.")
        missing = [key for key in REPORT_METRICS if key not in block]
        if missing:
            raise FeedbackReportError(f"'{side}' of the feedback report {path} lacks {', '.join(missing)}.")
        sides[side] = {**block, **{key: _metric(block[key], f"{side}.{key}") for key in REPORT_METRICS}}
    modified = datetime.fromtimestamp(path.stat().st_mtime, UTC)
    extra = {key: value for key, value in content.items() if key not in ("before", "after")}
    return FeedbackReport(path, modified, sides["before"], sides["after"], extra)


def _num(value: Any, digits: int = 3) -> str:
    return f"{value:.{digits}f}" if isinstance(value, int | float) and math.isfinite(value) else "n/a"


def describe_steps(steps: Any) -> list[str]:
    """One line per feedback step, in the operators' words: what changed in the model and why (or why not).

    Why: the before/after table says whether the held-out numbers moved, not what the run did — an operator who
    confirmed a dozen false alarms should see whether their patches joined the bank, or why they were left out.
    Reads the ``steps`` object of the report (madfh_pipeline.feedback.learning); unknown or malformed steps are
    skipped, never guessed.
    """
    if not isinstance(steps, dict):
        return []
    lines = []
    extend = steps.get("extend_bank")
    if isinstance(extend, dict):
        images, added = extend.get("images", 0), extend.get("patches_added", 0)
        if extend.get("skipped"):
            lines.append(f"Memory bank unchanged: {extend['skipped']}.")
        elif added:
            how = (
                f"judged out of fold: calibration AUROC {_num(extend.get('base_auroc'))} → {_num(extend.get('auroc'))}"
                f", smoothed {_num(extend.get('base_smoothed_auroc'), 4)} → {_num(extend.get('smoothed_auroc'), 4)}"
                if extend.get("judged")
                else str(extend.get("reason", "not judged"))
            )
            lines.append(f"Memory bank: {added} patches of {images} confirmed false alarm(s) added ({how}).")
        else:
            lines.append(
                f"Memory bank unchanged: the patches of {images} confirmed false alarm(s) were left out — "
                f"{extend.get('reason', 'no reason given')} (calibration AUROC {_num(extend.get('base_auroc'))} → "
                f"{_num(extend.get('auroc'))})."
            )
    defect = steps.get("defect_bank")
    if isinstance(defect, dict):
        if defect.get("kept") and "weight" in defect:
            lines.append(
                f"Defect bank of {defect.get('images')} confirmed defect(s) kept at weight {defect['weight']} "
                f"(out-of-fold calibration AUROC {_num(defect.get('base_auroc'))} → "
                f"{_num(defect.get('calibration_auroc'))})."
            )
        elif defect.get("kept"):
            lines.append(f"Defect bank: {defect.get('reason', 'kept')}.")
        else:
            lines.append(f"No defect bank: {defect.get('reason', 'no reason given')}.")
    threshold = steps.get("threshold")
    if isinstance(threshold, dict):
        if threshold.get("skipped"):
            lines.append(f"Image threshold unchanged: {threshold['skipped']}.")
        else:
            lines.append(
                f"Image threshold {_num(threshold.get('before'), 4)} → {_num(threshold.get('after'), 4)} "
                "(the highest that keeps the miss rate on the labelled defects within the target)."
            )
    return lines
