"""DART, CDPruner, PyramidDrop and VisionZip: their selections against direct re-implementations of the papers'
formulas, and the pruned model under both executors on the tiny LLaVA and Qwen2.5-VL models (VisionZip, which reads
a CLIP tower's CLS attention, on LLaVA, and a clear refusal elsewhere)."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

from analysis.errors import ConfigError, ModelError
from analysis.generation import generate_answers
from analysis.hooks.attention import RegionMasks
from analysis.models.registry import LoadedModel, load_model
from analysis.pruner.config import PruningConfig
from analysis.pruner.evaluation import evaluate_pruned
from analysis.pruner.methods.cdpruner import conditional_kernel, greedy_dpp, greedy_dpp_batch
from analysis.pruner.methods.dart import dart_selection
from analysis.pruner.methods.visionzip import split_budget, zip_image
from analysis.pruner.runtime import pruned_runtime
from analysis.pruner.simulate import PruningHooks

BOTH_FAMILIES = ("llava", "qwen2_5_vl")


# Tiny matrices run faster on one thread than on threads contending for two busy cores.
pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module", params=BOTH_FAMILIES)
def tiny(request: pytest.FixtureRequest) -> LoadedModel:
    """The tiny random LLaVA and Qwen2.5-VL models."""
    return load_model(FAMILIES[request.param])


def _config(loaded: LoadedModel, method: str, keep: int) -> PruningConfig:
    """A DART (K = 2, one image and two text pivots), CDPruner or PyramidDrop config keeping ``keep`` image tokens
    (PyramidDrop: stages after layers 0 and 1, lambda 1 where ``keep`` covers the image, else 0.5)."""
    options: dict[str, object] = {"pivot_image_tokens": 1, "pivot_text_tokens": 2} if method == "dart" else {}
    if method == "pyramiddrop":
        options = {"stage_layers": [1, 2], "ratio": 1.0 if keep >= 10_000 else 0.5}
    return PruningConfig(
        method=method, num_layers=loaded.adapter.num_layers, prune_layer=2, keep_tokens=keep, options=options
    )


# -- DART ---------------------------------------------------------------------------------------------------------
def _dart_as_written(
    image_norms: list[float],
    text_norms: list[float],
    image_states: torch.Tensor,
    text_states: torch.Tensor,
    per_pivot: int,
    pivot_image: int,
    pivot_text: int,
) -> list[int]:
    """DART's get_retained_image_token on one sequence [image tokens, text tokens], step by step as the authors
    wrote it (sets of sequence indices; pivots served in ascending order)."""
    n_image = len(image_norms)
    states = torch.cat([image_states, text_states])
    image_pivots = torch.tensor(image_norms).topk(pivot_image).indices.tolist()
    text_pivots = (torch.tensor(text_norms).topk(pivot_text).indices + n_image).tolist()
    selected = set(image_pivots + text_pivots)
    valid = set(range(n_image)) - set(image_pivots)
    for pivot in sorted(selected):
        candidates = sorted(valid)
        similarity = -F.cosine_similarity(states[pivot][None, :], states[candidates], dim=-1)
        taken = [candidates[i] for i in similarity.topk(per_pivot).indices.tolist()]
        selected.update(taken)
        valid.difference_update(taken)
    selected.difference_update(text_pivots)
    return sorted(selected)


def test_dart_selection_matches_the_formula() -> None:
    """On a fixed input whose budget divides evenly, the selection is the authors' step by step."""
    generator = torch.Generator().manual_seed(0)
    n_image, n_text, width = 24, 6, 8
    image_states = torch.randn(n_image, width, generator=generator)
    text_states = torch.randn(n_text, width, generator=generator)
    image_norms = torch.rand(n_image, generator=generator)
    text_norms = torch.rand(n_text, generator=generator)
    pivot_image, pivot_text, per_pivot = 2, 2, 3
    keep = pivot_image + (pivot_image + pivot_text) * per_pivot  # our budget counts the image pivots
    ours = dart_selection(image_norms, text_norms, image_states, text_states, keep, pivot_image, pivot_text)
    expected = _dart_as_written(
        image_norms.tolist(), text_norms.tolist(), image_states, text_states, per_pivot, pivot_image, pivot_text
    )
    assert ours.tolist() == expected
    assert len(expected) == keep


