"""Pruning configs, the mask-based pruned model and its accounting, on tiny models of both families."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import pytest
import torch
from conftest import FAMILIES

from analysis.errors import ConfigError
from analysis.hooks.attention import RegionMasks, route_attention
from analysis.models.registry import LoadedModel, load_model
from analysis.pruner.config import PruningConfig, load_config, parse_config
from analysis.pruner.evaluation import evaluate_pruned, summarize
from analysis.pruner.simulate import PruningHooks


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """A tiny random model of each family (SDPA)."""
    return load_model(FAMILIES[request.param])


def _logits(loaded: LoadedModel, samples, config: PruningConfig | None) -> torch.Tensor:
    """Prefill logits with or without pruning hooks."""
    inputs = loaded.adapter.build_inputs(loaded.processor, samples)
    with torch.no_grad():
        if config is None:
            return loaded.model(**inputs.tensors).logits
        length = inputs.input_ids.shape[1]
        hooks = PruningHooks(
            config, RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device), inputs.layouts, length
        )
        with route_attention(loaded.adapter, hooks, length - 1):
            return loaded.model(**inputs.tensors).logits


def test_all_off_is_bit_identical(tiny: LoadedModel, samples) -> None:
    """Method 'none' and VisiPruner with no stage leave logits untouched."""
    reference = _logits(tiny, samples, None)
    layers = tiny.adapter.num_layers
    assert torch.equal(_logits(tiny, samples, PruningConfig(method="none", num_layers=layers)), reference)
    assert torch.equal(
        _logits(tiny, samples, PruningConfig(num_layers=layers, stages=[], shallow_mid_layer=1)), reference
    )


def test_keeping_every_token_keeps_answers(tiny: LoadedModel, samples) -> None:
    """A selection that keeps every image token (tokens_threshold 0, no shallow or deep stage) changes no answer."""
    config = PruningConfig(
        num_layers=tiny.adapter.num_layers,
        stages=["middle"],
        shallow_mid_layer=0,
        layer_threshold=1.0,
        tokens_threshold=0.0,
    )
    per_sample = evaluate_pruned(tiny, samples, config, batch_size=4)
    assert (per_sample["selection_layer"] == 1).all() and (per_sample["n_kept"] == per_sample["n_image"]).all()
    assert per_sample["agrees"].all()


def test_batch_equals_single(tiny: LoadedModel, samples) -> None:
    """Per-sample decisions, answers and FLOPs do not depend on batching."""
    config = PruningConfig(
        num_layers=tiny.adapter.num_layers, shallow_mid_layer=1, layer_threshold=0.9999, tokens_threshold=0.02
    )
    batched = evaluate_pruned(tiny, samples, config, batch_size=4)
    single = evaluate_pruned(tiny, samples, config, batch_size=1)
    columns = ["pruned_answer", "selection_layer", "exit_layer", "n_kept", "flops"]
    assert batched[columns].equals(single[columns])


def test_baselines_keep_their_budget(tiny: LoadedModel, samples) -> None:
    """FastV, random and pre-LLM pruning keep exactly their token budget and cut FLOPs accordingly."""
    layers = tiny.adapter.num_layers
    cuts = {}
    for method in ("fastv", "random", "pre_llm"):
        per_sample = evaluate_pruned(
            tiny, samples, PruningConfig(method=method, num_layers=layers, prune_layer=2, keep_tokens=3), batch_size=4
        )
        assert (per_sample["n_kept"] == 3).all()
        cuts[method] = summarize(per_sample)["flops_cut"]
    assert cuts["fastv"] == pytest.approx(cuts["random"]) and cuts["pre_llm"] > cuts["fastv"] > 0


@pytest.mark.parametrize("method", ["visipruner", "fastv", "pre_llm", "none"])
def test_dropping_runtime_evaluates_like_the_masks(tiny: LoadedModel, samples, method: str) -> None:
    """Evaluation with tokens really dropped gives the mask-based answers, decisions and FLOPs."""
    config = PruningConfig(
        method=method,
        num_layers=tiny.adapter.num_layers,
        shallow_mid_layer=1,
        layer_threshold=0.9999,
        tokens_threshold=0.02,
        prune_layer=2,
        keep_tokens=3,
    )
    masked = evaluate_pruned(tiny, samples, config, batch_size=4, runtime="mask")
    dropped = evaluate_pruned(tiny, samples, config, batch_size=4, runtime="drop")
    assert dropped.equals(masked)
    with pytest.raises(ConfigError, match="drop or mask"):
        evaluate_pruned(tiny, samples, config, runtime="fast")


REFERENCE_ATTENTION = "test_zeroed_eager"


def _zeroed_eager(module, query, key, value, attention_mask, scaling, dropout=0.0, **_):
    """Independent reference of the authors' shallow rule (custom_modeling_llama.py lines 687-699): eager attention,
    then weights set to 0 after the softmax (not renormalised) in layers < S: text->image in layers 1..S-1; in layer 0
    their 7B rule (every row from the image on against the image keys, text rows' mass put on the first image
    token), their 13B rule (image->image and text->the first half of the image), or text->image ("none")."""
    settings = _zeroed_eager.settings
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling + attention_mask[..., : key.shape[2]]
    weights = torch.softmax(scores.float(), dim=-1)
    layer = module.layer_idx
    if layer < settings["shallow_mid_layer"]:
        rule = settings["layer0"] if layer == 0 else "none"
        for row, (text, image_rows, image) in enumerate(
            zip(settings["text"], settings["image_rows"], settings["image"], strict=True)
        ):
            sample = weights[row]  # (H, Q, K), edited in place
            if rule == "authors_7b":
                removed = sample[:, text][:, :, image].sum(-1)  # (H, text queries)
                rows = torch.cat([image_rows, text])
                sample[:, rows[:, None], image[None, :]] = 0.0
                sample[:, text, image[0]] = removed
            elif rule == "authors_13b":
                sample[:, image_rows[:, None], image[None, :]] = 0.0
                half = image[: len(image) // 2]
                sample[:, text[:, None], half[None, :]] = 0.0
            else:
                sample[:, text[:, None], image[None, :]] = 0.0
    settings["weights"][layer] = weights
    output = torch.matmul(weights.to(value.dtype), value).transpose(1, 2).contiguous()
    return output, weights


class _ObservingHooks(PruningHooks):
    """The pruning hooks, also handing over layer 1's last-row observation (a layer the rule zeroes)."""

    def wants_last_row(self, layer: int, query_start: int, query_length: int) -> bool:
        return layer == 1 and query_start == 0

    def observe(self, observation) -> None:
        self.observation = observation


