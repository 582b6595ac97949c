"""DeepseekVLV2ForCausalLM: vision tower + projector + language model + the two learned vectors.

Attribute paths equal checkpoint keys (`vision.*`, `projector.*`, `language.*`, `image_newline`,
`view_seperator` — upstream's spelling). `embed` mirrors the official `prepare_inputs_embeds`:
token embeddings everywhere, then the image features, laid out per image as
global rows (+ newline each) / separator / local rows (+ newline each), written in order into
the positions of the `<image>` placeholders.
"""

from __future__ import annotations

import torch
from torch import nn

from .config import VL2Config
from .language import DeepseekV2ForCausalLM
from .projector import MlpProjector
from .vision import VisionTransformer


class DeepseekVL2(nn.Module):
    def __init__(self, cfg: VL2Config) -> None:
        super().__init__()
        self.config = cfg
        hidden = cfg.language_config.hidden_size
        self.vision = VisionTransformer(cfg.vision_config)
        self.projector = MlpProjector(cfg.projector_config)
        self.language = DeepseekV2ForCausalLM(cfg.language_config)
        self.image_newline = nn.Parameter(torch.empty(hidden))
        self.view_seperator = nn.Parameter(torch.empty(hidden))

    def _layout(self, tiles: torch.Tensor, crops: list[tuple[int, int]]) -> torch.Tensor:
        """tiles [n_tiles, s*s, H] (global, locals.. per image) -> [n_image_tokens, H]."""
        s = self.config.tokens_per_side
        hidden = tiles.shape[-1]
        newline = self.image_newline
        pieces, i = [], 0
        for tw, th in crops:
            glob = tiles[i].view(s, s, hidden)
            local = tiles[i + 1 : i + 1 + tw * th].view(th, tw, s, s, hidden)
            local = local.permute(0, 2, 1, 3, 4).reshape(th * s, tw * s, hidden)
            for grid in (glob, local):
                rows = torch.cat([grid, newline.expand(grid.shape[0], 1, hidden)], dim=1)
                pieces.append(rows.reshape(-1, hidden))
                if grid is glob:
                    pieces.append(self.view_seperator[None])
            i += 1 + tw * th
        return torch.cat(pieces)

    def image_features(self, pixels: torch.Tensor, crops: list[tuple[int, int]]) -> torch.Tensor:
        """pixels [n_tiles, 3, S, S] -> image-token embeddings [n_image_tokens, H]."""
        feats = self.projector(self.vision(pixels.to(self.image_newline.dtype)))
        return self._layout(feats, crops)

    def embed(
        self,
        input_ids: torch.Tensor,
        image_mask: torch.Tensor,
        pixels: torch.Tensor | None,
        crops: list[tuple[int, int]],
    ) -> torch.Tensor:
        """input_ids/image_mask [T] -> inputs_embeds [1, T, H]."""
        embeds = self.language.model.embed_tokens(input_ids)
        if crops:
            if pixels is None:
                raise ValueError(f"{len(crops)} image crops but no pixels")
            feats = self.image_features(pixels, crops)
            n_slots = int(image_mask.sum())
            if feats.shape[0] != n_slots:
                raise ValueError(f"{feats.shape[0]} image features for {n_slots} <image> positions")
            embeds = embeds.masked_scatter(image_mask[:, None], feats)
        return embeds[None]
