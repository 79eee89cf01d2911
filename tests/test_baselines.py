"""DART and CDPruner: their selections against direct re-implementations of the papers' formulas, and the pruned
model under both executors on the tiny LLaVA and Qwen2.5-VL models."""

from __future__ import annotations

import itertools
import math

import pytest
import torch
import torch.nn.functional as F
from conftest import FAMILIES

from analysis.errors import ConfigError
from analysis.generation import generate_answers
from analysis.hooks.attention import RegionMasks
from analysis.models.registry import LoadedModel, load_model
from analysis.pruner.config import PruningConfig
from analysis.pruner.evaluation import evaluate_pruned
from analysis.pruner.methods.cdpruner import conditional_kernel, greedy_dpp, greedy_dpp_batch
from analysis.pruner.methods.dart import dart_selection
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
