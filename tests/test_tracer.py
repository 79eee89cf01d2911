"""The tracer's numbers against HF eager attention, batch invariance, and no effect on logits."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import numpy as np
import pytest
import torch

from analysis.layout import REGION_IMAGE, REGION_INSTRUCTION, REGION_SYSTEM
from analysis.models import hf
from analysis.models.registry import LoadedModel
from analysis.trace.tracer import trace_batch

IMPLEMENTATIONS = ("sdpa", "eager")


@contextmanager
def attention(loaded: LoadedModel, implementation: str) -> Iterator[None]:
    """The model runs with ``implementation`` inside the block (same weights), eager again after it."""
    hf.set_attention_implementation(loaded.adapter.text_config, implementation)
    try:
        yield
    finally:
        hf.set_attention_implementation(loaded.adapter.text_config, "eager")


TOL = 1e-5


def _reference_stats(loaded: LoadedModel, inputs) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Region masses, image-token rows and value L1 computed from output_attentions and plain hooks."""
    values: list[torch.Tensor] = []
    handles = [
        layer.self_attn.v_proj.register_forward_hook(lambda _m, _i, out: values.append(out.detach().float()))
        for layer in loaded.adapter.decoder_layers()
    ]
    try:
        with torch.no_grad():
            output = loaded.model(**inputs.tensors, output_attentions=True)
    finally:
        for handle in handles:
            handle.remove()
    n_layers, batch = len(output.attentions), inputs.input_ids.shape[0]
    n_heads = output.attentions[0].shape[1]
    n_max = max(layout.n_image_tokens for layout in inputs.layouts)
    mass = np.zeros((n_layers, batch, n_heads, 3, 3))
    rows = np.zeros((n_layers, batch, n_heads, 2, n_max))
    value_l1 = np.zeros((n_layers, batch, n_max))
    for layer, attention in enumerate(output.attentions):
        for b, layout in enumerate(inputs.layouts):
            offset = layout.pad_offset
            real = attention[b, :, offset:, offset:].double().numpy()  # (H, T, T) without padding
            groups = {
                0: [layout.last],
                1: np.flatnonzero(layout.regions == REGION_INSTRUCTION),
                2: np.flatnonzero(layout.regions == REGION_IMAGE),
            }
            for g, queries in groups.items():
                for r, region in enumerate((REGION_SYSTEM, REGION_IMAGE, REGION_INSTRUCTION)):
                    keys = np.flatnonzero(layout.regions == region)
                    mass[layer, b, :, g, r] = real[:, queries][:, :, keys].sum(-1).mean(-1)
            images = layout.image_positions
            rows[layer, b, :, 0, : len(images)] = real[:, layout.last, images]
            rows[layer, b, :, 1, : len(images)] = real[:, groups[1]][:, :, images].mean(1)
            value_l1[layer, b, : len(images)] = values[layer][b, offset + images].abs().sum(-1).numpy()
    return mass, rows, value_l1


def _stack(stats) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Trace statistics as numpy arrays with a leading layer axis."""
    return stats.region_mass.numpy(), stats.image_rows.numpy(), stats.value_l1.numpy()


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tracer_matches_eager_attention(tiny_eager: LoadedModel, samples, implementation: str) -> None:
    """Every layer and head's masses, image-token rows and value norms equal HF eager attention's."""
    inputs = tiny_eager.adapter.build_inputs(tiny_eager.processor, samples)
    with attention(tiny_eager, implementation):
        stats, _ = trace_batch(tiny_eager.adapter, inputs)
    mass, rows, value_l1 = _stack(stats)
    ref_mass, ref_rows, ref_value = _reference_stats(tiny_eager, inputs)
    assert mass.shape == ref_mass.shape == (tiny_eager.adapter.num_layers, 4, tiny_eager.adapter.num_heads, 3, 3)
    np.testing.assert_allclose(mass, ref_mass, atol=TOL)
    np.testing.assert_allclose(rows, ref_rows, atol=TOL)
    np.testing.assert_allclose(value_l1, ref_value, rtol=TOL, atol=TOL)
    # The three regions partition the keys of every query group (causal: image queries see no later text).
    np.testing.assert_allclose(mass[:, :, :, :2].sum(-1), 1.0, atol=TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_batch_equals_single(tiny_eager: LoadedModel, samples, implementation: str) -> None:
    """A left-padded batch of 4 gives each sample the numbers it gets alone."""
    batch_inputs = tiny_eager.adapter.build_inputs(tiny_eager.processor, samples)
    assert len({layout.length for layout in batch_inputs.layouts}) > 1, "prompts must differ in length"
    with attention(tiny_eager, implementation):
        mass, rows, value_l1 = _stack(trace_batch(tiny_eager.adapter, batch_inputs)[0])
        singles = [
            _stack(trace_batch(tiny_eager.adapter, tiny_eager.adapter.build_inputs(tiny_eager.processor, [s]))[0])
            for s in samples
        ]
    for b, (s_mass, s_rows, s_value) in enumerate(singles):
        n = batch_inputs.layouts[b].n_image_tokens
        np.testing.assert_allclose(mass[:, b], s_mass[:, 0], atol=TOL)
        np.testing.assert_allclose(rows[:, b, :, :, :n], s_rows[:, 0, :, :, :n], atol=TOL)
        np.testing.assert_allclose(value_l1[:, b, :n], s_value[:, 0, :n], rtol=TOL, atol=TOL)


@pytest.mark.parametrize("implementation", IMPLEMENTATIONS)
def test_tracing_changes_no_logits(tiny_eager: LoadedModel, samples, implementation: str) -> None:
    """Logits under the tracer equal a plain forward pass exactly."""
    inputs = tiny_eager.adapter.build_inputs(tiny_eager.processor, samples)
    with attention(tiny_eager, implementation):
        _, traced_logits = trace_batch(tiny_eager.adapter, inputs, return_logits=True)
        with torch.no_grad():
            plain = tiny_eager.model(**inputs.tensors).logits
    assert torch.equal(traced_logits, plain)
    # The wrapper is gone afterwards: no module keeps an instance-level forward.
    assert not [name for name, module in tiny_eager.model.named_modules() if "forward" in module.__dict__]


def test_tracing_leaves_no_registration_behind(tiny_eager: LoadedModel, samples) -> None:
    """After the block the model's attention implementation is its own again and no routed name stays registered."""
    before = hf.registered_attention_names()
    inputs = tiny_eager.adapter.build_inputs(tiny_eager.processor, samples[:1])
    trace_batch(tiny_eager.adapter, inputs)
    assert hf.attention_implementation(tiny_eager.adapter.text_config) == "eager"
    assert hf.registered_attention_names() == before


def test_a_users_nnsight_trace_records_the_tables(tiny_eager: LoadedModel, samples) -> None:
    """Inside a user's own nnsight trace, record_trace gives the same statistics as trace_batch."""
    from nnsight import NNsight

    from analysis.trace.tracer import record_trace

    inputs = tiny_eager.adapter.build_inputs(tiny_eager.processor, samples)
    expected = _stack(trace_batch(tiny_eager.adapter, inputs)[0])
    wrapped = NNsight(tiny_eager.model)
    with (
        record_trace(tiny_eager.adapter, inputs) as statistics,
        torch.inference_mode(),
        wrapped.trace(**inputs.tensors),
    ):
        last_hidden = tiny_eager.adapter.decoder_layers(wrapped)[-1].output.save()
    for got, want in zip(_stack(statistics.layer_stats()), expected, strict=True):
        np.testing.assert_allclose(got, want, atol=TOL)
    assert last_hidden is not None
