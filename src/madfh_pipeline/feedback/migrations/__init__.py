"""Alembic migrations of the knowledge base (a package so that installing madfh_pipeline ships them)."""
