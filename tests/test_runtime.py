"""The token-dropping runtime against the unmodified model and the mask-based pruned model, on both families."""

from __future__ import annotations

import pytest
import torch
from conftest import FAMILIES, LAYER_THRESHOLDS, TOKENS_THRESHOLDS

from analysis.errors import ConfigError, DataError
from analysis.hooks.attention import RegionMasks, route_attention
from analysis.models import hf
from analysis.models.adapters import ModelInputs
from analysis.models.registry import LoadedModel, load_model
from analysis.pruner.config import PruningConfig
from analysis.pruner.methods import method_for
from analysis.pruner.runtime import pruned_runtime
from analysis.pruner.simulate import Decisions, PruningHooks, masked_pruning

NEW_TOKENS = 5


# Tiny matrices run faster on one thread than on threads contending for two busy cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """A tiny random model of each family (SDPA, float32, CPU)."""
    return load_model(FAMILIES[request.param])


def _configs(loaded: LoadedModel) -> dict[str, PruningConfig]:
    """One config per method; VisiPruner selects at layer 1 of 4 (a partial selection) and exits for some samples."""
    layers = loaded.adapter.num_layers
    return {
        "visipruner": PruningConfig(
            num_layers=layers,
            shallow_mid_layer=0,
            layer_threshold=LAYER_THRESHOLDS[loaded.adapter.model_type],
            tokens_threshold=TOKENS_THRESHOLDS[loaded.adapter.model_type],
        ),
        # The shallow stage too (text->image hidden in layer 0, also while decoding), then selection at layer >= 2.
        "shallow": PruningConfig(
            num_layers=layers,
            shallow_mid_layer=1,
            layer_threshold=LAYER_THRESHOLDS[loaded.adapter.model_type],
            tokens_threshold=TOKENS_THRESHOLDS[loaded.adapter.model_type],
        ),
        # The authors' rule: text->image weights zeroed after the softmax (prefill only), their 7B layer-0 rule.
        "authors": PruningConfig(
            num_layers=layers,
            shallow_mid_layer=1,
            layer_threshold=LAYER_THRESHOLDS[loaded.adapter.model_type],
            tokens_threshold=TOKENS_THRESHOLDS[loaded.adapter.model_type],
        ).with_authors_rule("authors_7b"),
        "fastv": PruningConfig(method="fastv", num_layers=layers, prune_layer=2, keep_tokens=3),
        "random": PruningConfig(method="random", num_layers=layers, prune_layer=1, keep_tokens=3),
        "pre_llm": PruningConfig(method="pre_llm", num_layers=layers, keep_tokens=3),
        # One image pivot and two text pivots, so most kept tokens come from the duplication rule.
        "dart": PruningConfig(
            method="dart",
            num_layers=layers,
            prune_layer=2,
            keep_tokens=5,
            options={"pivot_image_tokens": 1, "pivot_text_tokens": 2},
        ),
        "cdpruner": PruningConfig(method="cdpruner", num_layers=layers, keep_tokens=3),
        # Two stages: half the image tokens go after layer 0, half of the rest after layer 1.
        "pyramiddrop": PruningConfig(
            method="pyramiddrop", num_layers=layers, options={"stage_layers": [1, 2], "ratio": 0.5}
        ),
        # 4 dominant (CLS included) and 1 merged contextual token per sample.
        "visionzip": PruningConfig(method="visionzip", num_layers=layers, keep_tokens=5),
    }


def _inputs(loaded: LoadedModel, samples) -> ModelInputs:
    """The standard left-padded batch."""
    return loaded.adapter.build_inputs(loaded.processor, samples)


def _masked(loaded: LoadedModel, inputs: ModelInputs, config: PruningConfig) -> tuple[torch.Tensor, Decisions]:
    """Prefill logits and decisions of the mask-based pruned model."""
    length = inputs.input_ids.shape[1]
    hooks = PruningHooks(
        config, RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device), inputs.layouts, length
    )
    with torch.no_grad(), masked_pruning(loaded.adapter, hooks):
        logits = loaded.model(**inputs.tensors).logits
    return logits, hooks.decisions(inputs.layouts)


def _dropped(
    loaded: LoadedModel, inputs: ModelInputs, config: PruningConfig, **kwargs
) -> tuple[torch.Tensor, Decisions]:
    """Prefill logits and decisions of the token-dropping runtime."""
    with torch.no_grad(), pruned_runtime(loaded.model, config, inputs.layouts, **kwargs) as state:
        logits = loaded.model(**inputs.tensors).logits
    return logits, state.decisions(inputs.layouts)


