"""PatchCore's feature extractor in ONNX Runtime: the heavy, static part of inference, exported once.

What is exported: everything PatchCore does from a canvas (or tile) tensor to its locally aware patch embeddings —
the frozen backbone up to its deepest requested layer (input normalisation and gray → RGB included), the channel
projection (a 1×1 convolution), the local average pooling and the bilinear resize onto the finest grid, then the
concatenation. That is >90 % of PatchCore's CPU time at 1024² and has no data-dependent control flow. What stays in
torch: the exact nearest-neighbour search against the memory bank, the reweighting, the fused upsample + blur and the
tiling logic — they depend on the fitted bank, not on the architecture, and are cheap.

How: ``torch.onnx.export(..., dynamo=True)`` (the torch.export-based exporter, the default since torch 2.9; the
TorchScript one is deprecated) at **ONNX opset 18** (:data:`ONNX_OPSET`), with a dynamic batch axis and the spatial
size fixed to the canvas (or tile) size the model will see. The graph is stored as one self-contained file (weights
inside, no external data). It holds operators and tensors only: loading it cannot execute code.

Why it is faster: ONNX Runtime folds the batch norms into the convolutions, fuses conv + activation and runs
depthwise convolutions (most of EfficientNet-Lite0) with its own kernels; torch's CPU path does each step separately.
Measured speed-up and tolerance: docs/serving.md. The graph carries a key of what it was exported from (backbone,
layers, embedding width, neighbourhood, input shape) in its metadata, and attaching it to a detector with another
key is refused, so a stale graph can never score silently with the wrong features.

Hook into PatchCore: the detector's ``_embed`` method is shadowed on the *instance* (:meth:`OnnxEmbedding.attach`),
so ``predict`` and ``fit`` run unchanged around it; :meth:`OnnxEmbedding.detach` restores it.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch

from madfh_pipeline.models.base import AnomalyDetector, ModelFileError, stable_hash

logger = logging.getLogger(__name__)

#: The ONNX opset the graph is exported at (ONNX Runtime >= 1.14 runs it; torch's dynamo exporter targets >= 18).
ONNX_OPSET = 18
#: Graph metadata keys.
_KEY = "madfh_embedding_key"
_META_PREFIX = "madfh_"
#: Largest |onnx - torch| accepted at export, relative to the largest embedding value (float32 round-off is ~1e-6).
EXPORT_RTOL = 1e-4


class OnnxRuntimeError(RuntimeError):
    """ONNX Runtime cannot serve this detector or input (missing package, wrong device, wrong input shape)."""


def _require_embedding(detector: AnomalyDetector) -> None:
    if not callable(getattr(type(detector), "_embed", None)) or not hasattr(detector, "backbone"):
        raise OnnxRuntimeError(
            f"Detector '{detector.name}' has no PatchCore-style feature embedding; runtime 'onnx' supports PatchCore."
        )
    if getattr(detector, "device", torch.device("cpu")).type != "cpu":
        raise OnnxRuntimeError("runtime 'onnx' runs on CPU; the detector is on " + str(detector.device) + ".")


def embedding_input_size(detector: AnomalyDetector, height: int, width: int) -> tuple[int, int]:
    """(height, width) of the tensors PatchCore embeds for a canvas of ``height × width``: the canvas, or its tile."""
    tile = detector.config.get("tile_size")
    if tile is None or (height <= int(tile) and width <= int(tile)):
        return height, width
    return min(int(tile), height), min(int(tile), width)


def embedding_key(detector: AnomalyDetector, channels: int, height: int, width: int) -> str:
    """Identity of the computation the graph replaces: a graph exported for another one must not be used."""
    cfg = detector.config
    return stable_hash(
        {
            "backbone": cfg.get("backbone"),
            "layers": list(getattr(detector.backbone, "layers", [])),
            "weights_path": str(cfg.get("weights_path")),
            "embed_dim": cfg.get("embed_dim"),
            "neighbourhood": cfg.get("neighbourhood"),
            "embedding_dim": int(getattr(detector, "embedding_dim", 0)),
            "input": [int(channels), int(height), int(width)],
        }
    )


class _EmbedModule(torch.nn.Module):
    """The detector's own embedding method as a module, for the exporter (always the class's, never a shadow)."""

    def __init__(self, detector: AnomalyDetector) -> None:
        super().__init__()
        self.detector = detector
        self.backbone = detector.backbone  # registered so the exporter sees the weights as parameters

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return type(self.detector)._embed(self.detector, images)


class OnnxEmbedding:
    """An ONNX Runtime session standing in for ``PatchCore._embed``: (B, C, H, W) float32 → (B, D, h, w)."""

    def __init__(self, model_bytes: bytes, threads: int | None = None) -> None:
        try:
            import onnxruntime as ort
        except ImportError as exc:
            raise OnnxRuntimeError("runtime 'onnx' needs the onnxruntime package (pip install onnxruntime).") from exc
        self.model_bytes = model_bytes
        options = ort.SessionOptions()
        # As many threads as torch uses here: a Dask worker set to one torch thread gets a one-thread session.
        options.intra_op_num_threads = int(threads or torch.get_num_threads())
        options.inter_op_num_threads = 1
        options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
        self.session = ort.InferenceSession(model_bytes, options, providers=["CPUExecutionProvider"])
        self.meta: dict[str, str] = dict(self.session.get_modelmeta().custom_metadata_map)
        if _KEY not in self.meta:
            raise ModelFileError("The ONNX graph carries no madfh embedding key: it was not exported by this package.")
        self.input_name = self.session.get_inputs()[0].name
        self.input_shape = tuple(int(v) for v in self.meta[_META_PREFIX + "input"].split(","))  # (C, H, W)
        self.threads = options.intra_op_num_threads

    def __reduce__(self) -> tuple[type[OnnxEmbedding], tuple[bytes]]:
        """Copies and pickles rebuild the session from the graph's bytes (a session itself cannot be copied): a
        detector with an attached embedding can be deep-copied (the feedback pipeline does) or sent to a worker."""
        return type(self), (self.model_bytes,)

    # ---------------------------------------------------------------- use
    def __call__(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != self.input_shape:
            raise OnnxRuntimeError(
                f"The ONNX embedding was exported for inputs (B, {', '.join(map(str, self.input_shape))}), got "
                f"{tuple(images.shape)}; export it again for this canvas or tile size."
            )
        array = images.detach().to("cpu", torch.float32).contiguous().numpy()
        (out,) = self.session.run(None, {self.input_name: array})
        return torch.from_numpy(out)

    def attach(self, detector: AnomalyDetector) -> None:
        """Make ``detector`` embed through this session; refused if the graph was exported from another set-up."""
        _require_embedding(detector)
        channels, height, width = self.input_shape
        expected = embedding_key(detector, channels, height, width)
        if self.meta[_KEY] != expected:
            raise ModelFileError(
                "The ONNX graph was exported for another backbone, layers, embedding or input size than this "
                f"detector's (key {self.meta[_KEY]} != {expected}); export it again."
            )
        detector._embed = self  # type: ignore[method-assign]  # the instance shadows the class's method

    @staticmethod
    def detach(detector: AnomalyDetector) -> None:
        detector.__dict__.pop("_embed", None)

    # ---------------------------------------------------------------- persistence
    def describe(self) -> dict[str, Any]:
        return {
            "opset": int(self.meta.get(_META_PREFIX + "opset", ONNX_OPSET)),
            "input_shape": list(self.input_shape),
            "key": self.meta[_KEY],
            "bytes": len(self.model_bytes),
        }

    def save(self, path: str | Path) -> Path:
        path = Path(path)
        tmp = path.with_name(path.name + ".tmp")
        tmp.write_bytes(self.model_bytes)
        tmp.replace(path)
        return path

    @classmethod
    def load(cls, path: str | Path, detector: AnomalyDetector | None = None) -> OnnxEmbedding:
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"No ONNX embedding at '{path}'.")
        try:
            embedding = cls(path.read_bytes())
        except OnnxRuntimeError:
            raise
        except Exception as exc:  # ONNX Runtime's own errors for a file that is not a valid graph
            raise ModelFileError(f"'{path}' is not a valid ONNX graph ({type(exc).__name__}: {exc}).") from exc
        if detector is not None:
            _require_embedding(detector)
        return embedding


@contextlib.contextmanager
def _quiet_exporter() -> Iterator[io.StringIO]:
    """The exporter prints its progress and its IR passes log every folded constant at INFO: keep that out of a
    pipeline's log (it goes to DEBUG), while warnings and errors still come through."""
    buffer = io.StringIO()
    noisy = [logging.getLogger(name) for name in ("onnx_ir", "onnxscript", "torch.onnx")]
    levels = [log.level for log in noisy]
    for log in noisy:
        log.setLevel(logging.WARNING)
    try:
        with contextlib.redirect_stdout(buffer):
            yield buffer
    finally:
        for log, level in zip(noisy, levels, strict=True):
            log.setLevel(level)


