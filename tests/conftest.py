"""Shared fixtures: tiny MVTec AD 2 trees on disk, category entries, and a throw-away copy of the Kedro project.

Everything a test writes lands under its ``tmp_path``; nothing touches the real ``data/``, ``mlflow.db`` or network.
"""

from __future__ import annotations

import os

# Set before Kedro (and its telemetry plugin) or matplotlib are imported by any test module.
os.environ["DO_NOT_TRACK"] = "1"
os.environ["KEDRO_DISABLE_TELEMETRY"] = "1"
os.environ["MPLBACKEND"] = "Agg"

import copy  # noqa: E402
import functools  # noqa: E402
import hashlib  # noqa: E402
import logging  # noqa: E402
import shutil  # noqa: E402
import subprocess  # noqa: E402
import sys  # noqa: E402
from collections.abc import Callable, Iterator, Mapping, Sequence  # noqa: E402
from dataclasses import dataclass  # noqa: E402
from pathlib import Path  # noqa: E402
from typing import Any  # noqa: E402

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import pandas as pd  # noqa: E402
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
    free_names: bool = False,
) -> Path:
    """Write ``<root>/<category>/`` in the MVTec AD 2 layout and return the category folder.

    File names follow the official pattern ``NNN_<lighting>.png``; train/validation are ``regular``, test_public
    cycles through :data:`TREE_LIGHTING`, every ``test_public/bad`` image gets a 0/255 mask of the same size.
    ``free_names=True`` names every file ``part_<n>.png`` instead (a user's own data: no lighting token at all).
    """
    counts = TREE_COUNTS | (counts or {})
    rng = np.random.default_rng(seed)
    cat_dir = Path(root) / category
    serial = iter(range(10_000))

    def stem(index: int, lighting: str) -> str:
        return f"part_{next(serial)}" if free_names else f"{index:03d}_{lighting}"

    for split in ("train", "validation"):
        for i in range(counts[split]):
            path = cat_dir / split / "good" / f"{stem(i, 'regular')}.png"
            _write_png(path, _tree_image(rng, width, height, channels))
    for label in ("good", "bad"):
        for i in range(counts[f"test_public_{label}"]):
            name = stem(i, TREE_LIGHTING[i % len(TREE_LIGHTING)])
            _write_png(cat_dir / "test_public" / label / f"{name}.png", _tree_image(rng, width, height, channels))
            if label == "bad":
                _write_png(
                    cat_dir / "test_public" / "ground_truth" / "bad" / f"{name}_mask.png",
                    _tree_mask(i, width, height),
                )
    for i in range(counts["test_private"]):
        path = cat_dir / "test_private" / f"{stem(i, 'regular')}.png"
        _write_png(path, _tree_image(rng, width, height, channels))
    for i in range(counts["test_private_mixed"]):
        path = cat_dir / "test_private_mixed" / f"{stem(i, 'mixed')}.png"
        _write_png(path, _tree_image(rng, width, height, channels))
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

    Deliberate differences from conf/base besides sizes:

    - ``mlflow.yml`` gives the tracking URI as an absolute path. MLflow caches its store per URI *string*, so the
      relative ``sqlite:///mlflow.db`` of conf/base would keep writing to the first temp project's database for
      every later test of the same pytest process.
    - the demo writer renders with one process: the tiny images take milliseconds, while each spawned worker pays
      seconds of imports.
    - evaluation runs in ``canvas`` mode (metrics named ``canvas.<pixel metric>``): the runs here test wiring,
      tracking and reuse, not the native-resolution accumulator.
    - the detectors are pinned to autoencoder + PatchCore, and the optional stages with tests of their own are off:
      the MiniCPM-V branch and the learned explainer (no weights offline), and the inspection stage.
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
            # Detection at toy sizes: the e2e test checks wiring, tracking and reports, not detector quality. The
            # autoencoder keeps conf/base's input_size: null (it trains at the canvas it is given).
            "detection": {
                # Pinned, so a detector added to conf/base (e.g. the MiniCPM-V ones) does not change these runs.
                "detectors": ["autoencoder", "patchcore"],
                "runtime": {"device": "cpu", "batch_size": 8},
                "models": {
                    "autoencoder": {"config": {"depth": 4, "latent_dim": 32, "epochs": 1}},
                    "patchcore": {"config": {"max_bank_size": 256, "pool_max_patches": 5000}},
                },
            },
            # Canvas metrics: native-resolution metrics are not what these runs test (and cost a resize per map).
            "evaluation": {"resolution": "canvas", "examples_per_group": 2},
            # No MiniCPM-V weights in tests (the VLM tests use their own tiny model).
            "vlm": {"enabled": False, "disabled_reason": "no MiniCPM-V weights in the test env"},
            # Nor BLIP weights: explanations come from the grounded describer alone.
            "explainer": {"learned": {"enabled": False, "disabled_reason": "no BLIP weights in the test env"}},
            # The inspection stage (knowledge base, review) has its own tests; here it would only add time.
            "inspection": {"enabled": False},
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