def _generate(loaded: LoadedModel, inputs: ModelInputs, **kwargs) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy new tokens (B, N) and each step's logits (N, B, V), on a cache that keeps every key (hooks index keys
    from position 0, which Gemma 3's default sliding-window cache breaks)."""
    tokenizer = loaded.processor.tokenizer
    with torch.no_grad():
        cache = {} if kwargs.get("use_cache") is False else hf.cache_kwargs(loaded.model, hf.new_cache())
        out = loaded.model.generate(
            **inputs.tensors,
            **cache,
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=None,
            pad_token_id=tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
            **kwargs,
        )
    return out.sequences[:, inputs.input_ids.shape[1] :], torch.stack(out.logits)


def _same_decisions(a: Decisions, b: Decisions) -> bool:
    """Same selections, exits, kept tokens and staged drops."""
    same_layers = (a.selection_layer == b.selection_layer).all() and (a.exit_layer == b.exit_layer).all()
    return bool(same_layers) and a.kept == b.kept and a.stage_drops == b.stage_drops


def test_all_off_is_bit_identical(tiny: LoadedModel, samples) -> None:
    """Method 'none' and VisiPruner with no stage reproduce the unmodified logits and answers bit for bit."""
    inputs = _inputs(tiny, samples)
    with torch.no_grad():
        reference = tiny.model(**inputs.tensors).logits
    tokens, _ = _generate(tiny, inputs)
    layers = tiny.adapter.num_layers
    no_stage = PruningConfig(num_layers=layers, stages=[], shallow_mid_layer=1)
    for config in (PruningConfig(method="none", num_layers=layers), no_stage):
        logits, _ = _dropped(tiny, inputs, config)
        assert torch.equal(logits, reference)
        with pruned_runtime(tiny.model, config, inputs.layouts):
            assert torch.equal(_generate(tiny, inputs)[0], tokens)


def test_keeping_every_token_changes_nothing(tiny: LoadedModel, samples) -> None:
    """A selection keeping every image token still re-gathers the sequence, and changes no answer."""
    inputs = _inputs(tiny, samples)
    config = PruningConfig(
        num_layers=tiny.adapter.num_layers,
        stages=["middle"],
        shallow_mid_layer=0,
        layer_threshold=1.0,
        tokens_threshold=0.0,
    )
    with torch.no_grad():
        reference = tiny.model(**inputs.tensors).logits
    with torch.no_grad(), pruned_runtime(tiny.model, config, inputs.layouts) as state:
        logits = tiny.model(**inputs.tensors).logits
    decisions = state.decisions(inputs.layouts)
    assert (decisions.selection_layer == 1).all() and [len(k) for k in decisions.kept] == decisions.n_image
    # Layers from 2 on run on the compacted sequence (the batch's left padding is gone as well).
    counts = state.layer_token_counts()
    assert (counts[2:] == torch.tensor([layout.length for layout in inputs.layouts])).all()
    assert torch.allclose(logits[:, -1], reference[:, -1], atol=1e-5)
    assert torch.equal(logits[:, -1].argmax(-1), reference[:, -1].argmax(-1))


@pytest.mark.parametrize(
    "method",
    ["visipruner", "shallow", "authors", "fastv", "random", "pre_llm", "dart", "cdpruner", "pyramiddrop", "visionzip"],
)
def test_dropping_equals_masking(tiny: LoadedModel, samples, method: str) -> None:
    """Same decisions, last-position logits and greedy answers as the mask-based pruned model."""
    inputs = _inputs(tiny, samples)
    config = _configs(tiny)[method]
    reason = method_for(config).unsupported(tiny.adapter)
    if reason is not None:
        assert method == "visionzip" and tiny.adapter.model_type != "llava"  # only VisionZip is family-bound
        pytest.skip(reason)
    masked, masked_decisions = _masked(tiny, inputs, config)
    dropped, decisions = _dropped(tiny, inputs, config)
    assert _same_decisions(decisions, masked_decisions)
    kept = [decisions.n_kept(row) for row in range(len(decisions.kept))]
    assert any(0 < n < total for n, total in zip(kept, decisions.n_image, strict=True))  # a real, partial selection
    if method == "visipruner":
        assert (decisions.selection_layer == 1).all()
    assert torch.allclose(dropped[:, -1], masked[:, -1], atol=1e-5)
    length = inputs.input_ids.shape[1]
    hooks = PruningHooks(
        config, RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device), inputs.layouts, length
    )
    with masked_pruning(tiny.adapter, hooks):
        masked_tokens, masked_logits = _generate(tiny, inputs)
    with pruned_runtime(tiny.model, config, inputs.layouts):
        tokens, logits = _generate(tiny, inputs)
    assert torch.equal(tokens, masked_tokens)
    assert torch.allclose(logits, masked_logits, atol=1e-4)


