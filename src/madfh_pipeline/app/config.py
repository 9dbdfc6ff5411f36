"""The review app's settings: from the command line (after ``--`` of ``streamlit run``) or environment variables.

Two sources because the app is started two ways: ``make ui`` passes flags; a service unit or a container sets
``MADFH_*`` variables (and Streamlit's test harness, which has no command line, uses those too). A flag wins over a
variable. There is deliberately no built-in default for the knowledge base or the data roots: an app that silently
opened (and so created) an empty knowledge base somewhere would show an empty queue and look healthy.
"""

from __future__ import annotations

import argparse
import os
import shlex
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

ENV_KB_URL = "MADFH_KB_URL"
ENV_DATA_ROOTS = "MADFH_DATA_ROOTS"  # several roots separated by os.pathsep (":" on Linux)
ENV_FEEDBACK_COMMAND = "MADFH_FEEDBACK_COMMAND"
ENV_UPLOAD_MAX_MB = "MADFH_UPLOAD_MAX_MB"
ENV_UPLOAD_MAX_PIXELS = "MADFH_UPLOAD_MAX_PIXELS"
ENV_TEXT_SEARCH = "MADFH_TEXT_SEARCH"  # 0/false/no/off switches text similarity off

#: ``{category}`` is replaced by the category the operator picked on the dashboard.
DEFAULT_FEEDBACK_COMMAND = "kedro run --env demo --pipelines=feedback_{category}"
#: Big enough for the largest MVTec AD 2 image as 16-bit TIFF (4224 x 1056 x 3 x 2 bytes is 27 MB).
DEFAULT_UPLOAD_MAX_MB = 50.0
#: 40 MP: 8x the largest MVTec AD 2 image; also caps what a decompression bomb can cost before it is refused.
DEFAULT_UPLOAD_MAX_PIXELS = 40_000_000


class ConfigError(ValueError):
    """The app was started without what it needs; the message says which flag or variable to set."""


@dataclass(frozen=True)
class AppConfig:
    """Everything the app needs to know about its surroundings.

    ``data_roots`` are resolved absolute folders: every image or map path the app reads, and every upload it
    writes, must lie inside one of them (:mod:`madfh_pipeline.app.files`). Uploads go to the first one.
    ``project_dir`` is where relative paths stored in the knowledge base are resolved and where the feedback
    command runs: the folder the app was started from (``make ui`` starts it in the project root).
    """

    kb_url: str
    data_roots: tuple[Path, ...]
    feedback_command: str = DEFAULT_FEEDBACK_COMMAND
    upload_max_mb: float = DEFAULT_UPLOAD_MAX_MB
    upload_max_pixels: int = DEFAULT_UPLOAD_MAX_PIXELS
    text_search: bool = True
    project_dir: Path = field(default_factory=Path.cwd)

    def __post_init__(self) -> None:
        if not self.kb_url.strip():
            raise ConfigError(f"No knowledge base given: pass --kb-url URL or set {ENV_KB_URL}.")
        if not self.data_roots:
            raise ConfigError(f"No data root given: pass --data-root DIR (repeatable) or set {ENV_DATA_ROOTS}.")
        missing = [str(root) for root in self.data_roots if not root.is_dir()]
        if missing:
            raise ConfigError(f"Data root(s) not found or not a folder: {', '.join(missing)}.")
        if self.upload_max_mb <= 0 or self.upload_max_pixels <= 0:
            raise ConfigError("Upload limits must be positive.")
        if "{category}" not in self.feedback_command:
            raise ConfigError(
                f"The feedback command must contain '{{category}}' (got {self.feedback_command!r}): the dashboard "
                "starts the feedback pipeline of the category on screen."
            )
        shlex.split(self.feedback_command)  # a quoting error surfaces at start, not at the first click

    def feedback_args(self, category: str) -> list[str]:
        """The feedback command for ``category`` as an argument list (run without a shell: no injection)."""
        return [part.replace("{category}", category) for part in shlex.split(self.feedback_command)]

    @property
    def upload_root(self) -> Path:
        """Where uploads are saved: ``<first data root>/05_model_input/uploads``."""
        return self.data_roots[0] / "05_model_input" / "uploads"

    def feedback_report_path(self, category: str) -> Path:
        """Where the feedback pipeline writes its report (see docs/review_app.md, 'Feedback pipeline report')."""
        return self.data_roots[0] / "08_reporting" / category / "feedback" / "report.json"

    @property
    def review_settings_path(self) -> Path:
        """The JSON file that holds the uncertainty band (see :mod:`madfh_pipeline.app.review_settings`)."""
        return self.data_roots[0] / "09_knowledge_base" / "review_settings.json"


