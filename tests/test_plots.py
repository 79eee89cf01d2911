"""Figures of analysis.plots on small runs of the tiny models, including Qwen2.5-VL's per-image, non-square grids."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import matplotlib as mpl
import numpy as np
import pytest
import seaborn as sns
from conftest import FAMILIES
from fixtures_runs import (
    DEEP_START,
    SHALLOW_END,
    variable_grid_dataset,
    write_synthetic_run,
)
from matplotlib.colors import to_hex
from matplotlib.container import BarContainer
from matplotlib.figure import Figure
from PIL import Image

from analysis import plots
from analysis.bootstrap import bootstrap_ci
from analysis.probes.run import ProbeConfig, run_probes
from analysis.results import read_table
from analysis.stages import StageConfig
from analysis.trace.run import TraceConfig, run_trace

PROBES = "knockout,masking,kv_removal,logit_lens,contribution,token_ablation"
FAST = StageConfig(n_bootstrap=50, critical_threshold=0.001)  # a tiny threshold so random models have critical tokens


@dataclass
class Runs:
    """A trace and a probe run of one model."""

    trace: Path
    probe: Path
    probe_config: ProbeConfig


@pytest.fixture(scope="module", params=[FAMILIES[name] for name in sorted(FAMILIES)])
def runs(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory, one_thread: None) -> Runs:
    """Small runs of each family: LLaVA on ShapesVQA, Qwen2.5-VL on images with varied, non-square grids."""
    root = tmp_path_factory.mktemp(request.param)
    if request.param == "tiny-llava":
        dataset, limit = "shapes-vqa", 6
    else:
        dataset, limit = str(variable_grid_dataset(root / "data")), None
    trace = TraceConfig(
        model=request.param, dataset=dataset, limit=limit, out=str(root / "trace"), device="cpu", max_new_tokens=2
    )
    probe = ProbeConfig(
        model=request.param,
        dataset=dataset,
        limit=limit,
        out=str(root / "probe"),
        device="cpu",
        probes=PROBES,
        knockout_modes="upto,from",
        knockout_queries="instruction",
        mask_seeds=2,
        max_new_tokens=2,
    )
    run_trace(trace, progress=False)
    run_probes(probe, progress=False)
    return Runs(root / "trace", root / "probe", probe)


def _images(fig: Figure) -> list[np.ndarray]:
    """The arrays of every image drawn on the figure's axes."""
    return [image.get_array() for ax in fig.axes for image in ax.get_images()]


def _texts(fig: Figure) -> str:
    """All titles, axis labels and legend entries of a figure, joined."""
    parts = [fig.get_suptitle()]
    for ax in fig.axes:
        parts += [ax.get_title(), ax.get_xlabel(), ax.get_ylabel()]
        if ax.get_legend():
            parts += [text.get_text() for text in ax.get_legend().get_texts()]
    parts += [text.get_text() for legend in fig.legends for text in legend.get_texts()]
    return "\n".join(parts)


def test_attention_sink_heatmaps(runs: Runs) -> None:
    """One panel per layer on the sample's own grid (non-square and per image for Qwen), one shared colour scale."""
    samples = read_table(runs.trace, "samples").to_pandas().set_index("sample_id")
    n_layers = read_table(runs.trace, "image_tokens").to_pandas()["layer"].nunique()
    for sample_id, row in samples.iterrows():
        for image_index, grid in enumerate(zip(row["image_rows"], row["image_cols"], strict=True)):
            fig = plots.attention_sink_heatmaps(runs.trace, sample_id, image_index=image_index)
            arrays = _images(fig)
            assert len(arrays) == n_layers and all(array.shape == tuple(grid) for array in arrays)
            assert not any(np.isnan(array).any() for array in arrays)
            assert [ax.get_title() for ax in fig.axes[:n_layers]] == [f"layer {layer}" for layer in range(n_layers)]
            assert "attention from the last prompt position" in fig.axes[-1].get_ylabel()  # the colour bar
            assert sample_id in fig.get_suptitle() and row["question"] in fig.get_suptitle()
    tokens = read_table(runs.trace, "image_tokens").to_pandas()
    fig = plots.attention_sink_heatmaps(tokens, layers=[1, 3], query="instruction")
    assert [ax.get_title() for ax in fig.axes[:2]] == ["layer 1", "layer 3"]
    with pytest.raises(ValueError, match="not in the run"):
        plots.attention_sink_heatmaps(runs.trace, "no-such-sample")
    with pytest.raises(ValueError, match="layers \\[99\\]"):
        plots.attention_sink_heatmaps(runs.trace, layers=[99])


