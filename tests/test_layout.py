"""Token layout from input_ids: spans of system prompt, each image, instruction and last position."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from analysis.errors import DataError
from analysis.layout import REGION_IMAGE, REGION_INSTRUCTION, REGION_SYSTEM, compute_layouts
from analysis.models.registry import LoadedModel


def test_two_images_mid_prompt(tiny_eager: LoadedModel, samples) -> None:
    """Two images placed inside the instruction get their own spans with the text between them as instruction."""
    inputs = tiny_eager.adapter.build_inputs(tiny_eager.processor, samples)
    layout = inputs.layouts[2]
    ids = inputs.input_ids[2, layout.pad_offset :].tolist()
    tokenizer = tiny_eager.processor.tokenizer
    assert len(layout.images) == 2
    first, second = layout.images
    assert first.end < second.start, "text ('and') must separate the images"
    # An image's span holds its image tokens and, between them, only its own markers (Idefics3's tile tags).
    for span, markers in zip(layout.images, layout.image_markers, strict=True):
        assert all(ids[p] == tiny_eager.adapter.image_token_id or p in markers for p in range(span.start, span.end))
    between = tokenizer.decode(ids[first.end : second.start], skip_special_tokens=True)
    assert "and" in between
    assert set(layout.regions[first.end : second.start]) == {REGION_INSTRUCTION}
    # "compare" sits between the system prompt and the first image and belongs to the instruction.
    assert "compare" in tokenizer.decode(ids[layout.system.end : first.start], skip_special_tokens=True)
    # An image's pieces (one grid for llava and qwen; base image + tiles for llava_next; Idefics3's tiles with their
    # tags between them) are in order and cover exactly its image tokens; the first piece's grid is the image's.
    for index, (span, (rows, cols), pieces) in enumerate(
        zip(layout.images, layout.image_grids, layout.image_pieces, strict=True)
    ):
        covered = np.concatenate([np.arange(p.span.start, p.span.end) for p in pieces])
        assert np.array_equal(covered, layout.image_token_positions(index))
        assert pieces[0].span.start == span.start and pieces[-1].span.end == span.end
        assert (pieces[0].rows, pieces[0].cols) == (rows, cols)
        assert sum(p.rows * (p.cols + p.newline) for p in pieces) == len(layout.image_token_positions(index))
    assert layout.last == len(ids) - 1
    assert layout.regions[layout.last] == REGION_INSTRUCTION


def test_system_span_is_the_template_preamble(tiny_eager: LoadedModel, samples) -> None:
    """The system span ends where the user's content starts and precedes the first image."""
    inputs = tiny_eager.adapter.build_inputs(tiny_eager.processor, samples)
    tokenizer = tiny_eager.processor.tokenizer
    for row, layout in enumerate(inputs.layouts):
        ids = inputs.input_ids[row, layout.pad_offset :].tolist()
        prompt = inputs.prompts[row]
        preamble = tokenizer(prompt.text[: prompt.content_start])["input_ids"]
        assert ids[: layout.system.end] == preamble, "system span is exactly the tokenised preamble"
        assert layout.system.end <= layout.images[0].start
        assert set(layout.regions[: layout.system.end]) == {REGION_SYSTEM}
        assert (layout.regions == REGION_IMAGE).sum() == layout.n_image_tokens


def test_layout_independent_of_padding(tiny_eager: LoadedModel, samples) -> None:
    """A sample's layout in a left-padded batch equals its layout alone, up to the pad offset."""
    batch = tiny_eager.adapter.build_inputs(tiny_eager.processor, samples).layouts
    assert any(layout.pad_offset > 0 for layout in batch)
    for sample, in_batch in zip(samples, batch, strict=True):
        alone = tiny_eager.adapter.build_inputs(tiny_eager.processor, [sample]).layouts[0]
        assert alone.pad_offset == 0
        assert (alone.system, alone.images, alone.image_grids, alone.image_pieces, alone.length) == (
            in_batch.system,
            in_batch.images,
            in_batch.image_grids,
            in_batch.image_pieces,
            in_batch.length,
        )
        assert np.array_equal(alone.regions, in_batch.regions)


