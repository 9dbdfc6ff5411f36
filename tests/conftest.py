"""Shared fixtures: tiny MVTec AD 2 trees on disk, category entries, and a throw-away copy of the Kedro project.

Everything a test writes lands under its ``tmp_path``; nothing touches the real ``data/``, ``mlflow.db`` or network.
"""

from __future__ import annotations

import os

# Set before Kedro (and its telemetry plugin) or matplotlib are imported by any test module.
os.environ["DO_NOT_TRACK"] = "1"
os.environ["KEDRO_DISABLE_TELEMETRY"] = "1"
os.environ["MPLBACKEND"] = "Agg"

import shutil  # noqa: E402
from collections.abc import Callable, Iterator  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pytest  # noqa: E402
import yaml  # noqa: E402

#: The real project, whose conf/ and pyproject.toml the temp projects copy.
PROJECT_ROOT = Path(__file__).resolve().parents[1]

#: Lighting tokens given to test_public files, in this order (cycled).
TREE_LIGHTING = ("regular", "overexposed", "underexposed", "shift_1", "shift_2", "shift_3")

#: Default file counts of :func:`make_mvtec_tree`, keyed like the ``counts`` of a category.
TREE_COUNTS = {
    "train": 4,
    "validation": 2,
    "test_public_good": 2,
    "test_public_bad": 2,
    "test_private": 1,
    "test_private_mixed": 1,
}

#: Size of the images in the temp project's test env (demo ``size_override`` and the categories' native size).
TEST_ENV_WIDTH, TEST_ENV_HEIGHT = 96, 80
#: Demo counts of the test env (per category).
TEST_ENV_COUNTS = {
    "train": 6,
    "validation": 2,
    "test_public_good": 2,
    "test_public_bad": 3,
    "test_private": 1,
    "test_private_mixed": 1,
}
PIPELINE_CATEGORIES = ("wallplugs", "sheet_metal", "walnuts", "fruit_jelly")


def pytest_configure(config: pytest.Config) -> None:
    # Test modules share base names across folders (tests/pipelines/*/test_nodes.py) and the folders have no
    # __init__.py, which the default "prepend" import mode refuses ("import file mismatch"). Same effect as
    # `--import-mode=importlib` in pyproject's addopts; harmless if that is set there.
    config.option.importmode = "importlib"


