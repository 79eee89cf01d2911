"""Causal probes: no-op exactness, knockouts against an independent mask, contributions, bad input."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import FAMILIES
from fixtures_data import LOCAL_RECORDS, write_jsonl

from analysis.errors import ConfigError
from analysis.generation import generate_answers
from analysis.hooks.attention import (
    AttentionHooks,
    Knockout,
    KnockoutHooks,
    RegionMasks,
    ZeroedEdges,
    route_attention,
)
from analysis.models import hf
from analysis.models.registry import LoadedModel, load_model
from analysis.probes import measure
from analysis.probes.__main__ import main
from analysis.probes.measure import (
    AnswerScores,
    PrefixGenerator,
    SuffixScorer,
    TeacherForced,
    observe_prefill,
    score_answers,
    teacher_forced,
)
from analysis.probes.run import (
    PROBE_SCHEMAS,
    PROBES,
    ProbeConfig,
    _first_text_query,
    probe_batch,
    run_probes,
)


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def tiny_sdpa(request: pytest.FixtureRequest) -> LoadedModel:
    """A tiny random model of each family with SDPA attention (probes never need eager)."""
    return load_model(FAMILIES[request.param], attn_implementation="sdpa")


def _forward(loaded: LoadedModel, tensors: dict[str, torch.Tensor], **extra) -> torch.Tensor:
    """Logits of a plain forward pass."""
    with torch.no_grad():
        return loaded.model(**tensors, **extra).logits


def test_noop_intervention_is_exact(tiny_sdpa: LoadedModel, samples) -> None:
    """No knockouts (and an empty layer set) reproduce the unmodified logits bit for bit."""
    inputs = tiny_sdpa.adapter.build_inputs(tiny_sdpa.processor, samples)
    reference = _forward(tiny_sdpa, inputs.tensors)
    masks = RegionMasks.from_layouts(inputs.layouts, inputs.input_ids.shape[1], inputs.input_ids.device)
    last = inputs.input_ids.shape[1] - 1
    for knockouts in ([], [Knockout("last", "image", frozenset())]):
        with route_attention(tiny_sdpa.adapter, KnockoutHooks(masks, knockouts), last):
            assert torch.equal(_forward(tiny_sdpa, inputs.tensors), reference)
    assert tiny_sdpa.adapter.text_config._attn_implementation == "sdpa"


def test_full_image_knockout_equals_masked_model(tiny_sdpa: LoadedModel, samples) -> None:
    """Knocking out text->image in every layer equals a forward pass with an explicit 4-D mask hiding image keys."""
    inputs = tiny_sdpa.adapter.build_inputs(tiny_sdpa.processor, samples)
    batch, seq_len = inputs.input_ids.shape
    masks = RegionMasks.from_layouts(inputs.layouts, seq_len, inputs.input_ids.device)
    layers = frozenset(range(tiny_sdpa.adapter.num_layers))
    with route_attention(
        tiny_sdpa.adapter, KnockoutHooks(masks, [Knockout("instruction", "image", layers)]), seq_len - 1
    ):
        knocked = _forward(tiny_sdpa, inputs.tensors)

    # Independent computation: the family's own mask (causal + padding; Gemma 3: an image's tokens see each other,
    # local layers a window), with image columns hidden from non-image rows; one mask per attention kind.
    def allowed_for(rule) -> torch.Tensor:
        positions = torch.arange(seq_len)
        allowed = (positions[None, :] <= positions[:, None])[None].expand(batch, -1, -1).clone()
        for row, layout in enumerate(inputs.layouts):
            for span in layout.images if rule.bidirectional_images else ():
                block = torch.arange(layout.padded(span.start), layout.padded(span.end))
                allowed[row, block[:, None], block[None, :]] = True
        if rule.window is not None:  # the window bounds the image blocks too
            allowed &= (positions[:, None] - positions[None, :] < rule.window)[None]
        allowed &= inputs.attention_mask.bool()[:, None, :]
        for row, layout in enumerate(inputs.layouts):
            image = torch.as_tensor(layout.padded(layout.image_positions))
            text_rows = torch.as_tensor(layout.padded(layout.instruction_positions))
            allowed[row, text_rows[:, None], image[None, :]] = False
            allowed[row, torch.arange(layout.pad_offset), torch.arange(layout.pad_offset)] = True  # pads see themselves
        return torch.zeros(batch, 1, seq_len, seq_len).masked_fill(~allowed[:, None], torch.finfo(torch.float32).min)

    rules = {rule.kind: rule for rule in map(tiny_sdpa.adapter.attention_rule, range(tiny_sdpa.adapter.num_layers))}
    per_kind = {kind: allowed_for(rule) for kind, rule in rules.items()}
    tensors = dict(inputs.tensors)
    # Positions a family derives from the 2-D padding mask (Qwen2.5-VL's M-RoPE): a 4-D mask hides it.
    positions = tiny_sdpa.adapter.explicit_positions(inputs)
    if positions is not None:
        tensors = hf.with_position_ids(tensors, positions)
    # One kind: a 4-D mask; several (Gemma 3's global and local layers): the model takes one per kind.
    tensors["attention_mask"] = next(iter(per_kind.values())) if len(per_kind) == 1 else per_kind
    reference = _forward(tiny_sdpa, tensors)
    real = inputs.attention_mask.bool()
    assert torch.allclose(knocked[real], reference[real], atol=1e-5)
    assert not torch.allclose(knocked[real], _forward(tiny_sdpa, inputs.tensors)[real], atol=1e-3)


def test_contribution_output_matches_attention(tiny_sdpa: LoadedModel, samples) -> None:
    """The probe's o equals the attention output before o_proj at the last position, in a left-padded batch."""
    inputs = tiny_sdpa.adapter.build_inputs(tiny_sdpa.processor, samples)
    assert any(layout.pad_offset for layout in inputs.layouts)
    forced = teacher_forced(tiny_sdpa.adapter, inputs, [s.answer for s in samples], tiny_sdpa.processor.tokenizer)
    captured: dict[int, torch.Tensor] = {}
    handles = [
        layer.self_attn.o_proj.register_forward_pre_hook(
            lambda _m, args, i=i: captured.__setitem__(i, args[0][:, forced.prompt_length - 1].float())
        )
        for i, layer in enumerate(tiny_sdpa.adapter.decoder_layers())
    ]
    try:
        observer, _ = observe_prefill(tiny_sdpa.model, tiny_sdpa.adapter, forced, inputs, lens=False)
    finally:
        for handle in handles:
            handle.remove()
    for layer, record in observer.records.items():
        assert torch.allclose(record["output"], captured[layer], atol=1e-5)
        # Removing a token with no weight leaves o unchanged: cosine 1 and norm 0 go together.
        assert record["cosine"].max() <= 1 + 1e-6 and (record["norm"] >= 0).all()


