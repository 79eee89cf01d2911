"""Stage 0: pretraining the organism's CLIP vision tower, standing in for the pretrained CLIP of real LLaVA.

The objective is CoCa's: CLIP's symmetric contrastive loss between the tower's pooled output and a small text
encoder's caption embedding, plus a captioning loss from a small text decoder that cross-attends to the tower's
penultimate-layer patch features. The contrastive term gives the tower CLIP's global image/text alignment; the
captioning term forces the patch features LLaVA consumes to keep every object's colour, shape, size and digit,
which a batch-level contrastive task alone can ignore once a few attributes tell captions apart. Cross-attention
carries no position of its own, so the decoder can only name each object's place ("at the top left") from what
the features say; LLaVA's language model needs that place for spatial questions. The position embeddings start
from 2-D sine-cosine codes (as in MAE) rather than noise, so every patch starts out with a linearly readable
row and column.
"""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from analysis.organism.build import VISION_FEATURE_LAYER
from analysis.organism.data import IGNORE_INDEX


def sincos_positions(grid: int, dim: int) -> torch.Tensor:
    """Position codes for a CLS token (zeros) and a ``grid`` x ``grid`` patch raster, from row and column sines."""
    quarter = dim // 4
    # Frequencies from a quarter turn across the grid (monotonic in the row or column) to a quarter turn per
    # patch, geometrically spaced: coarse and fine place both stay linearly readable on an 8 x 8 grid.
    omega = (math.pi / (2 * grid)) * grid ** (torch.arange(quarter) / max(1, quarter - 1))
    rows, cols = torch.meshgrid(torch.arange(grid), torch.arange(grid), indexing="ij")
    parts = []
    for coordinate in (rows, cols):
        angles = coordinate.flatten().float()[:, None] * omega[None, :]
        parts += [angles.sin(), angles.cos()]
    codes = torch.cat(parts, dim=1)
    codes = F.pad(codes, (0, dim - codes.shape[1]))
    return torch.cat([torch.zeros(1, dim), codes])


class VisionPretrainer(nn.Module):
    """A CLIP model (the organism's vision tower plus a text encoder) and a cross-attending caption decoder."""

    def __init__(
        self,
        vision_config: Any,
        *,
        vocab_size: int,
        max_caption_length: int,
        text_hidden_size: int,
        text_layers: int,
        captioner_layers: int,
        pad_token_id: int,
        bos_token_id: int,
        eos_token_id: int,
    ) -> None:
        super().__init__()
        from transformers import BertConfig, BertLMHeadModel, CLIPConfig, CLIPModel, CLIPTextConfig

        heads = max(1, text_hidden_size // 32)
        text_config = CLIPTextConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden_size,
            intermediate_size=4 * text_hidden_size,
            num_hidden_layers=text_layers,
            num_attention_heads=heads,
            max_position_embeddings=max_caption_length,
            projection_dim=vision_config.projection_dim,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
        clip_config = CLIPConfig(
            text_config=text_config.to_dict(),
            vision_config=vision_config.to_dict(),
            projection_dim=vision_config.projection_dim,
        )
        self.clip = CLIPModel(clip_config)
        grid = vision_config.image_size // vision_config.patch_size
        with torch.no_grad():
            self.clip.vision_model.embeddings.position_embedding.weight.copy_(
                sincos_positions(grid, vision_config.hidden_size)
            )
        captioner_config = BertConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden_size,
            intermediate_size=4 * text_hidden_size,
            num_hidden_layers=captioner_layers,
            num_attention_heads=heads,
            max_position_embeddings=max_caption_length,
            pad_token_id=pad_token_id,
            is_decoder=True,
            add_cross_attention=True,
        )
        self.bridge = nn.Linear(vision_config.hidden_size, text_hidden_size)
        self.captioner = BertLMHeadModel(captioner_config)

    @property
    def vision_model(self) -> nn.Module:
        """The CLIP vision transformer that becomes the organism's vision tower."""
        return self.clip.vision_model

    def forward(
        self, pixel_values: torch.Tensor, caption_ids: torch.Tensor, caption_mask: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """The contrastive and captioning losses of a batch of images and their right-padded captions."""
        vision = self.clip.vision_model(pixel_values=pixel_values, output_hidden_states=True)
        text = self.clip.text_model(input_ids=caption_ids, attention_mask=caption_mask)
        image_embeds = F.normalize(self.clip.visual_projection(vision.pooler_output).float(), dim=-1)
        text_embeds = F.normalize(self.clip.text_projection(text.pooler_output).float(), dim=-1)
        # CLIP caps the learned temperature at 100 so the logits cannot blow up.
        logits = self.clip.logit_scale.exp().clamp(max=100.0) * image_embeds @ text_embeds.T
        targets = torch.arange(len(logits), device=logits.device)
        contrastive = (F.cross_entropy(logits, targets) + F.cross_entropy(logits.T, targets)) / 2

        # The same features LLaVA's projector will see: the penultimate layer without the CLS token.
        patches = vision.hidden_states[VISION_FEATURE_LAYER][:, 1:]
        captioning = self.captioner(
            input_ids=caption_ids,
            attention_mask=caption_mask,
            encoder_hidden_states=self.bridge(patches),
            labels=caption_ids.masked_fill(caption_mask == 0, IGNORE_INDEX),
        ).loss
        return contrastive, captioning