@pytest.mark.parametrize("layer0_rule", ["none", "authors_7b", "authors_13b"])
def test_authors_shallow_rule_matches_zeroed_eager_weights(samples, layer0_rule: str) -> None:
    """The authors' rule (zeroed after the softmax; in layer 0 their 7B or 13B rule) on SDPA equals a reference eager
    computation that edits the attention weights directly, for both families in a left-padded batch."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask

    AttentionInterface.register(REFERENCE_ATTENTION, _zeroed_eager)
    AttentionMaskInterface.register(REFERENCE_ATTENTION, eager_mask)
    for name in FAMILIES.values():
        loaded = load_model(name)
        layers = loaded.adapter.num_layers
        config = PruningConfig(num_layers=layers, stages=["shallow"], shallow_mid_layer=2).with_authors_rule(
            layer0_rule
        )
        inputs = loaded.adapter.build_inputs(loaded.processor, samples)
        masks = RegionMasks.from_layouts(inputs.layouts, inputs.input_ids.shape[1], inputs.input_ids.device)
        _zeroed_eager.settings = {
            "shallow_mid_layer": 2,
            "layer0": layer0_rule,
            "text": [row.nonzero().flatten() for row in masks.queries["instruction"]],
            "image_rows": [row.nonzero().flatten() for row in masks.queries["image"]],
            "image": [row.nonzero().flatten() for row in masks.keys["image"]],
        }
        _zeroed_eager.settings["weights"] = {}
        ours = _logits(loaded, samples, config)
        length = inputs.input_ids.shape[1]
        hooks = _ObservingHooks(config, masks, inputs.layouts, length)
        with torch.no_grad(), route_attention(loaded.adapter, hooks, length - 1):
            loaded.model(**inputs.tensors)
        text_config = loaded.adapter.text_config
        text_config._attn_implementation = REFERENCE_ATTENTION
        try:
            reference = _logits(loaded, samples, None)
        finally:
            text_config._attn_implementation = "sdpa"
        unpruned = _logits(loaded, samples, None)
        renormalised = _logits(loaded, samples, replace(config, shallow_rule="mask", layer0_rule="none"))
        real = inputs.tensors["attention_mask"].bool()  # pad rows' outputs differ between eager and SDPA and are unused
        assert torch.allclose(ours[real], reference[real], atol=1e-5)
        # An observed last row shows the zeroed weights, as the reference computes them.
        assert torch.allclose(hooks.observation.weights, _zeroed_eager.settings["weights"][1][:, :, -1], atol=1e-6)
        # The rules really differ: neither is the unpruned model nor our renormalising mask.
        assert not torch.allclose(ours[real], unpruned[real], atol=1e-3)
        assert not torch.allclose(ours[real], renormalised[real], atol=1e-3)


def test_rule_precision_model_reproduces_half_precision_cosines(samples) -> None:
    """In an fp16 model a cosine of 0.99985 is 1.0: the authors' precision misses a selection that float32 makes."""
    from analysis.hooks.attention import LastRowObservation

    loaded = load_model("tiny-llava")
    inputs = loaded.adapter.build_inputs(loaded.processor, samples[:1])
    layout, length = inputs.layouts[0], inputs.input_ids.shape[1]
    image, text = layout.padded(layout.image_positions[0]), layout.padded(layout.last)
    # Half the attention on a text token with value (1, 0), half on an image token with value (1, 2 tan(phi)):
    # o is at angle phi from o - c_image, so cos(o - c_image, o) = cos(phi) = 0.99985 < 0.9999.
    phi = torch.acos(torch.tensor(0.99985))
    values = torch.zeros(1, 1, length, 2)
    values[0, 0, text] = torch.tensor([1.0, 0.0])
    values[0, 0, image] = torch.tensor([1.0, 2 * float(torch.tan(phi))])
    weights = torch.zeros(1, 1, length)
    weights[0, 0, [text, image]] = 0.5
    observation = LastRowObservation(
        1, torch.zeros(1, 1, 2), torch.zeros(1, 1, length, 2), values, weights, torch.float16
    )
    fired = {}
    for precision in ("float32", "model"):
        config = PruningConfig(
            num_layers=loaded.adapter.num_layers,
            stages=["middle"],
            shallow_mid_layer=0,
            layer_threshold=0.9999,
            tokens_threshold=0.0,
            rule_precision=precision,
        )
        hooks = PruningHooks(
            config, RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device), inputs.layouts, length
        )
        hooks.observe(observation)
        fired[precision] = int(hooks.selection_layer[0])
    assert fired == {"float32": 1, "model": -1}


