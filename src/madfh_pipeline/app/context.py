"""What every page of the app shares: the configuration, the knowledge base, the sidebar and cached pictures.

Streamlit re-runs a page's script on every click, so anything costly lives in caches: one
:class:`~madfh_pipeline.feedback.KnowledgeBase` per URL and server process (it is thread-safe; each browser session
runs in its own thread), and the decoded image and anomaly map of an item at display size (blending them at another
opacity is cheap). Widget values shared by the pages (operator name, category) live in ``st.session_state`` under the
keys below; the sidebar that sets them is drawn by ``main.py`` before the page runs.
"""

from __future__ import annotations

import logging
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import streamlit as st
from sqlalchemy.engine import make_url

from madfh_pipeline.app.config import AppConfig, load_config
from madfh_pipeline.app.feedback_run import FeedbackRuns
from madfh_pipeline.app.files import confine, fit_to, load_image, load_map, overlay, scale_map
from madfh_pipeline.feedback import InspectionInfo, KnowledgeBase

logger = logging.getLogger(__name__)

MAIN_SCRIPT = Path(__file__).resolve().parent / "main.py"
OPERATOR_KEY = "operator"
CATEGORY_KEY = "category"
FLASH_KEY = "flash"
#: Longer image side shown in the item view (a 2448 x 2048 photo is scaled down for the browser).
DISPLAY_SIDE = 1024
THUMBNAIL_SIDE = 256


def script_args() -> list[str]:
    """The flags after ``--`` of ``streamlit run main.py -- ...``; none when another program (a test) runs the app."""
    if sys.argv and Path(sys.argv[0]).resolve() == MAIN_SCRIPT:
        return sys.argv[1:]
    return []


@st.cache_resource(show_spinner=False)
def _config(argv: tuple[str, ...], environ: tuple[tuple[str, str], ...], cwd: str) -> AppConfig:
    return load_config(list(argv), dict(environ), Path(cwd))


def config() -> AppConfig:
    """The app's configuration (flags win over ``MADFH_*`` variables); cached per distinct input."""
    environ = tuple(sorted((k, v) for k, v in os.environ.items() if k.startswith("MADFH_")))
    return _config(tuple(script_args()), environ, str(Path.cwd()))


@st.cache_resource(show_spinner=False)
def _knowledge_base(url: str) -> KnowledgeBase:
    parsed = make_url(url)
    if parsed.get_backend_name() == "sqlite":
        path = Path(parsed.database or "")
        if not path.is_file():
            raise FileNotFoundError(
                f"No knowledge base file at {path.resolve()}: the inspection pipeline creates it (run `make run` "
                "first), or fix --kb-url."
            )
    return KnowledgeBase(url)


def knowledge_base(cfg: AppConfig) -> KnowledgeBase:
    """The shared knowledge base of ``cfg``. A missing SQLite file is an error: the app never creates one."""
    return _knowledge_base(cfg.kb_url)


def feedback_runs() -> FeedbackRuns:
    """The feedback-pipeline runs of this server process (shared by all sessions)."""
    return _feedback_runs()


@st.cache_resource(show_spinner=False)
def _feedback_runs() -> FeedbackRuns:
    return FeedbackRuns()


def operator() -> str:
    """The operator name from the sidebar, trimmed ('' when none was entered)."""
    return str(st.session_state.get(OPERATOR_KEY) or "").strip()


def category() -> str | None:
    """The category picked in the sidebar (None while the knowledge base has none)."""
    value = st.session_state.get(CATEGORY_KEY)
    return str(value) if value else None


def session_name() -> str | None:
    """A short id of this browser session, stored with each verdict (which verdicts came from one sitting)."""
    from streamlit.runtime.scriptrunner import get_script_run_ctx

    ctx = get_script_run_ctx()
    return f"review-app:{ctx.session_id[:12]}" if ctx is not None else None


def categories(cfg: AppConfig) -> list[str]:
    """Categories that have inspections in the knowledge base (it has no category table); cached for 30 s, since
    every page run asks and a new category only appears when a pipeline first inspects it."""
    return _categories(cfg.kb_url)


@st.cache_data(ttl=30, show_spinner=False)
def _categories(url: str) -> list[str]:
    decisions = _knowledge_base(url).stats().decisions
    return sorted(decisions["category"].unique().tolist()) if not decisions.empty else []


def flash(kind: str, message: str) -> None:
    """Keep a message for the next run of the page (callbacks run before the page is drawn again)."""
    st.session_state[FLASH_KEY] = (kind, message)


def show_flash() -> None:
    """Show (once) the message a callback left."""
    kind, message = st.session_state.pop(FLASH_KEY, (None, None))
    if kind == "success":
        st.success(message)
    elif kind == "warning":
        st.warning(message)
    elif kind == "error":
        st.error(message)


@dataclass(frozen=True)
class Pictures:
    """An item's image at display size and, if it has a map, the map scaled to [0, 1] at the same size."""

    image: np.ndarray
    scaled_map: np.ndarray | None
    map_note: str | None
    original_size: tuple[int, int]  # (width, height) of the file, for converting drawn regions to image pixels

    def blended(self, opacity: float) -> np.ndarray:
        return self.image if self.scaled_map is None else overlay(self.image, self.scaled_map, opacity)


@st.cache_data(show_spinner=False, max_entries=64)
def _pictures(
    image_path: str,
    image_mtime: float,
    map_path: str | None,
    map_mtime: float | None,
    threshold: float | None,
    max_side: int,
) -> Pictures:
    del image_mtime, map_mtime  # only part of the cache key: a rewritten file is read again
    image = load_image(Path(image_path))
    height, width = image.shape[:2]
    shown = fit_to(image, max_side)
    if map_path is None:
        return Pictures(shown, None, "This inspection has no anomaly map.", (width, height))
    anomaly_map = load_map(Path(map_path))
    scaled = cv2.resize(
        scale_map(anomaly_map, threshold), (shown.shape[1], shown.shape[0]), interpolation=cv2.INTER_LINEAR
    )
    note = None if anomaly_map.scores else "The map is a picture (not in score units): shown as stored."
    return Pictures(shown, scaled, note, (width, height))


def pictures(cfg: AppConfig, inspection: InspectionInfo, max_side: int = DISPLAY_SIDE) -> Pictures:
    """The item's image and map, both confined to the data roots (:class:`PathNotAllowedError` otherwise)."""
    image_path = confine(inspection.image_path, cfg.data_roots, cfg.project_dir)
    map_path = confine(inspection.map_path, cfg.data_roots, cfg.project_dir) if inspection.map_path else None
    return _pictures(
        str(image_path),
        image_path.stat().st_mtime,
        str(map_path) if map_path else None,
        map_path.stat().st_mtime if map_path else None,
        inspection.threshold,
        max_side,
    )
