"""Categories as data: the ``categories:`` parameters parsed and validated.

A category is nothing but a folder in the MVTec AD 2 layout plus a few facts (native size, channels, whether it gets
a registered pipeline, preprocessing overrides). The facts of the eight official categories live in
``conf/base/parameters.yml``; any other folder in the same layout — a user's own product — becomes a category by one
more entry there (or in ``conf/local``), with no code change.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field, fields
from typing import Any

#: Lighting tokens of test_public (``vial`` has one more, which is why unknown tokens only warn).
LIGHTING_TOKENS: tuple[str, ...] = ("regular", "overexposed", "underexposed", "shift_1", "shift_2", "shift_3")

#: Official splits in the order a report lists them.
SPLITS: tuple[str, ...] = ("train", "validation", "test_public", "test_private", "test_private_mixed")

#: Splits that carry labels (good/bad); the private ones are scored server-side only.
LABELLED_SPLITS: tuple[str, ...] = ("train", "validation", "test_public")

IMAGE_SUFFIXES: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff")

_NAME_RE = re.compile(r"^[A-Za-z][A-Za-z0-9_]*$")


class UnknownCategoryError(KeyError):
    """A category name that is neither built in nor configured under ``categories:``."""

    def __str__(self) -> str:  # KeyError quotes its message; we want it readable.
        return str(self.args[0])


@dataclass(frozen=True)
class CategorySpec:
    """What the pipelines need to know about one category.

    ``width``/``height``/``channels`` are the native image facts used to validate raw files (a file of another size
    is skipped and named in the report). ``preprocessing`` holds per-category overrides of the preprocessing
    parameters (e.g. letterbox for the 4:1 sheet_metal images).
    """

    name: str
    width: int
    height: int
    channels: int
    preprocessing: dict[str, Any] = field(default_factory=dict)
    detection: dict[str, Any] = field(default_factory=dict)
    description: str = ""
    pipeline: bool = True

    def __post_init__(self) -> None:
        if not _NAME_RE.match(self.name):
            raise ValueError(
                f"Category name '{self.name}' must start with a letter and use only letters, digits and '_' "
                "(it becomes a Kedro namespace and a folder name)."
            )
        if self.width <= 0 or self.height <= 0:
            raise ValueError(
                f"Category '{self.name}': width and height must be positive, got {self.width}x{self.height}."
            )
        if self.channels not in (1, 3):
            raise ValueError(f"Category '{self.name}': channels must be 1 (gray) or 3 (RGB), got {self.channels}.")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def parse_categories(configured: Mapping[str, Any] | None) -> dict[str, CategorySpec]:
    """Validate the ``categories:`` parameters into specs, with one message per bad entry."""
    specs: dict[str, CategorySpec] = {}
    for name, entry in (configured or {}).items():
        entry = dict(entry or {})
        missing = [k for k in ("name", "width", "height", "channels") if k not in entry]
        if missing:
            raise ValueError(
                f"Category '{name}' under 'categories:' must give {', '.join(missing)} "
                f"(name: {name}, the native width and height in pixels, and channels: 1 for gray / 3 for RGB)."
            )
        valid = {f.name for f in fields(CategorySpec)}
        unknown = sorted(set(entry) - valid)
        if unknown:
            hint = (
                " (official image counts are documented in docs/data.md, not configured)" if "counts" in unknown else ""
            )
            raise ValueError(
                f"Category '{name}' has unknown key(s) {unknown}{hint}; valid keys: {', '.join(sorted(valid))}."
            )
        if entry["name"] != name:
            raise ValueError(f"Category entry '{name}' has name '{entry['name']}': the two must be the same.")
        specs[name] = CategorySpec(**entry)
    return specs


def pipeline_categories(configured: Mapping[str, Any] | None) -> list[str]:
    """Names that get a registered pipeline: every configured category whose ``pipeline`` flag is not false."""
    return [name for name, spec in parse_categories(configured).items() if spec.pipeline]


def get_category(name: str, configured: Mapping[str, Any] | None = None) -> CategorySpec:
    """Look a category up by name, with a message that lists what is known."""
    known = parse_categories(configured)
    try:
        return known[name]
    except KeyError:
        raise UnknownCategoryError(
            f"Unknown category '{name}'. Known categories: {', '.join(sorted(known))}. "
            "Add an entry under 'categories:' in conf/base/parameters.yml (or conf/local/parameters.yml) with width, "
            "height and channels to use another folder in the MVTec AD 2 layout."
        ) from None
