"""Operators' verdicts into a memory-bank detector: confirmed normal patches join the bank, confirmed defects re-rank.

A mixin for detectors with a patch memory bank (PatchCore): it needs ``_embedding_chunks(images)`` (patch embeddings
per image or tile), ``_nearest(rows)`` (distance to the nearest bank patch), ``memory_bank`` and ``_set_bank``.

- :meth:`extend_bank` — a confirmed false alarm is a normal image whose variation the bank did not cover. Its patches
  that lie farthest from the bank (:meth:`farthest_patches`), above the pixel threshold (the patches that raised the
  alarm), are added, at most a fixed number per image, so the same normal variation stops alarming while the bank
  (and the kNN cost) grows by a bounded amount.
- :meth:`set_defect_bank` — a confirmed defect's most anomalous patches (farthest from the normal bank: the defect,
  not the part around it) form a *defect bank*. An image's score is then boosted by where its most anomalous patch
  lies between the two banks: ``score · (1 + w · max(0, 2r − 1))`` with ``r = d_normal / (d_normal + d_defect)`` — up
  when it is closer to a known defect than to anything normal, never down. Anomaly detection is open-set: a defect of
  a type no operator has confirmed yet must keep its unsupervised score (a two-sided factor pushed such defects down
  with the normals, and lost held-out AUROC on the demo's mixed defect types). ``w`` = ``defect_weight`` (0 disables
  it); the feedback step keeps the bank only when it measurably helps (:mod:`madfh_pipeline.feedback.learning`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

logger = logging.getLogger(__name__)


class FeedbackBankMixin:
    """Feedback capabilities for a patch-memory-bank detector (see the module docstring)."""

    defect_bank: torch.Tensor | None = None
    defect_weight: float = 0.0
    normal_patches_added: int = 0

    def patch_rows(self, batch: torch.Tensor) -> list[torch.Tensor]:
        """Patch embeddings of each image of ``batch`` (all tiles together): one ``(n_patches, D)`` tensor each."""
        rows: list[list[torch.Tensor]] = [[] for _ in range(batch.shape[0])]
        with torch.no_grad():
            for owners, embeddings, _ in self._embedding_chunks(batch.to(self.device, torch.float32)):  # type: ignore[attr-defined]
                n, dim = embeddings.shape[:2]
                flat = embeddings.permute(0, 2, 3, 1).reshape(n, -1, dim)
                for i in range(n):
                    rows[int(owners[i])].append(flat[i])
        return [torch.cat(r) for r in rows]

    def _farthest(self, rows: torch.Tensor, count: int) -> tuple[torch.Tensor, torch.Tensor]:
        distance, _ = self._nearest(rows)  # type: ignore[attr-defined]
        distance = distance.to(rows.device)
        order = torch.argsort(distance, descending=True)[: max(0, int(count))]
        return rows[order], distance[order]

    @torch.no_grad()
    def farthest_patches(
        self, batches: Any, per_image: int = 256, min_distance: float | None = None
    ) -> list[torch.Tensor]:
        """Each image's ``per_image`` patches farthest from the normal bank (on the CPU), one tensor per image.

        For a confirmed false alarm these are what the bank covers worst; ``min_distance`` (the feedback step passes
        the pixel threshold) keeps only the patches that raised the alarm — without it an image's most unusual
        *normal-looking* patches join the bank too, and the bank starts to cover the subtle defects that resemble
        them. For a confirmed defect they are the defect, not the part around it. Chosen against the normal bank
        alone, so a bank of any subset of the images is the concatenation of their tensors: cross-fitting builds its
        fold banks without another pass over the images.
        """
        if self.memory_bank is None:  # type: ignore[attr-defined]
            raise RuntimeError("The detector has no memory bank: fit it before adding feedback.")
        rows = []
        for batch in batches():
            for image_rows in self.patch_rows(batch):
                chosen, distance = self._farthest(image_rows, per_image)
                if min_distance is not None:
                    chosen = chosen[distance >= float(min_distance)]
                rows.append(chosen.cpu().float())
        return rows

    def extend_bank(self, rows: torch.Tensor) -> int:
        """Append confirmed-normal patches (``(n, D)``) to the memory bank; returns how many were added."""
        if self.memory_bank is None:  # type: ignore[attr-defined]
            raise RuntimeError("The detector has no memory bank: fit it before adding feedback.")
        if rows.shape[0] == 0:
            return 0
        self._set_bank(torch.cat([self.memory_bank.cpu(), rows.cpu()]))  # type: ignore[attr-defined]
        self.normal_patches_added = int(self.normal_patches_added) + int(rows.shape[0])
        logger.info("Memory bank extended by %d patches of confirmed-normal images.", rows.shape[0])
        return int(rows.shape[0])

    @contextmanager
    def trial_extension(self, rows: torch.Tensor) -> Iterator[None]:
        """The memory bank extended by ``rows`` inside the block, restored after it (cross-fitting a trial bank)."""
        if self.memory_bank is None:  # type: ignore[attr-defined]
            raise RuntimeError("The detector has no memory bank: fit it before adding feedback.")
        bank = self.memory_bank.detach().cpu().clone()  # type: ignore[attr-defined]
        self._set_bank(torch.cat([bank, rows.cpu()]))  # type: ignore[attr-defined]
        try:
            yield
        finally:
            self._set_bank(bank)  # type: ignore[attr-defined]

    def set_defect_bank(self, rows: torch.Tensor | None, weight: float) -> None:
        """Use ``rows`` (``(n, D)``: concatenated :meth:`farthest_patches` of confirmed defects) at ``weight``."""
        self.defect_bank = rows.float() if rows is not None and rows.shape[0] else None
        self.defect_weight = float(weight) if self.defect_bank is not None else 0.0

    def clear_defect_bank(self) -> None:
        self.defect_bank = None
        self.defect_weight = 0.0

    def rerank(self, scores: torch.Tensor, features: torch.Tensor, normal_distance: torch.Tensor) -> torch.Tensor:
        """Boost image scores whose most anomalous patch lies nearer a confirmed defect than anything normal."""
        if self.defect_bank is None or not self.defect_weight:
            return scores
        bank = self.defect_bank.to(features.device)
        defect_distance = torch.cdist(features.float(), bank).min(dim=1).values
        ratio = normal_distance / (normal_distance + defect_distance).clamp_min(1e-12)
        return scores * (1.0 + float(self.defect_weight) * (2.0 * ratio - 1.0).clamp_min(0.0))

    def feedback_state(self) -> dict[str, Any]:
        state: dict[str, Any] = {
            "defect_weight": float(self.defect_weight),
            "normal_patches_added": int(self.normal_patches_added),
        }
        if self.defect_bank is not None:
            state["defect_bank"] = self.defect_bank.detach().cpu().clone()
        return state

    def set_feedback_state(self, state: dict[str, Any]) -> None:
        bank = state.get("defect_bank")
        self.defect_bank = bank.float() if isinstance(bank, torch.Tensor) else None
        self.defect_weight = float(state.get("defect_weight", 0.0)) if self.defect_bank is not None else 0.0
        self.normal_patches_added = int(state.get("normal_patches_added", 0))