def test_rule_decisions_follow_the_cosines_row_by_row(samples, monkeypatch: pytest.MonkeyPatch) -> None:
    """Selection at the first layer where some token's cosine drops below the threshold, keeping tokens above the
    norm threshold; exit after ``deep_patience`` layers in which every kept token's cosine is negligible."""
    import analysis.pruner.methods.visipruner as visipruner
    from analysis.hooks.attention import LastRowObservation

    loaded = load_model("tiny-llava")
    inputs = loaded.adapter.build_inputs(loaded.processor, samples[:4])
    length, batch = inputs.input_ids.shape[1], 4
    n_image = min(layout.n_image_tokens for layout in inputs.layouts)
    layers = 8
    rng = torch.Generator().manual_seed(0)
    # Cosines near the thresholds so that rows decide at different layers; some rows never select, one keeps nothing.
    cosines = 0.985 + 0.02 * torch.rand(layers, batch, n_image, generator=rng)
    norms = torch.rand(batch, n_image, generator=rng)
    norms[3] = 0.0
    config = PruningConfig(
        num_layers=layers,
        stages=["middle", "deep"],
        shallow_mid_layer=0,
        layer_threshold=0.9855,
        tokens_threshold=0.5,
        deep_cosine=0.99,
        deep_patience=2,
    )
    hooks = PruningHooks(
        config, RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device), inputs.layouts, length
    )
    valid = hooks.image_valid
    current = {}

    def recorded(observation, index, image_valid, **_):  # type: ignore[no-untyped-def]
        cosine = torch.ones_like(valid, dtype=torch.float32)
        cosine[:, :n_image] = cosines[current["layer"]]
        norm = torch.zeros_like(cosine)
        norm[:, :n_image] = norms
        return {"cosine": cosine * image_valid, "norm": norm * image_valid}

    monkeypatch.setattr(visipruner, "image_contributions", recorded)
    dummy = torch.zeros(batch, 1, length, 2)
    for layer in range(1, layers):
        current["layer"] = layer
        hooks.observe(
            LastRowObservation(
                layer, torch.zeros(batch, 1, 2), dummy, dummy, torch.zeros(batch, 1, length), torch.float32
            )
        )
    for row in range(batch):
        # The rule, one row at a time.
        fired = [layer for layer in range(1, layers) if (cosines[layer, row] < 0.9855).any()]
        selection = fired[0] if fired else -1
        keep = norms[row] > 0.5
        exit_layer, streak = -1, 0
        for layer in range(selection + 1, layers) if fired else ():
            if (cosines[layer, row][keep] >= 0.99).all():
                streak += 1
                if streak == 2:
                    exit_layer = layer
                    break
        assert int(hooks.selection_layer[row]) == selection, row
        assert int(hooks.exit_layer[row]) == exit_layer, row
        if fired:
            assert torch.equal(hooks.keep[row, :n_image], keep)
    assert len(set(hooks.selection_layer.tolist())) > 1 and (hooks.exit_layer >= 0).any()


