"""torch-fidelity feature extractor ``s3-digits``: the shipped digits classifier.

Importing this module registers it. Inputs are uint8 tensors [B, 1, 8, 8] (0..255); features are
the classifier's 64-d penultimate layer (``features``: FID/KID/PRC) and its 10-way ``logits`` (ISC).
"""

from __future__ import annotations

import torch
from torch_fidelity import register_feature_extractor
from torch_fidelity.feature_extractor_base import FeatureExtractorBase
from torch_fidelity.helpers import vassert
from torch_fidelity.registry import FEATURE_EXTRACTORS_REGISTRY

NAME = "s3-digits"


def uint8_to_model(x: torch.Tensor) -> torch.Tensor:
    """uint8 0..255 -> float32 in [-1, 1]."""
    return x.float() / 127.5 - 1.0


class DigitsFeatureExtractor(FeatureExtractorBase):
    """``forward(uint8 [B,1,8,8]) -> tuple`` of the requested features, in ``features_list`` order.

    ``feature_extractor_weights_path`` (a torch-fidelity kwarg) selects another classifier
    checkpoint; by default the shipped ``assets/digits_classifier.safetensors``.
    """

    def __init__(self, name, features_list, feature_extractor_weights_path=None, **kwargs):
        super().__init__(name, features_list)
        from s3_ray.models.digits import load_digits_classifier

        self.net = load_digits_classifier(feature_extractor_weights_path)

    @staticmethod
    def get_provided_features_list():
        return "features", "logits"

    @staticmethod
    def get_default_feature_layer_for_metric(metric):
        return {"isc": "logits", "fid": "features", "kid": "features", "prc": "features"}[metric]

    @staticmethod
    def can_be_compiled():
        return False

    @staticmethod
    def get_dummy_input_for_compile():
        return torch.zeros(1, 1, 8, 8, dtype=torch.uint8)

    def forward(self, x):
        vassert(torch.is_tensor(x) and x.dtype == torch.uint8, "Expecting image as torch.Tensor with dtype=torch.uint8")
        vassert(x.dim() == 4 and tuple(x.shape[1:]) == (1, 8, 8), f"Expecting [B, 1, 8, 8] images, got {tuple(x.shape)}")
        e = self.net.embed(uint8_to_model(x))
        out = {"features": e / self.net.feat_scale, "logits": self.net.head(e)}
        return tuple(out[k] for k in self.features_list)


if NAME not in FEATURE_EXTRACTORS_REGISTRY:  # idempotent across re-imports
    register_feature_extractor(NAME, DigitsFeatureExtractor)
