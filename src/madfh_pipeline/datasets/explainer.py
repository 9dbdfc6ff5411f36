"""Kedro datasets of the explainer: training pairs (JSONL + images, in 05_model_input) and the LoRA explainer folder.

Pairs are kept as files a person can open (the composite images and their target texts), not as a pickle, so the
training set of the explainer can be reviewed like any other data. The explainer folder holds the adapters as
safetensors plus the processor and a JSON spec (see :class:`madfh_pipeline.explain.lora.LoraExplainer`); saving it also
logs it to the category's explainer run in MLflow.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Any

from kedro.io import AbstractDataset, DatasetError

from madfh_pipeline import tracking
from madfh_pipeline.imaging import read_image, write_png

PAIRS_FILE = "pairs.jsonl"


class TrainingPairsDataset(AbstractDataset[list[Any], list[Any]]):
    """A list of :class:`~madfh_pipeline.explain.dataset.TrainingPair` as ``pairs.jsonl`` + ``images/<n>.png``."""

    def __init__(self, path: str, metadata: dict[str, Any] | None = None) -> None:
        self._path = Path(path)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return (self._path / PAIRS_FILE).is_file()

    def save(self, data: list[Any]) -> None:
        if self._path.exists():
            shutil.rmtree(self._path)  # a set is replaced whole: no image of an earlier set may linger
        (self._path / "images").mkdir(parents=True)
        lines = []
        for i, pair in enumerate(data):
            image = f"images/{i:05d}.png"
            write_png(self._path / image, pair.image)
            lines.append(
                json.dumps(
                    {
                        "image_id": pair.image_id,
                        "image": image,
                        "text": pair.text,
                        "group": pair.group,
                        "source": pair.source,
                    }
                )
            )
        (self._path / PAIRS_FILE).write_text("\n".join(lines) + ("\n" if lines else ""))

    def load(self) -> list[Any]:
        from madfh_pipeline.explain.dataset import TrainingPair

        path = self._path / PAIRS_FILE
        if not path.is_file():
            raise DatasetError(f"No explainer pairs at '{self._path}': run the explainer pipeline's build_pairs node.")
        pairs = []
        for line in path.read_text().splitlines():
            if line.strip():
                record = json.loads(line)
                image = read_image(self._path / record.pop("image"), channels=3)
                pairs.append(TrainingPair(image=image, **record))
        return pairs


class LoraExplainerDataset(AbstractDataset[Any, Any]):
    """The fine-tuned explainer folder; ``save`` also logs it to the ``(category, explainer)`` MLflow run."""

    def __init__(
        self,
        path: str,
        category: str | None = None,
        local_files_only: bool = True,
        device: str = "auto",
        metadata: dict[str, Any] | None = None,
    ) -> None:
        self._path = Path(path)
        self._category = category
        self._local_files_only = local_files_only
        self._device = device
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"path": str(self._path)}

    def _exists(self) -> bool:
        return (self._path / "adapter_model.safetensors").is_file()

    def save(self, data: Any) -> None:
        data.save(self._path)
        if self._category:
            tracking.log_artifact(self._category, "explainer", self._path, "explainer")

    def load(self) -> Any:
        from madfh_pipeline.explain.lora import LoraExplainer

        return LoraExplainer.load(self._path, local_files_only=self._local_files_only, device=self._device)


class OperatorDescriptionsDataset(AbstractDataset[list[dict[str, Any]], list[dict[str, Any]]]):
    """Operators' descriptions exported by the feedback pipeline; an empty list until the first feedback run.

    Empty, not an error: the explainer trains on grounded pairs alone until operators have written something.
    """

    def __init__(self, filepath: str, metadata: dict[str, Any] | None = None) -> None:
        self._filepath = Path(filepath)
        self.metadata = metadata

    def _describe(self) -> dict[str, Any]:
        return {"filepath": str(self._filepath)}

    def _exists(self) -> bool:
        return True

    def save(self, data: list[dict[str, Any]]) -> None:
        self._filepath.parent.mkdir(parents=True, exist_ok=True)
        self._filepath.write_text(json.dumps(data, indent=2, default=str))

    def load(self) -> list[dict[str, Any]]:
        if not self._filepath.is_file():
            return []
        return list(json.loads(self._filepath.read_text()))
