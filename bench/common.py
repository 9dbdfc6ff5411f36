"""What every benchmark records next to its numbers, so that a result can be traced to the code it measured."""

from __future__ import annotations

import subprocess
from pathlib import Path

#: The project root (bench/ lives directly below it).
ROOT = Path(__file__).resolve().parents[1]


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