def build_kedro_project(project: Path, empty_mlflow_db: Path) -> Path:
    """Write the temp project of :func:`kedro_project` into ``project`` (a new folder) and return it.

    For fixtures of a wider scope than a test (which cannot take ``kedro_project``); they set the cwd themselves.
    """
    project.mkdir(parents=True)
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
    return project


@pytest.fixture
def kedro_project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, empty_mlflow_db: Path) -> Iterator[Path]:
    """A copy of the project (conf/ and pyproject.toml) in ``tmp_path/project`` with a ``test`` env; cwd is set there.

    ``conf/local`` starts empty (a developer's own local settings must not leak in). Relative paths of the catalog
    (``data/...``) therefore resolve inside the temp project; MLflow writes ``<project>/mlflow.db`` (a copy of an empty,
    migrated database). The generated
    data root is ``<project>/data/01_raw/test_demo``. MLflow runs left active are closed before and after.
    """
    project = build_kedro_project(tmp_path / "project", empty_mlflow_db)
    monkeypatch.chdir(project)
    monkeypatch.delenv("KEDRO_ENV", raising=False)
    end_active_mlflow_runs()
    yield project
    end_active_mlflow_runs()


# ---- test envs derived from ``test`` and the real CLI ----


def deep_merge(base: Mapping[str, Any], override: Mapping[str, Any]) -> dict[str, Any]:
    """``override`` onto ``base`` key by key (what the project's soft merge does to parameters)."""
    out = copy.deepcopy(dict(base))
    for key, value in override.items():
        if isinstance(value, Mapping) and isinstance(out.get(key), Mapping):
            out[key] = deep_merge(out[key], value)
        else:
            out[key] = copy.deepcopy(value)
    return out


def write_env(project: Path, name: str, parameters: Mapping[str, Any] | None = None) -> Path:
    """``conf/<name>``: a copy of the ``test`` env with ``parameters`` merged into its parameters.yml.

    Kedro reads base + one env, so an env that adds a category or a detector to the test setup copies ``test``.
    """
    env = project / "conf" / name
    shutil.copytree(project / "conf" / "test", env)
    current = yaml.safe_load((env / "parameters.yml").read_text())
    (env / "parameters.yml").write_text(yaml.safe_dump(deep_merge(current, parameters or {}), sort_keys=False))
    return env


@pytest.fixture
def make_env() -> Callable[..., Path]:
    """Factory ``make_env(project, name, parameters)``: see :func:`write_env`."""
    return write_env


KEDRO_CLI = Path(sys.executable).with_name("kedro")


def run_kedro(project: Path, *args: str, timeout: float = 240) -> subprocess.CompletedProcess[str]:
    """The real ``kedro`` command in ``project`` (no telemetry, no ``KEDRO_ENV`` of the developer's shell)."""
    env = os.environ | {"DO_NOT_TRACK": "1", "KEDRO_DISABLE_TELEMETRY": "1", "PYTHONUNBUFFERED": "1"}
    for name in ("KEDRO_ENV", "KEDRO_LOGGING_CONFIG"):
        env.pop(name, None)
    return subprocess.run(
        [str(KEDRO_CLI), *args], cwd=project, env=env, capture_output=True, text=True, timeout=timeout, check=False
    )


@pytest.fixture
def kedro_cli() -> Callable[..., subprocess.CompletedProcess[str]]:
    """Factory ``kedro_cli(project, *args, timeout=240)``: see :func:`run_kedro`."""
    return run_kedro


# ---- MLflow queries ----


