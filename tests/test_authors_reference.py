"""The authors' VisiPruner re-derived from their code as a slow explicit loop, against both of our executors.

The reference follows GitHub EIT-NLP/VisiPruner, ``llava/model/language_model/custom_modeling_llama.py``, and shares no
code with ``analysis.pruner``: ``VisiPrunerLlamaAttention.forward`` (lines 605-719: scores q k^T / sqrt(d), float32
softmax, the shallow rule after it at lines 687-699, the selection and the deep check at lines 715-719) with
``value_aware_token_selection`` (lines 541-568), and ``LlamaModel.forward``'s layer loop (lines 1366-1416: the
sequence shrinks at the start of the layer after a selection, lines 1389-1396, and the image leaves when the deep
count is 2, lines 1398-1403).
Batch 1, float32, attention and RoPE computed by hand; norms and MLPs are the model's own modules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cache

import pytest
import torch

from analysis.data.samples import Sample
from analysis.hooks.attention import RegionMasks, route_attention
from analysis.models.registry import LoadedModel, load_model
from analysis.pruner.config import PruningConfig
from analysis.pruner.runtime import pruned_runtime
from analysis.pruner.simulate import PruningHooks

NEW_TOKENS = 4
DEEP_COSINE = 0.999  # hard-coded in their value_aware_token_selection


@dataclass
class Reference:
    """What the authors' code decides and computes for one sample."""

    selection_layer: int  # the layer whose attention chose the tokens (-1: never)
    kept: list[int]  # kept image-token ordinals
    exit_layer: int  # the layer after which the image left (-1: never)
    prefill_logits: torch.Tensor  # (V,) at the last prompt position
    tokens: list[int]  # greedy new tokens
    step_logits: list[torch.Tensor]  # (V,) per new token


