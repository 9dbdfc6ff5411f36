"""Settings page: the category's defect types (add, rename, retire, restore), uncertainty band and queue samples.

Defect types live in the knowledge base (renames follow into past feedback; retired types stay on old verdicts).
The uncertainty band and the review queue's exploration share live in a JSON file next to the embedded knowledge
base, where the inspection pipeline and the queue read them (:mod:`madfh_pipeline.app.review_settings` says why a
file and what shape). Every change needs an operator name.
Writes go through callbacks, for the same reason as the verdict buttons (see ``review.py``).
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import pandas as pd
import streamlit as st

from madfh_pipeline.app import context
from madfh_pipeline.app.config import AppConfig
from madfh_pipeline.app.review_settings import (
    DEFAULT_EXPLORE_SHARE,
    MAX_BAND_STD,
    ReviewSettingsError,
    load_explore_share,
    load_review_settings,
    save_explore_share,
    save_review_band,
)
from madfh_pipeline.feedback import KnowledgeBase, KnowledgeBaseError
from madfh_pipeline.feedback.sampling import MAX_EXPLORE_SHARE

logger = logging.getLogger(__name__)


def _guarded(action: Callable[[str], str]) -> None:
    """Run a settings change for the operator in the sidebar and leave its outcome as a message."""
    operator = context.operator()
    if not operator:
        context.flash("error", "Enter your name in the sidebar before changing settings.")
        return
    try:
        message = action(operator)
    except (KnowledgeBaseError, ReviewSettingsError, ValueError) as exc:
        context.flash("error", f"Not changed: {exc}")
        return
    logger.info("Settings change by %s: %s", operator, message)
    context.flash("success", message)


def _add(kb: KnowledgeBase, category: str) -> None:
    def add(_operator: str) -> str:
        info = kb.add_defect_type(
            category, st.session_state.get("new-type-name", ""), st.session_state.get("new-type-description") or None
        )
        return f"Added defect type '{info.name}' to {category}."

    _guarded(add)


def _rename(kb: KnowledgeBase, category: str) -> None:
    def rename(_operator: str) -> str:
        old = st.session_state.get("edit-type")
        new_name = (st.session_state.get("edit-type-name") or "").strip() or None
        description = (st.session_state.get("edit-type-description") or "").strip() or None
        if not old or (new_name is None and description is None):
            raise ValueError("choose a type and give a new name or description")
        info = kb.update_defect_type(category, old, new_name=new_name, description=description)
        return f"Defect type '{old}' is now '{info.name}'" + (f": {info.description}" if description else ".")

    _guarded(rename)


def _set_active(kb: KnowledgeBase, category: str, name: str, active: bool) -> None:
    def change(_operator: str) -> str:
        if active:
            kb.restore_defect_type(category, name)
            return f"Defect type '{name}' is offered again."
        kb.retire_defect_type(category, name)
        return f"Defect type '{name}' is retired: no longer offered, kept on past verdicts."

    _guarded(change)


def _save_band(cfg: AppConfig, category: str, remove: bool) -> None:
    def save(operator: str) -> str:
        if remove:
            save_review_band(cfg.review_settings_path, category, None, operator)
            return f"{category} uses the inspection pipeline's configured REVIEW band again."
        band = float(st.session_state["band-std"])
        save_review_band(cfg.review_settings_path, category, band, operator)
        return f"REVIEW band of {category}: within {band:g} σ of the threshold."

    _guarded(save)


def _save_share(cfg: AppConfig, category: str, reset: bool) -> None:
    def save(operator: str) -> str:
        if reset:
            save_explore_share(cfg.review_settings_path, category, None, operator)
            return f"The review queue of {category} samples the default {DEFAULT_EXPLORE_SHARE:.0%} again."
        share = float(st.session_state["explore-share"]) / 100
        save_explore_share(cfg.review_settings_path, category, share, operator)
        return f"The review queue of {category} samples {share:.0%} of its places regardless of the score."

    _guarded(save)


def _defect_types(kb: KnowledgeBase, category: str) -> None:
    st.subheader(f"Defect types of {category}")
    types = kb.list_defect_types(category, include_retired=True)
    if types:
        st.dataframe(
            pd.DataFrame(
                [
                    {"name": t.name, "description": t.description, "active": t.active, "added": t.created_at}
                    for t in types
                ]
            ),
            hide_index=True,
            key="defect-types",
        )
    else:
        st.caption("No defect type yet: add the first one below.")
    disabled = not context.operator()
    add, edit, retire = st.columns(3)
    with add, st.form("add-type", clear_on_submit=True):
        st.markdown("**Add**")
        st.text_input("Name", key="new-type-name")
        st.text_input("Description", key="new-type-description")
        st.form_submit_button(
            "Add defect type", key="add-type-button", on_click=_add, args=(kb, category), disabled=disabled
        )
    with edit, st.form("edit-type-form", clear_on_submit=True):
        st.markdown("**Rename or describe**")
        st.selectbox("Type", [t.name for t in types], key="edit-type")
        st.text_input("New name", key="edit-type-name")
        st.text_input("New description", key="edit-type-description")
        st.form_submit_button(
            "Save", key="edit-type-button", on_click=_rename, args=(kb, category), disabled=disabled or not types
        )
    with retire:
        st.markdown("**Retire or restore**")
        for info in types:
            label = f"Retire '{info.name}'" if info.active else f"Restore '{info.name}'"
            st.button(
                label,
                key=f"toggle-type-{info.id}",
                on_click=_set_active,
                args=(kb, category, info.name, not info.active),
                disabled=disabled,
            )


def _save_and_undo(
    callback: Callable[..., None],
    args: tuple,
    save: tuple[str, str],
    undo: tuple[str, str],
    nothing_to_undo: bool = False,
) -> None:
    """A setting's two buttons, (key, label) each: ``callback(*args, False)`` saves, ``callback(*args, True)`` undoes."""
    left, right = st.columns(2)
    disabled = not context.operator()
    left.button(save[1], key=save[0], on_click=callback, args=(*args, False), disabled=disabled)
    right.button(undo[1], key=undo[0], on_click=callback, args=(*args, True), disabled=disabled or nothing_to_undo)


