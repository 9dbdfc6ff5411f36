"""What every benchmark records next to its numbers, so that a result can be traced to the code it measured."""

from __future__ import annotations

import subprocess
from pathlib import Path
from typing import Any

import yaml

#: The project root (bench/ lives directly below it).
ROOT = Path(__file__).resolve().parents[1]
#: The detection parameters the benchmarks measure, unless ``--params`` names another file.
DEFAULT_PARAMS = ROOT / "conf" / "base" / "parameters_detection.yml"


def git_revision() -> str:
    """Commit of the code measured (``+dirty`` when src/ or conf/ have uncommitted changes)."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "src", "conf"], cwd=ROOT, capture_output=True, text=True, check=False
        )
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def load_detection_params(path: Path) -> dict[str, Any]:
    """The ``detection`` parameters as the pipeline reads them; each ``models`` entry as ``{name, config}`` copies.

    Benchmarks change configs for their own data; copies keep those changes out of the loaded file's structure.
    """
    detection = dict(yaml.safe_load(path.read_text())["detection"])
    detection["models"] = {
        key: {"name": entry["name"], "config": dict(entry.get("config") or {})}
        for key, entry in detection["models"].items()
    }
    detection["runtime"] = dict(detection.get("runtime") or {})
    detection["thresholds"] = dict(detection.get("thresholds") or {})
    return detection