def test_dart_budget_is_exact_and_keeps_the_pivots() -> None:
    """Budgets that do not divide among the pivots still keep exactly that many tokens, the image pivots among them."""
    generator = torch.Generator().manual_seed(1)
    image_norms = torch.rand(30, generator=generator)
    states = torch.randn(30, 4, generator=generator)
    text_states = torch.randn(5, 4, generator=generator)
    pivots = image_norms.topk(3).indices.tolist()
    for keep in (3, 7, 11, 29, 30, 40):
        chosen = dart_selection(image_norms, torch.rand(5, generator=generator), states, text_states, keep, 3, 2)
        assert len(chosen) == min(keep, 30) and len(set(chosen.tolist())) == len(chosen)
        assert set(pivots) <= set(chosen.tolist())
    assert dart_selection(image_norms, image_norms[:5], states, text_states, 0, 3, 2).numel() == 0


def test_dart_bad_pivots_are_one_line() -> None:
    """Pivot counts that make no rule are a config error naming the parameter."""
    with pytest.raises(ConfigError, match="at least one pivot"):
        PruningConfig(method="dart", num_layers=4, options={"pivot_image_tokens": 0, "pivot_text_tokens": 0}).validate(
            4
        )


# -- CDPruner -----------------------------------------------------------------------------------------------------
def test_conditional_kernel_matches_the_formula() -> None:
    """The kernel is relevance_i * cos(x_i, x_j) * relevance_j with the authors' negated, min-max relevance."""
    generator = torch.Generator().manual_seed(2)
    image, text = torch.randn(7, 5, generator=generator), torch.randn(3, 5, generator=generator)
    cosine = torch.tensor([[F.cosine_similarity(a, b, dim=0).item() for b in image] for a in image])
    relevance = torch.tensor([-sum(F.cosine_similarity(a, t, dim=0).item() for t in text) / 3 for a in image])
    relevance = (relevance - relevance.min() + 1e-6) / (relevance.max() - relevance.min())
    expected = relevance[:, None] * cosine * relevance[None, :]
    assert torch.allclose(conditional_kernel(image, text), expected, atol=1e-5)


def _log_det(kernel: torch.Tensor, subset: list[int]) -> float:
    """log det of the kernel's principal submatrix on ``subset`` (-inf where singular)."""
    sign, value = torch.linalg.slogdet(kernel[subset][:, subset].double())
    return value.item() if sign > 0 else -math.inf


def test_greedy_dpp_is_greedy_on_determinants() -> None:
    """Every step adds the item whose addition maximises the determinant (brute force over the candidates)."""
    generator = torch.Generator().manual_seed(3)
    features = torch.randn(9, 6, generator=generator)
    kernel = conditional_kernel(features, torch.randn(2, 6, generator=generator)).double()
    chosen = greedy_dpp(kernel, 5).tolist()
    for step in range(5):
        others = [j for j in range(9) if j not in chosen[:step]]
        best = max(others, key=lambda j: _log_det(kernel, [*chosen[:step], j]))
        assert chosen[step] == best


@pytest.mark.parametrize("seed", range(4))
def test_greedy_dpp_reaches_the_brute_force_maximum(seed: int) -> None:
    """On small near-orthogonal inputs (where greedy MAP is exact) the selection is the subset of largest
    determinant, found by trying every subset."""
    generator = torch.Generator().manual_seed(seed)
    basis = torch.linalg.qr(torch.randn(8, 8, generator=generator)).Q
    features = basis + 0.05 * torch.randn(8, 8, generator=generator)
    scale = torch.rand(8, generator=generator) + 0.5
    kernel = (scale[:, None] * (features @ features.T) * scale[None, :]).double()
    for count in (1, 3, 5):
        best = max(itertools.combinations(range(8), count), key=lambda s: _log_det(kernel, list(s)))
        assert sorted(greedy_dpp(kernel, count).tolist()) == sorted(best)


def test_greedy_dpp_fills_a_low_rank_kernel_with_distinct_tokens() -> None:
    """Duplicated features (an upsampled image's identical patches) leave the kernel's rank below the budget; the
    selection still has as many distinct tokens, the volume-adding ones first."""
    generator = torch.Generator().manual_seed(6)
    features = torch.nn.functional.normalize(torch.randn(3, 4, generator=generator), dim=-1).repeat(4, 1)
    kernel = features @ features.T  # 12 tokens, rank 3
    chosen = greedy_dpp(kernel, 8).tolist()
    assert len(set(chosen)) == 8
    assert len({index % 3 for index in chosen[:3]}) == 3  # the first three span the three distinct features


