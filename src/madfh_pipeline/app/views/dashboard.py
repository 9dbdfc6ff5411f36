"""Dashboard page: what the line decided, how the operators' verdicts judge it, and the feedback pipeline.

Counts and rates come from ``KnowledgeBase.stats`` (rates of *reviewed* items only, with the caveat shown next to
them); score histograms from a snapshot of the category's inspections. The feedback pipeline runs as a child process
(:mod:`madfh_pipeline.app.feedback_run`); while it runs, a fragment polls its log once a second.
"""

from __future__ import annotations

import json
import logging

import altair as alt
import pandas as pd
import streamlit as st

from madfh_pipeline.app import context
from madfh_pipeline.app.config import AppConfig
from madfh_pipeline.app.feedback_run import (
    REPORT_METRICS,
    FeedbackReport,
    FeedbackReportError,
    FeedbackRunError,
    describe_steps,
    read_feedback_report,
)
from madfh_pipeline.feedback import KnowledgeBase

logger = logging.getLogger(__name__)

FREQUENCIES = {"D": "day", "W": "week", "M": "month"}
DECISION_ORDER = ["OK", "REVIEW", "NG", "ERROR"]
DECISION_PALETTE = ["#2e7d32", "#f9a825", "#c62828", "#757575"]
RATES_CAVEAT = (
    "Rates count **reviewed** items only, and the queue serves the most uncertain items first: they describe what "
    "operators looked at, not the line's whole output. A period without reviewed items of a kind has no rate."
)


def _counts(decisions: pd.DataFrame) -> None:
    totals = decisions.groupby("decision")["count"].sum() if not decisions.empty else pd.Series(dtype=int)
    columns = st.columns(5)
    columns[0].metric("Inspections", int(totals.sum()))
    for column, decision in zip(columns[1:], DECISION_ORDER, strict=True):
        column.metric(decision, int(totals.get(decision, 0)))


def _histograms(inspections: pd.DataFrame) -> None:
    scored = inspections.dropna(subset=["score"])
    if scored.empty:
        st.caption("No scored inspection in this selection.")
        return
    colour = alt.Color("decision:N", scale=alt.Scale(domain=DECISION_ORDER, range=DECISION_PALETTE))
    bars = (
        alt.Chart(scored)
        .mark_bar(opacity=0.75)
        .encode(
            x=alt.X("score:Q", bin=alt.Bin(maxbins=40), title="anomaly score"),
            y=alt.Y("count():Q", title="inspections"),
            color=colour,
            row=alt.Row("decision:N", sort=DECISION_ORDER, title=None),
        )
        .properties(height=110)
    )
    st.altair_chart(bars, width="stretch")
    thresholds = scored.groupby("model_version")["threshold"].median().rename("median threshold")
    st.caption("Median threshold per model version: " + ", ".join(f"{v}: {t:.4g}" for v, t in thresholds.items()))


def _rates_over_time(over_time: pd.DataFrame, freq: str) -> None:
    if over_time.empty:
        st.caption("No reviewed item yet: rates appear once operators give verdicts.")
        return
    long = over_time.melt(
        id_vars=["period"], value_vars=["false_alarm_rate", "miss_rate"], var_name="rate", value_name="value"
    ).dropna(subset=["value"])
    chart = (
        alt.Chart(long)
        .mark_line(point=True)
        .encode(
            x=alt.X("period:T", title=FREQUENCIES[freq]),
            y=alt.Y("value:Q", title="rate", scale=alt.Scale(domain=[0, 1]), axis=alt.Axis(format="%")),
            color=alt.Color("rate:N", title=None),
        )
        .properties(height=220)
    )
    st.altair_chart(chart, width="stretch")


def _start(cfg: AppConfig, category: str) -> None:
    """Callback of the start button (runs before the page is drawn again)."""
    try:
        context.feedback_runs().start(
            category,
            cfg.feedback_args(category),
            cfg.project_dir,
            context.operator(),
            cfg.feedback_report_path(category),
        )
    except (FeedbackRunError, OSError) as exc:
        context.flash("error", f"The feedback pipeline did not start: {exc}")