def _write_png(path: Path, array: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if array.ndim == 3:
        array = cv2.cvtColor(array, cv2.COLOR_RGB2BGR)
    assert cv2.imwrite(str(path), array), path


def _tree_image(rng: np.random.Generator, width: int, height: int, channels: int) -> np.ndarray:
    """A smooth random image (gradient + noise), uint8 gray (H, W) or RGB (H, W, 3)."""
    yy, xx = np.mgrid[0:height, 0:width]
    base = 60 + 100 * (xx / max(width - 1, 1)) + 40 * (yy / max(height - 1, 1))
    shape = (height, width) if channels == 1 else (height, width, 3)
    noise = rng.integers(-20, 21, size=shape)
    base = base if channels == 1 else base[..., None]
    return np.clip(base + noise, 0, 255).astype(np.uint8)


def _tree_mask(index: int, width: int, height: int) -> np.ndarray:
    """A 0/255 mask with one rectangle whose position depends on ``index``."""
    mask = np.zeros((height, width), np.uint8)
    x0 = (3 + 5 * index) % max(width - 8, 1)
    y0 = (2 + 3 * index) % max(height - 6, 1)
    mask[y0 : y0 + 6, x0 : x0 + 8] = 255
    return mask


def write_mvtec_tree(
    root: Path,
    category: str = "widget",
    width: int = 48,
    height: int = 40,
    channels: int = 1,
    counts: dict[str, int] | None = None,
    seed: int = 0,
) -> Path:
    """Write ``<root>/<category>/`` in the MVTec AD 2 layout and return the category folder.

    File names follow the official pattern ``NNN_<lighting>.png``; train/validation are ``regular``, test_public
    cycles through :data:`TREE_LIGHTING`, every ``test_public/bad`` image gets a 0/255 mask of the same size.
    """
    counts = TREE_COUNTS | (counts or {})
    rng = np.random.default_rng(seed)
    cat_dir = Path(root) / category
    for split in ("train", "validation"):
        for i in range(counts[split]):
            _write_png(cat_dir / split / "good" / f"{i:03d}_regular.png", _tree_image(rng, width, height, channels))
    for label in ("good", "bad"):
        for i in range(counts[f"test_public_{label}"]):
            name = f"{i:03d}_{TREE_LIGHTING[i % len(TREE_LIGHTING)]}"
            _write_png(cat_dir / "test_public" / label / f"{name}.png", _tree_image(rng, width, height, channels))
            if label == "bad":
                _write_png(
                    cat_dir / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png",
                    _tree_mask(i, width, height),
                )
    for i in range(counts["test_private"]):
        _write_png(cat_dir / "test_private" / f"{i:03d}_regular.png", _tree_image(rng, width, height, channels))
    for i in range(counts["test_private_mixed"]):
        _write_png(cat_dir / "test_private_mixed" / f"{i:03d}_mixed.png", _tree_image(rng, width, height, channels))
    return cat_dir


@pytest.fixture
def make_mvtec_tree() -> Callable[..., Path]:
    """Factory ``make_mvtec_tree(root, category="widget", width=48, height=40, channels=1, counts=None)``.

    Returns the category folder. With the default counts a tree holds 12 images and 2 masks.
    """
    return write_mvtec_tree


@pytest.fixture
def make_category() -> Callable[..., dict[str, Any]]:
    """Factory for a ``categories:`` entry (what nodes receive as ``params:category``)."""

    def make(name: str = "widget", width: int = 48, height: int = 40, channels: int = 1, **extra: Any) -> dict:
        return {"name": name, "width": width, "height": height, "channels": channels, **extra}

    return make


@pytest.fixture
def preprocessing_params() -> dict[str, Any]:
    """``params:preprocessing`` as in conf/base, shrunk: a 32x32 canvas, one worker."""
    return {
        "target_width": 32,
        "target_height": 32,
        "mode": "stretch",
        "output_channels": None,
        "check_size": True,
        "incremental": True,
        "change_detection": "mtime",
        "workers": 1,
        "splits": ["train", "validation", "test_public", "test_private", "test_private_mixed"],
    }


def _test_env(project: Path) -> dict[str, dict[str, Any]]:
    """Contents of ``conf/test/``: data inside the temp project, tiny images, a 64x64 canvas, two workers.

    Two deliberate differences from conf/base besides sizes:

    - ``mlflow.yml`` gives the tracking URI as an absolute path. MLflow caches its store per URI *string*, so the
      relative ``sqlite:///mlflow.db`` of conf/base would keep writing to the first temp project's database for
      every later test of the same pytest process.
    - the demo writer renders with one process: the tiny images take milliseconds, while each spawned worker pays
      seconds of imports.
    """
    data_root = project / "data" / "01_raw" / "test_demo"
    return {
        "globals.yml": {
            "raw_root": str(data_root),
            "demo_root": str(data_root),
            "raw_hint": "Generate it with the demo_data pipeline.",
        },
        "parameters.yml": {
            "data_source": "demo",
            # The demo images are rendered at the size_override, so the categories' native size is that size too:
            # preprocessing keeps checking sizes exactly as it does on real data.
            "categories": {cat: {"width": TEST_ENV_WIDTH, "height": TEST_ENV_HEIGHT} for cat in PIPELINE_CATEGORIES},
            "demo_data": {
                "seed": 7,
                "scale": 1.0,
                "counts": dict(TEST_ENV_COUNTS),
                "size_override": {"width": TEST_ENV_WIDTH, "height": TEST_ENV_HEIGHT},
            },
            "preprocessing": {"target_width": 64, "target_height": 64, "workers": 2},
            # Detection at toy sizes: the e2e test checks wiring, tracking and reports, not detector quality.
            "detection": {
                "runtime": {"device": "cpu", "batch_size": 8},
                "models": {
                    "autoencoder": {"config": {"input_size": 64, "depth": 4, "latent_dim": 32, "epochs": 1}},
                    "patchcore": {"config": {"max_bank_size": 256, "pool_max_patches": 5000}},
                },
            },
        },
        "catalog.yml": {
            "{category}.demo_images": {
                "type": "madfh_pipeline.datasets.MVTecAD2Dataset",
                "path": "${globals:demo_root}",
                "category": "{category}",
                "workers": 1,
            }
        },
        "mlflow.yml": {
            "server": {
                "mlflow_tracking_uri": f"sqlite:///{project / 'mlflow.db'}",
                "mlflow_registry_uri": None,
                "credentials": None,
            }
        },
    }


def end_active_mlflow_runs() -> None:
    """Close every MLflow run left active in this process (kedro-mlflow + ``nested: true`` leaves one open)."""
    import mlflow

    while mlflow.active_run() is not None:
        mlflow.end_run()


@pytest.fixture(scope="session")
def empty_mlflow_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An MLflow SQLite database with the schema but no data; copying it saves ~5 s of migrations per project."""
    import mlflow

    path = tmp_path_factory.mktemp("mlflow_template") / "mlflow.db"
    mlflow.MlflowClient(tracking_uri=f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def kedro_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Iterator[Path]:
    """A copy of the project (conf/ and pyproject.toml) in ``tmp_path/project`` with a ``test`` env; cwd is set there.

    ``conf/local`` starts empty (a developer's own local settings must not leak in). Relative paths of the catalog
    (``data/...``) therefore resolve inside the temp project; MLflow writes ``<project>/mlflow.db`` (a copy of an empty,
    migrated database). The generated
    data root is ``<project>/data/01_raw/test_demo``. MLflow runs left active are closed before and after.
    """
    project = tmp_path / "project"
    project.mkdir()
    shutil.copy2(PROJECT_ROOT / "pyproject.toml", project / "pyproject.toml")
    shutil.copytree(PROJECT_ROOT / "conf", project / "conf", ignore=shutil.ignore_patterns("local"))
    (project / "conf" / "local").mkdir()
    # bootstrap_project insists on the source folder; the package itself is imported from the editable install.
    (project / "src").mkdir()
    test_env = project / "conf" / "test"
    test_env.mkdir()
    shutil.copy2(empty_mlflow_db, project / "mlflow.db")
    for name, content in _test_env(project).items():
        (test_env / name).write_text(yaml.safe_dump(content, sort_keys=False))
    monkeypatch.chdir(project)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    end_active_mlflow_runs()
    yield project
    end_active_mlflow_runs()
