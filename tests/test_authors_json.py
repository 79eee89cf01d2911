"""Every authors' JSON the toolkit ships or exports passes the authors' own config validation."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from analysis.errors import ConfigError
from analysis.pruner.__main__ import main as pruner_main
from analysis.pruner.config import PruningConfig, authors_equivalent, authors_layer0_rule, parse_config
from analysis.pruner.export import ExportResult, write

CONFIGS = Path(__file__).resolve().parent.parent / "configs"


def their_validation(pruning_config: dict, num_layers: int) -> None:
    """validate_pruning_config of GitHub EIT-NLP/VisiPruner, custom_modeling_llama.py lines 103-126, restated."""
    if "mode" not in pruning_config:
        raise ValueError("Pruning config must contain 'mode' key.")
    if not isinstance(pruning_config["mode"], list):
        raise ValueError("'mode' must be a list of strings.")
    for mode in pruning_config["mode"]:
        if mode not in ["shallow", "middle", "deep"]:
            raise ValueError(f"Unsupported pruning mode: {mode}.")
    if "shallow" in pruning_config["mode"] or "middle" in pruning_config["mode"]:
        if "shallow_mid_layer" not in pruning_config:
            raise ValueError("'shallow_mid_layer' must be specified when 'shallow' mode is used.")
        layer = pruning_config["shallow_mid_layer"]
        if not isinstance(layer, int) or layer < 1 or layer >= num_layers:
            raise ValueError(f"'shallow_mid_layer' must be an integer in the range of [1, {num_layers}].")
    if "middle" in pruning_config["mode"] or "deep" in pruning_config["mode"]:
        for name in ("layer_threshold", "tokens_threshold"):
            if name in pruning_config and (
                not isinstance(pruning_config[name], float) or not 0 < pruning_config[name] < 1
            ):
                raise ValueError(f"'{name}' must be a float between 0 and 1.")
    if "deep" in pruning_config["mode"] and "middle" not in pruning_config["mode"]:  # noqa: SIM102 (their code as written)
        if "mid_deep_layer" not in pruning_config:
            raise ValueError("'mid_deep_layer' must be specified when 'deep' mode is used without 'middle' mode.")


def test_the_shipped_authors_json_passes_their_validation() -> None:
    """The organism's exported JSON (12 layers) is accepted by their check; the old S = 0 export was not."""
    shipped = json.loads((CONFIGS / "shapes-llava.visipruner.authors.json").read_text())
    their_validation(shipped, 12)
    with pytest.raises(ValueError, match="shallow_mid_layer"):
        their_validation({**shipped, "mode": ["shallow", "middle", "deep"], "shallow_mid_layer": 0}, 12)
    ours = json.loads((CONFIGS / "shapes-llava.visipruner.json").read_text())
    assert ours["provenance"]["authors_json"]["differences"]  # what the S = 0 config lost on the way is written down


def test_the_shipped_llava_7b_json_is_their_scripts_settings_for_both_7b_models() -> None:
    """The README's lmms-eval config (their scripts' S = 6, tL = 0.995, tT = 0.2) passes their check at LLaVA-1.5-7B's
    32 layers and Qwen2.5-VL-7B's 28, and parses for each: their 7B layer-0 rule for LLaVA, none named for Qwen."""
    shipped = json.loads((CONFIGS / "llava-1.5-7b.visipruner.authors.json").read_text())
    assert shipped == {
        "mode": ["shallow", "middle", "deep"],
        "shallow_mid_layer": 6,
        "layer_threshold": 0.995,
        "tokens_threshold": 0.2,
    }
    for depth, layer0 in ((32, "authors_7b"), (28, "none")):
        their_validation(shipped, depth)
        config = parse_config(shipped, depth, layer0_rule=layer0)
        assert (config.rule, config.layer0_rule, config.num_layers) == ("authors", layer0, depth)


