"""Stage 0: pretraining the organism's CLIP vision tower, standing in for the pretrained CLIP of real LLaVA.

The objective is CoCa-like: CLIP's symmetric contrastive loss between the tower's pooled output and a small
text encoder's caption embedding, plus a captioning loss from a small decoder that reads the tower's
penultimate-layer patch features. The contrastive term gives the tower CLIP's global image/text alignment; the
captioning term forces the patch features LLaVA consumes to keep every object's colour, shape, size, place
and digit, which a batch-level contrastive task alone can ignore once a few attributes tell captions apart.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from analysis.organism.build import VISION_FEATURE_LAYER
from analysis.organism.data import IGNORE_INDEX


class VisionPretrainer(nn.Module):
    """A CLIP model (the organism's vision tower plus a text encoder) and a captioning decoder."""

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
        from transformers import CLIPConfig, CLIPModel, CLIPTextConfig, LlamaConfig, LlamaForCausalLM

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
        captioner_config = LlamaConfig(
            vocab_size=vocab_size,
            hidden_size=text_hidden_size,
            intermediate_size=4 * text_hidden_size,
            num_hidden_layers=captioner_layers,
            num_attention_heads=heads,
            max_position_embeddings=max_caption_length + 128,
            pad_token_id=pad_token_id,
            bos_token_id=bos_token_id,
            eos_token_id=eos_token_id,
        )
        self.bridge = nn.Linear(vision_config.hidden_size, text_hidden_size)
        self.captioner = LlamaForCausalLM(captioner_config)

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
        prefix = self.bridge(patches)
        words = self.captioner.get_input_embeddings()(caption_ids)
        prefix_mask = torch.ones(prefix.shape[:2], dtype=caption_mask.dtype, device=caption_mask.device)
        labels = torch.cat(
            [torch.full_like(prefix_mask, IGNORE_INDEX), caption_ids.masked_fill(caption_mask == 0, IGNORE_INDEX)],
            dim=1,
        )
        captioning = self.captioner(
            inputs_embeds=torch.cat([prefix, words.to(prefix.dtype)], dim=1),
            attention_mask=torch.cat([prefix_mask, caption_mask], dim=1),
            labels=labels,
        ).loss
        return contrastive, captioning