def test_value_norm_vs_attention(runs: Runs) -> None:
    """Every image token of the layer is plotted; each sample's top-k attended are the highlighted ones."""
    tokens = read_table(runs.trace, "image_tokens").to_pandas()
    layer_tokens = tokens[tokens["layer"] == 1]
    fig = plots.value_norm_vs_attention(runs.trace, 1, top_k=2)
    ax = fig.axes[0]
    rest, sinks = (collection.get_offsets() for collection in ax.collections)
    assert len(rest) + len(sinks) == len(layer_tokens) and len(sinks) == 2 * layer_tokens["sample_id"].nunique()
    assert ax.get_xlabel().startswith("attention received") and "L1 norm" in ax.get_ylabel()
    assert "top-2 attended" in _texts(fig)
    with pytest.raises(ValueError, match="not in the run"):
        plots.value_norm_vs_attention(runs.trace, 99)


def test_sink_profile(runs: Runs) -> None:
    """Key-region shares and concentration per layer, on 0-1 axes."""
    fig = plots.sink_profile(runs.trace, n_boot=50)
    assert len(fig.axes) == 2
    text = _texts(fig)
    assert all(word in text for word in ("system", "image", "instruction", "top-5 image tokens", "entropy"))
    with pytest.raises(TypeError, match="run folder"):
        plots.sink_profile(read_table(runs.trace, "attention").to_pandas())


def test_logit_lens(runs: Runs) -> None:
    """Median ranks per target and layer, drawn as log ranks; per-family panels."""
    ranks = plots.logit_lens_ranks(runs.probe)
    lens = read_table(runs.probe, "logit_lens").to_pandas()
    residual = lens[lens["source"] == "residual"]
    assert ranks.index[0] == "answer" and set(ranks.index) == set(residual["target"])
    assert list(ranks.columns) == sorted(residual["layer"].unique())
    first = residual[(residual["target"] == "answer") & (residual["layer"] == 0)]
    assert ranks.loc["answer", 0] == first["rank"].median()
    fig = plots.logit_lens_heatmap(runs.probe)
    np.testing.assert_allclose(_images(fig)[0], np.log10(ranks.to_numpy() + 1))
    assert fig.axes[0].get_ylabel() == "target token" and "rank" in fig.axes[-1].get_ylabel()
    sample_id = residual["sample_id"].iloc[0]
    assert f"sample {sample_id}" in _texts(plots.logit_lens_heatmap(lens, sample_id))
    families = read_table(runs.probe, "samples").to_pandas()["family"].nunique()
    assert len(_images(plots.logit_lens_heatmap(runs.probe, by_family=True))) == families
    with pytest.raises(TypeError, match="run folder"):
        plots.logit_lens_heatmap(lens, by_family=True)


def test_knockout_curves_on_tiny_run(runs: Runs) -> None:
    """Both knockout curves span every layer, with bands of their bootstrap intervals."""
    fig = plots.knockout_curves(runs.probe, FAST)
    ax = fig.axes[0]
    n_layers = read_table(runs.probe, "effects").to_pandas()["layer_start"].max() + 1
    curves = [line for line in ax.get_lines() if len(line.get_xdata()) == n_layers]
    assert len(curves) == 2 and ax.get_xlabel() == "layer L" and "% of samples" in ax.get_ylabel()
    assert "upto" in _texts(fig) and "from" in _texts(fig)


def test_knockout_curves_shade_known_stages(tmp_path: Path) -> None:
    """On a synthetic run with fusion in layers [S, D), the bands and boundary labels sit exactly there."""
    run = write_synthetic_run(tmp_path / "run", 20)
    fig = plots.knockout_curves(run, StageConfig(n_bootstrap=20))
    ax = fig.axes[0]
    bands = sorted(patch.get_x() for patch in ax.patches)
    assert bands == [-0.5, SHALLOW_END - 0.5, DEEP_START - 0.5]
    assert {text.get_text() for text in ax.texts} == {"shallow", "middle", "deep"}
    text = _texts(fig)
    assert f"S = {SHALLOW_END} (95% CI {SHALLOW_END}–{SHALLOW_END})" in text and f"D = {DEEP_START}" in text
    fig = plots.kv_removal_curve(run, StageConfig(n_bootstrap=20))
    assert f"KV boundary = {DEEP_START}" in _texts(fig)
    assert [patch.get_x() for patch in fig.axes[0].patches] == [DEEP_START - 0.5]


def test_kv_removal_curve(runs: Runs) -> None:
    """Changed and correct shares per removal depth, from a folder or the table."""
    kv = read_table(runs.probe, "kv_removal").to_pandas()
    for source in (runs.probe, kv):
        fig = plots.kv_removal_curve(source, FAST)
        ax = fig.axes[0]
        changed = next(line for line in ax.get_lines() if line.get_label().startswith("answer differs"))
        expected = (~kv["agrees"]).groupby(kv["layer_start"]).mean()
        np.testing.assert_allclose(changed.get_ydata(), expected.to_numpy())
        assert "KV cache" in ax.get_xlabel()


