"""Uploads of new images to inspect: checked by content and size, saved under the first data root.

The app never scores an upload itself (no model in a long-running server process): it saves the file to
``<data root>/05_model_input/uploads/<category>/`` where the inspection pipeline picks it up on its next run, and
the knowledge base then has an inspection for it (matched by the SHA-256 of the file's bytes).

Checks, in the order they are cheap: the name (no folders, no traversal), the byte size, the format sniffed from the
content (PNG, JPEG or TIFF; a file's name is not evidence), the pixel count read from the header *before* decoding
(a decompression bomb is refused without being inflated), and finally a full decode (a truncated or damaged file is
refused instead of failing later inside the pipeline).
"""

from __future__ import annotations

import hashlib
import io
import logging
import os
import re
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, UnidentifiedImageError

logger = logging.getLogger(__name__)

#: Formats Pillow reports for accepted content, and the file suffixes each may be named with.
ACCEPTED_FORMATS: dict[str, tuple[str, ...]] = {
    "PNG": (".png",),
    "JPEG": (".jpg", ".jpeg"),
    "TIFF": (".tif", ".tiff"),
}
ACCEPTED_SUFFIXES: tuple[str, ...] = tuple(s for suffixes in ACCEPTED_FORMATS.values() for s in suffixes)
_UNSAFE = re.compile(r"[^A-Za-z0-9._-]+")
_CATEGORY = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")
MAX_STEM = 100


class UploadRejectedError(ValueError):
    """An upload that is refused; the message is written for the operator."""


@dataclass(frozen=True)
class UploadLimits:
    """Largest accepted upload, in bytes and in pixels (width x height)."""

    max_bytes: int
    max_pixels: int

    @classmethod
    def from_megabytes(cls, max_mb: float, max_pixels: int) -> UploadLimits:
        return cls(max_bytes=int(max_mb * 1024 * 1024), max_pixels=max_pixels)


@dataclass(frozen=True)
class CheckedUpload:
    """An upload that passed every check: its safe file name, format and size."""

    name: str
    format: str
    width: int
    height: int
    sha256: str


@dataclass(frozen=True)
class SavedUpload:
    """Where an upload was saved; ``created`` is False when the same bytes were already there."""

    path: Path
    created: bool


def safe_name(name: str) -> str:
    """A file name that is safe to write: refused if it names folders or traversal, else odd characters replaced.

    A browser sends a bare file name; a name with a path separator or ``..`` was crafted, so it is refused rather
    than quietly "cleaned" into something that might still surprise.
    """
    if not name or "\x00" in name or "/" in name or "\\" in name or ".." in name:
        raise UploadRejectedError(f"Refused the file name {name!r}: it must be a plain file name without folders.")
    stem, dot, suffix = name.rpartition(".")
    if not dot or not stem:
        raise UploadRejectedError(f"Refused {name!r}: the name needs an image suffix ({', '.join(ACCEPTED_SUFFIXES)}).")
    clean_stem = _UNSAFE.sub("_", stem).strip("._-")[:MAX_STEM] or "upload"
    clean_suffix = "." + suffix.lower()
    if clean_suffix not in ACCEPTED_SUFFIXES:
        raise UploadRejectedError(f"Refused {name!r}: only {', '.join(ACCEPTED_SUFFIXES)} images are accepted.")
    return clean_stem + clean_suffix


def check_upload(data: bytes, name: str, limits: UploadLimits) -> CheckedUpload:
    """Validate an upload (see the module docstring for the checks); raises :class:`UploadRejectedError`."""
    clean = safe_name(name)
    if len(data) > limits.max_bytes:
        raise UploadRejectedError(
            f"Refused {name}: {len(data) / 1e6:.1f} MB is larger than the limit of {limits.max_bytes / 1e6:.1f} MB."
        )
    if not data:
        raise UploadRejectedError(f"Refused {name}: the file is empty.")
    try:
        with Image.open(io.BytesIO(data)) as image:
            fmt, (width, height) = image.format, image.size
    except (UnidentifiedImageError, OSError) as exc:
        raise UploadRejectedError(f"Refused {name}: the content is not a PNG, JPEG or TIFF image.") from exc
    if fmt not in ACCEPTED_FORMATS:
        raise UploadRejectedError(
            f"Refused {name}: the content is a {fmt} image; only PNG, JPEG and TIFF are accepted."
        )
    if "." + clean.rpartition(".")[2] not in ACCEPTED_FORMATS[fmt]:
        raise UploadRejectedError(f"Refused {name}: it is named like another format but its content is {fmt}.")
    if width * height > limits.max_pixels:
        raise UploadRejectedError(
            f"Refused {name}: {width} x {height} pixels is more than the limit of {limits.max_pixels:,} pixels."
        )
    try:
        with Image.open(io.BytesIO(data)) as image:
            image.load()
    except (OSError, ValueError, Image.DecompressionBombError) as exc:
        raise UploadRejectedError(f"Refused {name}: the {fmt} file is damaged or truncated ({exc}).") from exc
    return CheckedUpload(clean, fmt, width, height, hashlib.sha256(data).hexdigest())


def upload_folder(upload_root: Path, category: str) -> Path:
    """``upload_root/<category>``; the category must be a plain name (it becomes a folder)."""
    if not _CATEGORY.match(category):
        raise UploadRejectedError(f"Refused the category name {category!r}: letters, digits and _ only.")
    return upload_root / category


def save_upload(data: bytes, checked: CheckedUpload, folder: Path) -> SavedUpload:
    """Write the upload into ``folder`` under its safe name, atomically (a reader never sees half a file).

    The same bytes under the same name are not written twice; different bytes under a taken name get the first
    eight hex digits of their SHA-256 appended, so nothing already queued is overwritten.
    """
    folder.mkdir(parents=True, exist_ok=True)
    stem, _, suffix = checked.name.rpartition(".")
    for candidate in (checked.name, f"{stem}-{checked.sha256[:8]}.{suffix}"):
        target = folder / candidate
        if target.resolve().parent != folder.resolve():  # belt and braces: safe_name already refused folders
            raise UploadRejectedError(f"Refused {checked.name!r}: it would be written outside {folder}.")
        if target.exists():
            if hashlib.sha256(target.read_bytes()).hexdigest() == checked.sha256:
                return SavedUpload(target, created=False)
            continue
        temporary = folder / f".{candidate}.{os.getpid()}.part"
        temporary.write_bytes(data)
        os.replace(temporary, target)
        logger.info(
            "Saved upload %s (%s, %dx%d) for the next inspection run.",
            target,
            checked.format,
            checked.width,
            checked.height,
        )
        return SavedUpload(target, created=True)
    raise UploadRejectedError(f"Refused {checked.name}: a different file with that name and hash is already queued.")


def queued_uploads(folder: Path) -> list[Path]:
    """The accepted image files waiting in an upload folder (hidden and partial files left out), oldest first."""
    if not folder.is_dir():
        return []
    files = [
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in ACCEPTED_SUFFIXES
    ]
    return sorted(files, key=lambda p: (p.stat().st_mtime, p.name))