def _report(report: FeedbackReport) -> None:
    rows = []
    for metric in REPORT_METRICS:
        before, after = report.before.get(metric), report.after.get(metric)
        change = after - before if before is not None and after is not None else None
        rows.append({"metric": metric.replace("_", " "), "before": before, "after": after, "change": change})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="feedback-report")
    st.caption(f"Report `{report.path}` written {report.modified:%Y-%m-%d %H:%M:%S} UTC.")
    changes = describe_steps(report.extra.get("steps"))
    if changes:
        st.markdown("**What the run changed**\n\n" + "\n".join(f"- {line}" for line in changes))
    if report.extra:
        with st.expander("Everything else in the report"):
            st.code(json.dumps(report.extra, indent=2, default=str), language="json")


def _feedback_pipeline(cfg: AppConfig, category: str) -> None:
    st.subheader("Feedback pipeline")
    st.markdown(
        "Turns the verdicts into the next model version (new threshold, false alarms into the memory bank, "
        f"explainer data). Command: `{' '.join(cfg.feedback_args(category))}`."
    )
    run = context.feedback_runs().get(category)
    running = run is not None and run.running
    st.button(
        "Start the feedback pipeline",
        key="start-feedback",
        on_click=_start,
        args=(cfg, category),
        disabled=running or not context.operator(),
        type="primary",
        icon=":material/model_training:",
    )
    if not context.operator():
        st.caption("Enter your name in the sidebar to start it.")

    @st.fragment(run_every=1.0 if running else None)
    def status() -> None:
        current = context.feedback_runs().get(category)
        if current is None:
            try:
                _report(_last_report(cfg, category))
            except FeedbackReportError as exc:
                st.info(str(exc))
            return
        code = current.returncode
        if current.running:
            st.info(f"Running since {current.started_at:%H:%M:%S} UTC (started by {current.started_by}) …")
        elif code == 0:
            st.success(f"Finished (started by {current.started_by} at {current.started_at:%H:%M:%S} UTC).")
        else:
            st.error(f"The feedback pipeline failed with exit code {code}; see its log below.")
        st.code("\n".join(current.log_tail()) or "(no output yet)", language="log", height=260)
        if current.running:
            st.button("Stop it", key="stop-feedback", on_click=current.stop)
        elif code == 0:
            try:
                _report(current.report())
            except FeedbackReportError as exc:
                st.error(str(exc))
        if running and not current.running:
            st.rerun(scope="app")  # stop polling: the page is drawn again without the timer

    status()


def _last_report(cfg: AppConfig, category: str) -> FeedbackReport:
    return read_feedback_report(cfg.feedback_report_path(category))


def render() -> None:
    cfg = context.config()
    kb: KnowledgeBase = context.knowledge_base(cfg)
    st.title("Dashboard")
    context.show_flash()
    category = context.category()
    if category is None:
        st.info("The knowledge base has no inspections yet: run the inspection pipeline (`make run`).")
        return
    left, right = st.columns(2)
    versions = [v.version for v in kb.list_model_versions(category)]
    version = left.selectbox("Model version", ["all", *versions], key="dashboard-version")
    freq = right.selectbox("Rates per", list(FREQUENCIES), format_func=FREQUENCIES.get, index=1, key="dashboard-freq")
    model_version = None if version == "all" else version
    stats = kb.stats(category, model_version=model_version, freq=freq)
    inspections = kb.snapshot(category).inspections
    if model_version is not None:
        inspections = inspections[inspections["model_version"] == model_version]

    _counts(stats.decisions)
    st.subheader("Scores per decision")
    _histograms(inspections)
    st.subheader("False-alarm and miss rates over time")
    st.markdown(RATES_CAVEAT)
    _rates_over_time(stats.over_time, freq)
    st.subheader("Per model version")
    if stats.per_model_version.empty:
        st.caption("No reviewed item yet.")
    else:
        st.dataframe(stats.per_model_version, hide_index=True, key="per-version")
    st.subheader("Verdicts per operator")
    if stats.operators.empty:
        st.caption("No verdict yet.")
    else:
        st.dataframe(stats.operators, hide_index=True, key="operators")
    _feedback_pipeline(cfg, category)


render()