@pytest.mark.parametrize("alias", ["tiny-llava-next", "tiny-llava-onevision"])
def test_any_resolution_pieces_are_where_the_model_puts_them(samples, alias: str) -> None:
    """LLaVA-NeXT / OneVision: each image is its base image then its tiles with a newline token closing every row
    (OneVision: downscaled past its cap; an image of a multi-image sample untiled, base + one newline). In a
    left-padded batch with images of different sizes, the newline positions are exactly those the model fills with
    its image_newline embedding, and each image is as long as the model's packed features."""
    from analysis.models.registry import load_model

    loaded = load_model(alias)
    inputs = loaded.adapter.build_inputs(loaded.processor, samples)
    pair = inputs.layouts[2]
    kinds = [[piece.kind for piece in image] for image in pair.image_pieces]
    if alias == "tiny-llava-next":
        assert len(pair.images[0]) != len(pair.images[1]), "two images of different sizes"
        assert kinds == [["base", "tiles"]] * 2
    else:
        assert kinds == [["base", "newline"]] * 2
        downscaled = loaded.adapter.tiles_grid(inputs.tensors["image_sizes"][1].tolist())
        assert downscaled != super(type(loaded.adapter), loaded.adapter).tiles_grid(
            inputs.tensors["image_sizes"][1].tolist()
        ), "the second sample's image is past the tiny model's cap"
    features = loaded.adapter.image_features(inputs.tensors).pooler_output
    packed = torch.cat(list(features))
    newline = (packed == loaded.model.model.image_newline).all(dim=-1)
    ours = []
    lengths = []
    for layout in inputs.layouts:
        pieces, _, cols = layout.image_token_cells
        for image in layout.image_pieces:
            assert image[0].kind == "base" and (image[0].rows, image[0].cols) == (4, 4) and image[1].newline
            lengths.append(image[-1].span.end - image[0].span.start)
        widths = np.concatenate(
            [np.full(len(p.span), p.cols if p.newline else -1) for i in layout.image_pieces for p in i]
        )
        ours.append(torch.as_tensor(cols == widths))
    assert torch.equal(torch.cat(ours), newline) and int(newline.sum()) > len(lengths)
    assert lengths == [int(f.shape[0]) for f in features]


def test_internvl_tiles_thumbnail_and_markers(samples) -> None:
    """InternVL: each image is its crops (row-major on the processor's grid) then a thumbnail, each crop one
    tile of context tokens, wrapped in <img> </img>; for two images of different sizes in one prompt and a
    left-padded batch, the pieces match the processor's tiles one to one (the thumbnail is the whole image
    resized) and the markers sit just outside each image."""
    from analysis.models.registry import load_model

    loaded = load_model("tiny-internvl")
    processor = loaded.processor
    inputs = loaded.adapter.build_inputs(processor, samples)
    pair = inputs.layouts[2]
    assert len(pair.images[0]) != len(pair.images[1]), "two images of different sizes"
    tile = 0
    pixels = inputs.tensors["pixel_values"]
    tokenizer = processor.tokenizer
    for row, (sample, layout) in enumerate(zip(samples, inputs.layouts, strict=True)):
        ids = inputs.input_ids[row, layout.pad_offset :].tolist()
        for image, span, pieces, markers in zip(
            sample.images, layout.images, layout.image_pieces, layout.image_markers, strict=True
        ):
            assert [piece.kind for piece in pieces][-1] == "thumbnail" and len(pieces) > 2
            assert all(len(piece.span) == loaded.adapter.tile_tokens for piece in pieces)
            alone = processor.image_processor(images=[image], crop_to_patches=False, return_tensors="pt")
            torch.testing.assert_close(pixels[tile + len(pieces) - 1], alone["pixel_values"][0])
            tile += len(pieces)
            assert markers == (span.start - 1, span.end)
            assert tokenizer.convert_ids_to_tokens([ids[p] for p in markers]) == ["<img>", "</img>"]
            assert set(layout.regions[list(markers)]) == {REGION_INSTRUCTION}
    assert tile == len(pixels)