def export_embedding(
    detector: AnomalyDetector,
    height: int,
    width: int,
    channels: int,
    opset: int = ONNX_OPSET,
    check: bool = True,
) -> OnnxEmbedding:
    """Export ``detector``'s embedding for canvases of ``height × width × channels`` and open it in ONNX Runtime.

    ``check`` runs one random batch through both paths and refuses the graph if they differ by more than
    :data:`EXPORT_RTOL` of the largest embedding value. Takes tens of seconds (the exporter traces the network).
    """
    _require_embedding(detector)
    try:
        import onnx
    except ImportError as exc:
        raise OnnxRuntimeError("Exporting to ONNX needs the onnx and onnxscript packages.") from exc
    in_h, in_w = embedding_input_size(detector, height, width)
    module = _EmbedModule(detector).eval()
    example = torch.rand(2, channels, in_h, in_w, generator=torch.Generator().manual_seed(0))
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp, torch.no_grad(), _quiet_exporter() as chatter:
        target = Path(tmp) / "embedding.onnx"
        torch.onnx.export(
            module,
            (example,),
            str(target),
            dynamo=True,
            opset_version=opset,
            input_names=["images"],
            output_names=["embeddings"],
            dynamic_shapes=({0: torch.export.Dim("batch", min=1, max=4096)},),
            external_data=False,
            verbose=False,
        )
        graph = onnx.load(str(target))
    logger.debug("ONNX exporter output:\n%s", chatter.getvalue())
    meta = {
        _KEY: embedding_key(detector, channels, in_h, in_w),
        _META_PREFIX + "input": f"{channels},{in_h},{in_w}",
        _META_PREFIX + "opset": str(opset),
        _META_PREFIX + "backbone": str(detector.config.get("backbone")),
        _META_PREFIX + "torch": torch.__version__,
    }
    for key, value in meta.items():
        entry = graph.metadata_props.add()
        entry.key, entry.value = key, value
    buffer = io.BytesIO()
    onnx.save_model(graph, buffer)
    embedding = OnnxEmbedding(buffer.getvalue())
    seconds = time.perf_counter() - started
    if check:
        with torch.no_grad():
            expected = type(detector)._embed(detector, example[:1]).numpy()
        got = embedding(example[:1]).numpy()
        error = float(np.abs(got - expected).max())
        scale = float(np.abs(expected).max())
        if not error <= EXPORT_RTOL * max(scale, 1.0):
            raise OnnxRuntimeError(
                f"The exported ONNX embedding differs from torch by {error:.3g} (largest value {scale:.3g}); refused."
            )
        logger.info("ONNX embedding exported in %.1f s (opset %d); max |onnx - torch| = %.2g.", seconds, opset, error)
    return embedding
