"""Datasets (COCO, Pascal VOC, synthetic shapes), transforms and resumable loaders."""

from frcnn_train.data.coco import CocoDetection, DataWarning
from frcnn_train.data.loader import (
    DataBundle,
    EvalLoader,
    ResumableSampler,
    TrainLoader,
    batches_per_epoch,
    build_datasets,
    build_eval_loader,
    build_train_loader,
    collate,
    resolve_num_workers,
)
from frcnn_train.data.shapes import SHAPE_CLASSES, ensure_shapes_dataset
from frcnn_train.data.voc import VOC_CLASSES, load_voc

__all__ = [
    "CocoDetection",
    "DataBundle",
    "DataWarning",
    "EvalLoader",
    "ResumableSampler",
    "SHAPE_CLASSES",
    "TrainLoader",
    "VOC_CLASSES",
    "batches_per_epoch",
    "build_datasets",
    "build_eval_loader",
    "build_train_loader",
    "collate",
    "ensure_shapes_dataset",
    "load_voc",
    "resolve_num_workers",
]
