"""Model construction shared by every model: weights from a fixed seed (without disturbing the
global torch RNG), optionally replaced by a saved state dict, moved to the device, eval mode."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

import torch
from torch import nn

M = TypeVar("M", bound=nn.Module)


def build(make: Callable[[], M], seed: int, weights_path: Path | None, device: torch.device) -> M:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = make()
    if weights_path is not None:
        state = torch.load(weights_path, map_location="cpu", weights_only=True)
        model.load_state_dict(state)
    return model.to(device).eval()