def test_greedy_dpp_batch_equals_each_kernel_alone() -> None:
    """Kernels of different sizes padded into one batch (one of them low-rank) pick what each picks on its own."""
    generator = torch.Generator().manual_seed(8)
    low_rank = torch.nn.functional.normalize(torch.randn(2, 5, generator=generator), dim=-1).repeat(3, 1)
    kernels = [
        conditional_kernel(torch.randn(9, 5, generator=generator), torch.randn(3, 5, generator=generator)),
        conditional_kernel(torch.randn(7, 5, generator=generator), torch.randn(2, 5, generator=generator)),
        low_rank @ low_rank.T,
    ]
    padded = torch.zeros(3, 9, 9)
    valid = torch.zeros(3, 9, dtype=torch.bool)
    for row, kernel in enumerate(kernels):
        padded[row, : len(kernel), : len(kernel)] = kernel
        valid[row, : len(kernel)] = True
    together = greedy_dpp_batch(padded, valid, 4)
    for row, kernel in enumerate(kernels):
        assert together[row].tolist() == greedy_dpp(kernel, 4).tolist()
        assert together[row].max() < len(kernel)


# -- PyramidDrop --------------------------------------------------------------------------------------------------
def test_pyramiddrop_stages_match_the_formula() -> None:
    """Fed fixed attention rows, each stage keeps int(N lambda^s) of the original tokens, the most attended among
    those still present (the authors' topk over the surviving tokens), and drops the rest after that layer."""
    from types import SimpleNamespace

    from analysis.hooks.attention import LastRowObservation
    from analysis.pruner.methods import method_for

    generator = torch.Generator().manual_seed(5)
    n_image, heads, text = 10, 3, 4
    config = PruningConfig(method="pyramiddrop", num_layers=8, options={"stage_layers": [2, 4, 6], "ratio": 0.6})
    method = method_for(config)
    state = SimpleNamespace(
        image_valid=torch.ones(1, n_image, dtype=torch.bool), stage_drops=torch.full((1, n_image), -1)
    )
    present, expected = list(range(n_image)), {}
    for stage, layer in enumerate((1, 3, 5)):
        assert method.observes(layer, state) and not method.observes(layer + 1, state)
        weights = torch.rand(1, heads, text + n_image, generator=generator).softmax(-1)
        index = torch.arange(text, text + n_image)[None, :]
        empty = torch.zeros(1, heads, 1)
        method.decide(state, LastRowObservation(layer, empty, empty, empty, weights, image_index=index))
        mean = weights.mean(1)[0, text:]
        keep = int(n_image * 0.6 ** (stage + 1))
        survivors = sorted(present, key=lambda i: -mean[i].item())[:keep]
        expected.update({i: layer for i in present if i not in survivors})
        present = sorted(survivors)
    assert state.stage_drops[0].tolist() == [expected.get(i, -1) for i in range(n_image)]
    assert [method.image_tokens(layer, n_image) for layer in range(8)] == [10, 10, 6, 6, 3, 3, 2, 2]


def test_pyramiddrop_default_stages_follow_the_depth() -> None:
    """Without stage layers, the stages start at a quarter, half and three quarters of the depth (8, 16, 24 of
    LLaVA-1.5's 32); stages outside the model are one config error."""
    from analysis.pruner.methods import method_for

    assert method_for(PruningConfig(method="pyramiddrop", num_layers=32)).params.boundaries() == (8, 16, 24)
    assert method_for(PruningConfig(method="pyramiddrop", num_layers=16)).params.boundaries() == (4, 8, 12)
    with pytest.raises(ConfigError, match="stage_layers"):
        PruningConfig(method="pyramiddrop", num_layers=4, options={"stage_layers": [2, 9]}).validate(4)


