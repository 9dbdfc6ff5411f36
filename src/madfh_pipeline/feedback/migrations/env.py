"""Alembic environment of the knowledge base.

Runs only on a connection that :mod:`madfh_pipeline.feedback.database` opened, locked and put in a transaction
(``upgrade``/``downgrade`` there, or ``python -m madfh_pipeline.feedback``): that is what makes concurrent first
opens of the embedded database safe. SQLite's DDL is transactional in fact, although Alembic assumes otherwise, so the
whole migration commits or rolls back as one.
"""

from __future__ import annotations

from alembic import context

from madfh_pipeline.feedback.schema import Base

connection = context.config.attributes.get("connection")
if connection is None:
    raise RuntimeError(
        "Knowledge-base migrations run through madfh_pipeline.feedback: "
        "`python -m madfh_pipeline.feedback upgrade --url <URL>`, not the bare alembic command."
    )

context.configure(
    connection=connection,
    target_metadata=Base.metadata,
    transactional_ddl=True,
    render_as_batch=connection.dialect.name == "sqlite",
    compare_type=True,
)
with context.begin_transaction():
    context.run_migrations()