def test_masking_bars(runs: Runs) -> None:
    """Four subsets per masking depth on two panels, random seeds pooled, the mask percentage in the legend."""
    effects = read_table(runs.probe, "effects").to_pandas()
    depths = effects.loc[effects["probe"] == "masking", "layer_end"].nunique()
    fig = plots.masking_bars(runs.probe, n_boot=50)
    left, right = fig.axes
    bars = [
        [bar for container in ax.containers if isinstance(container, BarContainer) for bar in container]
        for ax in (left, right)
    ]
    assert len(bars[0]) == len(bars[1]) == 4 * depths
    assert "nats" in left.get_ylabel() and "% of samples" in right.get_ylabel()
    legend = _texts(fig)
    assert all(
        name in legend
        for name in ("top 10% most attended", "random 10% (2 seeds)", "all but the top 10%", "all image tokens")
    )
    heights = sorted(round(bar.get_height(), 5) for bar in bars[0])
    masked = effects[effects["probe"] == "masking"]
    per_sample = masked.groupby(["variant", "layer_end", "sample_id"])["delta_logprob"].mean()
    assert heights == sorted(round(v, 5) for v in per_sample.groupby(["variant", "layer_end"]).mean())
    assert "top p%" in _texts(plots.masking_bars(effects, n_boot=0))


def test_token_grid_positions_match_ablation(runs: Runs) -> None:
    """Ordinals map to (image, row, col) consistently with the ablation table's image and token indices."""
    positions = plots.token_grid_positions(read_table(runs.probe, "samples").to_pandas())
    ablation = read_table(runs.probe, "token_ablation").to_pandas()
    merged = ablation.merge(positions, on=["sample_id", "ordinal"], suffixes=("", "_grid"))
    assert len(merged) == len(ablation)
    assert (merged["image_index"] == merged["image_index_grid"]).all()
    # Within an image, pieces follow each other and each is row-major (a newline token closing each row of
    # LLaVA-NeXT's tiles), so the cells enumerate the image's token indices in order.
    positions["token_index"] = positions.groupby(["sample_id", "image_index"]).cumcount()
    merged = ablation.merge(positions, on=["sample_id", "ordinal"], suffixes=("", "_grid"))
    assert (merged["token_index"] == merged["token_index_grid"]).all()
    first = positions[positions["piece"] == 0]
    assert (first["row"] * first["n_cols"] + first["col"] == first["token_index"]).all()


def test_critical_token_figure(runs: Runs) -> None:
    """Histogram of counts, a grid heatmap whose cells sum to the mean count, and the overlap bars."""
    from analysis.stages import critical_tokens

    critical = critical_tokens(runs.probe, FAST.critical_threshold)
    fig = plots.critical_token_figure(runs.probe, FAST)
    hist, grid, overlap = fig.axes[:3]
    assert sum(patch.get_height() for patch in hist.patches) == len(critical)
    assert hist.get_ylabel() == "samples" and grid.get_xlabel() == "grid column"
    heat = _images(fig)[0]
    # Newline tokens (LLaVA-NeXT) have no place on the image: the grid holds every other critical token.
    positions = plots.token_grid_positions(read_table(runs.probe, "samples").to_pandas())
    picked = critical["critical_ordinals"].explode().dropna().rename("ordinal").reset_index()
    picked = picked.astype({"ordinal": int}).merge(positions, on=["sample_id", "ordinal"])
    placed = int((picked["col"] < picked["n_cols"]).sum())
    assert heat.sum() == pytest.approx(placed / len(critical))
    samples = read_table(runs.probe, "samples").to_pandas()
    grids = zip(samples["piece_rows"], samples["piece_cols"], strict=True)
    shapes = {(r, c) for rows, cols in grids for r, c in zip(rows, cols, strict=True)}
    assert ("rescaled" in grid.get_title()) == (len(shapes) > 1)
    if len(shapes) == 1:
        assert heat.shape == next(iter(shapes))
    assert "share of critical tokens" in overlap.get_ylabel()
    with pytest.raises(TypeError, match="run folder"):
        plots.critical_token_figure(read_table(runs.probe, "token_ablation").to_pandas())


