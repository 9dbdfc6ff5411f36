"""``python -m madfh_pipeline.models.convert OLD.pt [NEW.safetensors]``: move a legacy detector file to the safe format.

Legacy files (format ``madfh_detector/1``) were torch pickles; loading those runs whatever they contain. This command
reads them with ``weights_only=True`` (tensors and plain values only; anything else is refused before it can run) and
writes the safetensors + JSON format that :func:`madfh_pipeline.models.base.load_detector` accepts.
"""

from __future__ import annotations

import argparse
import logging
import sys

from madfh_pipeline.models.base import ModelFileError, convert_legacy_file

logger = logging.getLogger("madfh_pipeline.models.convert")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("source", help="legacy detector file (.pt)")
    parser.add_argument("target", nargs="?", help="output file (default: the source with suffix .safetensors)")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(message)s")
    try:
        target = convert_legacy_file(args.source, args.target)
    except (ModelFileError, FileNotFoundError) as exc:
        logger.error("%s", exc)
        return 1
    logger.info("Wrote %s", target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
