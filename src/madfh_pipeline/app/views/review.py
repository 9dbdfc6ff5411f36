"""Review queue page: the items the detector doubts most, one at a time, answered in two clicks.

Verdict buttons write through ``on_click`` callbacks whose arguments (inspection id, action, next item) are bound
when the button is drawn. That is what the original prototype got wrong: a button read with ``if st.button(...)``
only fires if the very same button is drawn again on the next run, and a queue that changed in between (another
operator's verdict removes the item) swallowed the click. A callback records the verdict on the item the operator
saw, whatever the queue looks like afterwards.
"""

from __future__ import annotations

import logging
from datetime import UTC, datetime, time, timedelta
from pathlib import Path

import pandas as pd
import streamlit as st

from madfh_pipeline.app import context
from madfh_pipeline.app.files import PathNotAllowedError, UnsupportedMapError
from madfh_pipeline.app.regions import RegionError, polygons_from_canvas
from madfh_pipeline.app.review_settings import ReviewSettingsError, load_explore_share
from madfh_pipeline.feedback import (
    ACTIONS,
    Case,
    InspectionInfo,
    KnowledgeBase,
    KnowledgeBaseError,
    QueueItem,
    TextModelUnavailableError,
    valid_actions,
)

logger = logging.getLogger(__name__)

QUEUE_LIMIT = 200
PICKER_KEY = "item-picker"
NO_DEFECT_TYPE = "(none)"
#: Button label and keyboard shortcut of each action (Streamlit 1.67 buttons take ``shortcut=`` natively; the keys
#: C and R are reserved by Streamlit). Single keys fire only while no text field has the focus.
ACTION_LABELS = {
    "confirm_defect": ("Confirm defect", "D"),
    "false_alarm": ("False alarm", "F"),
    "missed_defect": ("Missed defect", "M"),
    "confirm_ok": ("Confirm OK", "O"),
}
STATUS_LABELS = {
    "unreviewed": "Not reviewed yet",
    "disputed": "Disputed (tied verdicts)",
    "conflict": "Operators disagree",
    "reviewed": "Reviewed",
    "all": "All",
}
DECISION_COLOURS = {"REVIEW": "orange", "NG": "red", "OK": "green", "ERROR": "gray"}
CANVAS_WIDTH = 640


def _describe(item: QueueItem) -> str:
    inspection = item.inspection
    margin = f"{item.margin:.1%}" if item.margin is not None else "n/a"
    name = Path(inspection.image_path).name
    sample = " · sample" if item.exploration else ""
    return f"#{inspection.id} · {inspection.decision} · {margin} from threshold{sample} · {name}"


def _record(kb: KnowledgeBase, inspection_id: int, action: str, next_id: int | None) -> None:
    """Callback of a verdict button: store the verdict, then move on to the next item of the queue."""
    operator = context.operator()
    if not operator:
        context.flash("error", "Enter your name in the sidebar before giving a verdict.")
        return
    defect = st.session_state.get(f"defect-{inspection_id}")
    defect = None if defect in (None, NO_DEFECT_TYPE) else str(defect)
    polygons = st.session_state.get(f"polygons-{inspection_id}")
    if ACTIONS[action] == "OK" and (defect or polygons):
        context.flash(
            "error",
            f"'{ACTION_LABELS[action][0]}' says the part is good: clear the defect type and the drawn region first.",
        )
        return
    try:
        feedback = kb.record_feedback(
            inspection_id,
            action=action,
            operator=operator,
            confidence=int(st.session_state.get(f"confidence-{inspection_id}", 3)),
            defect_type=defect,
            description=st.session_state.get(f"description-{inspection_id}") or None,
            region_polygon=polygons,
            session=context.session_name(),
        )
        case = kb.case(inspection_id)
    except KnowledgeBaseError as exc:
        context.flash("error", f"Not saved: {exc}")
        return
    message = f"Saved: {feedback.outcome.replace('_', ' ')} on #{inspection_id} by {operator}."
    others = sorted({f.operator for f in case.feedback} - {operator})
    if case.resolution.conflict:
        context.flash("warning", f"{message} Operators disagree on this image ({', '.join(others)} judged it too).")
    else:
        context.flash("success", message)
    if next_id is None:
        st.session_state.pop(PICKER_KEY, None)
    else:
        st.session_state[PICKER_KEY] = next_id
    st.session_state.pop(f"polygons-{inspection_id}", None)