def mlflow_client(project: Path) -> Any:
    import mlflow

    return mlflow.MlflowClient(tracking_uri=f"sqlite:///{project}/mlflow.db")


def search_runs(project: Path, filter_string: str = "", nested: bool = False) -> list[Any]:
    """Runs of the project's ``madfh_pipeline`` experiment matching ``filter_string``, oldest first.

    Only the ``kedro run`` (parent) runs unless ``nested``: detector runs inherit the parent's ``pipeline`` tag.
    """
    client = mlflow_client(project)
    experiment = client.get_experiment_by_name("madfh_pipeline")
    assert experiment is not None, "kedro-mlflow did not create the experiment"
    runs = client.search_runs(
        [experiment.experiment_id], filter_string=filter_string, order_by=["attributes.start_time ASC"]
    )
    return runs if nested else [r for r in runs if "mlflow.parentRunId" not in r.data.tags]


def child_runs(project: Path, parent: Any) -> dict[str, Any]:
    """The nested detector runs of a ``kedro run``'s run, by detector (at most one each)."""
    runs = search_runs(project, f"tags.`mlflow.parentRunId` = '{parent.info.run_id}'", nested=True)
    by_detector = {run.data.tags["detector"]: run for run in runs}
    assert len(by_detector) == len(runs), f"more than one nested run for a detector: {[r.data.tags for r in runs]}"
    return by_detector


@pytest.fixture
def detector_runs() -> Callable[[Path, Any], dict[str, Any]]:
    """Factory ``detector_runs(project, parent_run)``: see :func:`child_runs`."""
    return child_runs


@pytest.fixture
def mlflow_runs() -> Callable[..., list[Any]]:
    """Factory ``mlflow_runs(project, filter_string="", nested=False)``: see :func:`search_runs`."""
    return search_runs


def metric_points(metrics: Mapping[str, Any]) -> list[tuple[str, float, int]]:
    """(key, value, step) exactly as a detector run would receive them (NaN and non-numbers are left out)."""
    from madfh_pipeline.tracking import _metric_points

    return [(m.key, m.value, m.step) for key, value in metrics.items() for m in _metric_points(key, value, 0)]


@pytest.fixture(scope="session")
def mlflow_points() -> Callable[[Mapping[str, Any]], list[tuple[str, float, int]]]:
    """Factory ``mlflow_points(metrics)``: see :func:`metric_points`."""
    return metric_points


# ---- processed stores and manifests, as preprocessing leaves them ----


def manifest_row(
    relpath: str,
    split: str,
    label: str,
    lighting: str,
    mask_relpath: str = "",
    size: int = 32,
    category: str = "widget",
) -> dict[str, Any]:
    """One manifest row with the columns of preprocessing's ``build_manifest`` (identity geometry, square images)."""
    return {
        "category": category,
        "relpath": relpath,
        "split": split,
        "official_split": split,
        "label": label,
        "lighting": lighting,
        "has_mask": bool(mask_relpath),
        "mask_relpath": mask_relpath,
        "path": f"/raw/{category}/{relpath}",
        "src_width": size,
        "src_height": size,
        "dst_width": size,
        "dst_height": size,
        "scale_x": 1.0,
        "scale_y": 1.0,
        "pad_x": 0,
        "pad_y": 0,
    }


@pytest.fixture(scope="session")
def make_manifest_row() -> Callable[..., dict[str, Any]]:
    """Factory ``make_manifest_row(relpath, split, label, lighting, mask_relpath="", size=32, category="widget")``."""
    return manifest_row


#: Default counts of :func:`write_processed_store`.
STORE_COUNTS = {
    "train": 4,
    "validation": 3,
    "test_public_good": 2,
    "test_public_bad": 2,
    "test_private": 1,
    "test_private_mixed": 0,
}
STORE_LIGHTING = ("regular", "overexposed")


def _store_worker(images: dict[str, np.ndarray]) -> Callable[[dict[str, Any]], dict[str, Any]]:
    def work(task: dict[str, Any]) -> dict[str, Any]:
        from madfh_pipeline.imaging import write_png

        for key in task["outputs"]:
            target = Path(task["store_root"]) / key
            target.parent.mkdir(parents=True, exist_ok=True)
            write_png(target, images[key])
        return {"relpath": task["relpath"], "status": "processed", "problem": ""}

    return work


