"""The `classifier` model: an MLP over a fixed-size FP32 vector, returning class logits.

Weights come from a fixed seed (or a state_dict file), so every replica computes the same
function. Rows are independent: batching changes no output beyond float rounding.
"""

from __future__ import annotations

import itertools
from pathlib import Path

import torch
from torch import nn

from replica.config import ClassifierParams


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
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(params.seed)
        model = Classifier(params)
    if params.weights_path is not None:
        model.load_state_dict(_load_state(params.weights_path))
    return model.to(device).eval()


def _load_state(path: Path) -> dict[str, torch.Tensor]:
    state: dict[str, torch.Tensor] = torch.load(path, map_location="cpu", weights_only=True)
    return state
