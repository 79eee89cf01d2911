"""The latency mode (static buffers, CUDA graphs where available) against eager generation, on both families."""

from __future__ import annotations

import logging

import pytest
import torch
from conftest import FAMILIES, LAYER_THRESHOLDS, TOKENS_THRESHOLDS
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from analysis.benchmarks.latency_host import RecordedReplay
from analysis.models import hf
from analysis.models.adapters import ModelInputs
from analysis.models.registry import LoadedModel, load_model
from analysis.pruner.config import PruningConfig, load_config
from analysis.pruner.latency import LatencyEngine, LatencyUnsupported
from analysis.pruner.runtime import pruned_runtime

NEW_TOKENS = 6
LATENCY_FAMILIES = ("llava", "qwen2_5_vl")

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=LATENCY_FAMILIES)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """A tiny random model of each family the latency mode is tested on (SDPA, float32, CPU)."""
    return load_model(FAMILIES[request.param])


def _configs(loaded: LoadedModel) -> dict[str, PruningConfig | None]:
    """Unpruned, VisiPruner with and without its shallow stage, the authors' rule, FastV, and VisiPruner exiting as
    soon as its patience allows."""
    layers = loaded.adapter.num_layers
    family = loaded.adapter.model_type
    thresholds = {"layer_threshold": LAYER_THRESHOLDS[family], "tokens_threshold": TOKENS_THRESHOLDS[family]}
    return {
        "unpruned": None,
        "visipruner": PruningConfig(num_layers=layers, shallow_mid_layer=0, **thresholds),
        "shallow": PruningConfig(num_layers=layers, shallow_mid_layer=1, **thresholds),
        "authors": PruningConfig(num_layers=layers, shallow_mid_layer=1, **thresholds).with_authors_rule("authors_7b"),
        "fastv": PruningConfig(method="fastv", num_layers=layers, prune_layer=2, keep_tokens=3),
        # Every layer after the selection negligible: the deep test's read-backs are deferred until the exit's.
        "patient": PruningConfig(num_layers=layers, shallow_mid_layer=0, deep_cosine=1e-6, **thresholds),
    }