def write_processed_store(
    root: Path,
    category: str = "widget",
    size: int = 32,
    counts: Mapping[str, int] | None = None,
    seed: int = 0,
) -> tuple[pd.DataFrame, Any]:
    """A processed image store and its manifest, written through ``ImageStore.apply`` as preprocessing does.

    Good images are a uniform texture (128 ± 12), bad ones carry a saturated 8x8 blob with its 0/255 mask (one
    position per index); test_public alternates ``regular`` / ``overexposed``. Each image's fingerprint in the
    store's index is a hash of its pixels, so rewriting an image through this builder changes its fingerprint.
    """
    from madfh_pipeline.datasets.image_store import ImageStore, ImageWrites

    counts = STORE_COUNTS | dict(counts or {})
    rng = np.random.default_rng(seed)
    rows: list[dict[str, Any]] = []
    images: dict[str, np.ndarray] = {}

    def good() -> np.ndarray:
        return np.clip(128 + rng.integers(-12, 13, (size, size)), 0, 255).astype(np.uint8)

    def add(relpath: str, split: str, label: str, lighting: str, image: np.ndarray, mask_rel: str = "") -> None:
        rows.append(manifest_row(relpath, split, label, lighting, mask_rel, size=size, category=category))
        images[relpath] = image

    for split in ("train", "validation"):
        for i in range(counts[split]):
            add(f"{split}/good/{i:03d}_regular.png", split, "good", "regular", good())
    for label in ("good", "bad"):
        for i in range(counts[f"test_public_{label}"]):
            lighting = STORE_LIGHTING[i % len(STORE_LIGHTING)]
            name = f"{i:03d}_{lighting}"
            image, mask_rel = good(), ""
            if label == "bad":
                mask = np.zeros((size, size), np.uint8)
                top, left = (8 + 4 * i) % (size - 8), (10 + 4 * i) % (size - 8)
                mask[top : top + 8, left : left + 8] = 255
                image[mask > 0] = 255
                mask_rel = f"test_public/ground_truth/bad/{name}_mask.png"
                images[mask_rel] = mask
            add(f"test_public/{label}/{name}.png", "test_public", label, lighting, image, mask_rel)
    for split, lighting in (("test_private", "regular"), ("test_private_mixed", "mixed")):
        for i in range(counts[split]):
            add(f"{split}/{i:03d}_{lighting}.png", split, "unknown", lighting, good())
    manifest = pd.DataFrame(rows)
    for col in ("src_width", "src_height", "dst_width", "dst_height", "pad_x", "pad_y"):
        manifest[col] = manifest[col].astype("int64")
    store = ImageStore(root)
    tasks = []
    for row in rows:
        outputs = [row["relpath"]] + ([row["mask_relpath"]] if row["mask_relpath"] else [])
        digest = hashlib.blake2b(b"".join(images[k].tobytes() for k in outputs), digest_size=8).hexdigest()
        tasks.append({"relpath": row["relpath"], "fingerprint": digest, "outputs": outputs})
    store.apply(ImageWrites(tasks=tasks, worker=_store_worker(images), label=f"store {category}"))
    return manifest, store


@pytest.fixture(scope="session")
def make_processed_store() -> Callable[..., tuple[pd.DataFrame, Any]]:
    """Factory ``make_processed_store(root, category="widget", size=32, counts=None, seed=0)``.

    See :func:`write_processed_store`; returns ``(manifest, store)``.
    """
    return write_processed_store


# ---- a minimal registered detector, for tests of the detector plumbing (files, cache, nodes) ----