def _filters(kb: KnowledgeBase, category: str) -> dict:
    columns = st.columns([2, 1, 1, 1, 1])
    decisions = columns[0].multiselect(
        "Decision", ["REVIEW", "NG", "OK"], default=["REVIEW", "NG", "OK"], key="filter-decisions"
    )
    versions = [v.version for v in kb.list_model_versions(category)]
    version = columns[1].selectbox("Model version", ["all", *versions], key="filter-version")
    status = columns[2].selectbox("Show", list(STATUS_LABELS), format_func=STATUS_LABELS.get, key="filter-status")
    since = columns[3].date_input("Inspected from", value=None, key="filter-since")
    until = columns[4].date_input("Inspected until", value=None, key="filter-until")
    return {
        "decisions": decisions,
        "model_version": None if version == "all" else version,
        "status": status,
        "since": datetime.combine(since, time(), UTC) if since else None,
        "until": datetime.combine(until, time(), UTC) + timedelta(days=1) if until else None,
    }


def _queue_table(items: list[QueueItem]) -> pd.DataFrame:
    return pd.DataFrame(
        [
            {
                "item": item.inspection.id,
                "why": "sample" if item.exploration else "uncertain",
                "decision": item.inspection.decision,
                "score": item.inspection.score,
                "threshold": item.inspection.threshold,
                "from threshold": None if item.margin is None else 100 * item.margin,
                "model": item.inspection.model_version,
                "inspected": item.inspection.inspected_at,
                "verdicts": item.resolution.n_feedback,
                "image": Path(item.inspection.image_path).name,
            }
            for item in items
        ]
    )


@st.fragment
def _picture(cfg, inspection: InspectionInfo) -> None:
    """Image, heat map and region canvas: a fragment, so moving the opacity slider redraws only this part."""
    opacity = st.slider("Heat-map opacity", 0.0, 1.0, 0.45, 0.05, key="opacity")
    try:
        pictures = context.pictures(cfg, inspection)
    except PathNotAllowedError as exc:
        st.error(str(exc))
        return
    except (OSError, UnsupportedMapError) as exc:
        st.error(f"Cannot show the image or its map: {exc}")
        return
    st.image(
        pictures.blended(opacity), caption=f"{Path(inspection.image_path).name} with its anomaly map", width="stretch"
    )
    if pictures.map_note:
        st.caption(pictures.map_note)
    if st.toggle("Mark the defect region", key=f"draw-{inspection.id}"):
        _region_canvas(inspection, pictures)


def _region_canvas(inspection: InspectionInfo, pictures: context.Pictures) -> None:
    from PIL import Image
    from streamlit_drawable_canvas import st_canvas

    mode = st.radio(
        "Shape",
        ["rect", "polygon"],
        horizontal=True,
        key=f"shape-{inspection.id}",
        format_func={"rect": "Rectangle", "polygon": "Polygon (click points, click the first to close)"}.get,
    )
    height, width = pictures.image.shape[:2]
    canvas_height = max(1, round(CANVAS_WIDTH * height / width))
    result = st_canvas(
        fill_color="rgba(255, 0, 0, 0.25)",
        stroke_color="#ff0000",
        stroke_width=2,
        background_image=Image.fromarray(pictures.image),
        width=CANVAS_WIDTH,
        height=canvas_height,
        drawing_mode=mode,
        key=f"canvas-{inspection.id}",
    )
    try:
        polygons = polygons_from_canvas(result.json_data, (CANVAS_WIDTH, canvas_height), pictures.original_size)
    except RegionError as exc:
        st.error(str(exc))
        polygons = None
    st.session_state[f"polygons-{inspection.id}"] = polygons
    st.caption(f"{len(polygons or [])} region(s) will be stored with a defect verdict.")


