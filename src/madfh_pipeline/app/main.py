"""Entry point of the review app: ``streamlit run src/madfh_pipeline/app/main.py -- --kb-url URL --data-root DIR``.

Draws what every page shares (operator name and category in the sidebar), then runs the page the URL names. The
pages are scripts in ``views/``; their non-UI logic lives in the modules of this package.
"""

from __future__ import annotations

import logging
from pathlib import Path

import streamlit as st

from madfh_pipeline.app import context
from madfh_pipeline.app.config import ConfigError
from madfh_pipeline.feedback import KnowledgeBaseError

logger = logging.getLogger(__name__)
VIEWS = Path(__file__).resolve().parent / "views"

st.set_page_config(page_title="MAD-FH review", page_icon=":material/fact_check:", layout="wide")

try:
    cfg = context.config()
    kb = context.knowledge_base(cfg)
    known_categories = context.categories(cfg)
except (ConfigError, KnowledgeBaseError, FileNotFoundError) as exc:
    logger.error("The review app cannot start: %s", exc)
    st.error(f"The review app cannot start: {exc}")
    st.stop()

with st.sidebar:
    st.text_input(
        "Operator", key=context.OPERATOR_KEY, placeholder="your name", help="Stored with every verdict you give."
    )
    if not context.operator():
        st.warning("Enter your name to give verdicts or change settings.")
    if known_categories:
        if st.session_state.get(context.CATEGORY_KEY) not in known_categories:
            st.session_state[context.CATEGORY_KEY] = known_categories[0]
        st.selectbox("Category", known_categories, key=context.CATEGORY_KEY)
    else:
        st.session_state.pop(context.CATEGORY_KEY, None)
        st.info("The knowledge base has no inspections yet: run the inspection pipeline (`make run`).")
    st.caption(f"Knowledge base: `{kb.url.render_as_string(hide_password=True)}`")

pages = [
    st.Page(VIEWS / "review.py", title="Review queue", icon=":material/checklist:", default=True),
    st.Page(VIEWS / "dashboard.py", title="Dashboard", icon=":material/monitoring:", url_path="dashboard"),
    st.Page(VIEWS / "settings.py", title="Settings", icon=":material/tune:", url_path="settings"),
    st.Page(VIEWS / "upload.py", title="Upload images", icon=":material/upload:", url_path="upload"),
]
st.navigation(pages).run()