def _full_pass_scores(loaded: LoadedModel, forced: TeacherForced, hooks: AttentionHooks) -> AnswerScores:
    """The reference: a whole teacher-forced forward pass under the hooks."""
    with route_attention(loaded.adapter, hooks, forced.prompt_length - 1):
        return score_answers(loaded.model, forced)


def _assert_scores_close(actual: AnswerScores, expected: AnswerScores) -> None:
    """Answer log-probs and next-token log-probs agree to float noise."""
    assert torch.allclose(actual.answer_logprob, expected.answer_logprob, atol=1e-5)
    assert torch.allclose(actual.next_logprobs, expected.next_logprobs, atol=1e-5)


def test_suffix_scores_match_full_pass(tiny_sdpa: LoadedModel, samples) -> None:
    """Scoring from the clean prefix cache equals a full forward pass, with and without knockouts, left-padded."""
    inputs = tiny_sdpa.adapter.build_inputs(tiny_sdpa.processor, samples)
    assert any(layout.pad_offset for layout in inputs.layouts)
    forced = teacher_forced(tiny_sdpa.adapter, inputs, [s.answer for s in samples], tiny_sdpa.processor.tokenizer)
    masks = RegionMasks.from_layouts(inputs.layouts, forced.prompt_length, inputs.input_ids.device)
    with torch.inference_mode():
        scorer, clean = SuffixScorer.capture(tiny_sdpa.model, tiny_sdpa.adapter, forced, _first_text_query(masks))
    assert 0 < scorer.split < forced.prompt_length - 1
    _assert_scores_close(clean, score_answers(tiny_sdpa.model, forced))
    layers = frozenset(range(tiny_sdpa.adapter.num_layers))
    for knockouts, from_suffix in (
        ([], True),
        ([Knockout("instruction", "image", layers)], True),
        ([Knockout("last", "image", frozenset({1}))], True),
        ([Knockout("system", "system", frozenset({0}))], False),  # blocks prefix queries: needs the full pass
    ):
        hooks = KnockoutHooks(masks, knockouts)
        assert scorer._spares_prefix(hooks) == from_suffix
        with torch.inference_mode():
            scores = scorer.score(hooks)
        _assert_scores_close(scores, _full_pass_scores(tiny_sdpa, forced, hooks))
        # No suffix keys are left behind for the next intervention.
        assert all(layer.get_seq_length() == scorer.split for layer in scorer.cache.layers)
        if knockouts and from_suffix:
            assert not torch.allclose(scores.next_logprobs, clean.next_logprobs, atol=1e-3)
    # Weights zeroed after the softmax on prefix queries change the prefix too: the full pass is needed.
    zeroing = _ZeroSystemAttention(masks)
    assert not scorer._spares_prefix(zeroing)
    with torch.inference_mode():
        _assert_scores_close(scorer.score(zeroing), _full_pass_scores(tiny_sdpa, forced, zeroing))