def _verdict_form(kb: KnowledgeBase, inspection: InspectionInfo, next_id: int | None) -> None:
    operator = context.operator()
    actions = valid_actions(inspection.decision)
    types = [t.name for t in kb.list_defect_types(inspection.category)]
    with st.form(f"verdict-{inspection.id}", border=True):
        st.selectbox("Defect type (for a defect)", [NO_DEFECT_TYPE, *types], key=f"defect-{inspection.id}")
        st.text_area(
            "Description",
            key=f"description-{inspection.id}",
            height=80,
            placeholder="what you see, e.g. 'reflection on the rim'",
        )
        st.select_slider("Confidence", options=[1, 2, 3, 4, 5], value=4, key=f"confidence-{inspection.id}")
        columns = st.columns(len(actions))
        for column, action in zip(columns, actions, strict=True):
            label, shortcut = ACTION_LABELS[action]
            column.form_submit_button(
                label,
                key=f"action-{action}",
                on_click=_record,
                args=(kb, inspection.id, action, next_id),
                shortcut=shortcut,
                disabled=not operator,
                type="primary" if action in ("false_alarm", "missed_defect") else "secondary",
                width="stretch",
            )
    if not operator:
        st.caption("Verdict buttons are off until you enter your name in the sidebar.")


def _verdicts(case: Case) -> None:
    resolution = case.resolution
    if not case.feedback:
        st.caption("No verdict on this image yet.")
        return
    label = resolution.label or "none (disputed: needs another operator)"
    st.markdown(
        f"**Verdicts on this image** — label **{label}**, {resolution.votes_ng} NG / {resolution.votes_ok} OK vote(s)"
        + (" — :orange[operators disagree]" if resolution.conflict else "")
    )
    st.dataframe(
        pd.DataFrame(
            [
                {
                    "operator": f.operator,
                    "verdict": f.verdict,
                    "outcome": f.outcome.replace("_", " "),
                    "defect type": f.defect_type,
                    "confidence": f.confidence,
                    "description": f.description,
                    "region": "yes" if f.region_polygon else "",
                    "at": f.created_at,
                }
                for f in case.feedback
            ]
        ),
        hide_index=True,
        key=f"verdicts-{case.inspection.id}",
    )


def _similar(cfg, kb: KnowledgeBase, inspection: InspectionInfo) -> None:
    st.subheader("Similar past cases")
    by_image, by_text = st.columns(2)
    with by_image:
        st.markdown("**By image**")
        if inspection.embedding_space is None:
            st.caption("This inspection has no stored image embedding.")
        else:
            _similar_list(cfg, kb.similar_images(category=inspection.category, inspection_id=inspection.id, k=4))
    with by_text:
        st.markdown("**By explanation text**")
        if not cfg.text_search:
            st.info("Text similarity is switched off (--no-text-search / MADFH_TEXT_SEARCH=0).")
        elif not inspection.explanation:
            st.caption("This inspection has no explanation to search with.")
        else:
            try:
                hits = kb.similar_texts(inspection.explanation, category=inspection.category, k=4)
            except TextModelUnavailableError as exc:
                st.info(f"Text similarity is not available: {exc}")
            else:
                _similar_list(cfg, hits)


def _similar_list(cfg, hits: list) -> None:
    if not hits:
        st.caption("No reviewed case is similar yet.")
        return
    for hit in hits:
        case = hit.case
        outcomes = ", ".join(sorted({f.outcome.replace("_", " ") for f in case.feedback})) or "no verdict"
        thumb, text = st.columns([1, 2])
        try:
            thumb.image(context.pictures(cfg, case.inspection, context.THUMBNAIL_SIDE).image, width="stretch")
        except (PathNotAllowedError, OSError, UnsupportedMapError) as exc:
            thumb.caption(f"(image not shown: {exc})")
        label = case.resolution.label or "disputed"
        defect = f" ({case.resolution.defect_type})" if case.resolution.defect_type else ""
        text.markdown(
            f"#{case.inspection.id} · similarity {hit.similarity:.2f} · label **{label}**{defect}  \n"
            f"{case.inspection.decision}, score {case.inspection.score:.4g} · {outcomes}"
        )
        if hit.matched_text:
            text.caption(f"“{hit.matched_text}”")


