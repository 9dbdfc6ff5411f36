"""Upload page: new images to inspect, checked and saved where the inspection pipeline picks them up.

The app does not score them (no model inside the server): each accepted file is saved under
``<first data root>/05_model_input/uploads/<category>/`` and listed as "queued for the next inspect run" until the
knowledge base has an inspection of the same bytes.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

import pandas as pd
import streamlit as st

from madfh_pipeline.app import context
from madfh_pipeline.app.config import AppConfig
from madfh_pipeline.app.uploads import (
    ACCEPTED_SUFFIXES,
    UploadLimits,
    UploadRejectedError,
    check_upload,
    queued_uploads,
    save_upload,
    upload_folder,
)
from madfh_pipeline.feedback import KnowledgeBase, image_content_id

logger = logging.getLogger(__name__)
RESULTS_KEY = "upload-results"
GENERATION_KEY = "upload-generation"


def _uploader_key() -> str:
    return f"uploader-{st.session_state.get(GENERATION_KEY, 0)}"


def _queue(cfg: AppConfig, category: str) -> None:
    """Callback of the queue button: check and save every chosen file, then empty the uploader."""
    operator = context.operator()
    if not operator:
        context.flash("error", "Enter your name in the sidebar before uploading images.")
        return
    limits = UploadLimits.from_megabytes(cfg.upload_max_mb, cfg.upload_max_pixels)
    results = []
    for uploaded in st.session_state.get(_uploader_key()) or []:
        data = uploaded.getvalue()
        try:
            checked = check_upload(data, uploaded.name, limits)
            saved = save_upload(data, checked, upload_folder(cfg.upload_root, category))
        except UploadRejectedError as exc:
            logger.warning("Upload refused (operator %s): %s", operator, exc)
            results.append(("error", str(exc)))
            continue
        logger.info("Upload by %s queued: %s", operator, saved.path)
        state = "queued for the next inspect run" if saved.created else "was already queued (same bytes)"
        results.append(("success", f"{uploaded.name} → {saved.path.name}: {state}."))
    st.session_state[RESULTS_KEY] = results
    st.session_state[GENERATION_KEY] = st.session_state.get(GENERATION_KEY, 0) + 1


def _waiting(kb: KnowledgeBase, cfg: AppConfig, category: str) -> None:
    folder = upload_folder(cfg.upload_root, category)
    files = queued_uploads(folder)
    st.subheader("Uploaded images")
    if not files:
        st.caption(f"No upload in `{folder}`.")
        return
    rows = []
    for path in files:
        found = kb.find_inspections(image_content_id(path), category)
        status = (
            ", ".join(f"inspected: #{i.id} {i.decision} (model {i.model_version})" for i in found)
            if found
            else "queued for the next inspect run"
        )
        rows.append({"file": path.name, "size (kB)": round(path.stat().st_size / 1024, 1), "status": status})
    st.dataframe(pd.DataFrame(rows), hide_index=True, key="uploads-table")


def render() -> None:
    cfg = context.config()
    kb = context.knowledge_base(cfg)
    st.title("Upload images to inspect")
    context.show_flash()
    category = context.category()
    if category is None:
        st.info("The knowledge base has no category yet: run the inspection pipeline (`make run`) first.")
        return
    st.markdown(
        f"PNG, JPEG or TIFF, checked by content; at most **{cfg.upload_max_mb:g} MB** and "
        f"**{cfg.upload_max_pixels:,} pixels** each. Accepted files wait in "
        f"`{Path(cfg.upload_root) / category}` for the next run of the inspection pipeline; the app itself runs "
        "no model."
    )
    st.file_uploader(
        f"Images of {category}",
        type=[suffix.lstrip(".") for suffix in ACCEPTED_SUFFIXES],
        accept_multiple_files=True,
        key=_uploader_key(),
        max_upload_size=max(1, math.ceil(cfg.upload_max_mb)),
    )
    chosen = st.session_state.get(_uploader_key()) or []
    st.button(
        f"Queue {len(chosen)} image(s) for inspection",
        key="queue-uploads",
        on_click=_queue,
        args=(cfg, category),
        disabled=not chosen or not context.operator(),
        type="primary",
    )
    if not context.operator():
        st.caption("Enter your name in the sidebar to upload.")
    for kind, message in st.session_state.pop(RESULTS_KEY, []):
        (st.success if kind == "success" else st.error)(message)
    _waiting(kb, cfg, category)


render()