@functools.cache
def _mean_detector_class() -> type:
    import torch

    from madfh_pipeline.models.base import AnomalyDetector, DetectorOutput

    class MeanDetector(AnomalyDetector):
        """Learns the mean training image; the map is the channel-mean absolute difference, the score its maximum.

        Registered as ``test_mean``. ``fit_calls`` counts fits across instances (to prove that a fit was skipped).
        """

        name = "test_mean"
        fit_calls = 0

        def __init__(self, config: dict[str, Any] | None = None) -> None:
            super().__init__({"offset": 0.0, **(config or {})})
            self.mean: torch.Tensor | None = None

        def fit(self, batches: Callable[[], Any]) -> dict[str, Any]:
            type(self).fit_calls += 1
            total, count = None, 0
            for batch in batches():
                total = batch.sum(0) if total is None else total + batch.sum(0)
                count += batch.shape[0]
            if total is None:
                raise ValueError("no images")
            self.mean = total / count
            return {"loss": [float(self.mean.mean())], "n_images": count}

        def predict(self, batch: torch.Tensor) -> DetectorOutput:
            if self.mean is None:
                raise RuntimeError("not fitted")
            maps = ((batch - self.mean.to(batch.device)).abs().mean(dim=1) + self.config["offset"]).cpu().numpy()
            maps = maps.astype(np.float32)
            return DetectorOutput(scores=maps.reshape(len(maps), -1).max(axis=1), maps=maps)

        def get_state(self) -> dict[str, Any]:
            assert self.mean is not None
            return {"mean": self.mean, "shape": list(self.mean.shape), "notes": {"kind": "mean", "version": [1, 2]}}

        def set_state(self, state: dict[str, Any]) -> None:
            self.mean = state["mean"]

    return MeanDetector


@pytest.fixture(scope="session")
def mean_detector() -> type:
    """The ``test_mean`` detector class (registered once per session): fast to fit, exact to check."""
    return _mean_detector_class()


def rewrite_processed_images(store: Any, images: Mapping[str, np.ndarray]) -> None:
    """Replace images of a processed store the way a changed source would: through a plan, with new fingerprints.

    Every other image keeps its index row (status ``unchanged``), exactly as an incremental preprocessing run leaves
    it; writing files directly would leave the index (and everything fingerprinted from it) unaware of the change.
    """
    from madfh_pipeline.datasets.image_store import ImageWrites

    index = store.read_index()
    tasks = []
    for relpath, fingerprint in zip(index["relpath"], index["fingerprint"], strict=True):
        if relpath in images:
            fingerprint = hashlib.blake2b(images[relpath].tobytes(), digest_size=8).hexdigest()
        tasks.append({"relpath": relpath, "fingerprint": fingerprint, "outputs": [relpath]})
    store.apply(ImageWrites(tasks=tasks, worker=_store_worker(dict(images)), label="rewrite"))


@pytest.fixture(scope="session")
def rewrite_images() -> Callable[[Any, Mapping[str, np.ndarray]], None]:
    """Factory ``rewrite_images(store, {relpath: image})``: see :func:`rewrite_processed_images`."""
    return rewrite_processed_images


def base_catalog_resolver() -> Any:
    """The dataset factories of conf/base/catalog.yml, with conf/base's (secret-free) credentials.

    Entries that need ``${globals:...}`` are left out: resolving those is the config loader's job, tested with a
    session elsewhere.
    """
    from kedro.io.catalog_config_resolver import CatalogConfigResolver

    config = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "catalog.yml").read_text())
    credentials = yaml.safe_load((PROJECT_ROOT / "conf" / "base" / "credentials.yml").read_text()) or {}
    kept = {k: v for k, v in config.items() if "${" not in yaml.safe_dump(v)}
    return CatalogConfigResolver(kept, credentials=credentials)


@pytest.fixture(scope="session")
def catalog_resolver() -> Any:
    """See :func:`base_catalog_resolver`."""
    return base_catalog_resolver()


# ---- runs of the stages that need a trained category (vlm_features, explainer, inspection, feedback, notebook) ----


def write_demo_tree(
    root: Path,
    category: str = "wallplugs",
    width: int = TEST_ENV_WIDTH,
    height: int = TEST_ENV_HEIGHT,
    channels: int = 1,
    counts: Mapping[str, int] | None = None,
    seed: int = 7,
    defect_px: float | None = None,
    defect_kinds: Sequence[str] | None = None,
) -> Path:
    """The demo data set of one category, rendered as the ``demo_data`` pipeline renders it, without a Kedro run.

    Procedural scenes of the category's style with real defects (and their 0/255 masks), in the MVTec AD 2 layout
    under ``<root>/<category>/``; ``counts`` as :data:`TEST_ENV_COUNTS` (the default). Returns the category folder.

    ``defect_px`` / ``defect_kinds`` pin every defective image to one defect of that size and those kinds (the demo
    draws 1-3 defects whose size scales with the image: on thumbnails most of them are a few pixels, which no
    detector finds at a 64² canvas; tests that need detections that follow the defects pin them).
    """
    from madfh_pipeline.demo.synth import SceneSpec, plan_dataset, render_item, render_pair

    spec = SceneSpec(category, width, height, channels)
    folder = Path(root) / category
    for item in plan_dataset(spec, dict(counts or TEST_ENV_COUNTS), seed):
        if item.kind == "defective" and (defect_px is not None or defect_kinds is not None):
            rng = np.random.default_rng(item.seed)
            pair = render_pair(spec, rng, item.render_lighting, n_defects=1, kinds=defect_kinds, size_px=defect_px)
            _write_png(folder / item.image_path, pair.image)
            if item.mask_path is not None:
                _write_png(folder / item.mask_path, pair.mask)
            continue
        for relpath, array in render_item(spec, item).items():
            _write_png(folder / relpath, array)
    return folder


