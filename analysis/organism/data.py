"""Training data for the organism, rendered and tokenised once: every stage then only indexes tensors.

Prompts are rendered by ``LlavaAdapter.render_prompt`` and tokenised by the organism's own processor, so the
token ids seen in training are the ones ``build_inputs`` produces at inference.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image

from analysis.data.samples import Sample
from analysis.data.shapes import ShapesConfig, caption, generate_items, item_sample, render
from analysis.errors import DataError
from analysis.models.adapters import FamilyAdapter
from analysis.organism.build import CAPTION_PROMPT, IMAGE_TOKEN, image_token_count

logger = logging.getLogger(__name__)

IGNORE_INDEX = -100


@dataclass
class SequenceSet:
    """Left-padded token sequences, their loss labels and the image each shows (-1 for text only)."""

    input_ids: torch.Tensor
    attention_mask: torch.Tensor
    labels: torch.Tensor
    image_index: torch.Tensor

    def __len__(self) -> int:
        return int(self.input_ids.shape[0])

    def to(self, device: torch.device) -> SequenceSet:
        """The same sequences on ``device``."""
        tensors = (self.input_ids, self.attention_mask, self.labels, self.image_index)
        return SequenceSet(*(tensor.to(device) for tensor in tensors))

    def batch(self, rows: torch.Tensor, *, full_width: bool = False) -> dict[str, torch.Tensor]:
        """Rows ``rows`` with the padding columns they all share removed (kept with ``full_width``), plus
        generation-style position ids."""
        mask = self.attention_mask[rows]
        width = mask.shape[1] if full_width else int(mask.sum(dim=1).max())
        mask = mask[:, -width:]
        # The positions generate() derives from a left-padded mask, so training sees the same RoPE phases.
        positions = (mask.long().cumsum(dim=1) - 1).clamp(min=0)
        return {
            "input_ids": self.input_ids[rows][:, -width:],
            "attention_mask": mask,
            "position_ids": positions,
            "labels": self.labels[rows][:, -width:],
        }


@dataclass
class TrainingData:
    """Everything the four stages train on, from the ShapesVQA train split (``families``: one per question row)."""

    pixels: torch.Tensor
    captions: list[str]
    caption_ids: torch.Tensor
    caption_mask: torch.Tensor
    families: list[str]
    text_qa: SequenceSet
    caption_chat: SequenceSet
    vqa: SequenceSet

    def to(self, device: torch.device) -> TrainingData:
        """The same data with every tensor on ``device``."""
        return TrainingData(
            self.pixels.to(device),
            self.captions,
            self.caption_ids.to(device),
            self.caption_mask.to(device),
            self.families,
            self.text_qa.to(device),
            self.caption_chat.to(device),
            self.vqa.to(device),
        )


def tower_input(image: Image.Image, image_processor: Any) -> np.ndarray:
    """A square scene as uint8 (h, w, 3) at the vision tower's size, resized as the image processor resizes it
    (a square image's shortest-edge resize and center crop are one resize), so training sees what inference sees."""
    side = int(image_processor.crop_size["height"])
    rgb = image.convert("RGB")
    if rgb.size != (side, side):
        rgb = rgb.resize((side, side), resample=image_processor.resample)
    return np.asarray(rgb)


def pixel_values(pixels: torch.Tensor, image_processor: Any) -> torch.Tensor:
    """CLIP-normalised float pixels from uint8 (n, 3, h, w) images, as the processor computes them."""
    mean = torch.tensor(image_processor.image_mean, device=pixels.device).view(1, 3, 1, 1)
    std = torch.tensor(image_processor.image_std, device=pixels.device).view(1, 3, 1, 1)
    return (pixels.float() * float(image_processor.rescale_factor) - mean) / std


def expand_marker_ids(ids: list[int], image_id: int, copies: int) -> list[int]:
    """Token ids with every image-marker id repeated ``copies`` times."""
    if image_id not in ids:
        return ids
    expanded: list[int] = []
    for token in ids:
        expanded.extend([token] * copies if token == image_id else [token])
    return expanded


def encode_sequences(
    tokenizer: Any,
    prompts: Sequence[str],
    targets: Sequence[str],
    image_index: Sequence[int],
    *,
    loss_on_prompt: bool,
    image_tokens: int = image_token_count(),
) -> SequenceSet:
    """Tokenise prompt + target + EOS per row; the loss covers the target and EOS (and the prompt if asked).

    Each image marker becomes ``image_tokens`` image tokens, as the processor expands it.
    """
    # Prompts and answers repeat a lot (stage 2 has a single prompt), so each distinct string is tokenised once,
    # with one marker per image: the marker is a special token, so expanding its id afterwards gives the ids of
    # the expanded prompt without tokenising hundreds of markers per prompt.
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    unique_prompts = list(dict.fromkeys(prompts))
    prompt_ids = {
        prompt: expand_marker_ids(ids, image_id, image_tokens)
        for prompt, ids in zip(unique_prompts, tokenizer(unique_prompts)["input_ids"], strict=True)
    }
    unique_targets = list(dict.fromkeys(targets))
    encoded = tokenizer(unique_targets, add_special_tokens=False)["input_ids"]
    target_ids = dict(zip(unique_targets, encoded, strict=True))
    rows = [(prompt_ids[p], [*target_ids[t], tokenizer.eos_token_id]) for p, t in zip(prompts, targets, strict=True)]
    width = max(len(p) + len(t) for p, t in rows)
    ids = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for row, (prompt, target) in enumerate(rows):
        sequence = prompt + target
        start = width - len(sequence)
        ids[row, start:] = sequence
        mask[row, start:] = 1
        labels[row, width - len(target) :] = target
        if loss_on_prompt:
            labels[row, start : width - len(target)] = prompt
    unknown = int((ids == tokenizer.unk_token_id).sum())
    if unknown:
        raise DataError(f"{unknown} training tokens are unknown to the organism's tokenizer; rebuild its vocabulary")
    return SequenceSet(
        torch.from_numpy(ids), torch.from_numpy(mask), torch.from_numpy(labels), torch.tensor(list(image_index))
    )


def encode_conversations(
    tokenizer: Any,
    conversations: Sequence[Sequence[tuple[str, str]]],
    image_index: Sequence[int],
    followup_texts: Callable[[Sequence[tuple[str, str]]], list[tuple[str, str]]],
    *,
    image_tokens: int,
) -> SequenceSet:
    """Tokenise multi-turn chats about one image each, as LLaVA's instruction data holds several questions per
    image; the loss covers every answer and its end of turn.

    Each conversation lists (prompt, answer) turns: the first prompt is the whole rendered first turn (with the
    image marker), later prompts are the user's text, placed by ``followup_texts`` as the chat template places it.
    """
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    # Questions and answers repeat a lot, so each distinct piece is rendered and tokenised once.
    pieces: dict[tuple[str, str], tuple[list[int], list[int]]] = {}
    first_ids: dict[str, list[int]] = {}
    for conversation in conversations:
        first_ids.setdefault(conversation[0][0], [])
        for (_, answer), (prompt, _) in zip(conversation, conversation[1:], strict=False):
            pieces.setdefault((prompt, answer), ([], []))
        pieces.setdefault(("", conversation[-1][1]), ([], []))
    for prompt, ids in zip(first_ids, tokenizer(list(first_ids))["input_ids"], strict=True):
        first_ids[prompt] = expand_marker_ids(ids, image_id, image_tokens)
    keys = list(pieces)
    texts = followup_texts([(prompt or " ", answer) for prompt, answer in keys])
    replies = tokenizer([reply for reply, _ in texts], add_special_tokens=False)["input_ids"]
    asks = tokenizer([ask for _, ask in texts], add_special_tokens=False)["input_ids"]
    for key, reply_ids, ask_ids in zip(keys, replies, asks, strict=True):
        pieces[key] = (reply_ids, ask_ids)
    rows: list[tuple[list[int], list[bool]]] = []
    for conversation in conversations:
        ids, is_answer = list(first_ids[conversation[0][0]]), [False] * len(first_ids[conversation[0][0]])
        for turn, (_, answer) in enumerate(conversation):
            following = conversation[turn + 1][0] if turn + 1 < len(conversation) else ""
            reply_ids, ask_ids = pieces[(following, answer)]
            ids += reply_ids
            is_answer += [True] * len(reply_ids)
            if following:
                ids += ask_ids
                is_answer += [False] * len(ask_ids)
        rows.append((ids, is_answer))
    width = max(len(ids) for ids, _ in rows)
    input_ids = np.full((len(rows), width), tokenizer.pad_token_id, dtype=np.int64)
    labels = np.full((len(rows), width), IGNORE_INDEX, dtype=np.int64)
    mask = np.zeros((len(rows), width), dtype=np.int64)
    for row, (ids, is_answer) in enumerate(rows):
        start = width - len(ids)
        input_ids[row, start:] = ids
        mask[row, start:] = 1
        labels[row, start:] = np.where(is_answer, ids, IGNORE_INDEX)
    unknown = int((input_ids == tokenizer.unk_token_id).sum())
    if unknown:
        raise DataError(f"{unknown} training tokens are unknown to the organism's tokenizer; rebuild its vocabulary")
    return SequenceSet(
        torch.from_numpy(input_ids), torch.from_numpy(mask), torch.from_numpy(labels), torch.tensor(list(image_index))
    )


def scene_conversations(image_of_sample: Sequence[int], turns: int, seed: int) -> list[list[int]]:
    """Sample indices grouped into conversations of at most ``turns`` questions about one image, each image's
    questions in a seeded random order (so every family is sometimes asked first, as at evaluation)."""
    by_image: dict[int, list[int]] = {}
    for sample, image in enumerate(image_of_sample):
        by_image.setdefault(image, []).append(sample)
    rng = np.random.default_rng(seed)
    conversations = []
    for samples in by_image.values():
        order = [samples[i] for i in rng.permutation(len(samples))]
        conversations += [order[start : start + turns] for start in range(0, len(order), turns)]
    return conversations


def pack_sequences(sequences: SequenceSet, order: torch.Tensor, context: int, pad_token_id: int) -> SequenceSet:
    """The rows of ``sequences`` in ``order`` (repeats allowed), concatenated greedily into left-padded rows of at
    most ``context`` tokens, each keeping its labels: the packed documents of LLM pretraining."""
    mask = sequences.attention_mask.bool()
    lengths = mask.sum(dim=1)
    longest = int(lengths[order].max()) if len(order) else 0
    if longest > context:
        raise DataError(f"a {longest}-token training sequence does not fit a packing context of {context} tokens")
    packed: list[list[int]] = []
    length = context
    for row in order.tolist():
        if length + int(lengths[row]) > context:
            packed.append([])
            length = 0
        packed[-1].append(row)
        length += int(lengths[row])
    ids = torch.full((len(packed), context), pad_token_id, dtype=sequences.input_ids.dtype)
    labels = torch.full((len(packed), context), IGNORE_INDEX, dtype=sequences.labels.dtype)
    attention = torch.zeros((len(packed), context), dtype=sequences.attention_mask.dtype)
    for index, rows in enumerate(packed):
        width = int(lengths[rows].sum())
        ids[index, context - width :] = torch.cat([sequences.input_ids[row][mask[row]] for row in rows])
        labels[index, context - width :] = torch.cat([sequences.labels[row][mask[row]] for row in rows])
        attention[index, context - width :] = 1
    return SequenceSet(ids, attention, labels, torch.full((len(packed),), -1, dtype=sequences.image_index.dtype))


def encode_captions(tokenizer: Any, captions: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """Right-padded ``<s> caption </s>`` ids and mask: CLIP's text encoder pools at the first EOS."""
    encoded = [[*ids, tokenizer.eos_token_id] for ids in tokenizer(list(captions))["input_ids"]]
    width = max(len(ids) for ids in encoded)
    ids = torch.full((len(encoded), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, sequence in enumerate(encoded):
        ids[row, : len(sequence)] = torch.tensor(sequence)
        mask[row, : len(sequence)] = 1
    return ids, mask


def build_training_data(
    processor: Any,
    adapter: FamilyAdapter,
    shapes_config: ShapesConfig,
    train_size: int,
    *,
    turns: int = 1,
    seed: int = 0,
) -> TrainingData:
    """Generate the first ``train_size`` train questions, render each scene once and tokenise all stages; VQA rows
    are conversations of up to ``turns`` questions about one image (1: one question per row)."""
    items = generate_items("train", train_size, shapes_config)
    scene_of_image: dict[int, int] = {}
    images: list[Image.Image] = []
    captions: list[str] = []
    for item in items:
        if item.scene.index not in scene_of_image:
            scene_of_image[item.scene.index] = len(images)
            images.append(render(item.scene))
            captions.append(caption(item.scene))
    samples = [item_sample(item, images[scene_of_image[item.scene.index]]) for item in items]
    image_of_sample = [scene_of_image[item.scene.index] for item in items]
    logger.info("generated %d train questions over %d scenes", len(samples), len(images))

    # PIL resizes without the GIL, so the scenes are brought to the tower's size on every core, each written into
    # one preallocated array: stacking a list afterwards copied all of them once more (600k questions: 81.7k scenes,
    # 27.7 GB of uint8 at 336 px, twice that at the peak).
    side = int(processor.image_processor.crop_size["height"])
    stacked = np.empty((len(images), side, side, 3), dtype=np.uint8)

    def resize_into(index: int) -> None:
        stacked[index] = tower_input(images[index], processor.image_processor)

    with ThreadPoolExecutor() as pool:
        list(pool.map(resize_into, range(len(images))))
    pixels = torch.from_numpy(stacked).permute(0, 3, 1, 2)
    tokenizer = processor.tokenizer
    caption_ids, caption_mask = encode_captions(tokenizer, captions)

    # Stage 1 is text only: the scene is described in words where the image will later be.
    text_prompts = [
        adapter.render_prompt(processor, text_only_sample(sample, captions[image])).text
        for sample, image in zip(samples, image_of_sample, strict=True)
    ]
    # As many image tokens per marker as the processor makes: one per patch of the tower's input.
    n_image = image_token_count(int(processor.image_processor.crop_size["height"]), int(processor.patch_size))
    text_qa = encode_sequences(
        tokenizer,
        text_prompts,
        [s.answer or "" for s in samples],
        [-1] * len(samples),
        loss_on_prompt=True,
        image_tokens=n_image,
    )
    describe = Sample("caption", [images[0]], prompt=CAPTION_PROMPT, question=CAPTION_PROMPT)
    caption_prompt = adapter.render_prompt(processor, describe).text
    caption_chat = encode_sequences(
        tokenizer,
        [caption_prompt] * len(images),
        captions,
        range(len(images)),
        loss_on_prompt=False,
        image_tokens=n_image,
    )
    vqa_prompts = [adapter.render_prompt(processor, sample).text for sample in samples]
    answers = [s.answer or "" for s in samples]
    if turns == 1:
        vqa = encode_sequences(
            tokenizer, vqa_prompts, answers, image_of_sample, loss_on_prompt=False, image_tokens=n_image
        )
    else:
        groups = scene_conversations(image_of_sample, turns, seed)
        vqa = encode_conversations(
            tokenizer,
            [
                [(vqa_prompts[first], answers[first])] + [(samples[i].prompt, answers[i]) for i in rest]
                for first, *rest in groups
            ],
            [image_of_sample[group[0]] for group in groups],
            lambda turns: adapter.followup_texts(processor, turns),
            image_tokens=n_image,
        )
    families = [sample.family for sample in samples]
    return TrainingData(pixels, captions, caption_ids, caption_mask, families, text_qa, caption_chat, vqa)


def text_only_sample(sample: Sample, description: str) -> Sample:
    """``sample`` with its image replaced by a description in the prompt (the text-only stage's input)."""
    return Sample(
        sample.sample_id,
        [],
        prompt=f"{description}\n{sample.prompt}",
        question=sample.question,
        answer=sample.answer,
        family=sample.family,
        answer_type=sample.answer_type,
    )