def test_config_errors_list_every_problem(tmp_path: Path) -> None:
    """Another depth, thresholds out of range, missing keys and unknown modes are all reported together."""
    bad = {"mode": ["shallow", "sideways"], "shallow_mid_layer": 9, "layer_threshold": 1.5}
    with pytest.raises(ConfigError) as error:
        parse_config(bad, num_layers=4)
    message = str(error.value)
    for part in ("missing keys ['tokens_threshold']", "sideways", "shallow_mid_layer 9", "layer_threshold 1.5"):
        assert part in message
    with pytest.raises(ConfigError, match="12-layer model but this model has 4"):
        parse_config(PruningConfig(num_layers=12).to_json(), num_layers=4)
    with pytest.raises(ConfigError, match="unknown keys"):
        parse_config({"num_layers": 4, "speed": "fast"})
    with pytest.raises(ConfigError) as error:
        parse_config({"num_layers": 4, "shallow_rule": "halve", "rule_precision": "int8", "layer0_rule": "authors_7b"})
    for part in ("unknown shallow_rule 'halve'", "unknown rule_precision 'int8'", "needs shallow_rule 'zero'"):
        assert part in str(error.value)
    (tmp_path / "broken.json").write_text("{")
    with pytest.raises(ConfigError, match="not valid JSON"):
        load_config(tmp_path / "broken.json")


def test_authors_json_round_trip(tmp_path: Path) -> None:
    """Our config exports the authors' JSON, which parses back to the same rule."""
    ours = PruningConfig(num_layers=32, shallow_mid_layer=6, layer_threshold=0.995, tokens_threshold=0.2)
    (tmp_path / "a.json").write_text(json.dumps(ours.authors_json()))
    theirs = load_config(tmp_path / "a.json", num_layers=32, layer0_rule="authors_7b")
    assert (theirs.shallow_mid_layer, theirs.layer_threshold, theirs.tokens_threshold, theirs.stages) == (
        6,
        0.995,
        0.2,
        ["shallow", "middle", "deep"],
    )
    # Their rule: text blinded in the prefill only, weights zeroed after the softmax, cosines in the model's dtype.
    assert (theirs.rule, theirs.shallow_in_decode, theirs.shallow_rule, theirs.rule_precision, theirs.layer0_rule) == (
        "authors",
        False,
        "zero",
        "model",
        "authors_7b",
    )


def test_sweep_matches_baseline_flops(tiny: LoadedModel, samples) -> None:
    """Each baseline is evaluated at the token budget whose FLOPs cut is closest to VisiPruner's."""
    from analysis.pruner.sweep import baselines_for, sweep

    config = PruningConfig(
        num_layers=tiny.adapter.num_layers, shallow_mid_layer=1, layer_threshold=0.9999, tokens_threshold=0.02
    )
    table = sweep(tiny, samples, [config], prune_layer=2, batch_size=4, authors_rule=True, authors_layer0="authors_7b")
    assert list(table["method"]) == ["visipruner", "visipruner_authors", *baselines_for(tiny.adapter)]
    assert "shallow=zero" in table.loc[1, "settings"] and "shallow=mask" in table.loc[0, "settings"]
    visipruner_cut = table.loc[0, "flops_cut"]
    for method in ("fastv", "random", "dart", "pyramiddrop"):
        row = table[table["method"] == method].iloc[0]
        # Budgets are whole tokens (PyramidDrop's lambda too: each stage keeps a whole number), so the match is
        # within about one token's worth of FLOPs.
        assert abs(row["flops_cut"] - visipruner_cut) < 1.0