def _eager(
    loaded: LoadedModel, inputs: ModelInputs, config: PruningConfig | None, eos: int | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """Greedy new tokens (B, N) and each step's logits (N, B, V) of transformers' generate, pruned by the eager
    runtime."""
    config = config or PruningConfig(method="none", num_layers=loaded.adapter.num_layers)
    with torch.no_grad(), pruned_runtime(loaded.model, config, inputs.layouts):
        out = loaded.model.generate(
            **inputs.tensors,
            **hf.cache_kwargs(loaded.model, hf.new_cache()),
            max_new_tokens=NEW_TOKENS,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=loaded.processor.tokenizer.pad_token_id,
            output_logits=True,
            return_dict_in_generate=True,
        )
    return out.sequences[:, inputs.input_ids.shape[1] :], torch.stack(out.logits).float()


@pytest.mark.parametrize("name", ["unpruned", "visipruner", "shallow", "authors", "fastv", "patient"])
def test_latency_mode_gives_the_eager_tokens(tiny: LoadedModel, samples, name: str) -> None:
    """Same greedy tokens and decisions as eager generation, on a left-padded batch with several images."""
    config = _configs(tiny)[name]
    inputs = tiny.adapter.build_inputs(tiny.processor, samples)
    expected, expected_logits = _eager(tiny, inputs, config)
    engine = LatencyEngine(tiny.model, width_bucket=4)
    pad = tiny.processor.tokenizer.pad_token_id
    result = engine.generate(inputs, NEW_TOKENS, config, pad_token_id=pad, return_logits=True)
    assert torch.equal(result.tokens, expected)
    # The tower's features were merged by the engine (checked against the model's own merge), not by the model.
    assert list(engine._tower_matches.values()) == [True]
    assert result.logits is not None
    torch.testing.assert_close(result.logits, expected_logits, rtol=1e-4, atol=1e-4)
    if config is not None:
        with torch.no_grad(), pruned_runtime(tiny.model, config, inputs.layouts) as eager:
            tiny.model(**inputs.tensors)
        ours, theirs = result.decisions(inputs), eager.decisions(inputs.layouts)
        assert ours.kept == theirs.kept
        assert (ours.selection_layer == theirs.selection_layer).all() and (ours.exit_layer == theirs.exit_layer).all()
    # A second call reuses the engine's buffers and gives the same tokens.
    again = engine.generate(inputs, NEW_TOKENS, config, pad_token_id=pad)
    assert torch.equal(again.tokens, expected)


def test_pinned_decisions_give_the_live_rules_tokens_with_no_rule_run(tiny: LoadedModel, samples, monkeypatch) -> None:
    """The live rule's decisions pinned (graphs standing in): the same tokens, logits and decisions with no layer
    observed (what ``pruned_speed --latency`` times as the rule's schedule without its cost)."""
    monkeypatch.setattr(LatencyEngine, "_capture", _stand_in_capture({}, []))
    config = _configs(tiny)["visipruner"]
    inputs = tiny.adapter.build_inputs(tiny.processor, samples)
    engine = LatencyEngine(tiny.model, width_bucket=4)
    engine.graphs = True
    pad = tiny.processor.tokenizer.pad_token_id
    live = engine.generate(inputs, NEW_TOKENS, config, pad_token_id=pad, return_logits=True)
    decisions = live.decisions(inputs)
    assert (decisions.selection_layer >= 0).any()  # the rule fired, so the pinned run prunes
    observed: list[int] = []
    for name in ("_run_observed", "_run_deferred"):
        original = getattr(engine, name)
        monkeypatch.setattr(
            engine,
            name,
            lambda runtime, layer, *rest, run=original: observed.append(layer) or run(runtime, layer, *rest),
        )
    pinned = engine.generate(inputs, NEW_TOKENS, config, pad_token_id=pad, return_logits=True, decisions=decisions)
    assert torch.equal(pinned.tokens, live.tokens)
    assert pinned.logits is not None and live.logits is not None
    torch.testing.assert_close(pinned.logits, live.logits, rtol=1e-4, atol=1e-4)
    again = pinned.decisions(inputs)
    assert again.kept == decisions.kept and (again.exit_layer == decisions.exit_layer).all()
    assert observed == []


def test_latency_mode_on_the_organism_answers_as_eager(samples) -> None:
    """The trained organism (real answers, end of sequence inside the budget): same tokens, pruned and unpruned,
    with padding after a row's end of sequence as transformers writes it."""
    from analysis.data.loaders import load_samples

    loaded = load_model("shapes-llava")
    batch = load_samples("shapes-vqa", "test", 6)
    inputs = loaded.adapter.build_inputs(loaded.processor, batch)
    tokenizer = loaded.processor.tokenizer
    config = load_config("configs/shapes-llava.visipruner.json")
    engine = LatencyEngine(loaded.model)
    for pruning in (None, config):
        expected, _ = _eager(loaded, inputs, pruning, eos=tokenizer.eos_token_id)
        result = engine.generate(
            inputs, NEW_TOKENS, pruning, eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id
        )
        width = expected.shape[1]
        assert torch.equal(result.tokens[:, :width], expected)
        assert (result.tokens[:, width:] == tokenizer.pad_token_id).all()
        assert (expected == tokenizer.eos_token_id).any()  # the answers end inside the budget


def test_cuda_graphs_off_cuda_fall_back_with_a_message(tiny: LoadedModel, caplog) -> None:
    """Asking for graphs on the CPU logs why the static-buffer path runs uncaptured."""
    with caplog.at_level(logging.WARNING, logger="analysis.pruner.latency"):
        engine = LatencyEngine(tiny.model, graphs=True)
    assert not engine.graphs
    assert "CUDA graphs need a CUDA device" in caplog.text


def test_logits_processors_are_refused_and_callers_generate_eagerly(tiny: LoadedModel, samples, caplog) -> None:
    """A repetition penalty is not greedy argmax: the engine refuses, generate_answers falls back with the reason."""
    from analysis.generation import generate_answers

    inputs = tiny.adapter.build_inputs(tiny.processor, samples)
    previous = tiny.model.generation_config.repetition_penalty
    tiny.model.generation_config.repetition_penalty = 1.3
    try:
        with pytest.raises(LatencyUnsupported, match="repetition_penalty"):
            LatencyEngine(tiny.model).generate(inputs, NEW_TOKENS)
        with caplog.at_level(logging.WARNING, logger="analysis.pruner.latency"):
            answers = generate_answers(tiny, inputs, NEW_TOKENS, latency=True)
        assert answers == generate_answers(tiny, inputs, NEW_TOKENS)
        assert "generating eagerly" in caplog.text
    finally:
        tiny.model.generation_config.repetition_penalty = previous


def test_a_model_split_over_devices_is_refused(tiny: LoadedModel, samples) -> None:
    """A device map over several devices: the engine's buffers live on one, so it refuses with the reason."""
    inputs = tiny.adapter.build_inputs(tiny.processor, samples)
    tiny.model.hf_device_map = {"model.vision_tower": "cpu", "model.language_model": "disk"}
    try:
        with pytest.raises(LatencyUnsupported, match="several devices"):
            LatencyEngine(tiny.model).generate(inputs, NEW_TOKENS)
    finally:
        del tiny.model.hf_device_map


def test_deepstack_family_is_refused(samples) -> None:
    """Qwen3-VL adds DeepStack features inside its decoder: the latency mode says so instead of running wrong."""
    loaded = load_model(FAMILIES["qwen3_vl"])
    inputs = loaded.adapter.build_inputs(loaded.processor, samples)
    with pytest.raises(LatencyUnsupported, match="DeepStack"):
        LatencyEngine(loaded.model).generate(inputs, NEW_TOKENS)


def test_pruned_evaluation_in_latency_mode_equals_drop(samples) -> None:
    """evaluate_pruned with runtime "latency": the same answers and decisions as the eager token-dropping runtime."""
    from analysis.data.loaders import load_samples
    from analysis.pruner.evaluation import evaluate_pruned

    loaded = load_model("shapes-llava")
    batch = load_samples("shapes-vqa", "test", 8)
    config = load_config("configs/shapes-llava.visipruner.json")
    drop = evaluate_pruned(loaded, batch, config, batch_size=4, runtime="drop")
    latency = evaluate_pruned(loaded, batch, config, batch_size=4, runtime="latency")
    columns = ["baseline_answer", "pruned_answer", "selection_layer", "exit_layer", "n_kept", "flops"]
    assert drop[columns].equals(latency[columns])


class _ReadsOnly(TorchDispatchMode):
    """Records every tensor an operation reads that is neither allowed (weights, the engine's buffers, the graph's
    inputs) nor made by an earlier operation of the same run: what a CUDA-graph replay would read stale."""

    def __init__(self, allowed: set[int]) -> None:
        super().__init__()
        self.allowed = allowed
        self.strays: list[tuple[str, tuple[int, ...]]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        for value in tree_leaves((args, kwargs)):
            if isinstance(value, torch.Tensor) and value.numel() and _storage(value) not in self.allowed:
                self.strays.append((str(func), tuple(value.shape)))
        out = func(*args, **kwargs)
        self.allowed |= {_storage(value) for value in tree_leaves(out) if isinstance(value, torch.Tensor)}
        return out


def _storage(tensor: torch.Tensor) -> int:
    """The address of a tensor's storage (views share it)."""
    return tensor.untyped_storage().data_ptr()


def _stand_in_capture(strays: dict[tuple, list], captured: list[tuple]):  # type: ignore[no-untyped-def]
    """LatencyEngine._capture on the CPU: run the step once under _ReadsOnly, noting its key and stray reads, and
    return its recorded replay standing in for its graph."""
    from analysis.pruner import latency

    def capture(self, key, run, values):  # type: ignore[no-untyped-def]
        inputs = [value.clone() for value in values]
        allowed = {_storage(t) for t in (*self.model.parameters(), *self.model.buffers(), *inputs)}
        allowed |= {_storage(t) for t in (*self.kv.keys, *self.kv.values) if t is not None}
        allowed |= {_storage(t) for t in (self._query_row, self._pending) if t is not None}
        mode, tape = _ReadsOnly(allowed), RecordedReplay()
        with mode, tape:
            output = run(inputs)
        strays[key] = mode.strays
        captured.append(key[:2])
        return latency._Graph(tape, inputs, output)

    return capture


@pytest.mark.parametrize("name", ["unpruned", "visipruner", "shallow", "authors", "fastv", "patient"])
def test_graph_steps_read_only_their_inputs(tiny: LoadedModel, samples, name: str, monkeypatch) -> None:
    """Every step the engine would capture (tower, layer runs, observed layers, the rule, a decoding step) reads only
    its input buffers, the weights and the engine's own buffers, so a replay in a later call reads that call's
    values; with replays standing in for graphs, two calls give the eager tokens."""
    strays: dict[tuple, list] = {}
    captured: list[tuple] = []
    monkeypatch.setattr(LatencyEngine, "_capture", _stand_in_capture(strays, captured))
    config = _configs(tiny)[name]
    engine = LatencyEngine(tiny.model, width_bucket=4)
    engine.graphs = True  # the capture path, with the stand-in above
    pad = tiny.processor.tokenizer.pad_token_id
    first = tiny.adapter.build_inputs(tiny.processor, samples)
    second = tiny.adapter.build_inputs(tiny.processor, samples[::-1])  # same shapes, other values
    for inputs in (first, second):
        expected, _ = _eager(tiny, inputs, config)
        assert torch.equal(engine.generate(inputs, NEW_TOKENS, config, pad_token_id=pad).tokens, expected)
    tower = {"tower"} if tiny.adapter.static_vision_tower else set()
    assert {kind for kind, *_ in captured} >= {"prefill", "decode", *tower}
    if name in ("visipruner", "shallow", "authors", "patient"):
        assert "rule" in {kind for kind, *_ in captured} and "observed" in {kind for kind, *_ in captured}
    if name == "patient":
        assert "deferred" in {kind for kind, *_ in captured}
    assert {key: found for key, found in strays.items() if found} == {}


def test_one_engine_serves_every_config(tiny: LoadedModel, samples, monkeypatch) -> None:
    """Configs in turn through one engine (graphs standing in): each gives its eager tokens, none replays a graph
    another config captured with other code (FastV's rule after VisiPruner's at the same layer and shapes)."""
    monkeypatch.setattr(LatencyEngine, "_capture", _stand_in_capture({}, []))
    engine = LatencyEngine(tiny.model, width_bucket=4)
    engine.graphs = True
    pad = tiny.processor.tokenizer.pad_token_id
    inputs = tiny.adapter.build_inputs(tiny.processor, samples)
    configs = _configs(tiny)
    for name in [*configs, *reversed(configs)]:
        expected, expected_logits = _eager(tiny, inputs, configs[name])
        result = engine.generate(inputs, NEW_TOKENS, configs[name], pad_token_id=pad, return_logits=True)
        assert torch.equal(result.tokens, expected), name
        assert result.logits is not None
        # Logits too: a rule graph reading another runtime's constants (the score scale) can keep the tokens.
        torch.testing.assert_close(result.logits, expected_logits, rtol=1e-4, atol=1e-4, msg=name)
