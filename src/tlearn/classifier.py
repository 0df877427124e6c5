"""The classifier as one torch network: backbone (pooled features) -> L2 normalisation (with the ImageNet prior
beside, when the head uses it: tlearn.train.head.ImageNetPrior) -> linear head.

Used where images go through torch: fine-tuning, eager prediction, export. Training the head and everything done
on cached features stay in numpy (tlearn.train.head), so they never import torch.
"""
from __future__ import annotations

import numpy as np
import torch
from torch import nn
from torch.nn import functional as F

from tlearn.train.head import LinearHead


class Classifier(nn.Module):
    """Backbone (pooled features), L2 normalisation, then a linear head: images in, logits out. With
    `mirror_mean`, the features are the mean of the image's and its mirror's (test-time augmentation)."""

    def __init__(self, backbone: nn.Module, head: nn.Linear, mirror_mean: bool = False,
                 prior: nn.Linear | None = None, prior_scale: float = 0.0):
        super().__init__()
        self.backbone, self.head, self.mirror_mean = backbone, head, mirror_mean
        self.prior, self.prior_scale = prior, prior_scale  # the ImageNet classifier (frozen), its block's weight
        if prior is not None:
            prior.requires_grad_(False)

    @classmethod
    def from_head(cls, backbone: nn.Module, head: LinearHead) -> "Classifier":
        """The network of `backbone` with a head fitted on its cached features (tlearn.train.fit_head)."""
        prior = head.prior
        return cls(backbone, _linear(head.weight, head.bias),
                   prior=None if prior is None else _linear(prior.weight, prior.bias),
                   prior_scale=0.0 if prior is None else prior.scale)

    def classify_features(self, features: torch.Tensor) -> torch.Tensor:
        """Logits from pooled backbone features (as cached by tlearn.features)."""
        features = features.float()
        inputs = F.normalize(features, dim=-1)
        if self.prior is not None:
            imagenet = torch.sqrt(torch.softmax(self.prior(features), dim=-1))
            inputs = F.normalize(torch.cat([inputs, self.prior_scale * imagenet], dim=-1), dim=-1)
        return self.head(inputs)

    def forward(self, pixels: torch.Tensor) -> torch.Tensor:
        features = self.backbone(pixels)
        if self.mirror_mean:
            features = (features + self.backbone(pixels.flip(-1))) / 2
        return self.classify_features(features)

    def numpy_state(self) -> dict[str, np.ndarray]:
        """The state dict as numpy arrays, copied (what a bundle stores)."""
        return {k: v.detach().cpu().numpy().copy() for k, v in self.state_dict().items()}


def _linear(weight: np.ndarray, bias: np.ndarray) -> nn.Linear:
    linear = nn.Linear(weight.shape[1], weight.shape[0])
    with torch.no_grad():
        linear.weight.copy_(torch.from_numpy(np.asarray(weight, np.float32)))
        linear.bias.copy_(torch.from_numpy(np.asarray(bias, np.float32)))
    return linear
