"""Data: dataset parsers (one file per dataset), the synthetic occluded dataset, PK batches sliced per rank, joint
transforms, the training and test loaders."""

from .dataset import ReIDImageDataset
from .datasets.base import DatasetWarning
from .loaders import EpochLoader, SeededSamples, build_test_loader, build_train_dataset, build_train_loader
from .parts import FLIP_PAIRS, NO_MASK, NUM_PARTS, PART_NAMES
from .records import ImageRecord, ReIDData, relabel
from .registry import build_dataset, list_datasets, register_dataset
from .sampler import GlobalBatchSampler, PKSampler
from .transforms import (
    REID_MEAN,
    REID_STD,
    JointErasing,
    OccluderPaste,
    ReIDTransform,
    patch_occlusion,
    resolve_data_config,
    swap_parts,
)

__all__ = ["FLIP_PAIRS", "NO_MASK", "NUM_PARTS", "PART_NAMES", "REID_MEAN", "REID_STD", "DatasetWarning", "EpochLoader",
           "GlobalBatchSampler", "ImageRecord", "JointErasing", "OccluderPaste", "PKSampler", "ReIDData",
           "ReIDImageDataset", "ReIDTransform", "SeededSamples", "build_dataset", "build_test_loader",
           "build_train_dataset", "build_train_loader", "list_datasets", "patch_occlusion", "register_dataset",
           "relabel", "resolve_data_config", "swap_parts"]
