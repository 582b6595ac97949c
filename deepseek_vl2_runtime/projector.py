"""Vision-to-language projector (`projector.layers.{0,2}`), type `downsample_mlp_gelu`.

Mirrors the official `MlpProjector`: the 27x27 feature grid is zero-padded to 28x28 (bottom row,
right column), 2x2 neighbourhoods are stacked channel-major by `F.unfold` (feature index
c*4 + dy*2 + dx), then Linear -> GELU (erf) -> Linear.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from .config import ProjectorConfig


class MlpProjector(nn.Module):
    def __init__(self, cfg: ProjectorConfig) -> None:
        super().__init__()
        self.ratio = cfg.downsample_ratio
        self.layers = nn.Sequential(
            nn.Linear(cfg.input_dim * self.ratio**2, cfg.n_embed),
            nn.GELU(),
            nn.Linear(cfg.n_embed, cfg.n_embed),
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[N, g*g, C] -> [N, ceil(g/r)^2, n_embed]."""
        n, hw, c = x.shape
        g = math.isqrt(hw)
        pad = -g % self.ratio
        x = F.pad(x.view(n, g, g, c), (0, 0, 0, pad, 0, pad)).permute(0, 3, 1, 2)
        x = F.unfold(x, kernel_size=self.ratio, stride=self.ratio).transpose(1, 2)
        return self.layers(x)
