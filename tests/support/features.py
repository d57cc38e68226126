"""A tiny seeded feature extractor for torch-fidelity: FID's real code path in milliseconds.

Tests register it with `register_tiny_features()`; a child `python -m eval fid` process gets it
through the hidden `--feature-extractor tiny-seeded=support.features:TinyFeatures`."""

from __future__ import annotations

import numpy as np
import scipy.linalg
import torch
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

NAME = "tiny-seeded"


class TinyFeatures(FeatureExtractorBase):
    """A fixed random conv net (seed 0): uint8 [B, 3, H, W] -> 16 features. Not Inception."""

    def __init__(self, name, features_list, **kwargs):
        super().__init__(name, features_list)
        g = torch.Generator().manual_seed(0)
        self.w1 = torch.nn.Parameter(torch.randn(8, 3, 3, 3, generator=g) / 5, requires_grad=False)
        self.w2 = torch.nn.Parameter(torch.randn(16, 8, 3, 3, generator=g) / 8, requires_grad=False)

    def forward(self, x):
        x = x.double() / 127.5 - 1
        x = torch.tanh(torch.nn.functional.conv2d(x, self.w1.double(), padding=1))
        x = torch.tanh(torch.nn.functional.conv2d(x, self.w2.double(), padding=1))
        return (x.mean((2, 3)).float(),)

    @staticmethod
    def get_provided_features_list():
        return ("16",)

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return "16"

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 3, 8, 8, dtype=torch.uint8)


def register_tiny_features(name: str = NAME) -> str:
    if name not in FEATURE_EXTRACTORS_REGISTRY:
        register_feature_extractor(name, TinyFeatures)
    return name


def fid_by_hand(f1: np.ndarray, f2: np.ndarray) -> float:
    """Independent: float64 moments and scipy's sqrtm of S1 S2 (the TTUR formula)."""
    f1, f2 = f1.astype(np.float64), f2.astype(np.float64)
    mu1, mu2 = f1.mean(0), f2.mean(0)
    s1, s2 = np.cov(f1, rowvar=False), np.cov(f2, rowvar=False)
    covmean = scipy.linalg.sqrtm(s1 @ s2)
    covmean = covmean.real if np.iscomplexobj(covmean) else covmean
    return float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2 * np.trace(covmean))


def train_images(shards) -> np.ndarray:
    """All training images of a shard directory, uint8 [n, H, W, 3] in shard order."""
    from eval.features import iter_uint8

    return np.concatenate(list(iter_uint8(str(shards), "train", 16)))