@pytest.fixture(scope="session")
def make_demo_tree() -> Callable[..., Path]:
    """Factory ``make_demo_tree(root, category="wallplugs", width=96, height=80, channels=1, counts=None, seed=7)``.

    See :func:`write_demo_tree`.
    """
    return write_demo_tree


class _Collect(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.INFO)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(record.getMessage())


def run_pipelines(project: Path, env: str, *pipelines: str, **options: Any) -> str:
    """``kedro run --env <env> --pipelines <pipelines>`` through a KedroSession; returns the run's INFO log.

    ``options`` go to ``session.run`` (``node_names``, ``to_nodes``, ...). MLflow runs left active are closed before
    and after, also when the run fails (the exception propagates). The caller sets the cwd to the project.
    """
    from kedro.framework.session import KedroSession
    from kedro.framework.startup import bootstrap_project

    bootstrap_project(project)  # before the handler: a first bootstrap may re-apply the logging configuration
    end_active_mlflow_runs()
    handler = _Collect()
    root = logging.getLogger()
    root.addHandler(handler)
    try:
        with KedroSession.create(project_path=project, env=env) as session:
            session.run(pipeline_names=list(pipelines), **options)
    finally:
        root.removeHandler(handler)
        end_active_mlflow_runs()
    return "\n".join(handler.lines)


@pytest.fixture(scope="session")
def run_kedro_session() -> Callable[..., str]:
    """Factory ``run_kedro_session(project, env, *pipelines, **options) -> log``: see :func:`run_pipelines`."""
    return run_pipelines


#: Defects of the stage tests' defective images: one, large enough to be seen on a thumbnail.
VISIBLE_DEFECTS: dict[str, Any] = {"defect_px": 24, "defect_kinds": ("scratch", "missing_piece", "crack")}
#: A small PatchCore: with the test env's 1 % coreset a 64² canvas leaves a bank of a few patches.
SMALL_PATCHCORE = {"coreset_ratio": 0.25}
#: The stage tests' category: gray sheet metal, whose visible defects PatchCore finds at the test env's 64² canvas.
STAGE_CATEGORY = "sheet_metal"


def build_category_project(
    folder: Path,
    empty_mlflow_db: Path,
    env: str,
    parameters: Mapping[str, Any] | None = None,
    category: str = STAGE_CATEGORY,
    counts: Mapping[str, int] | None = None,
    seed: int = 11,
) -> Path:
    """A temp project (:func:`build_kedro_project`) with demo data of ``category`` and an env derived from ``test``.

    The data has :data:`VISIBLE_DEFECTS`; the env's PatchCore keeps a quarter of the patches (:data:`SMALL_PATCHCORE`)
    and ``parameters`` are merged on top. Returns the project; the cwd is left alone.
    """
    project = build_kedro_project(folder, empty_mlflow_db)
    write_demo_tree(project / "data" / "01_raw" / "test_demo", category, counts=counts, seed=seed, **VISIBLE_DEFECTS)
    base = {"detection": {"models": {"patchcore": {"config": SMALL_PATCHCORE}}}}
    write_env(project, env, deep_merge(base, parameters or {}))
    return project


@pytest.fixture(scope="session")
def make_category_project(empty_mlflow_db: Path) -> Callable[..., Path]:
    """Factory ``make_category_project(folder, env, parameters=None, category="sheet_metal", counts=None, seed=11)``.

    See :func:`build_category_project`; usable from fixtures of any scope (it does not change the cwd).
    """

    def make(folder: Path, env: str, parameters: Mapping[str, Any] | None = None, **options: Any) -> Path:
        return build_category_project(folder, empty_mlflow_db, env, parameters, **options)

    return make


