"""Fixtures of the review-app tests: a real knowledge base and data root per test, and the app under AppTest.

The app reads its configuration from ``MADFH_*`` variables when it is not started by ``streamlit run`` (AppTest
has no command line), so each test points them at its own files. Text similarity is switched off (loading the
MiniLM model costs seconds per test); the one test of the text path switches it on.
"""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import streamlit as st
from streamlit.testing.v1 import AppTest

sys.path.insert(0, str(Path(__file__).parent))

from app_support import MAIN, ReviewData, build_review_data  # noqa: E402


@pytest.fixture
def review_data(tmp_path: Path) -> ReviewData:
    return build_review_data(tmp_path)


@pytest.fixture
def app_env(review_data: ReviewData, monkeypatch: pytest.MonkeyPatch) -> ReviewData:
    """Point the app at the test's knowledge base; relative paths in it resolve against the test's folder."""
    monkeypatch.chdir(review_data.root)
    monkeypatch.setenv("MADFH_KB_URL", review_data.kb_url)
    monkeypatch.setenv("MADFH_DATA_ROOTS", str(review_data.data_root))
    monkeypatch.setenv("MADFH_TEXT_SEARCH", "0")
    return review_data


@pytest.fixture(autouse=True)
def _fresh_streamlit_caches() -> Iterator[None]:
    """Streamlit's caches are per process: a knowledge base or config cached by one test must not leak into the next."""
    st.cache_resource.clear()
    st.cache_data.clear()
    yield
    st.cache_resource.clear()
    st.cache_data.clear()


@pytest.fixture
def make_app() -> Callable[..., AppTest]:
    """``make_app(operator=None, page=None)``: the app, run once, with the operator name entered and a page open."""

    def make(operator: str | None = None, page: str | None = None) -> AppTest:
        at = AppTest.from_file(str(MAIN), default_timeout=60)
        at.run()
        if page is not None:
            at.switch_page(f"views/{page}.py")
            at.run()
        if operator is not None:
            at.sidebar.text_input(key="operator").input(operator)
            at.run()
        assert not at.exception, at.exception
        return at

    return make


@pytest.fixture(autouse=True)
def _restore_main_module() -> Iterator[None]:
    """AppTest runs an app script as ``__main__`` and leaves ``sys.modules["__main__"]`` pointing at it.

    Multiprocessing children (spawn, forkserver) re-run the parent's ``__main__``: without this, tests that start
    worker processes after an app test would start the review app in every worker.
    """
    saved = sys.modules["__main__"]
    yield
    sys.modules["__main__"] = saved
