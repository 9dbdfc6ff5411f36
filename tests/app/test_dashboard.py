"""The dashboard page under AppTest: counts, charts, rates, and the feedback pipeline as a real child process."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from app_support import CATEGORY, ReviewData
from streamlit.testing.v1 import AppTest

from madfh_pipeline.feedback import KnowledgeBase

#: A stand-in for the lead's feedback pipeline: prints log lines, then writes the report (or fails, or writes none).
FAKE_PIPELINE = """
import json, sys, time
category, report, mode = sys.argv[1], sys.argv[2], sys.argv[3]
for step in ("read knowledge-base snapshot", "recalibrate threshold", "evaluate"):
    print(f"[{category}] {step}", flush=True)
    time.sleep(0.05)
if mode == "fail":
    print("boom", flush=True)
    sys.exit(3)
if mode == "ok":
    from pathlib import Path
    Path(report).parent.mkdir(parents=True, exist_ok=True)
    Path(report).write_text(json.dumps({
        "category": category, "recall": 0.95, "n_feedback": 12,
        "before": {"false_alarm_rate": 0.4, "image_auroc": 0.81, "threshold": 10.0},
        "after": {"false_alarm_rate": 0.25, "image_auroc": 0.84, "threshold": 11.5},
        "steps": {
            "extend_bank": {"images": 4, "judged": True, "base_auroc": 0.8, "auroc": 0.85,
                            "base_smoothed_auroc": 0.75, "smoothed_auroc": 0.79, "patches_added": 120},
            "defect_bank": {"images": 3, "kept": False, "reason": "no weight improved the calibration labels"},
            "threshold": {"before": 10.0, "after": 11.5},
        },
    }))