INSPECTED_COUNTS = {
    "train": 6,
    "validation": 3,
    "test_public_good": 4,
    "test_public_bad": 4,
    "test_private": 1,
    "test_private_mixed": 1,
}
INSPECTED_ENV = "inspected"


@dataclass(frozen=True)
class InspectedRun:
    """A category trained, evaluated and inspected once (see :func:`inspected_run`)."""

    project: Path
    env: str
    category: str
    log: str
    inbox: Path
    #: inbox file name → what it is: ``good`` / ``bad`` (test_public images), ``large`` (a good one at 2× the size),
    #: ``jpeg`` (a bad one as JPEG), ``corrupt`` (PNG signature + garbage)
    files: dict[str, str]


def _fill_inbox(inbox: Path, raw: Path) -> dict[str, str]:
    """A line's drop folder: the category's test_public images plus a JPEG, another size, a corrupt file, a note."""
    files: dict[str, str] = {}
    inbox.mkdir(parents=True, exist_ok=True)
    for label in ("good", "bad"):
        for source in sorted((raw / "test_public" / label).glob("*.png")):
            shutil.copy2(source, inbox / f"{label}_{source.name}")
            files[f"{label}_{source.name}"] = label
    good = sorted((raw / "test_public" / "good").glob("*.png"))[0]
    bad = sorted((raw / "test_public" / "bad").glob("*.png"))[0]
    image = cv2.imread(str(good), cv2.IMREAD_UNCHANGED)
    assert cv2.imwrite(str(inbox / "large.png"), cv2.resize(image, None, fx=2.0, fy=2.0))
    files["large.png"] = "large"
    assert cv2.imwrite(str(inbox / "bad_as.jpg"), cv2.imread(str(bad), cv2.IMREAD_UNCHANGED))
    files["bad_as.jpg"] = "jpeg"
    (inbox / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + b"not an image" * 10)
    files["corrupt.png"] = "corrupt"
    (inbox / "notes.txt").write_text("not an image: ignored by the listing\n")
    return files


@pytest.fixture(scope="session")
def inspected_run(tmp_path_factory: pytest.TempPathFactory, empty_mlflow_db: Path) -> Iterator[InspectedRun]:
    """One ``kedro run --env inspected --pipelines=sheet_metal`` in a temp project, shared by read-mostly tests.

    Demo data with visible defects, autoencoder + PatchCore, canvas metrics, grounded explanations only (learned
    explainer and MiniCPM-V off, as in the demo), and the inspection stage on, inspecting a drop folder
    ``data/inbox/sheet_metal`` (:func:`_fill_inbox`) with PatchCore's model. Tests that run more in it chdir into
    ``project`` themselves and leave the run's outputs as they found them (the inspection, explainer and notebook
    tests share it).
    """
    category = STAGE_CATEGORY
    parameters = {
        "detection": {"detectors": ["autoencoder", "patchcore"]},
        "inspection": {"enabled": True, "detector": "patchcore"},
    }
    project = build_category_project(
        tmp_path_factory.mktemp("inspected_run") / "project",
        empty_mlflow_db,
        INSPECTED_ENV,
        parameters,
        counts=INSPECTED_COUNTS,
    )
    inbox = project / "data" / "inbox" / category
    files = _fill_inbox(inbox, project / "data" / "01_raw" / "test_demo" / category)
    catalog_file = project / "conf" / INSPECTED_ENV / "catalog.yml"
    catalog = yaml.safe_load(catalog_file.read_text())
    catalog["{category}.inspection_images"] = {
        "type": "madfh_pipeline.datasets.ImageFolderDataset",
        "path": str(project / "data" / "inbox" / "{category}"),
    }
    catalog_file.write_text(yaml.safe_dump(catalog, sort_keys=False))
    with pytest.MonkeyPatch.context() as patch:
        patch.chdir(project)
        patch.delenv("KEDRO_ENV", raising=False)
        log = run_pipelines(project, INSPECTED_ENV, category)
    yield InspectedRun(project, INSPECTED_ENV, category, log, inbox, files)