# -- VisionZip ----------------------------------------------------------------------------------------------------
def _visionzip_as_written(
    cls_attention: torch.Tensor, keys: torch.Tensor, hidden: torch.Tensor, dominant_num: int, contextual_num: int
) -> tuple[list[int], torch.Tensor]:
    """The authors' CLIPVisionTower_VisionZip.forward on one image, step by step on the sequence [CLS, patches]
    (``dominant_num`` excludes the CLS, as their main.py passes it): the kept sequence indices of the dominant tokens
    (CLS included) and the contextual tokens' features."""
    top = (cls_attention.topk(dominant_num).indices + 1).tolist()
    kept = sorted([0, *top])
    mask = [index not in kept for index in range(len(hidden))]
    metric = keys[mask]
    filtered = hidden[mask]
    metric = metric / metric.norm(dim=-1, keepdim=True)
    step = max(1, len(metric) // contextual_num)
    targets = list(range(0, len(metric), step))[:contextual_num]
    others = [index for index in range(len(metric)) if index not in targets]
    best = (metric[others] @ metric[targets].T).argmax(dim=1)
    contextual = []
    for slot, target in enumerate(targets):
        joined = [others[j] for j in range(len(others)) if best[j] == slot]
        mean = filtered[joined].mean(dim=0) if joined else torch.zeros(hidden.shape[1])
        contextual.append(filtered[target] + mean)
    return kept, torch.stack(contextual)


def test_visionzip_selection_matches_the_formula() -> None:
    """On a fixed small image (12 patches), the dominant tokens, the contextual targets and their merged features are
    the authors' code's; the CLS feature takes the first patch slot left free."""
    generator = torch.Generator().manual_seed(11)
    attention = torch.rand(12, generator=generator)
    keys, features = torch.randn(13, 4, generator=generator), torch.randn(13, 6, generator=generator)
    zipped = zip_image(attention, keys, features, dominant=4, contextual=3)
    kept, contextual = _visionzip_as_written(attention, keys, features, dominant_num=3, contextual_num=3)
    assert sorted((zipped.dominant + 1).tolist()) == [index for index in kept if index]  # sequence = patch + 1
    assert torch.allclose(zipped.merged, contextual, atol=1e-6)
    used = {*zipped.dominant.tolist(), *zipped.targets.tolist()}
    assert zipped.cls_slot == min(set(range(12)) - used)
    assert len(used) + 1 == 4 + 3


def test_visionzip_budgets_are_the_papers() -> None:
    """64 / 128 / 192 tokens split as the authors' README runs them: 54 + 10, 108 + 20, 162 + 30."""
    assert [split_budget(keep, 10 / 64) for keep in (64, 128, 192)] == [(54, 10), (108, 20), (162, 30)]
    assert split_budget(1, 10 / 64) == (1, 0) and split_budget(0, 10 / 64) == (0, 0)


def test_visionzip_writes_the_merged_tokens_into_the_language_model(samples) -> None:
    """Layer 0 receives, at each contextual target's slot, the projector's image of that target's feature plus the
    mean of those merged into it, and the CLS token's feature at its slot; every other kept slot is unchanged."""
    from analysis.pruner.simulate import masked_pruning

    loaded = load_model(FAMILIES["llava"])
    adapter = loaded.adapter
    inputs = adapter.build_inputs(loaded.processor, samples[:1])
    length = inputs.input_ids.shape[1]
    config = PruningConfig(method="visionzip", num_layers=adapter.num_layers, keep_tokens=7)
    seen: list[torch.Tensor] = []
    layer0 = adapter.decoder_layers()[0]
    hooks = PruningHooks(config, RegionMasks.from_layouts(inputs.layouts, length, "cpu"), inputs.layouts, length)
    with torch.no_grad(), adapter.vision_attention() as passes, masked_pruning(adapter, hooks):
        # Registered after the executor's hook, so it sees layer 0's input as the executor left it.
        handle = layer0.register_forward_pre_hook(
            lambda m, a, k: seen.append(a[0] if a else k["hidden_states"]), with_kwargs=True
        )
        try:
            loaded.model(**inputs.tensors)
        finally:
            handle.remove()
    vision = passes[-1]
    zipped = zip_image(vision.cls_attention[0], vision.keys[0], vision.features[0], *split_budget(7, 10 / 64))
    image = torch.as_tensor(inputs.layouts[0].padded(inputs.layouts[0].image_positions), dtype=torch.long)
    expected = vision.project(torch.cat([zipped.merged, vision.features[0, :1]])[None])[0]
    written = seen[0][0, image[torch.cat([zipped.targets, torch.tensor([zipped.cls_slot])])]]
    assert torch.allclose(written, expected, atol=1e-5)
    original = vision.project(vision.features[0, 1:][None])[0]
    assert torch.allclose(seen[0][0, image[zipped.dominant]], original[zipped.dominant], atol=1e-5)
    assert hooks.keep[0].sum() == 7
    assert not torch.allclose(written[:-1], original[zipped.targets], atol=1e-3)  # merging changed the targets


def test_visionzip_on_llava_agrees_across_executors_and_batches(samples) -> None:
    """VisionZip on the tiny LLaVA: a budget covering the image gives the unpruned answers; the token-dropping and
    mask executors give the same decisions and answers; a left-padded batch (one sample with two images, which share
    its budget) gives each sample what it gets alone."""
    loaded = load_model(FAMILIES["llava"])
    full = PruningConfig(method="visionzip", num_layers=loaded.adapter.num_layers, keep_tokens=10_000)
    for runtime in ("mask", "drop"):
        assert evaluate_pruned(loaded, samples, full, batch_size=4, max_new_tokens=4, runtime=runtime)["agrees"].all()
    config = PruningConfig(method="visionzip", num_layers=loaded.adapter.num_layers, keep_tokens=5)
    tables = {
        runtime: evaluate_pruned(loaded, samples, config, batch_size=4, max_new_tokens=4, runtime=runtime)
        for runtime in ("mask", "drop")
    }
    assert list(tables["mask"]["pruned_answer"]) == list(tables["drop"]["pruned_answer"])
    assert (tables["drop"]["n_kept"] == 5).all()
    inputs = loaded.adapter.build_inputs(loaded.processor, samples)
    with pruned_runtime(loaded.model, config, inputs.layouts) as state:
        answers = generate_answers(loaded, inputs, 4)
    decisions = state.decisions(inputs.layouts)
    assert len({tuple(kept) for kept in decisions.kept}) > 1
    for row, sample in enumerate(samples):
        one = loaded.adapter.build_inputs(loaded.processor, [sample])
        with pruned_runtime(loaded.model, config, one.layouts) as single:
            alone = generate_answers(loaded, one, 4)
        assert single.decisions(one.layouts).kept[0] == decisions.kept[row]
        assert alone[0] == answers[row]


def test_visionzip_refuses_a_tower_without_cls_and_the_sweep_leaves_it_out(samples, caplog) -> None:
    """On Qwen2.5-VL (no CLS token in its tower) VisionZip is one ModelError naming the need, from either executor;
    the sweep's default baselines leave it out with the reason logged, and asking for it is a ConfigError."""
    import logging

    from analysis.pruner.sweep import baselines_for, budget_sweep

    loaded = load_model(FAMILIES["qwen2_5_vl"])
    config = PruningConfig(method="visionzip", num_layers=loaded.adapter.num_layers, keep_tokens=5)
    for runtime in ("mask", "drop"):
        with pytest.raises(ModelError, match="no CLS token"):
            evaluate_pruned(loaded, samples, config, batch_size=4, max_new_tokens=2, runtime=runtime)
    with caplog.at_level(logging.INFO, logger="analysis.pruner.sweep"):
        assert "visionzip" not in baselines_for(loaded.adapter)
    assert any("visionzip is left out" in record.message for record in caplog.records)
    assert "visionzip" in baselines_for(load_model(FAMILIES["llava"]).adapter)
    with pytest.raises(ConfigError, match="visionzip cannot run on this model"):
        budget_sweep(loaded, samples, methods=["visionzip"], progress=False)


# -- the three methods, both executors ---------------------------------------------------------------------------------
@pytest.mark.parametrize("method", ["dart", "cdpruner", "pyramiddrop"])
def test_keeping_every_token_gives_the_unpruned_answers(tiny: LoadedModel, samples, method: str) -> None:
    """A budget as large as the image keeps every token: answers equal the unpruned model's, in both executors."""
    config = _config(tiny, method, keep=10_000)
    for runtime in ("mask", "drop"):
        table = evaluate_pruned(tiny, samples, config, batch_size=4, max_new_tokens=4, runtime=runtime)
        assert table["agrees"].all()
        assert (table["n_kept"] == table["n_image"]).all()


@pytest.mark.parametrize("method", ["dart", "cdpruner", "pyramiddrop"])
def test_batch_equals_single(tiny: LoadedModel, samples, method: str) -> None:
    """Left-padded batches (different image sizes and counts) give each sample the tokens and answers it gets alone.

    Generation numbers each sample's positions from its own first token; DART's key L1 norms are taken after RoPE,
    which keeps L2 norms but not L1, so they need exactly that.
    """
    config = _config(tiny, method, keep=3)
    inputs = tiny.adapter.build_inputs(tiny.processor, samples)
    with pruned_runtime(tiny.model, config, inputs.layouts) as state:
        answers = generate_answers(tiny, inputs, 4)
    decisions = state.decisions(inputs.layouts)
    staged = decisions.stage_drops or [[]] * len(samples)
    assert len({(tuple(decisions.kept[row]), tuple(staged[row])) for row in range(len(samples))}) > 1
    for row, sample in enumerate(samples):
        one = tiny.adapter.build_inputs(tiny.processor, [sample])
        with pruned_runtime(tiny.model, config, one.layouts) as single:
            alone = generate_answers(tiny, one, 4)
        alone_decisions = single.decisions(one.layouts)
        assert alone_decisions.kept[0] == decisions.kept[row]
        assert (alone_decisions.stage_drops or [[]])[0] == staged[row]
        assert alone[0] == answers[row]


def test_a_hidden_state_rule_without_its_hooks_is_an_error(tiny: LoadedModel, samples) -> None:
    """Routing attention alone would leave DART unpruned without a word; it is an error naming masked_pruning."""
    from analysis.hooks.attention import route_attention

    inputs = tiny.adapter.build_inputs(tiny.processor, samples)
    length = inputs.input_ids.shape[1]
    hooks = PruningHooks(
        _config(tiny, "cdpruner", 3), RegionMasks.from_layouts(inputs.layouts, length, "cpu"), inputs.layouts, length
    )
    with (
        pytest.raises(RuntimeError, match="masked_pruning"),
        torch.no_grad(),
        route_attention(tiny.adapter, hooks, length - 1),
    ):
        tiny.model(**inputs.tensors)


# -- the sweep at token budgets -----------------------------------------------------------------------------------
def test_budget_sweep_runs_every_one_shot_method_at_each_share(samples) -> None:
    """Rows per method and share, budgets scaled to the model's image size, intervals around the accuracy and
    scores per family."""
    import dataclasses

    from analysis.pruner.sweep import BASELINES, budget_sweep

    samples = [dataclasses.replace(s, family=f) for s, f in zip(samples, ["color", "count", "color", ""], strict=True)]
    loaded = load_model(FAMILIES["llava"])
    table = budget_sweep(loaded, samples, shares=(1 / 8, 1 / 2), batch_size=4, max_new_tokens=2, progress=False)
    assert list(table["method"]) == [*BASELINES, *BASELINES]
    assert set(table["kept_tokens"].round()) >= {2.0, 8.0}  # 1/8 and 1/2 of the median 16 image tokens (s2 has 32)
    assert (table["accuracy_low"] <= table["accuracy"]).all() and (table["accuracy"] <= table["accuracy_high"]).all()
    assert {"accuracy_color", "agreement_color", "agreement_count"} <= set(table.columns)
    assert "agreement_" not in table.columns  # a sample without a family joins no family's score
    with pytest.raises(ConfigError, match="shares of the image"):
        budget_sweep(loaded, samples, shares=(64,), progress=False)


def test_sweep_cli_budgets(tmp_path, capsys: pytest.CaptureFixture[str]) -> None:
    """``pruner sweep --budgets`` alone prints and saves the budget table; neither configs nor budgets is one line."""
    from analysis.pruner.__main__ import main

    out = tmp_path / "sweep.csv"
    command = ["sweep", "--model", "tiny-llava", "--limit", "2", "--batch-size", "2", "--device", "cpu"]
    assert main([*command, "--budgets", "-o", str(out)]) == 0
    assert "cdpruner" in capsys.readouterr().out
    assert (tmp_path / "sweep-budgets.csv").read_text().startswith("method,budget_share")
    assert not out.exists()
    assert main(command) == 2
    assert "needs config files to match, --budgets, or both" in capsys.readouterr().err