def test_gemma3_images_and_their_markers(samples) -> None:
    """Gemma 3: every image is its fixed grid of soft tokens between <start_of_image> and <end_of_image>, for two
    images in one prompt and a left-padded batch; the markers stay text."""
    from analysis.models.registry import load_model

    loaded = load_model("tiny-gemma3")
    inputs = loaded.adapter.build_inputs(loaded.processor, samples)
    tokenizer = loaded.processor.tokenizer
    assert any(layout.pad_offset for layout in inputs.layouts) and len(inputs.layouts[2].images) == 2
    for row, layout in enumerate(inputs.layouts):
        ids = inputs.input_ids[row, layout.pad_offset :].tolist()
        for span, markers in zip(layout.images, layout.image_markers, strict=True):
            assert len(span) == loaded.model.config.mm_tokens_per_image
            assert markers == (span.start - 1, span.end)
            assert tokenizer.convert_ids_to_tokens([ids[p] for p in markers]) == ["<start_of_image>", "<end_of_image>"]
            assert set(layout.regions[list(markers)]) == {REGION_INSTRUCTION}


@pytest.mark.parametrize("alias", ["tiny-idefics3", "tiny-smolvlm"])
def test_idefics3_tiles_behind_their_tags(samples, alias: str) -> None:
    """Idefics3 and SmolVLM2: an image is several runs of image tokens, each behind its tag (<row_r_col_c> for a
    tile, <global-img> for the global view last); for two images with different tile grids in one prompt and a
    left-padded batch, every piece is the run after its tag, the tags and <fake_token_around_image> are the image's
    markers, and the pieces are as many as the processor's real tiles."""
    from analysis.models.registry import load_model

    loaded = load_model(alias)
    inputs = loaded.adapter.build_inputs(loaded.processor, samples)
    tokenizer = loaded.processor.tokenizer
    pair = inputs.layouts[2]
    assert len(pair.image_pieces[0]) != len(pair.image_pieces[1]), "two images with different tile grids"
    real_tiles = inputs.tensors["pixel_attention_mask"].flatten(2).any(-1)  # (B, tiles)
    for row, layout in enumerate(inputs.layouts):
        ids = inputs.input_ids[row, layout.pad_offset :].tolist()
        for pieces, markers in zip(layout.image_pieces, layout.image_markers, strict=True):
            assert pieces[-1].kind == "global"
            for piece in pieces:
                tag = tokenizer.convert_ids_to_tokens(ids[piece.span.start - 1])
                row_col = piece.kind.removeprefix("tile_").split("_")
                expected = (
                    "<global-img>"
                    if piece.kind == "global"
                    else f"<row_{int(row_col[0]) + 1}_col_{int(row_col[1]) + 1}>"
                )
                assert tag == expected and piece.span.start - 1 in markers
            names = set(tokenizer.convert_ids_to_tokens([ids[p] for p in markers]))
            assert "<fake_token_around_image>" in names and set(layout.regions[list(markers)]) == {REGION_INSTRUCTION}
        assert sum(len(pieces) for pieces in layout.image_pieces) == int(real_tiles[row].sum())


def test_adjacent_images_split_by_count() -> None:
    """Two images with no text between them form one run that the per-image counts split."""
    ids = torch.tensor([[0, 1, 2, 9, 9, 9, 9, 9, 9, 3, 4]])
    mask = torch.tensor([[0, 1, 1, 1, 1, 1, 1, 1, 1, 1, 1]])
    layout = compute_layouts(ids, mask, 9, [[1, 2]], [[2, 4]], [[(1, 2), (2, 2)]])[0]
    assert [(s.start, s.end) for s in layout.images] == [(2, 4), (4, 8)]
    assert (layout.system.start, layout.system.end, layout.last, layout.pad_offset) == (0, 2, 9, 1)


def test_layout_errors() -> None:
    """Missing images, mismatched counts and a trailing image are reported, not mis-laid."""
    mask = torch.ones(1, 5, dtype=torch.long)
    with pytest.raises(DataError, match="no image tokens"):
        compute_layouts(torch.tensor([[1, 2, 3, 4, 5]]), mask, 9, [[1]], [[1]], [[(1, 1)]])
    with pytest.raises(DataError, match="need 3"):
        compute_layouts(torch.tensor([[1, 9, 9, 4, 5]]), mask, 9, [[1]], [[3]], [[(1, 3)]])
    with pytest.raises(DataError, match="ends with an image"):
        compute_layouts(torch.tensor([[1, 2, 3, 9, 9]]), mask, 9, [[1]], [[2]], [[(1, 2)]])
    with pytest.raises(DataError, match="padding inside"):
        compute_layouts(torch.tensor([[1, 9, 0, 4, 5]]), torch.tensor([[1, 1, 0, 1, 1]]), 9, [[1]], [[1]], [[(1, 1)]])
