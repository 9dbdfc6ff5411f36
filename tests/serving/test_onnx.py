"""ONNX Runtime for PatchCore's feature extractor: maps equal to the torch path within the stated tolerance, the
graph saved and loaded with the model, and a graph that does not fit the detector or the input refused."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from madfh_pipeline.inspection import InspectionModel, InspectionSettings
from madfh_pipeline.models.base import ModelFileError, build_detector
from madfh_pipeline.serving.onnx import ONNX_OPSET, OnnxEmbedding, OnnxRuntimeError, export_embedding

pytestmark = pytest.mark.slow  # the exporter traces the backbone: ~20 s

#: The tolerance docs/serving.md states: maps and scores (values ≈ 15–75 here) within 1e-3 absolute + 1e-5 relative.
ATOL, RTOL = 1e-3, 1e-5


@pytest.fixture(scope="module")
def onnx_model(demo_model: InspectionModel) -> InspectionModel:
    settings = InspectionSettings.from_mapping(demo_model.settings.to_dict() | {"runtime": "onnx"})
    model = InspectionModel(
        demo_model.detector, demo_model.preprocessing, demo_model.category, settings, demo_model.version
    )
    assert model.detector is not demo_model.detector, "the ONNX runtime must work on a copy of the caller's detector"
    return model


def test_maps_equal_the_torch_path(
    demo_model: InspectionModel, onnx_model: InspectionModel, good_images: list[np.ndarray], bad_image: np.ndarray
) -> None:
    assert "_embed" in vars(onnx_model.detector) and "_embed" not in vars(demo_model.detector)
    for image in [*good_images[:2], bad_image]:
        torch_result, onnx_result = demo_model.inspect(image), onnx_model.inspect(image)
        np.testing.assert_allclose(onnx_result.anomaly_map, torch_result.anomaly_map, rtol=RTOL, atol=ATOL)
        assert onnx_result.score == pytest.approx(torch_result.score, rel=RTOL, abs=ATOL)
        assert onnx_result.decision == torch_result.decision


def test_graph_is_saved_and_loaded_with_the_model(
    onnx_model: InspectionModel, bad_image: np.ndarray, tmp_path: Path
) -> None:
    folder = onnx_model.save(tmp_path / "m")
    assert (folder / "embedding.onnx").is_file()
    assert onnx_model.config()["onnx"]["opset"] == ONNX_OPSET
    loaded = InspectionModel.load(folder)
    assert loaded.settings.runtime == "onnx" and isinstance(vars(loaded.detector)["_embed"], OnnxEmbedding)
    assert loaded.inspect(bad_image).score == pytest.approx(onnx_model.inspect(bad_image).score, rel=1e-6)
    (folder / "embedding.onnx").unlink()
    with pytest.raises(ModelFileError, match="holds no embedding.onnx"):
        InspectionModel.load(folder)


def test_an_attached_detector_can_be_deep_copied(onnx_model: InspectionModel, bad_image: np.ndarray) -> None:
    """The feedback pipeline deep-copies the served detector; the copy gets its own session from the graph bytes."""
    import copy

    clone = copy.deepcopy(onnx_model.detector)
    embedding = vars(clone)["_embed"]
    assert isinstance(embedding, OnnxEmbedding) and embedding is not vars(onnx_model.detector)["_embed"]
    canvas = onnx_model.prepare(bad_image)[0]
    tensor = torch.from_numpy(canvas).float().div(255.0)[None, None]
    np.testing.assert_array_equal(clone.predict(tensor).maps, onnx_model.detector.predict(tensor).maps)


def test_a_graph_for_another_detector_or_input_is_refused(onnx_model: InspectionModel) -> None:
    embedding = vars(onnx_model.detector)["_embed"]
    other = build_detector("patchcore", onnx_model.detector.config | {"embed_dim": 64})
    with pytest.raises(ModelFileError, match="another backbone"):
        embedding.attach(other)
    with pytest.raises(OnnxRuntimeError, match="exported for inputs"):
        embedding(torch.zeros(1, 1, 64, 64))


def test_only_patchcore_style_detectors_can_export() -> None:
    autoencoder = build_detector("autoencoder", {"depth": 2, "latent_dim": 8})
    with pytest.raises(OnnxRuntimeError, match="PatchCore"):
        export_embedding(autoencoder, 64, 64, 1)