class _ZeroSystemAttention(AttentionHooks):
    """Zeroes system->system attention weights in layer 0 (edges among prefix queries only)."""

    def __init__(self, masks: RegionMasks) -> None:
        self.masks = masks

    def zeroed(self, layer: int, query_start: int, query_length: int, key_length: int) -> ZeroedEdges | None:
        if layer != 0:
            return None
        rows = self.masks.query_rows("system", query_start, query_length)
        return ZeroedEdges(rows[:, :, None] & self.masks.key_columns("system", key_length)[:, None, :])


def test_probe_batch_matches_full_passes(tiny_sdpa: LoadedModel, samples, monkeypatch: pytest.MonkeyPatch) -> None:
    """Knockout, masking and token-ablation tables from the prefix cache equal those of one full pass each."""
    inputs = tiny_sdpa.adapter.build_inputs(tiny_sdpa.processor, samples)
    config = ProbeConfig(knockout_modes="single,from", mask_layers="1,2", ablation_layers="1:3", max_new_tokens=2)
    probes = ["knockout", "masking", "token_ablation"]
    full_passes: list[int] = []

    def counted(model: torch.nn.Module, batch: TeacherForced) -> AnswerScores:
        full_passes.append(1)
        return score_answers(model, batch)

    with monkeypatch.context() as patch:
        patch.setattr(measure, "score_answers", counted)
        fast = probe_batch(tiny_sdpa, config, probes, samples, inputs)
    assert not full_passes  # every intervention of these probes spares the prefix

    def full_capture(model: torch.nn.Module, adapter, forced: TeacherForced, split: int):
        """The scoring before the prefix cache: one full pass for the clean scores and one per intervention."""
        scorer = SimpleNamespace(adapter=adapter, score=lambda hooks: _full_pass_scores(tiny_sdpa, forced, hooks))
        return scorer, score_answers(model, forced)

    monkeypatch.setattr(SuffixScorer, "capture", staticmethod(full_capture))
    reference = probe_batch(tiny_sdpa, config, probes, samples, inputs)
    for name in ("effects", "token_ablation"):
        actual, expected = fast[name].to_pandas(), reference[name].to_pandas()
        assert len(actual) > 0 and list(actual.columns) == list(expected.columns)
        floats = [column for column in actual.columns if actual[column].dtype.kind == "f"]
        pd.testing.assert_frame_equal(actual.drop(columns=floats), expected.drop(columns=floats))
        assert np.allclose(actual[floats].to_numpy(), expected[floats].to_numpy(), atol=1e-5, rtol=0)