def _band(cfg: AppConfig, category: str) -> None:
    st.subheader("Uncertainty band")
    st.markdown(
        "Scores within this many **standard deviations of the validation scores** of the threshold are decided "
        "**REVIEW** by the inspection pipeline, so an operator looks at them first (0: the plain threshold). "
        "σ units, not a fraction of the threshold: detectors' scores live on unrelated scales."
    )
    try:
        band = load_review_settings(cfg.review_settings_path).get(category)
    except ReviewSettingsError as exc:
        st.error(str(exc))
        return
    st.caption(
        f"Stored in `{cfg.review_settings_path}` (read by the inspection pipeline at its next run). Now: "
        + (f"{band:g} σ." if band is not None else "not set here: the pipeline's configured review_band_std.")
    )
    st.number_input(
        "REVIEW band half-width (σ)",
        0.0,
        MAX_BAND_STD,
        value=band if band is not None else 1.0,
        step=0.25,
        key="band-std",
    )
    _save_and_undo(
        _save_band, (cfg, category), ("save-band", "Save band"), ("remove-band", "Remove band"), band is None
    )


def _samples(cfg: AppConfig, category: str) -> None:
    st.subheader("Queue samples")
    st.markdown(
        "The review queue serves the items nearest the threshold first, but this share of its places goes to items "
        "**sampled regardless of their score** (marked *sample*). The feedback pipeline checks every change to the "
        "model on the labels operators gave; labels from borderline items only made it reject changes that help "
        "the whole line (docs/performance.md, 'Feedback loop'). 0 % serves the most uncertain items only."
    )
    try:
        share = load_explore_share(cfg.review_settings_path, category)
    except ReviewSettingsError as exc:
        st.error(str(exc))
        return
    st.caption(f"Stored in `{cfg.review_settings_path}`. Now: {share:.0%} (default {DEFAULT_EXPLORE_SHARE:.0%}).")
    st.number_input(
        "Share of samples in the queue (%)",
        0,
        int(MAX_EXPLORE_SHARE * 100),
        value=int(round(share * 100)),
        step=5,
        key="explore-share",
    )
    _save_and_undo(_save_share, (cfg, category), ("save-share", "Save share"), ("reset-share", "Use the default"))


def _about(cfg: AppConfig, kb: KnowledgeBase) -> None:
    with st.expander("This app's configuration"):
        st.markdown(
            f"- Knowledge base: `{kb}`\n"
            f"- Data roots (the only folders the app reads or writes): "
            + ", ".join(f"`{root}`" for root in cfg.data_roots)
            + f"\n- Uploads go to: `{cfg.upload_root}`"
            f"\n- Upload limits: {cfg.upload_max_mb:g} MB, {cfg.upload_max_pixels:,} pixels"
            f"\n- Text similarity: {'on' if cfg.text_search else 'off'}"
            f"\n- Feedback command: `{cfg.feedback_command}`"
        )


def render() -> None:
    cfg = context.config()
    kb = context.knowledge_base(cfg)
    st.title("Settings")
    context.show_flash()
    category = context.category()
    if category is None:
        st.info("The knowledge base has no inspections yet: run the inspection pipeline (`make run`).")
    else:
        if not context.operator():
            st.warning("Enter your name in the sidebar to change settings.")
        _defect_types(kb, category)
        _band(cfg, category)
        _samples(cfg, category)
    _about(cfg, kb)


render()