def test_sweep_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The sweep command prints and saves the table; a bad config is one error line."""
    from analysis.pruner.__main__ import main

    good = tmp_path / "ours.json"
    good.write_text(
        json.dumps(
            PruningConfig(num_layers=4, shallow_mid_layer=1, layer_threshold=0.9999, tokens_threshold=0.02).to_json()
        )
    )
    out = tmp_path / "sweep.csv"
    assert (
        main(
            [
                "sweep",
                str(good),
                "--model",
                "tiny-llava",
                "--limit",
                "4",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "-o",
                str(out),
            ]
        )
        == 0
    )
    assert "fastv" in capsys.readouterr().out and out.read_text().startswith("method,")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"num_layers": 32}))
    assert main(["sweep", str(bad), "--limit", "4", "--device", "cpu"]) == 2
    assert "32-layer model" in capsys.readouterr().err


def test_ceiling_reads_exit_cost_and_budgets(tmp_path: Path) -> None:
    """Per layer: the exact FLOPs cut of exiting vision there, the answers that exit changes, the target's budget."""
    from analysis.pruner.ceiling import CeilingConfig, ceiling, describe
    from analysis.pruner.flops import DecoderShape, LayerTokens, prefill_flops
    from tests.test_stages import DEEP_START, N_LAYERS, write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", 10, image_span=(100, 20, 84))  # 64 image tokens of 100
    shape = DecoderShape(num_layers=N_LAYERS, hidden=64, intermediate=128, num_heads=4, num_kv_heads=4, head_dim=16)
    config = CeilingConfig(target_cut=40.0)
    table = ceiling(run, shape, config)

    def cut(layer: int, keep: int) -> float:
        layers = [LayerTokens(100, 64)] * layer + [LayerTokens(36 + keep, keep)] * (N_LAYERS - layer)
        return 100 * (
            1 - prefill_flops(shape, layers)["exact"] / prefill_flops(shape, [LayerTokens(100, 64)] * N_LAYERS)["exact"]
        )

    assert table["exit_cut"].tolist() == pytest.approx([cut(layer, 0) for layer in range(N_LAYERS)])
    # The synthetic answers change exactly when the image is hidden from a layer before D.
    assert table["changed"].tolist() == [1.0] * DEEP_START + [0.0] * (N_LAYERS - DEEP_START)
    for row in table.itertuples():
        if row.keep_for_target < 0:
            assert cut(row.layer, 0) < 40.0
        else:
            assert cut(row.layer, row.keep_for_target) >= 40.0
            assert row.keep_for_target == 64 or cut(row.layer, row.keep_for_target + 1) < 40.0
    assert (table["keep_for_target"] >= 0).any() and (table["keep_for_target"] < 0).any()
    text = describe(table, config)
    assert f"{cut(DEEP_START, 0):.1f}% (vision exits at layer {DEEP_START})" in text
    last = int(table[table["keep_for_target"] >= 0]["layer"].max())
    assert f"must drop them at layer {last} or earlier" in text and "changes 100.0% of answers" in text


