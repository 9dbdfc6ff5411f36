"""The upload page under AppTest: content and size checks, safe names, and where accepted files go."""

from __future__ import annotations

import io
from collections.abc import Callable

import numpy as np
import pytest
from app_support import CATEGORY, ReviewData
from PIL import Image
from streamlit.testing.v1 import AppTest

from madfh_pipeline.feedback import image_content_id


def _png(width: int = 40, height: int = 30, noise: bool = False, fmt: str = "PNG") -> bytes:
    rng = np.random.default_rng(1)
    pixels = (
        rng.integers(0, 256, (height, width, 3), dtype=np.uint8) if noise else np.zeros((height, width, 3), np.uint8)
    )
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, fmt)
    return buffer.getvalue()


def _upload(at: AppTest, *files: tuple[str, bytes]) -> str:
    at.file_uploader[0].set_value([(name, data, "image/png") for name, data in files]).run()
    at.button(key="queue-uploads").click().run()
    assert not at.exception
    return "\n".join(str(p.value) for p in [*at.error, *at.success])


def _folder(app_env: ReviewData):
    return app_env.data_root / "05_model_input" / "uploads" / CATEGORY


def test_accepted_image_is_queued_then_matched_to_its_inspection(make_app: Callable, app_env: ReviewData) -> None:
    at = make_app(operator="anna", page="upload")
    data = _png()
    messages = _upload(at, ("part 7 (left).png", data))
    assert "part 7 (left).png → part_7_left.png: queued for the next inspect run." in messages
    saved = _folder(app_env) / "part_7_left.png"
    assert saved.read_bytes() == data
    table = next(f.value for f in at.dataframe if "status" in f.value.columns)
    assert table["status"].tolist() == ["queued for the next inspect run"]

    assert "already queued" in _upload(at, ("part 7 (left).png", data))
    assert "part_7_left-" in _upload(at, ("part 7 (left).png", _png(41, 30)))  # same name, other bytes: kept both

    with app_env.kb() as kb:  # the inspection pipeline's next run records it
        kb.record_inspection(
            image_id=image_content_id(saved),
            image_path=str(saved),
            category=CATEGORY,
            model_version="v2",
            score=1.0,
            threshold=11.0,
            decision="OK",
        )
    at.run()
    table = next(f.value for f in at.dataframe if "status" in f.value.columns)
    assert table.set_index("file").loc["part_7_left.png", "status"].startswith("inspected: #")


@pytest.mark.parametrize(
    ("name", "data", "message"),
    [
        ("notes.png", b"just some text, not an image", "not a PNG, JPEG or TIFF image"),
        ("fake.png", _png(fmt="JPEG"), "its content is JPEG"),
        ("../../etc/passwd.png", _png(), "plain file name without folders"),
        ("..\\evil.png", _png(), "plain file name without folders"),
        ("icon.png", _png(fmt="GIF"), "the content is a GIF image"),
    ],
)
def test_refused_uploads_write_nothing(
    make_app: Callable, app_env: ReviewData, name: str, data: bytes, message: str
) -> None:
    at = make_app(operator="anna", page="upload")
    at.file_uploader[0].set_value([(name, data, "application/octet-stream")]).run()
    at.button(key="queue-uploads").click().run()
    assert message in "\n".join(e.value for e in at.error)
    assert not _folder(app_env).exists() or not any(_folder(app_env).iterdir())
    assert not (app_env.root.parent / "etc").exists()


def test_too_large_files_are_refused(make_app: Callable, app_env: ReviewData, monkeypatch) -> None:
    monkeypatch.setenv("MADFH_UPLOAD_MAX_MB", "0.01")  # 10 kB
    monkeypatch.setenv("MADFH_UPLOAD_MAX_PIXELS", "1000")
    at = make_app(operator="anna", page="upload")
    big = _png(80, 80, noise=True)
    assert len(big) > 0.01 * 1024 * 1024
    messages = _upload(at, ("big.png", big), ("wide.png", _png(40, 30)), ("small.png", _png(20, 20)))
    assert "big.png" in messages and "larger than the limit" in messages
    assert "1,000 pixels" in messages and "40 x 30 pixels" in messages
    assert [p.name for p in _folder(app_env).iterdir()] == ["small.png"]


def test_upload_needs_an_operator(make_app: Callable, app_env: ReviewData) -> None:
    at = make_app(page="upload")
    at.file_uploader[0].set_value([("a.png", _png(), "image/png")]).run()
    assert at.button(key="queue-uploads").disabled
    assert "Enter your name in the sidebar to upload" in "\n".join(c.value for c in at.caption)