def _result(config: PruningConfig) -> ExportResult:
    """An export result holding ``config`` (as ``choose`` makes it), for ``write``."""
    config.provenance = {"calibration": {}, "target_agreement": 0.9}
    return ExportResult(config, True, None, {})  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("stages", "shallow_mid_layer", "layer_threshold", "tokens_threshold"),
    [
        (["shallow", "middle", "deep"], 0, 0.9, 0.12),
        (["shallow", "middle", "deep"], 6, 0.995, 0.2),
        (["shallow", "middle", "deep"], 0, 1.0, 0.0),
        (["middle", "deep"], 3, 0.999, 0.5),
        (["shallow"], 0, 0.9, 0.2),
        (["shallow"], 4, 0.9, 0.2),
        (["middle"], 1, 1.0, 0.3),
    ],
)
def test_every_export_passes_their_validation(
    tmp_path: Path, stages: list[str], shallow_mid_layer: int, layer_threshold: float, tokens_threshold: float
) -> None:
    """Exports of configs their format can hold are accepted as written; what had to change is listed, and the JSON
    parses back (as the authors' rule) with the thresholds written."""
    config = PruningConfig(
        num_layers=12,
        stages=stages,
        shallow_mid_layer=shallow_mid_layer,
        layer_threshold=layer_threshold,
        tokens_threshold=tokens_threshold,
    )
    written = write(_result(config), tmp_path / "c.json")
    assert written.authors is not None
    theirs = json.loads(written.authors.read_text())
    their_validation(theirs, 12)
    changed = shallow_mid_layer == 0 or layer_threshold >= 1 or tokens_threshold <= 0
    assert bool(written.differences) == changed
    back = parse_config(theirs, 12, layer0_rule="authors_7b")
    assert back.rule == "authors" and back.layer_threshold == theirs["layer_threshold"]
    assert json.loads(written.ours.read_text())["provenance"]["authors_json"]["differences"] == written.differences


def test_configs_their_format_cannot_hold_are_refused_with_the_reason(tmp_path: Path) -> None:
    """A token threshold >= 1 (an absolute norm) gets no authors' JSON, and no stale one is left beside ours."""
    (tmp_path / "c.authors.json").write_text("{}")
    config = PruningConfig(num_layers=12, shallow_mid_layer=3, layer_threshold=0.99, tokens_threshold=2.5)
    written = write(_result(config), tmp_path / "c.json")
    assert written.authors is None and "tokens_threshold 2.5" in (written.refused or "")
    assert not (tmp_path / "c.authors.json").exists() and written.ours.exists()
    with pytest.raises(ConfigError, match="deep stage without the middle one"):
        authors_equivalent(PruningConfig(num_layers=12, stages=["deep"], shallow_mid_layer=3))


def test_a_fresh_cli_export_passes_their_validation(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """probes -> pruner export on the organism writes an authors' JSON their validation accepts and says what
    differs from ours, or, for a config their format cannot hold, writes none and says why."""
    from analysis.probes.__main__ import main as probes_main

    run = tmp_path / "run"
    assert (
        probes_main(
            [
                "--limit",
                "4",
                "--batch-size",
                "4",
                "--device",
                "cpu",
                "--probes",
                "knockout,contribution",
                "--knockout-modes",
                "upto,from",
                "--out",
                str(run),
                "--quiet",
            ]
        )
        == 0
    )
    assert (
        pruner_main(["export", str(run), "-o", str(tmp_path / "cfg.json"), "--target", "0.5", "--device", "cpu"]) == 0
    )
    printed = capsys.readouterr().out
    authors = tmp_path / "cfg.authors.json"
    if authors.exists():
        assert "accepted by the authors' validation" in printed
        their_validation(json.loads(authors.read_text()), 12)
    else:
        assert "no authors' JSON: tokens_threshold" in printed


def test_their_layer0_rule_comes_from_the_architecture_not_the_name() -> None:
    """LLaVA-1.5-7B and -13B decoder shapes pick their rules; anything else (or another family) picks none."""
    from types import SimpleNamespace

    def text(layers: int, hidden: int, heads: int, mlp: int) -> SimpleNamespace:
        return SimpleNamespace(
            num_hidden_layers=layers, hidden_size=hidden, num_attention_heads=heads, intermediate_size=mlp
        )

    assert authors_layer0_rule("llava", text(32, 4096, 32, 11008)) == "authors_7b"
    assert authors_layer0_rule("llava", text(40, 5120, 40, 13824)) == "authors_13b"
    assert authors_layer0_rule("llava", text(12, 256, 8, 1024)) is None
    assert authors_layer0_rule("qwen2_5_vl", text(32, 4096, 32, 11008)) is None
    shallow = {
        "mode": ["shallow", "middle", "deep"],
        "shallow_mid_layer": 2,
        "layer_threshold": 0.9,
        "tokens_threshold": 0.2,
    }
    with pytest.raises(ConfigError, match="--authors-layer0"):
        parse_config(shallow, 12)
    assert parse_config(shallow, 12, layer0_rule="authors_13b").layer0_rule == "authors_13b"
    with pytest.raises(ConfigError, match="JSON float"):
        parse_config({**shallow, "tokens_threshold": 1}, 12, layer0_rule="none")
