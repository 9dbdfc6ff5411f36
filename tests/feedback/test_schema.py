"""The schema: created only by the packaged migrations, equal to the models, enforced by the database itself."""

from __future__ import annotations

from pathlib import Path

import pytest
import sqlalchemy as sa
from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from kb_support import CATEGORY, MODEL, inspection_fields
from setuptools import find_packages

from madfh_pipeline.feedback import KnowledgeBase, SchemaOutOfDateError, UnsupportedDatabaseError, head_revision
from madfh_pipeline.feedback.__main__ import main as cli
from madfh_pipeline.feedback.database import (
    MIGRATIONS_DIR,
    create_kb_engine,
    current_revision,
    downgrade,
    upgrade,
)
from madfh_pipeline.feedback.schema import Base

SRC = Path(__file__).resolve().parents[2] / "src"
TABLES = {"model_versions", "defect_types", "inspections", "feedback", "text_embeddings"}


def test_migrated_database_matches_the_models(kb: KnowledgeBase) -> None:
    with kb.engine.connect() as connection:
        context = MigrationContext.configure(connection, opts={"compare_type": True})
        assert compare_metadata(context, Base.metadata) == []
        assert TABLES <= set(sa.inspect(connection).get_table_names())
    assert current_revision(kb.engine) == head_revision()


def test_downgrade_to_base_and_upgrade_again(unmigrated_url: str) -> None:
    kb = KnowledgeBase(unmigrated_url, migrate=True)
    assert downgrade(kb.engine, "base") is None
    with kb.engine.connect() as connection:
        assert not TABLES & set(sa.inspect(connection).get_table_names())
    assert upgrade(kb.engine) == head_revision()
    with kb.engine.connect() as connection:
        assert TABLES <= set(sa.inspect(connection).get_table_names())
    kb.close()


def test_server_database_is_never_migrated_implicitly(unmigrated_url: str, backend: str) -> None:
    """SQLite migrates on open; a server refuses with the command to run, and the explicit CLI then works."""
    if backend == "sqlite":
        with KnowledgeBase(unmigrated_url) as kb:
            assert kb.schema_revision == head_revision()
        return
    with pytest.raises(SchemaOutOfDateError, match="python -m madfh_pipeline.feedback upgrade"):
        KnowledgeBase(unmigrated_url)
    assert cli(["check", "--url", unmigrated_url]) == 1
    assert cli(["upgrade", "--url", unmigrated_url]) == 0
    assert cli(["check", "--url", unmigrated_url]) == 0
    with KnowledgeBase(unmigrated_url) as kb:
        assert kb.schema_status() == (head_revision(), head_revision())


def test_migrate_false_refuses_an_empty_sqlite_file(tmp_path: Path) -> None:
    with pytest.raises(SchemaOutOfDateError, match="has no knowledge-base schema"):
        KnowledgeBase(f"sqlite:///{tmp_path / 'kb.sqlite'}", migrate=False)


def test_database_from_a_newer_release_is_refused(unmigrated_url: str) -> None:
    with KnowledgeBase(unmigrated_url, migrate=True) as kb, kb.engine.begin() as connection:
        connection.execute(sa.text("UPDATE alembic_version SET version_num = '9999'"))
    with pytest.raises(SchemaOutOfDateError, match="9999"):
        KnowledgeBase(unmigrated_url, migrate=True)


def test_sqlite_connections_are_set_up_for_concurrent_durable_writes(tmp_path: Path) -> None:
    kb = KnowledgeBase.embedded(tmp_path / "sub" / "kb.sqlite", busy_timeout_s=7)
    with kb.engine.connect() as connection:
        pragma = {
            name: connection.exec_driver_sql(f"PRAGMA {name}").scalar()
            for name in ("journal_mode", "synchronous", "foreign_keys", "busy_timeout")
        }
    kb.close()
    assert pragma == {"journal_mode": "wal", "synchronous": 2, "foreign_keys": 1, "busy_timeout": 7000}


@pytest.mark.parametrize("url", ["sqlite://", "sqlite:///:memory:", "mysql://u@h/db"])
def test_unsupported_urls_are_refused(url: str) -> None:
    with pytest.raises(UnsupportedDatabaseError):
        KnowledgeBase(url)


def test_missing_sqlite_folder_is_an_error_not_a_new_folder(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        KnowledgeBase(f"sqlite:///{tmp_path / 'nowhere' / 'kb.sqlite'}")


def test_migrations_are_shipped_as_package_modules() -> None:
    """pyproject's packages.find (namespaces = false) only ships folders that are packages: the migrations are."""
    packages = set(find_packages(str(SRC)))
    assert {"madfh_pipeline.feedback.migrations", "madfh_pipeline.feedback.migrations.versions"} <= packages
    assert (MIGRATIONS_DIR / "env.py").is_file()
    assert any(p.name.startswith(f"{head_revision()}_") for p in (MIGRATIONS_DIR / "versions").glob("*.py"))


def test_cli_upgrades_an_empty_sqlite_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    url = f"sqlite:///{tmp_path / 'kb.sqlite'}"
    monkeypatch.setenv("MADFH_KB_URL", url)
    assert cli(["current"]) == 0
    assert cli(["check"]) == 1
    assert cli(["upgrade"]) == 0
    assert cli(["check"]) == 0
    engine = create_kb_engine(url)
    assert current_revision(engine) == head_revision()
    engine.dispose()


@pytest.mark.parametrize(
    ("table", "values"),
    [
        ("feedback", {"confidence": 9}),
        ("feedback", {"verdict": "XX"}),
        ("feedback", {"operator": ""}),
        ("feedback", {"verdict": "OK", "outcome": "confirmed_defect"}),
        ("feedback", {"inspection_id": 999_999}),
        ("inspections", {"decision": "PASS"}),
        ("inspections", {"decision": "ERROR"}),
        ("inspections", {"image_id": "short"}),
    ],
)
def test_database_constraints_hold_without_the_api(kb: KnowledgeBase, table: str, values: dict) -> None:
    """CHECK and foreign-key constraints are the database's, so a writer that bypasses the API is refused too."""
    inspection_id = kb.record_inspection(**inspection_fields(1, score=12.0)).id
    version_id = kb.get_model_version(CATEGORY, MODEL).id
    now = "2026-03-02 08:00:00"
    rows = {
        "feedback": {
            "inspection_id": inspection_id,
            "verdict": "NG",
            "outcome": "confirmed_defect",
            "confidence": 3,
            "operator": "anna",
            "created_at": now,
        },
        "inspections": {
            "image_id": "a" * 64,
            "image_path": "/x.png",
            "category": CATEGORY,
            "model_version_id": version_id,
            "score": 1.0,
            "threshold": 2.0,
            "decision": "OK",
            "inspected_at": now,
            "recorded_at": now,
        },
    }
    good = rows[table]
    columns = ", ".join(good)
    params = ", ".join(f":{c}" for c in good)
    statement = sa.text(f"INSERT INTO {table} ({columns}) VALUES ({params})")
    with kb.engine.begin() as connection:  # the valid row goes in: the statement itself is fine
        connection.execute(statement, good | ({"image_id": "b" * 64} if table == "inspections" else {}))
    with pytest.raises(sa.exc.IntegrityError), kb.engine.begin() as connection:
        connection.execute(statement, good | values)