def _rope(positions: torch.Tensor, head_dim: int, theta: float) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin (T, d) of Llama's rotary embedding at the given positions."""
    inv_freq = 1.0 / theta ** (torch.arange(0, head_dim, 2, dtype=torch.float32) / head_dim)
    freqs = positions.float()[:, None] * inv_freq[None, :]
    emb = torch.cat([freqs, freqs], dim=-1)
    return emb.cos(), emb.sin()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x * cos + rotate_half(x) * sin, for x (H, T, d)."""
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos[None] + rotated * sin[None]


def _language_inputs(loaded: LoadedModel, tensors: dict[str, torch.Tensor]) -> torch.Tensor:
    """The embeddings (T, D) the language model receives (image features merged), from one plain forward."""
    seen: dict[str, torch.Tensor] = {}

    def keep(_module, _args, kwargs) -> None:  # type: ignore[no-untyped-def]
        seen["embeds"] = kwargs["inputs_embeds"]

    handle = loaded.model.model.language_model.register_forward_pre_hook(keep, with_kwargs=True)
    try:
        with torch.no_grad():
            loaded.model(**tensors)
    finally:
        handle.remove()
    return seen["embeds"][0].float()


def reference(
    loaded: LoadedModel,
    tensors: dict[str, torch.Tensor],
    image_start: int,
    n_image: int,
    *,
    stages: list[str],
    shallow_mid_layer: int,
    layer_threshold: float,
    tokens_threshold: float,
    layer0: str,
) -> Reference:
    """Their prefill and greedy decoding of one unpadded sample whose image occupies [image_start, +n_image)."""
    text_model = loaded.model.model.language_model
    config = loaded.adapter.text_config
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    theta = config.rope_parameters["rope_theta"]
    vis_end = image_start + n_image
    full = _language_inputs(loaded, tensors)
    length = full.shape[0]
    hidden, positions = full, torch.arange(length)
    important: torch.Tensor | None = None  # kept image positions (absolute), their important_vision_tokens
    exit_count, selection_layer, exit_layer = 0, -1, -1
    kv_cache: list[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = []  # per layer: keys, values, key positions
    S = shallow_mid_layer
    with torch.no_grad():
        for index, layer in enumerate(text_model.layers):
            # LlamaModel.forward, before the layer: shrink after a selection; drop the image once the count is 2.
            if index > S and "middle" in stages and important is not None and hidden.shape[0] == length:
                keep = torch.cat([torch.arange(image_start), important, torch.arange(vis_end, length)])
                hidden, positions = hidden[keep], positions[keep]
            elif (
                index > S
                and "deep" in stages
                and important is not None
                and hidden.shape[0] == length - n_image + len(important)
                and exit_count == 2
            ):
                keep = torch.cat(
                    [torch.arange(image_start), torch.arange(image_start + len(important), len(positions))]
                )
                hidden, positions = hidden[keep], positions[keep]
            q_len = hidden.shape[0]
            x = layer.input_layernorm(hidden[None])[0]
            attn = layer.self_attn
            q = attn.q_proj(x).view(q_len, heads, head_dim).transpose(0, 1)
            k = attn.k_proj(x).view(q_len, kv_heads, head_dim).transpose(0, 1)
            v = attn.v_proj(x).view(q_len, kv_heads, head_dim).transpose(0, 1)
            cos, sin = _rope(positions, head_dim, theta)
            q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
            kv_cache.append((k, v, positions.clone()))
            k = k.repeat_interleave(heads // kv_heads, dim=0)
            v = v.repeat_interleave(heads // kv_heads, dim=0)
            scores = q @ k.transpose(1, 2) / math.sqrt(head_dim)
            causal = torch.ones(q_len, q_len, dtype=torch.bool).tril()
            scores = scores.masked_fill(~causal, torch.finfo(scores.dtype).min)
            weights = torch.softmax(scores, dim=-1, dtype=torch.float32)
            if "shallow" in stages and index < S:  # prefill only (their q_len > 611)
                if index == 0 and layer0 == "authors_7b":
                    removed = weights[:, vis_end:, image_start:vis_end].sum(-1)
                    weights[:, image_start:, image_start:vis_end] = 0
                    weights[:, vis_end:, image_start] = removed
                elif index == 0 and layer0 == "authors_13b":
                    weights[:, image_start:vis_end, image_start:vis_end] = 0
                    weights[:, vis_end:, image_start : image_start + n_image // 2] = 0
                else:
                    weights[:, vis_end:, image_start:vis_end] = 0
            output = weights @ v  # (H, T, d)
            flat = output.transpose(0, 1).reshape(q_len, heads * head_dim)
            if index > S:
                last = flat[-1]
                contributions = (weights[:, -1, :, None] * v).transpose(0, 1).reshape(q_len, heads * head_dim)
                if "middle" in stages and important is None and q_len == length:
                    masked = last[None] - contributions[image_start:vis_end]
                    cosine = torch.nn.functional.cosine_similarity(masked, last[None], dim=-1)
                    if bool((cosine < layer_threshold).any()):
                        norm = torch.norm(masked - last[None], p=2, dim=-1)
                        important = torch.where(norm > tokens_threshold)[0] + image_start
                        selection_layer = index
                elif "deep" in stages and important is not None and q_len == length - n_image + len(important):
                    masked = last[None] - contributions[image_start : image_start + len(important)]
                    cosine = torch.nn.functional.cosine_similarity(masked, last[None], dim=-1)
                    exit_count += int(not bool((cosine < DEEP_COSINE).any()))
                    if exit_count == 2 and exit_layer < 0 and q_len < length:
                        # The next layer starts without the image (a selection that kept everything never shrank
                        # the sequence, so the loop above never reaches its exit branch).
                        exit_layer = index
            hidden = hidden + attn.o_proj(flat)
            hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden[None]))[0]
        logits = loaded.model.lm_head(text_model.norm(hidden[None]))[0, -1]
        tokens, step_logits = [], []
        token = int(logits.argmax())
        for step in range(NEW_TOKENS):
            tokens.append(token)
            if step == NEW_TOKENS - 1:
                break
            hidden = text_model.embed_tokens(torch.tensor([[token]]))[0].float()
            position = torch.tensor([length + step])
            for index, layer in enumerate(text_model.layers):
                x = layer.input_layernorm(hidden[None])[0]
                attn = layer.self_attn
                q = attn.q_proj(x).view(1, heads, head_dim).transpose(0, 1)
                k = attn.k_proj(x).view(1, kv_heads, head_dim).transpose(0, 1)
                v = attn.v_proj(x).view(1, kv_heads, head_dim).transpose(0, 1)
                cos, sin = _rope(position, head_dim, theta)
                q, k = _rotate(q, cos, sin), _rotate(k, cos, sin)
                keys, values, key_positions = kv_cache[index]
                keys, values = torch.cat([keys, k], dim=1), torch.cat([values, v], dim=1)
                kv_cache[index] = (keys, values, torch.cat([key_positions, position]))
                keys = keys.repeat_interleave(heads // kv_heads, dim=0)
                values = values.repeat_interleave(heads // kv_heads, dim=0)
                weights = torch.softmax(q @ keys.transpose(1, 2) / math.sqrt(head_dim), dim=-1, dtype=torch.float32)
                flat = (weights @ values).transpose(0, 1).reshape(1, heads * head_dim)
                hidden = hidden + attn.o_proj(flat)
                hidden = hidden + layer.mlp(layer.post_attention_layernorm(hidden[None]))[0]
            step_logit = loaded.model.lm_head(text_model.norm(hidden[None]))[0, -1]
            step_logits.append(step_logit)
            token = int(step_logit.argmax())
    kept = [] if important is None else (important - image_start).tolist()
    if important is None:
        kept = list(range(n_image))
    return Reference(selection_layer, kept, exit_layer, logits, tokens, step_logits)


@cache
def _model(name: str, implementation: str) -> LoadedModel:
    """A model per name and attention implementation, loaded once; tiny-llava with 6 layers, so that S = 3 leaves
    layers to select in."""
    if name != "tiny-llava":
        return load_model(name, attn_implementation=implementation)
    from analysis.models.adapters import adapter_class, get_adapter

    family = adapter_class("llava")
    model = family.tiny_model(seed=0, num_layers=6)
    model.set_attn_implementation(implementation)
    return LoadedModel(model.eval(), family.tiny_processor(), get_adapter(model), name, "builtin:llava", "seed-0")


def _sample(name: str, index: int) -> Sample:
    """A test question of the organism, or one of the standard samples for tiny-llava."""
    if name == "shapes-llava":
        from analysis.data.loaders import load_samples

        return load_samples("shapes-vqa", "test", index + 1)[index]
    from conftest import make_samples

    return make_samples()[index]


def _ours(loaded: LoadedModel, sample: Sample, config: PruningConfig, runtime: str) -> dict[str, object]:
    """Decisions, prefill logits and greedy tokens and logits of one of our executors."""
    inputs = loaded.adapter.build_inputs(loaded.processor, [sample])
    length = inputs.input_ids.shape[1]
    generate = {
        "max_new_tokens": NEW_TOKENS,
        "do_sample": False,
        "eos_token_id": None,
        "output_logits": True,
        "return_dict_in_generate": True,
        "pad_token_id": loaded.processor.tokenizer.pad_token_id,
    }
    with torch.no_grad():
        if runtime == "drop":
            with pruned_runtime(loaded.model, config, inputs.layouts) as hooks:
                logits = loaded.model(**inputs.tensors).logits[0, -1]
            with pruned_runtime(loaded.model, config, inputs.layouts):
                out = loaded.model.generate(**inputs.tensors, **generate)
        else:
            hooks = PruningHooks(
                config,
                RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device),
                inputs.layouts,
                length,
            )
            with route_attention(loaded.adapter, hooks, length - 1):
                logits = loaded.model(**inputs.tensors).logits[0, -1]
            fresh = PruningHooks(
                config,
                RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device),
                inputs.layouts,
                length,
            )
            with route_attention(loaded.adapter, fresh, length - 1):
                out = loaded.model.generate(**inputs.tensors, **generate)
    decisions = hooks.decisions(inputs.layouts)
    return {
        "selection_layer": int(decisions.selection_layer[0]),
        "kept": decisions.kept[0],
        "exit_layer": int(decisions.exit_layer[0]),
        "logits": logits,
        "tokens": out.sequences[0, length:].tolist(),
        "step_logits": [step[0] for step in out.logits[1:]],
        "layout": inputs.layouts[0],
    }


# (model, sample, S, layer-0 rule, layer_threshold, tokens_threshold, what the case must show)
CASES = [
    ("shapes-llava", 13, 2, "authors_7b", 0.99, 0.9, "exits"),
    ("shapes-llava", 4, 3, "authors_13b", 0.99, 0.9, "exits"),
    ("shapes-llava", 2, 3, "authors_13b", 0.99, 0.5, "partial"),
    ("shapes-llava", 2, 2, "authors_13b", 0.99, 1e-6, "keeps everything"),
    ("shapes-llava", 0, 3, "authors_7b", 0.99, 1e-6, "keeps everything"),
    ("tiny-llava", 0, 2, "authors_7b", 0.9999, 0.02, "exits"),
    ("tiny-llava", 3, 3, "authors_13b", 0.9999, 0.02, "partial"),
    ("tiny-llava", 1, 3, "authors_7b", 0.9999, 1e-6, "keeps everything"),
]


@pytest.mark.parametrize("implementation", ["sdpa", "eager"])
@pytest.mark.parametrize(("name", "index", "S", "layer0", "layer_threshold", "tokens_threshold", "shows"), CASES)
def test_both_executors_follow_the_authors_code(
    name: str,
    index: int,
    S: int,
    layer0: str,
    layer_threshold: float,
    tokens_threshold: float,
    shows: str,
    implementation: str,
) -> None:
    """Selection layer, kept set, exit layer, prefill logits (1e-5) and 4 greedy decode steps of the authors' mode,
    token-dropping and mask-based, SDPA and eager, equal the reference written from their code."""
    loaded = _model(name, implementation)
    sample = _sample(name, index)
    config = PruningConfig(
        num_layers=loaded.adapter.num_layers,
        shallow_mid_layer=S,
        layer_threshold=layer_threshold,
        tokens_threshold=tokens_threshold,
    ).with_authors_rule(layer0)
    config.validate(loaded.adapter.num_layers)
    results = {runtime: _ours(loaded, sample, config, runtime) for runtime in ("drop", "mask")}
    layout = results["drop"]["layout"]
    tensors = loaded.adapter.build_inputs(loaded.processor, [sample]).tensors
    expected = reference(
        loaded,
        tensors,
        int(layout.image_positions[0]),
        layout.n_image_tokens,
        stages=list(config.stages),
        shallow_mid_layer=S,
        layer_threshold=layer_threshold,
        tokens_threshold=tokens_threshold,
        layer0=layer0,
    )
    assert expected.selection_layer > S
    n_image = layout.n_image_tokens
    if shows == "keeps everything":
        assert len(expected.kept) == n_image and expected.exit_layer == -1
    elif shows == "exits":
        assert 0 < len(expected.kept) < n_image and expected.exit_layer > expected.selection_layer
    else:
        assert 0 < len(expected.kept) < n_image
    for runtime, ours in results.items():
        assert (ours["selection_layer"], ours["kept"], ours["exit_layer"]) == (
            expected.selection_layer,
            expected.kept,
            expected.exit_layer,
        ), runtime
        assert torch.allclose(ours["logits"], expected.prefill_logits, atol=1e-5), runtime
        assert ours["tokens"] == expected.tokens, runtime
        for step, logits in zip(ours["step_logits"], expected.step_logits, strict=True):
            assert torch.allclose(step, logits, atol=1e-4), runtime