def test_save_figure_writes_png_and_svg(runs: Runs, tmp_path: Path) -> None:
    """PNG at 150 dpi and SVG land in the folder (created), with no temp files left; names are plain stems."""
    fig = plots.value_norm_vs_attention(runs.trace, 0)
    png, svg = plots.save_figure(fig, "scatter", tmp_path / "figures")
    assert png.read_bytes().startswith(b"\x89PNG") and b"<svg" in svg.read_bytes()[:500]
    with Image.open(png) as image:
        assert round(image.info["dpi"][0]) == plots.DPI
    plots.save_figure(fig, "scatter", tmp_path / "figures")  # overwriting is fine
    assert sorted(path.name for path in (tmp_path / "figures").iterdir()) == ["scatter.png", "scatter.svg"]
    with pytest.raises(ValueError, match="plain file stem"):
        plots.save_figure(fig, "../escape", tmp_path)


def test_style_is_local_and_applicable(runs: Runs) -> None:
    """Figure functions leave global rcParams alone; set_style applies the colour-blind palette globally."""
    before = dict(mpl.rcParams)
    plots.masking_bars(runs.probe, n_boot=0)
    assert dict(mpl.rcParams) == before
    with mpl.rc_context():
        plots.set_style()
        cycle = mpl.rcParams["axes.prop_cycle"].by_key()["color"]
        palette = sns.color_palette("colorblind")
        assert [to_hex(color) for color in cycle[:3]] == [to_hex(color) for color in palette[:3]]


def test_has_finished_run(runs: Runs, tmp_path: Path) -> None:
    """A notebook skips a run only when the folder holds a finished run of exactly its config."""
    assert plots.has_finished_run(runs.probe_config)
    assert not plots.has_finished_run(ProbeConfig(**{**vars(runs.probe_config), "mask_seeds": 3}))
    assert not plots.has_finished_run(ProbeConfig(out=str(tmp_path / "empty")))


def test_bootstrap_interval() -> None:
    """The percentile interval brackets the mean, is a point for constant data and skips missing values."""
    values = np.column_stack([np.arange(20.0), np.full(20, 0.5), np.r_[np.full(10, np.nan), np.ones(10)]])
    low, high = bootstrap_ci(values, 500, 0.95, 0)
    assert low[0] < values[:, 0].mean() < high[0]
    assert low[1] == high[1] == 0.5 and low[2] == high[2] == 1.0


def test_pruning_tradeoff_from_a_sweep_table(tmp_path) -> None:
    """The pruning figure reads a sweep CSV, draws one line per method, and names the fix for a wrong table."""
    import pandas as pd

    from analysis.errors import ConfigError

    table = pd.DataFrame(
        {
            "method": ["visipruner", "fastv", "random", "pre_llm"] * 2,
            "accuracy": [95, 90, 80, 70, 94, 85, 75, 65],
            "agreement": [97, 91, 81, 71, 96, 86, 76, 66],
            "flops_cut": [40, 40, 41, 39, 60, 60, 61, 59],
            "baseline_accuracy": [96] * 8,
        }
    )
    path = tmp_path / "sweep.csv"
    table.to_csv(path, index=False)
    fig = plots.pruning_tradeoff(path)
    names = [text.get_text() for text in fig.legends[0].get_texts()]
    assert names == ["VisiPruner", "FastV", "random", "before the LLM", "unpruned"]
    with pytest.raises(ConfigError, match="analysis.pruner sweep"):
        plots.pruning_tradeoff(table.drop(columns=["agreement"]))


def test_pruning_budgets_from_a_budget_table(tmp_path) -> None:
    """The budget figure reads a budget CSV, draws one bar group per method and budget with its interval, and names
    the fix for a wrong table."""
    import pandas as pd

    from analysis.errors import ConfigError

    methods = ["fastv", "dart", "cdpruner", "pyramiddrop"]
    table = pd.DataFrame(
        {
            "method": methods * 2,
            "budget_share": [1 / 9] * 4 + [1 / 3] * 4,
            "kept_tokens": [64, 64, 64, 2, 192, 192, 192, 34],
            "accuracy": [80, 78, 62, 87, 88, 82, 83, 86],
            "accuracy_low": [75, 72, 55, 82, 84, 77, 77, 81],
            "accuracy_high": [85, 84, 69, 91, 92, 88, 88, 91],
            "agreement": [86, 81, 63, 86, 91, 86, 88, 90],
            "baseline_accuracy": [91.5] * 8,
        }
    )
    path = tmp_path / "budgets.csv"
    table.to_csv(path, index=False)
    fig = plots.pruning_budgets(path)
    names = [text.get_text() for text in fig.legends[0].get_texts()]
    assert names == ["unpruned", "FastV", "DART", "CDPruner", "PyramidDrop"]
    accuracy_axis = fig.axes[0]
    assert len(accuracy_axis.patches) == 8 and [t.get_text() for t in accuracy_axis.get_xticklabels()][0].startswith(
        "11% of the image"
    )
    with pytest.raises(ConfigError, match="sweep --budgets"):
        plots.pruning_budgets(table.drop(columns=["accuracy_low"]))
