"""Fixtures of the knowledge-base tests: one real database per test, on SQLite and on PostgreSQL.

Every test that takes ``kb`` or ``kb_url`` runs twice: against a SQLite file in ``tmp_path`` (a copy of a file
migrated once per session) and against a real PostgreSQL server, in a schema migrated once per session by the explicit
server path and emptied before each test; tests of the schema itself get a fresh schema of their own. The server comes from ``MADFH_TEST_POSTGRES_URL`` (``.ci/postgres.sh`` starts one
and sets it); without it the PostgreSQL variants skip locally and fail under CI (``CI`` set), so CI can never pass
while silently skipping them.
"""

from __future__ import annotations

import os
import shutil
import sys
import uuid
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
import sqlalchemy as sa

# Builders and the worker functions of the multi-process tests live in kb_support.py next to this file; child
# processes find it through the sys.path that multiprocessing hands them.
sys.path.insert(0, str(Path(__file__).parent))

from kb_support import CATEGORY, MODEL, inspection_fields  # noqa: E402

from madfh_pipeline.feedback import KnowledgeBase  # noqa: E402
from madfh_pipeline.feedback.database import create_kb_engine, upgrade  # noqa: E402
from madfh_pipeline.feedback.records import RecordedInspection  # noqa: E402

POSTGRES_VARIABLE = "MADFH_TEST_POSTGRES_URL"
KB_TABLES = ("text_embeddings", "feedback", "inspections", "defect_types", "model_versions")


def _postgres_server_url() -> str:
    url = os.environ.get(POSTGRES_VARIABLE)
    if url:
        return url
    if os.environ.get("CI"):
        pytest.fail(f"{POSTGRES_VARIABLE} is not set under CI: run the tests through .ci/postgres.sh.")
    pytest.skip(f"{POSTGRES_VARIABLE} not set: no PostgreSQL server (run through .ci/postgres.sh to include it)")


@pytest.fixture(params=["sqlite", "postgresql"])
def backend(request: pytest.FixtureRequest) -> str:
    return request.param


@contextmanager
def _postgres_schema(prefix: str) -> Iterator[str]:
    """A URL whose connections live in a new, empty schema of the test server (dropped afterwards).

    A schema per test instead of a database per test: CREATE DATABASE costs most of a second, a schema milliseconds.
    The knowledge base does not care which schema it is in (``search_path`` in the URL's ``options``), which is also
    how a plant would give it a schema of a shared database.
    """
    server = sa.engine.make_url(_postgres_server_url())
    name = f"{prefix}_{uuid.uuid4().hex[:12]}"
    admin = sa.create_engine(server, isolation_level="AUTOCOMMIT")
    try:
        with admin.connect() as connection:
            connection.exec_driver_sql(f'CREATE SCHEMA "{name}"')
        yield server.update_query_dict({"options": f"-csearch_path={name}"}).render_as_string(hide_password=False)
        with admin.connect() as connection:
            connection.exec_driver_sql(f'DROP SCHEMA IF EXISTS "{name}" CASCADE')
    finally:
        admin.dispose()


@pytest.fixture(scope="session")
def _postgres_kb_schema() -> Iterator[str]:
    """One schema for the whole session, migrated once by the explicit server path (what a deploy step runs)."""
    with _postgres_schema("madfh_test") as url:
        engine = create_kb_engine(url)
        try:
            upgrade(engine)
        finally:
            engine.dispose()
        yield url


@pytest.fixture(scope="session")
def _sqlite_template(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An empty knowledge-base file migrated once (opening it by URL migrates it; closing checkpoints the WAL)."""
    path = tmp_path_factory.mktemp("kb_template") / "kb.sqlite"
    KnowledgeBase(f"sqlite:///{path}").close()
    assert not path.with_name("kb.sqlite-wal").exists(), "the template must be one self-contained file"
    return path


@pytest.fixture
def kb_url(backend: str, tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[str]:
    """A URL of an empty, migrated knowledge base: a copy of a migrated SQLite file, or the session's PostgreSQL
    schema emptied (migrating per test would cost a tenth to a third of a second each). Opening a database that
    is not migrated yet is what ``unmigrated_url`` is for."""
    if backend == "sqlite":
        path = tmp_path / "kb.sqlite"
        shutil.copyfile(request.getfixturevalue("_sqlite_template"), path)
        yield f"sqlite:///{path}"
        return
    url = request.getfixturevalue("_postgres_kb_schema")
    engine = sa.create_engine(url)
    try:
        with engine.begin() as connection:  # DELETE, not TRUNCATE: a third of a second faster on tiny tables
            connection.exec_driver_sql("UPDATE model_versions SET parent_id = NULL")
            for table in KB_TABLES:
                connection.exec_driver_sql(f"DELETE FROM {table}")
                connection.exec_driver_sql(f"ALTER SEQUENCE {table}_id_seq RESTART")
    finally:
        engine.dispose()
    yield url


@pytest.fixture
def unmigrated_url(backend: str, tmp_path: Path) -> Iterator[str]:
    """A URL of an empty database with no schema at all (SQLite: a new file; PostgreSQL: a new, empty schema)."""
    if backend == "sqlite":
        yield f"sqlite:///{tmp_path / 'fresh.sqlite'}"
        return
    with _postgres_schema("madfh_fresh") as url:
        yield url


@pytest.fixture
def kb(kb_url: str) -> Iterator[KnowledgeBase]:
    """An open knowledge base with model version ``v1`` of ``wallplugs`` and defect types scratch, crack."""
    knowledge_base = KnowledgeBase(kb_url)
    knowledge_base.register_model_version(CATEGORY, MODEL, mlflow_run_id="run-1", detector="patchcore")
    knowledge_base.add_defect_type(CATEGORY, "scratch", "a line scratched into the surface")
    knowledge_base.add_defect_type(CATEGORY, "crack")
    yield knowledge_base
    knowledge_base.close()


@pytest.fixture
def add_inspection(kb: KnowledgeBase) -> Callable[..., int]:
    """``add_inspection(n, **overrides) -> id``: record the inspection of image ``n`` (see :func:`inspection_fields`)."""

    def add(n: int, **overrides: Any) -> int:
        result: RecordedInspection = kb.record_inspection(**inspection_fields(n, **overrides))
        assert result.created
        return result.id

    return add
