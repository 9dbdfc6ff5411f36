"""The detector interface's plumbing: the plug-in registry, fingerprints, and the safe model file format.

Model files must never execute code: a crafted pickle (a file copied from another station, a download) is refused
by :func:`load_detector` and by the legacy converter before any of its payload can run. Each refusal test first
shows that its payload *is* live (unpickling it the unsafe way creates the marker file), so the test can fail.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from madfh_pipeline.models import convert
from madfh_pipeline.models.autoencoder import AutoencoderDetector
from madfh_pipeline.models.base import (
    FILE_FORMAT,
    LEGACY_FORMAT,
    AnomalyDetector,
    ModelFileError,
    Thresholds,
    build_detector,
    convert_legacy_file,
    detector_class,
    detector_payload,
    load_detector,
    read_header,
    save_detector,
    stable_hash,
)

CONVERT_COMMAND = "python -m madfh_pipeline.models.convert"


def _images(n: int = 4, channels: int = 1, size: int = 16, seed: int = 0) -> torch.Tensor:
    return 0.3 + 0.4 * torch.rand(n, channels, size, size, generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def fitted_mean(mean_detector: type) -> AnomalyDetector:
    detector = mean_detector({"offset": 0.25})
    detector.fit(lambda: _images().split(2))
    detector.thresholds = Thresholds(pixel=0.5, image=0.75, rule="mean+3.0std", stats={"pixel_mean": 0.1})
    detector.provenance = {"training_fingerprint": "abc", "n_train": 4}
    return detector


# --------------------------------------------------------------------------------------------------------------------
# registry


def test_builtin_detectors_are_found_by_importing_on_a_miss() -> None:
    """A fresh process that imported only the base module still builds 'patchcore' (no if/else chain of imports)."""
    code = (
        "import sys\n"
        "from madfh_pipeline.models.base import AnomalyDetector, detector_class\n"
        "assert 'patchcore' not in AnomalyDetector.registry\n"
        "assert 'madfh_pipeline.models.patchcore' not in sys.modules\n"
        "print(detector_class('patchcore').__module__)\n"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, check=False)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip() == "madfh_pipeline.models.patchcore"


def test_a_plugin_module_registers_by_being_imported(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "plugin_for_registry_test.py").write_text(
        "from madfh_pipeline.models.base import AnomalyDetector\n"
        "class Plugged(AnomalyDetector):\n"
        "    name = 'plugged_for_registry_test'\n"
        "    def fit(self, batches): return {}\n"
        "    def predict(self, batch): raise NotImplementedError\n"
        "    def get_state(self): return {}\n"
        "    def set_state(self, state): pass\n"
    )
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.setattr(AnomalyDetector, "registry", dict(AnomalyDetector.registry))  # undone after the test
    with pytest.raises(ValueError, match="Unknown detector 'plugged_for_registry_test'.*detection.models.<key>.module"):
        detector_class("plugged_for_registry_test")
    cls = detector_class("plugged_for_registry_test", module="plugin_for_registry_test")
    assert cls.__module__ == "plugin_for_registry_test"
    detector = build_detector("plugged_for_registry_test", {"k": 1}, "plugin_for_registry_test")
    assert isinstance(detector, cls) and detector.config == {"k": 1}


def test_unknown_detector_lists_the_known_ones_and_a_bad_module_is_named() -> None:
    with pytest.raises(ValueError, match=r"Unknown detector 'nope'\. Known detectors: .*autoencoder.*patchcore"):
        detector_class("nope")
    with pytest.raises(ValueError, match="Detector 'x': cannot import its module 'no_such_module_anywhere'"):
        detector_class("x", module="no_such_module_anywhere")


def test_build_detector_passes_the_config() -> None:
    detector = build_detector("autoencoder", {"depth": 3, "input_size": 32})
    assert isinstance(detector, AutoencoderDetector)
    assert detector.config["depth"] == 3 and detector.config["input_size"] == 32


# --------------------------------------------------------------------------------------------------------------------
# fingerprints


def test_stable_hash_ignores_key_order_but_not_values() -> None:
    assert stable_hash({"a": 1, "b": [1, 2]}) == stable_hash({"b": [1, 2], "a": 1})
    assert stable_hash({"a": 1}) != stable_hash({"a": 2})
    assert stable_hash({"a": [1, 2]}) != stable_hash({"a": [2, 1]})
    assert len(stable_hash(None)) == 24  # 12 bytes, hex


def test_fingerprint_follows_what_decides_the_maps(mean_detector: type) -> None:
    first, second = mean_detector({"offset": 0.0}), mean_detector({"offset": 0.0})
    assert first.fingerprint == second.fingerprint
    second.provenance = {"training_fingerprint": "other images", "fitted_at": "now"}
    assert second.fingerprint != first.fingerprint
    first.provenance = {"training_fingerprint": "other images", "fitted_at": "yesterday"}  # when: not what
    assert second.fingerprint == first.fingerprint
    second.thresholds = Thresholds(pixel=1.0)
    assert second.fingerprint != first.fingerprint
    assert mean_detector({"offset": 1.0}).fingerprint != mean_detector({"offset": 0.0}).fingerprint


# --------------------------------------------------------------------------------------------------------------------
# the safe format


def test_round_trip_keeps_state_thresholds_provenance_and_outputs(fitted_mean: AnomalyDetector, tmp_path: Path) -> None:
    path = tmp_path / "models" / "mean.safetensors"
    save_detector(fitted_mean, path)
    assert [p.name for p in path.parent.iterdir()] == ["mean.safetensors"]  # written atomically: no .tmp left
    loaded = load_detector(path)
    assert type(loaded) is type(fitted_mean)
    assert loaded.config == {"offset": 0.25}
    assert loaded.thresholds == fitted_mean.thresholds
    assert loaded.provenance == {"training_fingerprint": "abc", "n_train": 4}
    assert loaded.fingerprint == fitted_mean.fingerprint
    state = loaded.get_state()
    assert state["shape"] == [1, 16, 16] and state["notes"] == {"kind": "mean", "version": [1, 2]}
    probe = _images(3, seed=5)
    np.testing.assert_array_equal(loaded.predict(probe).maps, fitted_mean.predict(probe).maps)


def test_header_is_json_and_tensors_are_the_body(fitted_mean: AnomalyDetector, tmp_path: Path) -> None:
    save_detector(fitted_mean, tmp_path / "m.safetensors")
    header = read_header(tmp_path / "m.safetensors")
    assert header["format"] == FILE_FORMAT
    assert (header["name"], header["config"]) == ("test_mean", {"offset": 0.25})
    assert header["thresholds"]["pixel"] == 0.5 and header["provenance"]["training_fingerprint"] == "abc"
    assert header["state"]["mean"] == {"__tensor__": "state.mean"}  # a reference into the tensor body
    _, tensors = detector_payload(fitted_mean)
    assert list(tensors) == ["state.mean"]
    torch.testing.assert_close(tensors["state.mean"], fitted_mean.mean)


def test_state_must_be_tensors_and_json_values(fitted_mean: AnomalyDetector, tmp_path: Path) -> None:
    fitted_mean.get_state = lambda: {"mean": fitted_mean.mean, "extra": [1, {"bad": object()}]}  # type: ignore[method-assign]
    with pytest.raises(TypeError, match=r"state\.extra\.1\.bad.*object.*tensors and JSON values"):
        save_detector(fitted_mean, tmp_path / "m.safetensors")
    assert not (tmp_path / "m.safetensors").exists()


def test_numpy_values_in_the_state_are_stored(fitted_mean: AnomalyDetector, tmp_path: Path) -> None:
    original = fitted_mean.get_state

    def with_numpy() -> dict[str, Any]:
        return original() | {"counts": np.arange(3, dtype=np.int64), "scale": np.float32(0.5)}

    fitted_mean.get_state = with_numpy  # type: ignore[method-assign]
    save_detector(fitted_mean, tmp_path / "m.safetensors")
    header = read_header(tmp_path / "m.safetensors")
    assert header["state"]["scale"] == 0.5
    assert header["state"]["counts"] == {"__tensor__": "state.counts"}


def test_a_safetensors_file_that_is_not_a_detector_is_refused(tmp_path: Path) -> None:
    save_file({"w": torch.zeros(2)}, str(tmp_path / "weights.safetensors"))
    with pytest.raises(ModelFileError, match="safetensors file but not a madfh_pipeline detector"):
        load_detector(tmp_path / "weights.safetensors")
    header = {"format": "madfh_detector/99", "name": "test_mean", "config": {}, "state": {}}
    save_file({"w": torch.zeros(2)}, str(tmp_path / "future.safetensors"), metadata={"madfh": json.dumps(header)})
    with pytest.raises(ModelFileError, match=rf"format 'madfh_detector/99'; this version reads {FILE_FORMAT}"):
        read_header(tmp_path / "future.safetensors")


def test_missing_file_says_to_train_first(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="Run the training pipeline first"):
        load_detector(tmp_path / "none.safetensors")


# --------------------------------------------------------------------------------------------------------------------
# files that try to run code


class _Payload:
    """Unpickling this object creates ``marker`` (stands in for any code a crafted model file could run)."""

    def __init__(self, marker: Path) -> None:
        self.marker = str(marker)

    def __reduce__(self) -> tuple[Any, ...]:
        return (open, (self.marker, "w"))


def _crafted(path: Path, marker: Path) -> Path:
    """A file in the legacy layout (a torch pickle) whose state is a code-running payload."""
    torch.save({"format": LEGACY_FORMAT, "name": "test_mean", "config": {}, "state": _Payload(marker)}, path)
    return path


def test_the_crafted_payload_is_live(tmp_path: Path) -> None:
    """The control: unpickled the unsafe way, the payload does run. The refusals below are therefore real."""
    marker = tmp_path / "control_marker"
    torch.load(_crafted(tmp_path / "control.pt", marker), weights_only=False)
    assert marker.exists()


@pytest.mark.parametrize("suffix", [".pt", ".safetensors"])
def test_load_refuses_a_pickle_and_never_runs_it(tmp_path: Path, suffix: str) -> None:
    marker = tmp_path / "pwned"
    path = _crafted(tmp_path / f"model{suffix}", marker)
    with pytest.raises(ModelFileError) as info:
        load_detector(path)
    message = str(info.value)
    assert str(path) in message and "not a safetensors detector file" in message
    assert f"{CONVERT_COMMAND} {path}" in message  # says how to move a genuine old model over
    with pytest.raises(ModelFileError):
        read_header(path)
    assert not marker.exists()


def test_converter_refuses_a_pickle_payload_and_never_runs_it(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    path = _crafted(tmp_path / "model.pt", marker)
    with pytest.raises(
        ModelFileError, match=r"(?s)holds more than tensors and plain values.*it is refused and nothing in it ran"
    ):
        convert_legacy_file(path)
    assert convert.main([str(path)]) == 1  # the command line says so with a non-zero exit
    assert not marker.exists()
    assert not path.with_suffix(".safetensors").exists()


def test_a_file_cannot_make_the_loader_import_a_module(
    fitted_mean: AnomalyDetector, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Importing runs a module's top level, so the module named in a file's header is imported only if it is ours."""
    marker = tmp_path / "imported"
    (tmp_path / "evil_detector_module.py").write_text(f"open({str(marker)!r}, 'w').close()\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    header, tensors = detector_payload(fitted_mean)
    header["module"] = "evil_detector_module"
    path = tmp_path / "m.safetensors"
    save_file(tensors, str(path), metadata={"madfh": json.dumps(header)})
    loaded = load_detector(path)
    assert loaded.name == "test_mean"
    assert not marker.exists() and "evil_detector_module" not in sys.modules


# --------------------------------------------------------------------------------------------------------------------
# converting genuine legacy files


@pytest.fixture(scope="module")
def legacy_autoencoder() -> AutoencoderDetector:
    config = {"input_size": 32, "depth": 3, "latent_dim": 8, "epochs": 1, "batch_size": 4, "smoothing_sigma": 1.0}
    detector = AutoencoderDetector(config)
    detector.fit(lambda: _images(4, size=32).split(2))
    detector.thresholds = Thresholds(pixel=0.2, image=0.3, rule="mean+3.0std")
    return detector


def _legacy_file(detector: AutoencoderDetector, path: Path) -> Path:
    """What ``save_detector`` wrote before the safe format: ``torch.save`` of a dict of tensors and plain values."""
    state = detector.get_state()
    old_state = {"model": state["model"], "in_channels": state["in_channels"]}  # the first format had no input_size
    payload = {
        "format": LEGACY_FORMAT,
        "name": detector.name,
        "config": detector.config,
        "state": old_state,
        "thresholds": detector.thresholds.to_dict(),
    }
    torch.save(payload, path)
    return path


def test_a_genuine_legacy_file_converts_and_loads(legacy_autoencoder: AutoencoderDetector, tmp_path: Path) -> None:
    source = _legacy_file(legacy_autoencoder, tmp_path / "autoencoder.pt")
    with pytest.raises(ModelFileError, match="convert"):
        load_detector(source)  # refused as it is ...
    target = convert_legacy_file(source)  # ... converted once ...
    assert target == tmp_path / "autoencoder.safetensors"
    loaded = load_detector(target)  # ... then loaded safely
    assert isinstance(loaded, AutoencoderDetector)
    assert loaded.config == legacy_autoencoder.config and loaded.thresholds == legacy_autoencoder.thresholds
    probe = _images(2, size=32, seed=9)
    np.testing.assert_array_equal(loaded.predict(probe).maps, legacy_autoencoder.predict(probe).maps)


def test_convert_command_writes_the_named_target(legacy_autoencoder: AutoencoderDetector, tmp_path: Path) -> None:
    source = _legacy_file(legacy_autoencoder, tmp_path / "old.pt")
    assert convert.main([str(source), str(tmp_path / "new" / "ae.safetensors")]) == 0
    assert read_header(tmp_path / "new" / "ae.safetensors")["name"] == "autoencoder"


def test_a_plain_torch_file_that_is_not_a_legacy_detector_is_refused(tmp_path: Path) -> None:
    torch.save({"weights": torch.zeros(2)}, tmp_path / "other.pt")
    with pytest.raises(ModelFileError, match=f"is not a {LEGACY_FORMAT} detector file"):
        convert_legacy_file(tmp_path / "other.pt")