def _dataset(root: Path) -> str:
    """A local dataset of the reference fixture records."""
    return str(write_jsonl(root / "data", LOCAL_RECORDS))


def test_probe_run_tables(tmp_path: Path) -> None:
    """Every probe writes its table with rows for every sample, on both families."""
    for model in FAMILIES.values():
        out = tmp_path / model
        config = ProbeConfig(
            model=model,
            dataset=_dataset(tmp_path),
            limit=None,
            out=str(out),
            device="cpu",
            mask_layers="1,2",
            kv_layers="0,3",
            batch_size=3,
            knockout_modes="single,from",
            probes=",".join(PROBES),
            ablation_layers="1:3",
        )
        result = run_probes(config, progress=False)
        assert result.n_samples == len(LOCAL_RECORDS)
        effects = pd.read_parquet(out / "effects")
        assert set(effects["probe"]) == {"knockout", "masking"}
        masking = effects[effects["probe"] == "masking"]
        assert set(masking["variant"]) == {"top", "bottom", "random", "all"} and set(masking["seed"]) == {-1, 0, 1, 2}
        assert len(pd.read_parquet(out / "kv_removal")) == 2 * len(LOCAL_RECORDS)
        lens = pd.read_parquet(out / "logit_lens")
        assert set(lens["source"]) == {"residual", "head"} and "answer" in set(lens["target"])
        assert len(pd.read_parquet(out / "contributions")) > 0
        ablation = pd.read_parquet(out / "token_ablation")
        assert set(ablation["layer_start"]) == {1} and ablation.groupby("sample_id")["ordinal"].nunique().min() >= 4
        for name in PROBE_SCHEMAS:
            assert pd.read_parquet(out / name)["sample_id"].nunique() == len(LOCAL_RECORDS)


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--mask-layers", "99"], "outside the model's layers"),
        (["--kv-layers", "-1"], "outside the model's layers"),
        (["--mask-percent", "0"], "--mask-percent must be in (0, 100)"),
        (["--mask-percent", "100"], "--mask-percent must be in (0, 100)"),
        (["--knockout-queries", "pixels"], "unknown query region 'pixels'"),
        (["--knockout-key", "audio"], "unknown key region 'audio'"),
        (["--probes", "telepathy"], "unknown probes"),
        (["--probes", "token_ablation", "--ablation-layers", "3:99"], "outside the model's layers"),
    ],
)
def test_bad_probe_input(tmp_path: Path, capsys: pytest.CaptureFixture[str], extra: list[str], message: str) -> None:
    """Bad probe settings fail with one line naming the problem, before any output."""
    out = tmp_path / "out"
    assert main(["--dataset", _dataset(tmp_path), "--out", str(out), "--device", "cpu", *extra]) == 2
    assert message in capsys.readouterr().err
    assert not out.exists()


