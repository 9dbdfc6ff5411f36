"""Kedro datasets of the project: the MVTec AD 2 folder reader, the processed image and map stores, saved detectors.

Imported lazily: preprocessing workers are spawned processes that import the image store, and pulling in torch (via
the detector dataset) would cost each of them seconds.
"""

from __future__ import annotations

import importlib
from typing import Any

_EXPORTS = {
    "DetectorArtifactDataset": "madfh_pipeline.datasets.tracking",
    "DetectorDataset": "madfh_pipeline.datasets.detector",
    "DetectorMetricsDataset": "madfh_pipeline.datasets.tracking",
    "DetectorParamsDataset": "madfh_pipeline.datasets.tracking",
    "FeatureStore": "madfh_pipeline.datasets.feature_store",
    "FeatureStoreDataset": "madfh_pipeline.datasets.feature_store",
    "FeatureWrites": "madfh_pipeline.datasets.feature_store",
    "ImageWrites": "madfh_pipeline.datasets.image_store",
    "MapWrites": "madfh_pipeline.datasets.map_store",
    "ModelCache": "madfh_pipeline.datasets.detector",
    "ModelCacheDataset": "madfh_pipeline.datasets.detector",
    "SubmissionDataset": "madfh_pipeline.datasets.map_store",
    "ImageFolderDataset": "madfh_pipeline.datasets.image_folder",
    "ImageStore": "madfh_pipeline.datasets.image_store",
    "InspectionModelStoreDataset": "madfh_pipeline.datasets.knowledge_base",
    "InspectionRecordsDataset": "madfh_pipeline.datasets.knowledge_base",
    "KnowledgeBaseDataset": "madfh_pipeline.datasets.knowledge_base",
    "KnowledgeBaseSnapshotDataset": "madfh_pipeline.datasets.knowledge_base",
    "ModelVersionsDataset": "madfh_pipeline.datasets.knowledge_base",
    "NotificationsDataset": "madfh_pipeline.datasets.knowledge_base",
    "OperatorDescriptionsDataset": "madfh_pipeline.datasets.explainer",
    "ReviewSettingsDataset": "madfh_pipeline.datasets.knowledge_base",
    "LoraExplainerDataset": "madfh_pipeline.datasets.explainer",
    "TrainingPairsDataset": "madfh_pipeline.datasets.explainer",
    "ImageStoreDataset": "madfh_pipeline.datasets.image_store",
    "MapStore": "madfh_pipeline.datasets.map_store",
    "MapStoreDataset": "madfh_pipeline.datasets.map_store",
    "MVTecAD2Dataset": "madfh_pipeline.datasets.mvtec_ad2",
    "MissingRawDataError": "madfh_pipeline.datasets.mvtec_ad2",
}

__all__ = [
    "DetectorArtifactDataset",
    "DetectorDataset",
    "DetectorMetricsDataset",
    "DetectorParamsDataset",
    "FeatureStore",
    "FeatureStoreDataset",
    "FeatureWrites",
    "ImageWrites",
    "MapWrites",
    "ModelCache",
    "ModelCacheDataset",
    "SubmissionDataset",
    "ImageFolderDataset",
    "ImageStore",
    "ImageStoreDataset",
    "InspectionModelStoreDataset",
    "InspectionRecordsDataset",
    "KnowledgeBaseDataset",
    "KnowledgeBaseSnapshotDataset",
    "ModelVersionsDataset",
    "NotificationsDataset",
    "OperatorDescriptionsDataset",
    "ReviewSettingsDataset",
    "LoraExplainerDataset",
    "TrainingPairsDataset",
    "MVTecAD2Dataset",
    "MapStore",
    "MapStoreDataset",
    "MissingRawDataError",
]


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    return getattr(importlib.import_module(_EXPORTS[name]), name)