def test_ceiling_bad_input(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A run of another layer count, a run without a model and out-of-range values are named, not tracebacks."""
    from analysis.pruner.__main__ import main
    from tests.test_stages import write_synthetic_run

    run = write_synthetic_run(tmp_path / "run", 4, model="tiny-llava", image_span=(30, 5, 21))
    assert main(["ceiling", str(run)]) != 0
    assert "has 'from' knockouts for 12 layers but the model has 4" in capsys.readouterr().err
    assert main(["ceiling", str(run), "--target-cut", "150", "--tolerance", "1.5"]) != 0
    err = capsys.readouterr().err
    assert "--target-cut must be in (0, 100)" in err and "--tolerance must be in [0, 1)" in err
    anonymous = write_synthetic_run(tmp_path / "anonymous", 4, image_span=(30, 5, 21))
    assert main(["ceiling", str(anonymous)]) != 0
    assert "names no model" in capsys.readouterr().err
    assert main(["ceiling", str(tmp_path / "missing")]) != 0
    assert "no manifest.json" in capsys.readouterr().err


def test_authors_mode_decides_in_half_precision_with_their_formulas(samples) -> None:
    """On an fp16 model their mode recomputes the last row's scores in fp16 and takes cos(o - c_j, o) and
    ||(o - c_j) - o|| in fp16, as their value_aware_token_selection does: a direct fp16 restatement keeps the same
    tokens; our mode keeps those of float32 ||c_j||."""
    import math

    import torch.nn.functional as F

    from analysis.hooks.attention import LastRowObservation

    loaded = load_model("tiny-llava")
    inputs = loaded.adapter.build_inputs(loaded.processor, samples[:1])
    layout, length = inputs.layouts[0], inputs.input_ids.shape[1]
    generator = torch.Generator().manual_seed(0)
    heads, dim = 4, 16
    query = torch.randn(1, heads, dim, generator=generator).half().float()
    keys = torch.randn(1, heads, length, dim, generator=generator).half().float()
    values = (3 * torch.randn(1, heads, length, dim, generator=generator)).half().float()
    mask = torch.zeros(1, 1, length)
    image = torch.as_tensor(layout.padded(layout.image_positions))
    # Their computation, restated: fp16 scores / sqrt(d), float32 softmax cast to fp16, fp16 everything after.
    scores = torch.einsum("bhd,bhkd->bhk", query.half(), keys.half()) / math.sqrt(dim)
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).half()
    output = torch.einsum("bhk,bhkd->bhd", weights, values.half()).reshape(1, -1)
    contributions = (
        (weights[:, :, image, None] * values.half()[:, :, image]).permute(0, 2, 1, 3).reshape(1, len(image), -1)
    )
    masked = output[:, None] - contributions
    cosine = F.cosine_similarity(masked, output[:, None], dim=-1)[0]
    norm = torch.norm(masked - output[:, None], p=2, dim=-1)[0]
    threshold = float(norm.float().median())
    layer_threshold = min(float(cosine.float().max()) + 1e-3, 0.9999)
    observation = LastRowObservation(
        1,
        query,
        keys,
        values,
        torch.softmax(torch.einsum("bhd,bhkd->bhk", query, keys) / math.sqrt(dim), dim=-1),
        torch.float16,
        mask,
    )
    kept = {}
    for rule in ("authors", "ours"):
        config = PruningConfig(
            num_layers=loaded.adapter.num_layers,
            stages=["middle"],
            shallow_mid_layer=0,
            layer_threshold=layer_threshold,
            tokens_threshold=threshold,
        )
        if rule == "authors":
            config = replace(config.with_authors_rule(), shallow_mid_layer=0)
        hooks = PruningHooks(
            config, RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device), inputs.layouts, length
        )
        hooks.observe(observation)
        assert int(hooks.selection_layer[0]) == 1
        kept[rule] = hooks.keep[0, : layout.n_image_tokens]
    assert torch.equal(kept["authors"], norm > threshold)
    # Ours: float32 weights and ||c_j||, from the same observation.
    ours_norm = (
        (observation.weights[:, :, image, None] * values[:, :, image])
        .permute(0, 2, 1, 3)
        .reshape(1, len(image), -1)
        .norm(dim=-1)[0]
    )
    assert torch.equal(kept["ours"], ours_norm > threshold)
    assert not torch.equal(norm.float(), ours_norm)  # the two arithmetics really differ


def test_sweep_authors_rows_need_a_layer0_rule_and_skip_what_their_format_cannot_hold(
    tiny: LoadedModel, samples, caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """On a model that is not LLaVA-1.5, their rule on a shallow stage needs --authors-layer0, refused before any
    sample runs; a config with a token threshold >= 1 gets no authors' row, with a warning saying why."""
    import analysis.pruner.sweep as sweep_module
    from analysis.pruner.sweep import baselines_for, sweep

    layers = tiny.adapter.num_layers
    shallow = PruningConfig(num_layers=layers, shallow_mid_layer=1, layer_threshold=0.9999, tokens_threshold=0.02)
    with monkeypatch.context() as patch:
        patch.setattr(sweep_module, "clean_answers", lambda *a, **k: pytest.fail("ran before the refusal"))
        with pytest.raises(ConfigError, match="--authors-layer0"):
            sweep(tiny, samples, [shallow], batch_size=4, authors_rule=True)
    absolute = replace(shallow, tokens_threshold=2.5)
    table = sweep(tiny, samples, [absolute], batch_size=4, authors_rule=True, authors_layer0="authors_13b")
    assert list(table["method"]) == ["visipruner", *baselines_for(tiny.adapter)]
    assert any("no authors'-rule row" in record.message and "2.5" in record.message for record in caplog.records)