"""


def _metrics(at: AppTest) -> dict[str, str]:
    return {m.label: m.value for m in at.metric}


def _messages(at: AppTest) -> str:
    return "\n".join(str(p.value) for p in [*at.error, *at.warning, *at.success, *at.info])


def test_dashboard_with_data(make_app: Callable, app_env: ReviewData) -> None:
    with app_env.kb() as kb:  # one false alarm and one missed defect, so the rates have something to show
        kb.record_feedback(app_env.ids["001_regular"], action="false_alarm", operator="anna", confidence=4)
        kb.record_feedback(app_env.ids["004_regular"], action="missed_defect", operator="ben", confidence=3)
    at = make_app(page="dashboard")
    assert not at.exception and not at.error
    assert _metrics(at) == {"Inspections": "7", "OK": "2", "REVIEW": "1", "NG": "4", "ERROR": "0"}
    charts = at.get("vega_lite_chart")
    assert len(charts) == 2, "score histograms per decision and rates over time"
    assert "Rates count **reviewed** items only" in "\n".join(m.value for m in at.markdown)
    per_version = next(f.value for f in at.dataframe if "false_alarm_rate" in f.value.columns)
    v1 = per_version.set_index("model_version").loc["v1"]
    # Reviewed under v1: bob's confirmed defect, anna's false alarm (both flagged), ben's missed defect (OK item).
    assert (v1["flagged_reviewed"], v1["false_alarms"], v1["ok_reviewed"], v1["missed_defects"]) == (2, 1, 1, 1)
    assert v1["false_alarm_rate"] == pytest.approx(0.5) and v1["miss_rate"] == pytest.approx(1.0)
    operators = next(f.value for f in at.dataframe if "operator" in f.value.columns)
    assert sorted(operators["operator"]) == ["anna", "ben", "bob"]
    assert "No feedback report" in _messages(at)

    at.selectbox(key="dashboard-version").set_value("v2").run()
    assert _metrics(at)["Inspections"] == "1"
    assert not at.exception


def test_dashboard_with_an_empty_knowledge_base(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    data_root = tmp_path / "data"
    KnowledgeBase.embedded(data_root / "kb.sqlite").close()
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MADFH_KB_URL", f"sqlite:///{data_root / 'kb.sqlite'}")
    monkeypatch.setenv("MADFH_DATA_ROOTS", str(data_root))
    from app_support import MAIN

    at = AppTest.from_file(str(MAIN), default_timeout=30).run()
    assert "no inspections yet" in "\n".join(i.value for i in at.sidebar.info)
    for page in ("dashboard", "review", "settings", "upload"):
        at.switch_page(f"views/{page}.py").run()
        assert not at.exception and not at.error, page
        assert "no inspections yet" in _messages(at).lower() or "no category yet" in _messages(at).lower(), page


def _fake_pipeline(app_env: ReviewData, monkeypatch: pytest.MonkeyPatch, mode: str) -> Path:
    script = app_env.root / "fake_feedback.py"
    script.write_text(FAKE_PIPELINE)
    report = app_env.data_root / "08_reporting" / CATEGORY / "feedback" / "report.json"
    monkeypatch.setenv("MADFH_FEEDBACK_COMMAND", f"{sys.executable} {script} {{category}} {report} {mode}")
    return report


def _start_and_wait(at: AppTest) -> None:
    at.button(key="start-feedback").click().run()
    from madfh_pipeline.app.context import feedback_runs

    run = feedback_runs().get(CATEGORY)
    assert run is not None, _messages(at)
    deadline = time.monotonic() + 30
    while run.running and time.monotonic() < deadline:
        time.sleep(0.05)
    assert not run.running
    at.run()


def test_feedback_pipeline_runs_streams_its_log_and_shows_before_and_after(
    make_app: Callable, app_env: ReviewData, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_pipeline(app_env, monkeypatch, "ok")
    at = make_app(page="dashboard")
    assert at.button(key="start-feedback").disabled  # no operator yet
    at = make_app(operator="anna", page="dashboard")
    _start_and_wait(at)
    assert "Finished (started by anna" in _messages(at)
    log = next(c.value for c in at.code if "recalibrate threshold" in c.value)
    assert log.splitlines()[0] == f"[{CATEGORY}] read knowledge-base snapshot"
    report = next(f.value for f in at.dataframe if "before" in f.value.columns).set_index("metric")
    assert report.loc["false alarm rate", "before"] == 0.4 and report.loc["false alarm rate", "after"] == 0.25
    assert report.loc["threshold", "change"] == pytest.approx(1.5)
    assert report.loc["image auroc", "after"] == 0.84
    changes = next(m.value for m in at.markdown if "What the run changed" in m.value)
    assert "Memory bank: 120 patches of 4 confirmed false alarm(s) added" in changes
    assert "calibration AUROC 0.800 → 0.850" in changes
    assert "No defect bank: no weight improved the calibration labels." in changes
    assert "Image threshold 10.0000 → 11.5000" in changes


def test_feedback_pipeline_failure_and_missing_report_are_reported(
    make_app: Callable, app_env: ReviewData, monkeypatch: pytest.MonkeyPatch
) -> None:
    _fake_pipeline(app_env, monkeypatch, "fail")
    at = make_app(operator="anna", page="dashboard")
    _start_and_wait(at)
    assert "failed with exit code 3" in _messages(at)
    assert any("boom" in c.value for c in at.code)

    _fake_pipeline(app_env, monkeypatch, "silent")  # succeeds but writes no report
    at = make_app(operator="anna", page="dashboard")
    _start_and_wait(at)
    assert "No feedback report at" in _messages(at)


def test_feedback_command_that_does_not_exist_is_a_clear_error(
    make_app: Callable, app_env: ReviewData, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("MADFH_FEEDBACK_COMMAND", "no-such-program-madfh run {category}")
    at = make_app(operator="anna", page="dashboard")
    at.button(key="start-feedback").click().run()
    assert "did not start" in _messages(at) and "no-such-program-madfh" in _messages(at)


def test_report_shape_errors(tmp_path: Path) -> None:
    from madfh_pipeline.app.feedback_run import FeedbackReportError, read_feedback_report

    path = tmp_path / "report.json"
    for content, message in [
        ("not json", "not valid JSON"),
        ("[]", "JSON object"),
        (json.dumps({"before": {}}), "'before' of the feedback report"),
        (json.dumps({"before": {"false_alarm_rate": 1, "image_auroc": 1, "threshold": 1}}), "no 'after'"),
        (
            json.dumps(
                {
                    "before": {"false_alarm_rate": "x", "image_auroc": 1, "threshold": 1},
                    "after": {"false_alarm_rate": 1, "image_auroc": 1, "threshold": 1},
                }
            ),
            "before.false_alarm_rate must be a number",
        ),
    ]:
        path.write_text(content)
        with pytest.raises(FeedbackReportError, match=message):
            read_feedback_report(path)
    path.write_text(
        json.dumps(
            {
                "before": {"false_alarm_rate": None, "image_auroc": 0.8, "threshold": 1, "model_version": "3"},
                "after": {"false_alarm_rate": 0.1, "image_auroc": 0.9, "threshold": 2},
                "recall": 0.95,
            }
        )
    )
    report = read_feedback_report(path)
    assert report.before["false_alarm_rate"] is None and report.before["model_version"] == "3"
    assert report.extra == {"recall": 0.95}