def test_eager_equals_sdpa(samples) -> None:
    """Eager attention (explicit additive masks everywhere) gives the runtime the same results as SDPA."""
    for name in FAMILIES.values():
        results = []
        for implementation in ("sdpa", "eager"):
            loaded = load_model(name, attn_implementation=implementation)
            results.append(_dropped(loaded, _inputs(loaded, samples), _configs(loaded)["visipruner"]))
        assert _same_decisions(results[0][1], results[1][1])
        assert torch.allclose(results[0][0][:, -1], results[1][0][:, -1], atol=1e-5)


def test_batch_equals_single(tiny: LoadedModel, samples) -> None:
    """Left-padded batches (different image sizes and counts) give each sample its own decisions and logits."""
    config = _configs(tiny)["visipruner"]
    logits, decisions = _dropped(tiny, _inputs(tiny, samples), config)
    assert len(set(map(len, decisions.kept))) > 1  # rows keep different numbers of tokens
    for row, sample in enumerate(samples):
        one, one_decisions = _dropped(tiny, _inputs(tiny, [sample]), config)
        assert one_decisions.kept[0] == decisions.kept[row]
        assert (one_decisions.selection_layer[0], one_decisions.exit_layer[0]) == (
            decisions.selection_layer[row],
            decisions.exit_layer[row],
        )
        assert torch.allclose(one[0, -1], logits[row, -1], atol=1e-5)


def test_cached_generation_equals_recomputation(tiny: LoadedModel, samples) -> None:
    """Decoding on the pruned KV cache equals re-running the pruned prefill for every new token."""
    inputs = _inputs(tiny, samples)
    config = _configs(tiny)["visipruner"]
    with pruned_runtime(tiny.model, config, inputs.layouts) as state:
        tokens, logits = _generate(tiny, inputs)
        first = state.decisions(inputs.layouts)
        # Without a cache each step is a fresh prefill of prompt + tokens so far, with the same (frozen) decisions.
        again, again_logits = _generate(tiny, inputs, use_cache=False)
        assert _same_decisions(state.decisions(inputs.layouts), first)
    assert torch.equal(tokens, again)
    assert torch.allclose(logits, again_logits, atol=1e-4)


def test_pinned_decisions(tiny: LoadedModel, samples) -> None:
    """Pinned decisions are applied as given (no rule), and reproduce the rule's run when they are its own."""
    inputs = _inputs(tiny, samples)
    config = _configs(tiny)["visipruner"]
    logits, decisions = _dropped(tiny, inputs, config)
    pinned, pinned_decisions = _dropped(tiny, inputs, config, decisions=decisions)
    assert _same_decisions(pinned_decisions, decisions)
    assert torch.allclose(pinned[:, -1], logits[:, -1], atol=1e-6)
    with pytest.raises(ConfigError, match="outside"):
        bad = Decisions(decisions.selection_layer + 10, decisions.exit_layer, decisions.kept, decisions.n_image)
        _dropped(tiny, inputs, config, decisions=bad)
    # Frozen decisions compact each layer once per input length: later passes reuse it (no device read-back).
    with torch.no_grad(), pruned_runtime(tiny.model, config, inputs.layouts, decisions=decisions) as state:
        calls = []
        compact = state._compact
        state._compact = lambda *args: calls.append(args[1]) or compact(*args)
        first = tiny.model(**inputs.tensors).logits
        again = tiny.model(**inputs.tensors).logits
    assert calls == sorted(set(calls)) and calls  # each cut layer compacted in the first pass only
    assert torch.equal(first, again)


