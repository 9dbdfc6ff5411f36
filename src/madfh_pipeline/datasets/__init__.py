"""Kedro datasets of the project: the MVTec AD 2 folder reader, the processed image store, saved detectors."""

from madfh_pipeline.datasets.detector import DetectorDataset
from madfh_pipeline.datasets.image_store import ImageStore, ImageStoreDataset
from madfh_pipeline.datasets.map_store import MapStore, MapStoreDataset
from madfh_pipeline.datasets.mvtec_ad2 import MissingRawDataError, MVTecAD2Dataset

__all__ = [
    "DetectorDataset",
    "ImageStore",
    "ImageStoreDataset",
    "MVTecAD2Dataset",
    "MapStore",
    "MapStoreDataset",
    "MissingRawDataError",
]
