"""Schema commands for a knowledge base: ``python -m madfh_pipeline.feedback {upgrade,current,check,downgrade,revision}``.

A server database is never migrated implicitly (several services open it; a deploy step should decide when the schema
changes), so this is the explicit command. The URL comes from ``--url`` or the ``MADFH_KB_URL`` environment variable
(keep passwords out of shell history: prefer the variable). Exit status: 0 on success, 1 if ``check`` finds the
schema out of date, 2 on a usage error. ``revision -m "..."`` drafts a new migration for developers (against a
database at head, e.g. a scratch SQLite file).
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from madfh_pipeline.feedback.database import (
    check_schema,
    create_kb_engine,
    current_revision,
    display_url,
    downgrade,
    head_revision,
    new_revision,
    upgrade,
)
from madfh_pipeline.feedback.errors import SchemaOutOfDateError

logger = logging.getLogger("madfh_pipeline.feedback")

URL_VARIABLE = "MADFH_KB_URL"


def main(argv: list[str] | None = None) -> int:
    """Run one schema command; returns the exit status."""
    parser = argparse.ArgumentParser(prog="python -m madfh_pipeline.feedback", description=__doc__.splitlines()[0])
    parser.add_argument("command", choices=("upgrade", "current", "check", "downgrade", "revision"))
    parser.add_argument("--url", default=os.environ.get(URL_VARIABLE), help=f"database URL (default: ${URL_VARIABLE})")
    parser.add_argument("--revision", default=None, help="target revision (upgrade: head; downgrade: required)")
    parser.add_argument("-m", "--message", default=None, help="revision: what the new migration changes")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    if not args.url:
        parser.error(f"give --url or set {URL_VARIABLE}")
    engine = create_kb_engine(args.url)
    try:
        shown = display_url(engine.url)
        if args.command == "upgrade":
            reached = upgrade(engine, args.revision or "head")
            logger.info("%s is at schema revision %s.", shown, reached)
        elif args.command == "downgrade":
            if not args.revision:
                parser.error("downgrade needs --revision (use 'base' to drop the whole schema)")
            downgrade(engine, args.revision)
        elif args.command == "revision":
            if not args.message:
                parser.error("revision needs -m/--message")
            new_revision(engine, args.message)
        elif args.command == "current":
            logger.info("%s: schema revision %s (this code: %s).", shown, current_revision(engine), head_revision())
        else:
            try:
                check_schema(engine)
            except SchemaOutOfDateError as exc:
                logger.error("%s", exc)
                return 1
            logger.info("%s is at this code's schema revision %s.", shown, head_revision())
        return 0
    finally:
        engine.dispose()


if __name__ == "__main__":
    sys.exit(main())
