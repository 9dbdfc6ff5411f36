"""The operators' review app: a Streamlit front end on the knowledge base (``madfh_pipeline.feedback``).

Start it with ``make ui`` or::

    streamlit run src/madfh_pipeline/app/main.py -- --kb-url URL --data-root DIR [--data-root DIR ...]

The app talks to :class:`~madfh_pipeline.feedback.KnowledgeBase` only: no Kedro session, no model, no worker pool
lives in the long-running server process (DESIGN.md §5). Everything that is not drawing widgets (configuration,
file access inside the data roots, uploads, heat-map overlays, the feedback-pipeline subprocess, settings storage)
is in plain modules next to ``main.py`` so it can be tested without a browser. See ``docs/review_app.md``.
"""
