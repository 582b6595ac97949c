"""Image tiling and pixel normalisation, as the official DeepseekVLV2Processor does it.

Pure functions over PIL images (Pillow does the resampling, so pixels are bit-exact with the
reference). Per image: a global view (the whole image padded into one tile) and, with dynamic
tiling, a canvas of the best candidate resolution cut into tiles row-major. Tiling is switched
off (every image gets one 384 canvas) when the conversation holds more than two images.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
import torch
from PIL import Image, ImageOps


@dataclasses.dataclass(frozen=True)
class TilingConfig:
    """What the processor needs from config.json / processor_config.json."""

    candidate_resolutions: tuple[tuple[int, int], ...]
    tokens_per_side: int
    image_mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    image_std: tuple[float, float, float] = (0.5, 0.5, 0.5)

    @property
    def tile_size(self) -> int:
        return self.candidate_resolutions[0][0]

    @property
    def pad_color(self) -> tuple[int, int, int]:
        r, g, b = (int(m * 255) for m in self.image_mean)
        return r, g, b


@dataclasses.dataclass(frozen=True)
class ImageBatch:
    """pixels [n_tiles, 3, S, S] float32 (global, local.. for each image in order); crops (w_tiles, h_tiles)."""

    pixels: torch.Tensor
    crops: tuple[tuple[int, int], ...]


def select_best_resolution(
    size: tuple[int, int], candidates: Sequence[tuple[int, int]]
) -> tuple[int, int]:
    """The candidate (w, h) keeping the most image pixels after an aspect-preserving fit; ties go
    to the least wasted canvas, then to the earlier candidate (strict comparisons, as upstream)."""
    width, height = size
    best, best_effective, best_wasted = candidates[0], -1, float("inf")
    for w, h in candidates:
        scale = min(w / width, h / height)
        effective = min(int(width * scale) * int(height * scale), width * height)
        wasted = w * h - effective
        if effective > best_effective or (effective == best_effective and wasted < best_wasted):
            best, best_effective, best_wasted = (w, h), effective, wasted
    return best


def num_image_tokens(crop: tuple[int, int], tokens_per_side: int) -> int:
    """Global rows with a newline each, one separator, local rows with a newline each."""
    tw, th = crop
    s = tokens_per_side
    return s * (s + 1) + 1 + (s * th) * (s * tw + 1)


def _to_tensor(image: Image.Image, cfg: TilingConfig) -> torch.Tensor:
    """uint8 HWC -> float32 CHW in [-1, 1] (ToTensor then Normalize, same float ops)."""
    x = torch.from_numpy(np.asarray(image, dtype=np.uint8).copy()).permute(2, 0, 1).float().div(255)
    mean = torch.tensor(cfg.image_mean)[:, None, None]
    std = torch.tensor(cfg.image_std)[:, None, None]
    return x.sub(mean).div(std)


def image_tiles(
    image: Image.Image, cfg: TilingConfig, cropping: bool, fit_size: tuple[int, int] | None = None
) -> tuple[torch.Tensor, tuple[int, int]]:
    """One RGB image -> (tiles [1 + tw*th, 3, S, S], (tw, th)).

    The canvas is chosen for `fit_size` (default: the image's size): an upload that was
    downscaled on load passes its original size, because the official rule truncates fitted
    sizes to whole pixels and a few pixels of downscaling can flip its choice (6000x4000 gets
    3x2 tiles, 4096x2731 would get 3x3)."""
    s = cfg.tile_size
    fit_size = fit_size or image.size
    canvas_size = (
        select_best_resolution(fit_size, cfg.candidate_resolutions) if cropping else (s, s)
    )
    glob = ImageOps.pad(image, (s, s), color=cfg.pad_color)
    canvas = ImageOps.pad(image, canvas_size, color=cfg.pad_color)
    tw, th = canvas_size[0] // s, canvas_size[1] // s
    local = (
        _to_tensor(canvas, cfg).view(3, th, s, tw, s).permute(1, 3, 0, 2, 4).reshape(-1, 3, s, s)
    )
    return torch.cat([_to_tensor(glob, cfg)[None], local]), (tw, th)


def preprocess(
    images: Sequence[Image.Image],
    cfg: TilingConfig,
    fit_sizes: Sequence[tuple[int, int] | None] | None = None,
) -> ImageBatch:
    """All images of a conversation, in order. Tiling only when there are at most two images.
    `fit_sizes[i]`: the size to choose image i's canvas for (see `image_tiles`)."""
    cropping = len(images) <= 2
    fit_sizes = fit_sizes or [None] * len(images)
    tiles, crops = [], []
    for image, fit_size in zip(images, fit_sizes, strict=True):
        if image.mode != "RGB":
            raise ValueError(f"expected an RGB image, got mode {image.mode!r}")
        t, crop = image_tiles(image, cfg, cropping, fit_size)
        tiles.append(t)
        crops.append(crop)
    if not tiles:
        return ImageBatch(pixels=torch.zeros(0, 3, cfg.tile_size, cfg.tile_size), crops=())
    return ImageBatch(pixels=torch.cat(tiles), crops=tuple(crops))