def test_model_unchanged_after_exit(tiny: LoadedModel, samples) -> None:
    """After the block (also one left by an error) no hook remains and logits are bit-identical to before."""
    inputs = _inputs(tiny, samples)
    with torch.no_grad():
        before = tiny.model(**inputs.tensors).logits
    config = _configs(tiny)["visipruner"]
    modules = list(tiny.model.modules())
    hooks_before = [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in modules]
    _dropped(tiny, inputs, config)
    with pytest.raises(RuntimeError, match="inside"), pruned_runtime(tiny.model, config, inputs.layouts):
        raise RuntimeError("inside")
    assert [(dict(m._forward_pre_hooks), dict(m._forward_hooks)) for m in modules] == hooks_before
    assert tiny.adapter.text_config._attn_implementation == "sdpa"
    with torch.no_grad():
        assert torch.equal(tiny.model(**inputs.tensors).logits, before)


def test_bad_input_fails_before_the_model_runs(tiny: LoadedModel, samples) -> None:
    """Another depth, thresholds out of range, an unknown method or a foreign batch raise before any forward."""
    inputs = _inputs(tiny, samples)
    calls = []
    handle = tiny.model.register_forward_pre_hook(lambda *_: calls.append(1))
    layers = tiny.adapter.num_layers
    try:
        for config, message in (
            (PruningConfig(num_layers=32), "32-layer model"),
            (PruningConfig(num_layers=layers, shallow_mid_layer=1, layer_threshold=1.5), "layer_threshold 1.5"),
            (PruningConfig(method="magic", num_layers=layers), "unknown method 'magic'"),
        ):
            with pytest.raises(ConfigError, match=message), pruned_runtime(tiny.model, config, inputs.layouts):
                tiny.model(**inputs.tensors)
        assert not calls
        other = _inputs(tiny, samples[:2])
        with (
            pytest.raises(DataError, match="shape"),
            pruned_runtime(tiny.model, _configs(tiny)["fastv"], other.layouts),
        ):
            tiny.model(**inputs.tensors)
    finally:
        handle.remove()


def test_generate_is_one_prefill_then_continuations_on_this_transformers(
    tiny: LoadedModel, samples, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``generate`` through the runtime, on whatever transformers is installed: the runtime sees one prefill and then
    one continuation per new token (5.24 renamed the cache argument, and detection by that name took every step for
    a prefill), and the pruned answers equal the mask-based model's."""
    from analysis.pruner.runtime import PrunedRuntime

    inputs = _inputs(tiny, samples)
    config = _configs(tiny)["visipruner"]
    passes: list[bool] = []
    detect = PrunedRuntime._is_prefill

    def recorded(self: PrunedRuntime, *args, **kwargs) -> bool:
        passes.append(detect(self, *args, **kwargs))
        return passes[-1]

    monkeypatch.setattr(PrunedRuntime, "_is_prefill", recorded)
    with pruned_runtime(tiny.model, config, inputs.layouts) as state:
        tokens, _ = _generate(tiny, inputs)
    assert passes == [True] + [False] * (NEW_TOKENS - 1)
    decisions = state.decisions(inputs.layouts)
    # Tokens were really dropped, so continuations ran on a pruned cache.
    assert any(len(kept) < n for kept, n in zip(decisions.kept, decisions.n_image, strict=True))
    length = inputs.input_ids.shape[1]
    hooks = PruningHooks(
        config, RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device), inputs.layouts, length
    )
    with route_attention(tiny.adapter, hooks, length - 1):
        assert torch.equal(_generate(tiny, inputs)[0], tokens)


def test_a_cache_the_runtime_did_not_fill_is_a_compatibility_error(tiny: LoadedModel, samples) -> None:
    """A continuation whose cache holds other than what the runtime put there names transformers, not the user."""
    from analysis.models import hf

    inputs = _inputs(tiny, samples)
    config = _configs(tiny)["visipruner"]
    with torch.no_grad(), pruned_runtime(tiny.model, config, inputs.layouts):
        cache = hf.new_cache()
        tiny.model(**inputs.tensors, **hf.cache_kwargs(tiny.model, cache))
        hf.crop_cache(cache, 3)  # not what the runtime left there
        step = {
            "input_ids": inputs.input_ids[:, -1:],
            "attention_mask": torch.cat([inputs.attention_mask, inputs.attention_mask[:, -1:]], dim=1),
        }
        with pytest.raises(hf.CompatibilityError, match=r"transformers \d+\.\d+.*supports transformers"):
            tiny.model(**step, **hf.cache_kwargs(tiny.model, cache))