def test_sample_without_image_refused(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A sample with no image has no image region to probe."""
    data = write_jsonl(tmp_path / "text", [{"id": "t", "question": "what is two plus two?", "answer": "4"}])
    out = tmp_path / "out"
    assert main(["--dataset", str(data), "--out", str(out)]) == 2
    assert "no image" in capsys.readouterr().err and not out.exists()


def test_config_rejects_bad_values() -> None:
    """Validation names every problem at once."""
    with pytest.raises(ConfigError, match="--window"):
        ProbeConfig(window=0).validate()


def test_a_full_knockout_leaves_no_other_path_from_the_image(tiny_sdpa: LoadedModel) -> None:
    """With the instruction's queries blocked from every image key in every layer, the next-token distribution
    does not depend on the image at all: attention is the only way image information reaches the text, also
    under Qwen3-VL's DeepStack, which adds visual features to the image positions only."""
    from conftest import noise_image

    from analysis.data.samples import Sample

    results, plain = [], []
    for seed in (10, 11):
        sample = Sample("s", [noise_image(seed, 56, 56)], prompt="what is the colour ?", question="?", answer="red")
        inputs = tiny_sdpa.adapter.build_inputs(tiny_sdpa.processor, [sample])
        length = inputs.input_ids.shape[1]
        masks = RegionMasks.from_layouts(inputs.layouts, length, inputs.input_ids.device)
        hooks = KnockoutHooks(masks, [Knockout("instruction", "image", frozenset(range(tiny_sdpa.adapter.num_layers)))])
        with torch.no_grad():
            plain.append(tiny_sdpa.model(**inputs.tensors).logits[0, -1])
            with route_attention(tiny_sdpa.adapter, hooks, length - 1):
                results.append(tiny_sdpa.model(**inputs.tensors).logits[0, -1])
    assert not torch.allclose(plain[0], plain[1], atol=1e-4), "without the knockout the image matters"
    torch.testing.assert_close(results[0], results[1], atol=1e-5, rtol=0)


def test_kv_removal_generations_from_the_prompt_cache_equal_full_generations(
    tiny_sdpa: LoadedModel, samples, request: pytest.FixtureRequest
) -> None:
    """Generating from the clean cache of the prompt before its last position gives the answers a full ``generate``
    gives under the same KV removal, at every depth, left-padded; the cache is left as it was for the next."""
    inputs = tiny_sdpa.adapter.build_inputs(tiny_sdpa.processor, samples)
    assert any(layout.pad_offset for layout in inputs.layouts)
    prompt_length, num_layers = inputs.input_ids.shape[1], tiny_sdpa.adapter.num_layers
    masks = RegionMasks.from_layouts(inputs.layouts, prompt_length, inputs.input_ids.device)
    generator = PrefixGenerator.capture(tiny_sdpa.model, tiny_sdpa.adapter, inputs)
    family = tiny_sdpa.adapter.model_type
    if generator is None:
        # Gemma 3's language model is handed masks already expanded per attention kind: kv_removal generates in full.
        assert family == "gemma3"
        return
    for depth in range(num_layers + 1):
        hooks = KnockoutHooks(masks, [Knockout("last", "image", frozenset(range(depth, num_layers)))])
        with route_attention(tiny_sdpa.adapter, hooks, prompt_length - 1):
            expected = generate_answers(tiny_sdpa, inputs, 4)
        assert generator.generate(hooks, 4, tiny_sdpa.processor.tokenizer) == expected
        assert all(layer.get_seq_length() == prompt_length - 1 for layer in generator.cache.layers)
    # The removal reaches every layer of the cached generation (the comparison is not of two unmodified ones).
    counting = _CountingKnockouts(masks, [Knockout("last", "image", frozenset(range(num_layers)))])
    generator.generate(counting, 2, tiny_sdpa.processor.tokenizer)
    assert counting.layers == set(range(num_layers))
    assert counting.first_query == prompt_length - 1


class _CountingKnockouts(KnockoutHooks):
    """Knockout hooks that note the layers that asked for their blocked edges and the first query position."""

    def __init__(self, masks: RegionMasks, knockouts: list[Knockout]) -> None:
        super().__init__(masks, knockouts)
        self.layers: set[int] = set()
        self.first_query: int | None = None

    def blocked(self, layer: int, query_start: int, query_length: int, key_length: int) -> torch.Tensor | None:
        self.layers.add(layer)
        self.first_query = query_start if self.first_query is None else min(self.first_query, query_start)
        return super().blocked(layer, query_start, query_length, key_length)