class _Parser(argparse.ArgumentParser):
    """argparse that raises instead of exiting: inside Streamlit a ``SystemExit`` would only blank the page."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"Bad review-app arguments: {message}. {self.format_usage()}")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="madfh-review-app", description="MAD-FH operators' review app")
    parser.add_argument("--kb-url", help=f"knowledge base URL (env {ENV_KB_URL})")
    parser.add_argument(
        "--data-root", action="append", default=None, help=f"data root, repeatable (env {ENV_DATA_ROOTS})"
    )
    parser.add_argument(
        "--feedback-command", help=f"feedback pipeline command with {{category}} ({ENV_FEEDBACK_COMMAND})"
    )
    parser.add_argument("--upload-max-mb", type=float, help=f"largest upload in MB (env {ENV_UPLOAD_MAX_MB})")
    parser.add_argument("--upload-max-pixels", type=int, help=f"largest upload in pixels ({ENV_UPLOAD_MAX_PIXELS})")
    parser.add_argument(
        "--no-text-search", action="store_true", help=f"do not load the text model (env {ENV_TEXT_SEARCH}=0)"
    )
    return parser


def _flag(value: str, name: str) -> bool:
    lowered = value.strip().lower()
    if lowered in ("1", "true", "yes", "on"):
        return True
    if lowered in ("0", "false", "no", "off"):
        return False
    raise ConfigError(f"{name}={value!r} is not a yes/no value (use 1 or 0).")


def _number(value: str, name: str, kind: type[float] | type[int]) -> float | int:
    try:
        return kind(value)
    except ValueError as exc:
        raise ConfigError(f"{name}={value!r} is not a number.") from exc


def load_config(
    argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, cwd: Path | None = None
) -> AppConfig:
    """Build the configuration from flags (``argv``, without the program name) and ``environ``; flags win.

    Relative data roots are taken from ``cwd`` (default: the working directory).
    """
    environ = os.environ if environ is None else environ
    cwd = Path.cwd() if cwd is None else cwd
    args = _parser().parse_args(list(argv or []))
    kb_url = args.kb_url or environ.get(ENV_KB_URL, "")
    if args.data_root:
        roots = list(args.data_root)
    else:
        roots = [part for part in environ.get(ENV_DATA_ROOTS, "").split(os.pathsep) if part.strip()]
    max_mb = args.upload_max_mb
    if max_mb is None and environ.get(ENV_UPLOAD_MAX_MB):
        max_mb = _number(environ[ENV_UPLOAD_MAX_MB], ENV_UPLOAD_MAX_MB, float)
    max_pixels = args.upload_max_pixels
    if max_pixels is None and environ.get(ENV_UPLOAD_MAX_PIXELS):
        max_pixels = _number(environ[ENV_UPLOAD_MAX_PIXELS], ENV_UPLOAD_MAX_PIXELS, int)
    text_search = not args.no_text_search
    if text_search and environ.get(ENV_TEXT_SEARCH):
        text_search = _flag(environ[ENV_TEXT_SEARCH], ENV_TEXT_SEARCH)
    return AppConfig(
        kb_url=kb_url,
        data_roots=tuple((cwd / root).resolve() for root in roots),
        feedback_command=args.feedback_command or environ.get(ENV_FEEDBACK_COMMAND) or DEFAULT_FEEDBACK_COMMAND,
        upload_max_mb=float(max_mb) if max_mb is not None else DEFAULT_UPLOAD_MAX_MB,
        upload_max_pixels=int(max_pixels) if max_pixels is not None else DEFAULT_UPLOAD_MAX_PIXELS,
        text_search=text_search,
        project_dir=cwd.resolve(),
    )