def _item(cfg, kb: KnowledgeBase, inspection_id: int, next_id: int | None) -> None:
    case = kb.case(inspection_id)
    inspection = case.inspection
    left, right = st.columns([3, 2], gap="large")
    with left:
        _picture(cfg, inspection)
    with right:
        colour = DECISION_COLOURS.get(inspection.decision, "gray")
        st.markdown(f"### Item #{inspection.id} · :{colour}[{inspection.decision}]")
        if inspection.score is not None and inspection.threshold is not None:
            above = inspection.score - inspection.threshold
            st.metric(
                "Anomaly score",
                f"{inspection.score:.4g}",
                delta=f"{above:+.3g} vs threshold {inspection.threshold:.4g}",
                delta_color="inverse",
            )
            if inspection.margin is not None:
                st.caption(f"{inspection.margin:.1%} of the threshold away from it.")
        st.caption(
            f"Model {inspection.model_version} · inspected {inspection.inspected_at:%Y-%m-%d %H:%M} UTC · "
            f"`{inspection.image_path}`"
        )
        if inspection.explanation:
            st.markdown("**Explanation**")
            st.info(inspection.explanation)
        else:
            st.caption("No explanation was generated for this item.")
        _verdict_form(kb, inspection, next_id)
        _verdicts(case)
    _similar(cfg, kb, inspection)


def render() -> None:
    cfg = context.config()
    kb = context.knowledge_base(cfg)
    st.title("Review queue")
    context.show_flash()
    category = context.category()
    if category is None:
        st.info("Nothing to review: the knowledge base has no inspections yet.")
        return
    filters = _filters(kb, category)
    if not filters["decisions"]:
        st.warning("Choose at least one decision to list.")
        return
    try:
        share = load_explore_share(cfg.review_settings_path, category)
    except ReviewSettingsError as exc:
        st.error(f"{exc} The queue is served without samples until the Settings page stores a valid share.")
        share = 0.0
    items = kb.review_queue(category, limit=QUEUE_LIMIT, explore_share=share, **filters)
    ids = [item.inspection.id for item in items]
    order = "REVIEW first, then closest to the threshold"
    if share > 0 and filters["status"] == "unreviewed":
        order += (
            f"; {share:.0%} of the places are *samples* taken regardless of the score, so the feedback pipeline "
            "learns from representative labels, not only from borderline ones"
        )
    st.caption(
        f"{len(items)} item(s) of {category}{' (first ' + str(QUEUE_LIMIT) + ')' if len(items) == QUEUE_LIMIT else ''}"
        f" — {order}."
    )
    if not items:
        st.success("The queue is empty for these filters.")
        return
    with st.expander("Queue", expanded=True):
        st.dataframe(
            _queue_table(items),
            hide_index=True,
            key="queue-table",
            column_config={"from threshold": st.column_config.NumberColumn(format="%.1f %%")},
        )
    if st.session_state.get(PICKER_KEY) not in ids:
        st.session_state[PICKER_KEY] = ids[0]
    current = st.selectbox("Item", ids, key=PICKER_KEY, format_func=lambda i: _describe(items[ids.index(i)]))
    position = ids.index(current)
    neighbours = ids[position + 1 : position + 2] or ids[max(position - 1, 0) : position]
    next_id = neighbours[0] if neighbours else None
    try:
        _item(cfg, kb, current, next_id)
    except KnowledgeBaseError as exc:
        st.error(f"Cannot show item #{current}: {exc}")


render()
