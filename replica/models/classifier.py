"""The `classifier` model: an MLP over a fixed-size FP32 vector, returning class logits.

Weights come from a fixed seed (or a state_dict file), so every replica computes the same
function. Rows are independent: batching changes no output beyond float rounding.
"""

from __future__ import annotations

import itertools

import torch
from torch import nn

from replica.config import ClassifierParams
from replica.models.weights import build


class Classifier(nn.Module):
    def __init__(self, params: ClassifierParams) -> None:
        super().__init__()
        sizes = [params.input_size, *params.hidden_sizes]
        layers: list[nn.Module] = []
        for fan_in, fan_out in itertools.pairwise(sizes):
            layers += [nn.Linear(fan_in, fan_out), nn.GELU()]
        layers.append(nn.Linear(sizes[-1], params.num_classes))
        self.net = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out: torch.Tensor = self.net(x)
        return out


def build_classifier(params: ClassifierParams, device: torch.device) -> Classifier:
    return build(lambda: Classifier(params), params.seed, params.weights_path, device)
