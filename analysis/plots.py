"""Figures of the three-stage picture: attention sinks, task intent, knockouts, redundancy and critical tokens.

Every figure function takes a run folder (or, where noted, the matching table as a DataFrame) and
returns a :class:`matplotlib.figure.Figure` drawn in the toolkit's style. Figures are built without
pyplot, so library calls leave no open figures behind; ``save_figure`` writes one as PNG and SVG.
Layer counts, grid shapes and task words come from the data, never from a particular model.
"""

from __future__ import annotations

import io
import json
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeAlias

import matplotlib as mpl
import numpy as np
import pandas as pd
import seaborn as sns
from matplotlib import cycler  # type: ignore[attr-defined]  # re-exported at run time, not in its stubs
from matplotlib.axes import Axes
from matplotlib.figure import Figure
from matplotlib.layout_engine import ConstrainedLayoutEngine
from matplotlib.ticker import MaxNLocator, PercentFormatter

from analysis.bootstrap import bootstrap_ci
from analysis.config import run_identity
from analysis.errors import ConfigError
from analysis.results import RunFolder, atomic_write_bytes, read_table
from analysis.stages import StageConfig, bootstrap, boundaries, critical_tokens, first_quiet_layer, load_curves

if TYPE_CHECKING:
    from analysis.probes.run import ProbeConfig
    from analysis.trace.run import TraceConfig

RunLike: TypeAlias = "str | Path | pd.DataFrame"
DPI = 150
PALETTE = "colorblind"
SEQUENTIAL = "viridis"
MAX_PANELS = 16
# Band colours of the shallow / middle / deep stages: light, and distinct for colour-blind readers.
STAGE_COLORS = {"shallow": "#cfe2f3", "middle": "#fde0c5", "deep": "#e2e2e2"}
MASK_ORDER = ("top", "random", "bottom", "all")
QUERY_NAMES = {"last": "last prompt position", "instruction": "instruction tokens (mean)"}


def _style_rc() -> Any:
    """rcParams of the toolkit's figure style: seaborn whitegrid, notebook font sizes, colour-blind palette."""
    return {
        **sns.axes_style("whitegrid"),
        **sns.plotting_context("notebook"),
        "axes.prop_cycle": cycler(color=sns.color_palette(PALETTE)),
        "image.cmap": SEQUENTIAL,
        "savefig.dpi": DPI,
        "axes.titlesize": 12,
        "figure.titlesize": 13,
    }


def set_style() -> None:
    """Apply the toolkit's figure style globally (for figures a notebook draws itself)."""
    mpl.rcParams.update(_style_rc())


@contextmanager
def _styled() -> Iterator[None]:
    """The toolkit's style for one figure, without touching the caller's global rcParams."""
    with mpl.rc_context(_style_rc()):
        yield


def save_figure(fig: Figure, name: str, folder: str | Path = "figures") -> tuple[Path, Path]:
    """Write ``folder/name.png`` (150 dpi) and ``folder/name.svg`` atomically; returns both paths."""
    if not name or Path(name).name != name:
        raise ValueError(f"figure name must be a plain file stem without folders, got {name!r}")
    paths = []
    for fmt in ("png", "svg"):
        buffer = io.BytesIO()
        # A fixed SVG date keeps re-rendered figures byte-identical, so version control sees real changes only.
        metadata = {"Date": None} if fmt == "svg" else None
        fig.savefig(buffer, format=fmt, dpi=DPI, bbox_inches="tight", metadata=metadata)
        path = Path(folder) / f"{name}.{fmt}"
        atomic_write_bytes(path, buffer.getvalue())
        paths.append(path)
    return paths[0], paths[1]


def has_finished_run(config: TraceConfig | ProbeConfig) -> bool:
    """Whether ``config.out`` holds a finished run of exactly this config, so a notebook can skip re-running it."""
    from analysis.data.loaders import resolve_split

    if config.out is None:
        return False
    manifest = RunFolder(Path(config.out), {}).read_manifest()
    identity = run_identity(config, resolve_split(config.dataset, config.split))
    # The manifest stores the identity as JSON, so compare against its JSON round trip.
    if not manifest:
        return False
    return manifest.get("status") == "complete" and manifest.get("identity") == json.loads(json.dumps(identity))


# --- shared helpers ----------------------------------------------------------------------------


def _table(run: RunLike, name: str) -> pd.DataFrame:
    """A run's table as a DataFrame, or the DataFrame itself when one was passed."""
    if isinstance(run, pd.DataFrame):
        return run
    return read_table(run, name).to_pandas()


def _run_dir(run: RunLike, what: str) -> Path:
    """A run folder path; figures that join several tables cannot work from one DataFrame."""
    if isinstance(run, pd.DataFrame):
        raise TypeError(f"{what} joins several tables of a run; pass the run folder, not a DataFrame")
    return Path(run)


def _manifest_config(run: RunLike) -> dict[str, Any]:
    """The config recorded in a run's manifest ({} for a DataFrame or a folder without one)."""
    if isinstance(run, pd.DataFrame):
        return {}
    manifest = RunFolder(Path(run), {}).read_manifest() or {}
    return manifest.get("config", {})


def _question_line(run: RunLike, sample_id: str) -> str:
    """A newline and the sample's question, when the run folder is at hand."""
    if isinstance(run, pd.DataFrame):
        return ""
    samples = read_table(run, "samples").to_pandas().set_index("sample_id")
    return f"\n“{samples.loc[sample_id, 'question']}”" if sample_id in samples.index else ""


def _check_query(query: str) -> None:
    """Reject query groups the trace does not record per image token."""
    if query not in QUERY_NAMES:
        raise ValueError(f"query must be one of {', '.join(QUERY_NAMES)}, got {query!r}")


def _pick_layers(available: Sequence[int], layers: Sequence[int] | None) -> list[int]:
    """Requested layers (checked), or up to MAX_PANELS evenly spaced ones spanning the model."""
    available = sorted(int(layer) for layer in available)
    if layers is not None:
        missing = sorted(set(layers) - set(available))
        if missing:
            raise ValueError(f"layers {missing} not in the run (layers {available[0]}..{available[-1]})")
        return [int(layer) for layer in layers]
    if len(available) <= MAX_PANELS:
        return available
    picks = np.unique(np.linspace(0, len(available) - 1, MAX_PANELS).round().astype(int))
    return [available[i] for i in picks]


def _pick_sample(table: pd.DataFrame, sample_id: str | None) -> str:
    """The requested sample (checked), or the table's first."""
    ids = table["sample_id"].unique()
    if sample_id is None:
        return str(ids[0])
    if sample_id not in set(ids):
        raise ValueError(f"sample {sample_id!r} not in the run; it has e.g. {', '.join(map(str, ids[:3]))}")
    return sample_id


def _panel_grid(fig: Figure, n_panels: int, max_cols: int) -> list[Axes]:
    """n_panels axes in a rows x columns grid (extra cells removed), in reading order."""
    n_cols = min(n_panels, max_cols)
    n_rows = -(-n_panels // n_cols)
    axes = np.atleast_1d(fig.subplots(n_rows, n_cols, squeeze=False)).ravel()
    for ax in axes[n_panels:]:
        ax.remove()
    return list(axes[:n_panels])


def _grid_ticks(ax: Axes, n_rows: int, n_cols: int) -> None:
    """Integer ticks on an image-grid heatmap (every cell of a small grid), and no background grid lines over it."""
    ax.grid(False)
    for axis, size in ((ax.xaxis, n_cols), (ax.yaxis, n_rows)):
        # A locator finds no integer ticks on a one-cell axis, and too many labels crowd a large grid.
        if size <= 6:
            axis.set_ticks(range(size))
        else:
            axis.set_major_locator(MaxNLocator(nbins=5, integer=True))


def _span(start: int, end: int) -> str:
    """Half-open layer range [start, end) as text: '3' or '0–5'."""
    return str(start) if end - start == 1 else f"{start}–{end - 1}"


def _layer_axis(ax: Axes, label: str = "layer (0 = first decoder layer)") -> None:
    """Integer layer ticks and the layer label."""
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set_xlabel(label)


def _share_axis(ax: Axes, label: str) -> None:
    """A 0-100 % y axis."""
    ax.set_ylim(-0.03, 1.03)
    ax.yaxis.set_major_formatter(PercentFormatter(1.0))
    ax.set_ylabel(label)


def _stage_bands(layers: np.ndarray, shallow_end: int | None, deep_start: int | None) -> list[tuple[str, int, int]]:
    """Half-open shallow [first, S), middle [S, D) and deep [D, last] layer bands (empty when nothing was found)."""
    first, last = int(layers.min()), int(layers.max())
    if shallow_end is None and deep_start is None:
        return []
    middle_start = first if shallow_end is None else shallow_end
    middle_end = last + 1 if deep_start is None else max(deep_start, middle_start)
    return [("shallow", first, middle_start), ("middle", middle_start, middle_end), ("deep", middle_end, last + 1)]


def _shade_bands(ax: Axes, layers: np.ndarray, bands: Sequence[tuple[str, int, int]]) -> None:
    """Shade and name layer bands behind the curves."""
    for name, start, end in bands:
        if end <= start:
            continue
        ax.axvspan(start - 0.5, end - 0.5, color=STAGE_COLORS[name], zorder=0, lw=0)
        # Names sit just above the frame, where no curve can hide them.
        ax.text(
            (start + end - 1) / 2,
            1.01,
            name,
            transform=ax.get_xaxis_transform(),
            ha="center",
            va="bottom",
            fontsize=10,
            color="0.25",
        )
    ax.set_xlim(int(layers.min()) - 0.5, int(layers.max()) + 0.5)


def _boundary_label(name: str, value: int | None, intervals: pd.DataFrame | None, key: str, confidence: float) -> str:
    """'S = 4 (95% CI 3-5)', or 'S: not found'."""
    if value is None:
        return f"{name}: not found"
    text = f"{name} = {value}"
    if intervals is not None and key in intervals.index and not np.isnan(intervals.loc[key, "low"]):
        low, high = intervals.loc[key, ["low", "high"]]
        text += f" ({confidence:.0%} CI {low:.0f}–{high:.0f})"
    return text


def _mean_curve(
    ax: Axes, matrix: pd.DataFrame, label: str, color: Any, ci: tuple[int, float, int], marker: str = "o", ls: str = "-"
) -> None:
    """Mean over samples (rows) per layer (columns) with its bootstrap band; ci = (n_boot, confidence, seed)."""
    layers = matrix.columns.to_numpy(dtype=int)
    low, high = bootstrap_ci(matrix.to_numpy(), *ci)
    ax.fill_between(layers, low, high, color=color, alpha=0.25, lw=0)
    ax.plot(layers, matrix.mean().to_numpy(), marker=marker, ls=ls, color=color, label=label)


# --- finding 1: attention sinks ----------------------------------------------------------------


def attention_sink_heatmaps(
    trace_run: RunLike,
    sample_id: str | None = None,
    layers: Sequence[int] | None = None,
    *,
    image_index: int = 0,
    piece: int = 0,
    query: str = "last",
) -> Figure:
    """Small multiples over layers of the attention each image-grid cell (of one piece of the image, e.g.
    LLaVA-NeXT's base image 0 or its tiles 1, whose newline tokens form the last column) receives from the text."""
    _check_query(query)
    tokens = _table(trace_run, "image_tokens")
    sample_id = _pick_sample(tokens, sample_id)
    tokens = tokens[(tokens["sample_id"] == sample_id) & (tokens["image_index"] == image_index)]
    tokens = tokens[tokens["piece"] == piece]
    if tokens.empty:
        raise ValueError(f"sample {sample_id!r} has no image {image_index} (piece {piece})")
    layers = _pick_layers(tokens["layer"].unique(), layers)
    n_rows, n_cols = int(tokens["row"].max()) + 1, int(tokens["col"].max()) + 1
    column = f"{query}_attention"
    vmax = float(tokens.loc[tokens["layer"].isin(layers), column].max())
    panel = 2.4
    height = panel * min(max(n_rows / n_cols, 0.4), 1.6)
    with _styled():
        fig = Figure(
            figsize=(panel * min(len(layers), 4) + 1.2, height * -(-len(layers) // 4) + 0.9), layout="constrained"
        )
        axes = _panel_grid(fig, len(layers), max_cols=4)
        image = None
        for ax, layer in zip(axes, layers, strict=False):
            cells = tokens[tokens["layer"] == layer]
            grid = np.full((n_rows, n_cols), np.nan)
            grid[cells["row"].to_numpy(), cells["col"].to_numpy()] = cells[column].to_numpy()
            image = ax.imshow(grid, vmin=0, vmax=vmax, cmap=SEQUENTIAL, interpolation="nearest")
            _grid_ticks(ax, n_rows, n_cols)
            ax.set_title(f"layer {layer}")
        for index, ax in enumerate(axes):
            if index % 4 == 0:
                ax.set_ylabel("grid row")
            if index >= len(axes) - 4:
                ax.set_xlabel("grid column")
        assert image is not None, "at least one layer is drawn"
        fig.colorbar(image, ax=axes, shrink=0.85, label=f"attention from the {QUERY_NAMES[query]}\n(mean over heads)")
        fig.suptitle(
            f"Attention to image tokens, sample {sample_id}, image {image_index} ({n_rows}×{n_cols} grid)"
            + _question_line(trace_run, sample_id)
        )
    return fig


def value_norm_vs_attention(trace_run: RunLike, layer: int, *, top_k: int = 5, query: str = "last") -> Figure:
    """Per image token at one layer: value-vector L1 norm against attention received, top-k attended marked."""
    _check_query(query)
    tokens = _table(trace_run, "image_tokens")
    _pick_layers(tokens["layer"].unique(), [layer])
    tokens = tokens[tokens["layer"] == layer].copy()
    column = f"{query}_attention"
    # Sinks are a per-sample notion: the k tokens that sample's text attends to most.
    tokens["sink"] = tokens.groupby("sample_id")[column].rank(method="first", ascending=False) <= top_k
    colors = sns.color_palette(PALETTE)
    with _styled():
        fig = Figure(figsize=(6.4, 4.6), layout="constrained")
        ax = fig.subplots()
        rest, sinks = tokens[~tokens["sink"]], tokens[tokens["sink"]]
        ax.scatter(rest[column], rest["value_l1"], s=14, alpha=0.45, color=colors[0], lw=0, label="other image tokens")
        ax.scatter(
            sinks[column],
            sinks["value_l1"],
            s=40,
            alpha=0.9,
            color=colors[3],
            marker="D",
            edgecolor="black",
            lw=0.4,
            label=f"top-{top_k} attended per sample (sinks)",
        )
        positive = tokens[column][tokens[column] > 0]
        # Sink attention can be orders of magnitude above the rest; a log axis keeps both readable.
        if len(positive) and positive.max() / positive.min() > 100:
            ax.set_xscale("log")
        ax.set_xlabel(f"attention received from the {QUERY_NAMES[query]}, mean over heads")
        ax.set_ylabel("value vector L1 norm (all KV heads)")
        ax.set_title(f"Image tokens at layer {layer} ({tokens['sample_id'].nunique()} samples)")
        ax.legend(loc="best", fontsize=9)
    return fig


def sink_profile(trace_run: str | Path, *, query: str = "last", confidence: float = 0.95, n_boot: int = 1000) -> Figure:
    """Per layer: where a query group's attention goes and how concentrated its image-directed part is."""
    _check_query(query)
    run_dir = _run_dir(trace_run, "sink_profile")
    attention = read_table(run_dir, "attention").to_pandas()
    sinks = read_table(run_dir, "sinks").to_pandas()
    attention = attention[attention["query"] == query]
    sinks = sinks[sinks["query"] == query]
    colors = sns.color_palette(PALETTE)
    with _styled():
        fig = Figure(figsize=(11, 4.2), layout="constrained")
        left, right = fig.subplots(1, 2)
        mass = attention.groupby(["key_region", "sample_id", "layer"])["mass"].mean()
        for color, region in zip(colors, ("system", "image", "instruction"), strict=False):
            if region in mass.index.get_level_values(0):
                _mean_curve(left, mass.loc[region].unstack(), region, color, (n_boot, confidence, 0))
        _share_axis(left, "share of attention (mean over heads)")
        _layer_axis(left)
        left.set_title(f"Where the {QUERY_NAMES[query]} attends")
        left.legend(title="key region", fontsize=9)
        top_k = int(sinks["top_k"].max())
        for color, (column, label) in zip(
            colors[3:],
            (
                ("top_k_share", f"share on the top-{top_k} image tokens"),
                ("normalized_entropy", "entropy / log(n image tokens)"),
            ),
            strict=False,
        ):
            per_sample = sinks.groupby(["sample_id", "layer"])[column].mean().unstack()
            _mean_curve(right, per_sample, label, color, (n_boot, confidence, 0))
        right.set_ylim(-0.03, 1.03)
        right.set_ylabel("share / normalised entropy (0–1)")
        _layer_axis(right)
        right.set_title("Concentration of its image-directed attention")
        right.legend(fontsize=9)
    return fig


# --- finding 2: task intent (logit lens) -------------------------------------------------------


def logit_lens_ranks(probe_run: RunLike, sample_id: str | None = None) -> pd.DataFrame:
    """Median logit-lens rank (0 = top-1) per target (rows, answer first) and layer (columns), residual stream."""
    lens = _table(probe_run, "logit_lens")
    lens = lens[lens["source"] == "residual"]
    if sample_id is not None:
        lens = lens[lens["sample_id"] == _pick_sample(lens, sample_id)]
    targets = ["answer", *[t for t in lens["target"].unique() if t != "answer"]]
    ranks = lens.groupby(["target", "layer"])["rank"].median().unstack()
    ranks.columns.name = "layer"
    return ranks.reindex([t for t in targets if t in ranks.index])


def logit_lens_heatmap(probe_run: RunLike, sample_id: str | None = None, *, by_family: bool = False) -> Figure:
    """Heatmap of the log rank of the answer and task words per layer (logit lens, residual stream, last position)."""
    lens = _table(probe_run, "logit_lens")
    if by_family:
        families = read_table(_run_dir(probe_run, "by_family"), "samples").to_pandas().set_index("sample_id")["family"]
        lens = lens.assign(family=lens["sample_id"].map(families).fillna(""))
        groups = {
            f"{name or 'no family'} (n = {part['sample_id'].nunique()})": logit_lens_ranks(part)
            for name, part in lens.groupby("family")
        }
    else:
        title = f"sample {sample_id}" if sample_id else f"median over {lens['sample_id'].nunique()} samples"
        groups = {title: logit_lens_ranks(lens, sample_id)}
    vmax = max(max(float(np.log10(ranks.to_numpy() + 1).max()) for ranks in groups.values()), 1e-9)
    n_targets, n_layers = max(r.shape[0] for r in groups.values()), max(r.shape[1] for r in groups.values())
    max_cols = 1 if len(groups) == 1 else 3 if n_layers <= 8 else 2
    panel_width = min(max(0.45 * n_layers + 1.6, 3.6), 12 / max_cols + 1)
    n_rows = -(-len(groups) // max_cols)
    with _styled():
        fig = Figure(
            figsize=(panel_width * max_cols + 1.6, (0.4 * n_targets + 1.1) * n_rows + 0.8), layout="constrained"
        )
        axes = _panel_grid(fig, len(groups), max_cols)
        image = None
        for index, (ax, (title, ranks)) in enumerate(zip(axes, groups.items(), strict=False)):
            log_rank = np.log10(ranks.to_numpy(dtype=float) + 1)
            layers = ranks.columns.to_numpy(dtype=int)
            # The extent puts cell centres on the layer numbers, so the x axis reads in layers directly.
            image = ax.imshow(
                log_rank,
                aspect="auto",
                cmap=f"{SEQUENTIAL}_r",
                vmin=0,
                vmax=vmax,
                interpolation="nearest",
                extent=(layers[0] - 0.5, layers[-1] + 0.5, len(ranks.index) - 0.5, -0.5),
            )
            ax.grid(False)
            ax.set_yticks(range(len(ranks.index)), ranks.index)
            ax.tick_params(labelleft=index % max_cols == 0)
            ax.xaxis.set_major_locator(MaxNLocator(integer=True, nbins=12))
            # Exact ranks are easiest to read in the cells, as long as the cells are big enough for them.
            if n_layers <= 32:
                for (i, j), rank in np.ndenumerate(ranks.to_numpy()):
                    label = f"{rank:.0f}" if rank < 1000 else f"{rank / 1000:.0f}k"
                    ax.text(
                        layers[j],
                        i,
                        label,
                        ha="center",
                        va="center",
                        fontsize=7 if n_layers > 12 else 8,
                        color="white" if log_rank[i, j] > vmax / 2 else "black",
                    )
            _layer_axis(ax, "layer" if index >= len(groups) - max_cols else "")
            ax.set_title(title, fontsize=11)
        axes[0].set_ylabel("target token")
        assert image is not None, "at least one group is drawn"
        fig.colorbar(
            image, ax=axes, shrink=min(0.9, 0.5 + 0.4 / n_rows), label="log10(median rank + 1)\n(0 = top-1 token)"
        )
        fig.suptitle("Logit lens at the last prompt position (residual stream): rank of the answer and task words")
    return fig


# --- finding 3: three stages (knockouts, KV removal) -------------------------------------------


def knockout_curves(probe_run: str | Path, stage_config: StageConfig | None = None) -> Figure:
    """Share of changed answers when image access is knocked out up to / from layer L, stages shaded."""
    config = stage_config or StageConfig()
    config.validate()
    curves, _ = load_curves(probe_run, config)
    found = boundaries(curves, config)
    intervals = bootstrap(curves, config) if config.n_bootstrap else None
    colors = sns.color_palette(PALETTE)
    with _styled():
        fig = Figure(figsize=(8, 4.6), layout="constrained")
        ax = fig.subplots()
        layers = curves.upto.columns.to_numpy(dtype=int)
        _shade_bands(ax, layers, _stage_bands(layers, found.shallow_end, found.deep_start))
        ci = (config.n_bootstrap, config.confidence, config.seed)
        _mean_curve(ax, curves.upto, "hidden in layers 0..L (upto)", colors[0], ci)
        # Distinct markers and dashes keep both curves visible where they coincide.
        _mean_curve(ax, curves.from_, "hidden in layers L..last (from)", colors[1], ci, "s", "--")
        for value, name, key, style in (
            (found.shallow_end, "S", "shallow_end", "-."),
            (found.deep_start, "D", "deep_start", ":"),
        ):
            _boundary_line(ax, value, _boundary_label(name, value, intervals, key, config.confidence), style)
        _share_axis(ax, "answers changed (% of samples, top-1)")
        _layer_axis(ax, "layer L")
        fig.suptitle(
            f"Knocking out {config.query} → {config.key} attention "
            f"({found.n_samples} samples, {config.confidence:.0%} bootstrap CIs)"
        )
        fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    return fig


def _boundary_line(ax: Axes, layer: int | None, label: str, style: str) -> None:
    """A vertical line before ``layer`` (or, when none was found, only its legend entry)."""
    if layer is not None:
        ax.axvline(layer - 0.5, color="0.2", ls=style, lw=1.2, label=label)
    else:
        ax.plot([], [], ls=style, color="0.2", label=label)


def kv_removal_curve(probe_run: RunLike, stage_config: StageConfig | None = None) -> Figure:
    """Share of changed and of correct answers when image tokens leave the KV cache from layer L on."""
    config = stage_config or StageConfig()
    config.validate()
    kv = _table(probe_run, "kv_removal")
    changed = (~kv["agrees"]).astype(float).groupby([kv["sample_id"], kv["layer_start"]]).mean().unstack()
    correct = kv["correct"].astype(float).groupby([kv["sample_id"], kv["layer_start"]]).mean().unstack()
    deep_start = first_quiet_layer(changed.mean(), config.tolerance)
    colors = sns.color_palette(PALETTE)
    with _styled():
        fig = Figure(figsize=(8, 4.6), layout="constrained")
        ax = fig.subplots()
        layers = changed.columns.to_numpy(dtype=int)
        # KV removal only tells where vision stops mattering, so only the deep band is shaded.
        _shade_bands(ax, layers, [("deep", deep_start, int(layers.max()) + 1)] if deep_start is not None else [])
        ci = (config.n_bootstrap, config.confidence, config.seed)
        _mean_curve(ax, changed, "answer differs from the unmodified model", colors[0], ci)
        _mean_curve(ax, correct, "answer correct", colors[2], ci, "s", "--")
        ax.axhline(config.tolerance, color="0.4", lw=1, ls="--", label=f"tolerance ({config.tolerance:.0%})")
        label = f"KV boundary = {deep_start}" if deep_start is not None else "KV boundary: not found"
        _boundary_line(ax, deep_start, label, ":")
        _share_axis(ax, "% of samples (greedy answer)")
        _layer_axis(ax, "image tokens removed from the KV cache of layers L..last")
        fig.suptitle(
            f"KV-cache removal of image tokens ({len(changed)} samples, {config.confidence:.0%} bootstrap CIs)"
        )
        fig.legend(loc="outside lower center", ncols=2, fontsize=9)
    return fig


# --- finding 4: redundancy paradox (masking) ---------------------------------------------------


def masking_bars(probe_run: RunLike, *, confidence: float = 0.95, n_boot: int = 1000, seed: int = 0) -> Figure:
    """Effect of hiding the top / random / bottom / all image tokens from the text in layers below L."""
    effects = _table(probe_run, "effects")
    effects = effects[effects["probe"] == "masking"]
    if effects.empty:
        raise ConfigError("the run has no masking effects; run `python -m analysis.probes --probes masking`")
    effects = effects.assign(changed=(~effects["top1_match"]).astype(float))
    # Random subsets are pooled over seeds per sample first, so each sample counts once in the bootstrap.
    columns = ["delta_logprob", "changed"]
    per_sample = effects.groupby(["variant", "layer_end", "sample_id"], as_index=False)[columns].mean()
    percent = _manifest_config(probe_run).get("mask_percent")
    size = f"{percent:g}%" if percent is not None else "p%"
    seeds = effects.loc[effects["variant"] == "random", "seed"].nunique()
    labels = {
        "top": f"top {size} most attended",
        "random": f"random {size} ({seeds} seeds)",
        "bottom": f"all but the top {size}",
        "all": "all image tokens",
    }
    per_sample["hidden tokens"] = per_sample["variant"].map(labels)
    per_sample["masked layers"] = per_sample["layer_end"].map(lambda end: _span(0, end))
    depths = [_span(0, end) for end in sorted(per_sample["layer_end"].unique())]
    hue_order = [labels[v] for v in MASK_ORDER if v in set(per_sample["variant"])]
    with _styled():
        fig = Figure(figsize=(11, 4.6), layout="constrained")
        left, right = fig.subplots(1, 2)
        for ax, column in ((left, "delta_logprob"), (right, "changed")):
            sns.barplot(
                per_sample,
                x="masked layers",
                y=column,
                hue="hidden tokens",
                order=depths,
                hue_order=hue_order,
                errorbar=("ci", confidence * 100) if n_boot else None,
                n_boot=n_boot,
                seed=seed,
                ax=ax,
                capsize=0.1,
                err_kws={"linewidth": 1.2},
                legend=ax is left,
            )
        left.axhline(0, color="0.3", lw=0.8)
        left.set_ylabel("Δ log p(reference answer) (nats)")
        left.set_title("Answer log-probability")
        _share_axis(right, "answers changed (% of samples, top-1)")
        right.set_title("Changed answers")
        for ax in (left, right):
            ax.set_xlabel("image tokens hidden from the instruction in layers")
        handles, names = left.get_legend_handles_labels()
        left.get_legend().remove()
        fig.legend(
            handles, names, title="hidden image tokens", loc="outside lower center", ncols=len(names), fontsize=9
        )
        fig.suptitle(
            f"Redundancy paradox: masking image tokens ({per_sample['sample_id'].nunique()} samples, "
            f"{confidence:.0%} bootstrap CIs)"
        )
    return fig


# --- finding 5: critical tokens ----------------------------------------------------------------


def token_grid_positions(samples: pd.DataFrame) -> pd.DataFrame:
    """(sample_id, ordinal) -> image_index, piece, row, col, n_rows, n_cols of every image token, from the samples
    table; a row's newline token (LLaVA-NeXT's tiles) has col == n_cols."""
    # Ordinals count a sample's image tokens over its images in order, each piece's tokens row-major.
    parts = []
    columns = ("piece_images", "piece_rows", "piece_cols", "piece_newlines")
    for sample_id, images, rows, cols, newlines in zip(
        samples["sample_id"], *(samples[name] for name in columns), strict=True
    ):
        piece_of_image: dict[int, int] = {}
        for image_index, n_rows, n_cols, newline in zip(images, rows, cols, newlines, strict=True):
            piece = piece_of_image.get(int(image_index), 0)
            piece_of_image[int(image_index)] = piece + 1
            row, col = np.divmod(np.arange(int(n_rows) * (int(n_cols) + int(newline))), int(n_cols) + int(newline))
            parts.append(
                pd.DataFrame(
                    {
                        "sample_id": sample_id,
                        "image_index": int(image_index),
                        "piece": piece,
                        "row": row,
                        "col": col,
                        "n_rows": int(n_rows),
                        "n_cols": int(n_cols),
                    }
                )
            )
    grid = pd.concat(parts, ignore_index=True)
    grid.insert(1, "ordinal", grid.groupby("sample_id").cumcount())
    return grid


def critical_token_figure(probe_run: str | Path, stage_config: StageConfig | None = None) -> Figure:
    """How many image tokens are critical per sample, where they sit on the image grid, and which rankings find them."""
    config = stage_config or StageConfig()
    run_dir = _run_dir(probe_run, "critical_token_figure")
    critical = critical_tokens(run_dir, config.critical_threshold)
    if critical is None:
        raise ConfigError(
            f"{run_dir} has no token_ablation table; run `python -m analysis.probes --probes "
            "token_ablation,contribution`"
        )
    ablation = read_table(run_dir, "token_ablation").to_pandas()
    positions = token_grid_positions(read_table(run_dir, "samples").to_pandas())
    positions = positions[positions["sample_id"].isin(critical.index)]
    picked = critical["critical_ordinals"].explode().dropna().rename("ordinal").reset_index()
    picked = picked.astype({"ordinal": int}).merge(positions, on=["sample_id", "ordinal"])
    # A newline token stands for no place on the image; it is counted in the histogram, not on the grid.
    newlines = int((picked["col"] >= picked["n_cols"]).sum())
    picked = picked[picked["col"] < picked["n_cols"]]
    # Variable-resolution models give every image (and each piece of one: base image, tiles) its own grid;
    # positions are then pooled on the median grid by relative position, so a cell means the same part of the
    # picture whatever its resolution.
    shapes = positions.drop_duplicates(["sample_id", "image_index", "piece"])[["n_rows", "n_cols"]]
    grid_rows, grid_cols = (int(round(float(shapes[axis].median()))) for axis in ("n_rows", "n_cols"))
    rescaled = len(shapes.drop_duplicates()) > 1
    heat = np.zeros((grid_rows, grid_cols))
    cell_rows = ((picked["row"] + 0.5) * grid_rows / picked["n_rows"]).astype(int).clip(0, grid_rows - 1)
    cell_cols = ((picked["col"] + 0.5) * grid_cols / picked["n_cols"]).astype(int).clip(0, grid_cols - 1)
    np.add.at(heat, (cell_rows.to_numpy(), cell_cols.to_numpy()), 1)
    heat /= len(critical)
    start, end = int(ablation["layer_start"].iloc[0]), int(ablation["layer_end"].iloc[0])
    counts = critical["n_critical"].to_numpy()
    colors = sns.color_palette(PALETTE)
    with _styled():
        fig = Figure(figsize=(15, 4.6), layout=ConstrainedLayoutEngine(wspace=0.06))
        hist, grid_ax, overlap_ax = fig.subplots(1, 3, width_ratios=[1.1, 1, 1.1])
        hist.hist(counts, bins=np.arange(counts.max() + 2) - 0.5, color=colors[0], edgecolor="white")
        # Explicit integer ticks: a locator finds none when every sample has the same count.
        hist.set_xticks(np.unique(np.linspace(0, counts.max(), min(counts.max() + 1, 9)).round().astype(int)))
        hist.yaxis.set_major_locator(MaxNLocator(integer=True))
        hist.set_xlabel(f"critical tokens per sample (of median {critical['n_image_tokens'].median():.0f})")
        hist.set_ylabel("samples")
        hist.set_title(f"Critical tokens: mean {counts.mean():.2f}, none in {(counts == 0).mean():.0%}")
        image = grid_ax.imshow(heat, cmap=SEQUENTIAL, vmin=0, vmax=float(heat.max()) or 1.0, interpolation="nearest")
        _grid_ticks(grid_ax, grid_rows, grid_cols)
        grid_ax.set_xlabel("grid column")
        grid_ax.set_ylabel("grid row")
        grid_ax.set_title(
            f"Where they sit on the {'median ' if rescaled else ''}{grid_rows}×{grid_cols} grid"
            + (" (grids rescaled)" if rescaled else "")
            + (f"; {newlines / len(critical):.2f} per sample are newline tokens" if newlines else "")
        )
        fig.colorbar(image, ax=grid_ax, shrink=0.85, label="critical tokens per sample")
        _overlap_bars(overlap_ax, critical, config, colors)
        band = f"layer{'s' if end - start > 1 else ''} {_span(start, end)}"
        fig.suptitle(
            f"Critical image tokens: hiding one in {band} flips the answer or costs "
            f"> {config.critical_threshold:g} nats ({len(critical)} samples)"
        )
    return fig


def _overlap_bars(ax: Axes, critical: pd.DataFrame, config: StageConfig, colors: Sequence[Any]) -> None:
    """Share of each sample's critical tokens that other rankings (same number of tokens) also pick."""
    names = {
        "overlap_top_attended": "most attended\n(fusion band)",
        "overlap_sinks": "shallow sinks",
        "overlap_top_contribution": "largest ‖c_j‖\n(VisiPruner)",
    }
    present = [column for column in names if column in critical.columns]
    ax.set_title("Do attention or contribution find them?")
    if not present or critical[present].dropna(how="all").empty:
        ax.text(
            0.5,
            0.5,
            "no critical tokens\n(or no contributions table)",
            ha="center",
            va="center",
            transform=ax.transAxes,
            color="0.4",
        )
        ax.set_xticks([])
        _share_axis(ax, "share of critical tokens also picked")
        return
    values = critical[present].dropna(how="all")
    means = values.mean().to_numpy()
    low, high = bootstrap_ci(values.to_numpy(), config.n_bootstrap, config.confidence, config.seed)
    ax.bar(
        range(len(present)),
        means,
        color=colors[1 : 1 + len(present)],
        yerr=np.vstack([means - low, high - means]).clip(min=0),
        capsize=4,
    )
    ax.set_xticks(range(len(present)), [names[column] for column in present], fontsize=9)
    _share_axis(
        ax, f"share of critical tokens also picked\n({len(values)} samples with any, {config.confidence:.0%} CI)"
    )


# --- finding 6: pruning ------------------------------------------------------------------------


def method_label(name: str) -> str:
    """How a figure names a sweep row's method (a registered method's label, else the name itself)."""
    from analysis.pruner.methods import METHODS
    from analysis.pruner.sweep import AUTHORS_RULE_METHOD

    if name == AUTHORS_RULE_METHOD:
        return "VisiPruner, authors' rule"
    return (METHODS.get(name).label or name) if name in METHODS else name


def pruning_tradeoff(sweep_table: str | Path | pd.DataFrame) -> Figure:
    """Accuracy and agreement with the unpruned model against the prefill FLOPs cut, per pruning method."""
    table = pd.read_csv(sweep_table) if not isinstance(sweep_table, pd.DataFrame) else sweep_table
    missing = {"method", "accuracy", "agreement", "flops_cut", "baseline_accuracy"} - set(table.columns)
    if missing:
        raise ConfigError(
            f"not a sweep table (missing columns {sorted(missing)}); make one with "
            "`python -m analysis.pruner sweep CONFIG.json ... -o table.csv`"
        )
    table = table.assign(method_name=table["method"].map(method_label))
    order = list(dict.fromkeys(table["method_name"]))  # as the sweep wrote them: VisiPruner first, then baselines
    with _styled():
        fig = Figure(figsize=(11, 4.4), layout="constrained")
        left, right = fig.subplots(1, 2, sharex=True)
        for ax, column, title in ((left, "accuracy", "Accuracy"), (right, "agreement", "Same answer as unpruned")):
            sns.lineplot(
                table.sort_values("flops_cut"),
                x="flops_cut",
                y=column,
                hue="method_name",
                hue_order=order,
                style="method_name",
                style_order=order,
                markers=True,
                dashes=False,
                ax=ax,
                legend=ax is left,
                markersize=8,
            )
            ax.set_title(title)
            ax.set_xlabel("prefill FLOPs cut (%, exact count)")
            ax.set_ylabel(f"{column} (%)")
        unpruned = float(table["baseline_accuracy"].iloc[0])
        left.axhline(unpruned, color="0.3", lw=1, ls="--", label="unpruned")
        # Lines do not widen the axis, and the unpruned accuracy is usually above every pruned point.
        bottom, top = left.get_ylim()
        left.set_ylim(bottom, max(top, unpruned + 0.05 * (top - bottom)))
        handles, names = left.get_legend_handles_labels()
        left.get_legend().remove()
        fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize=9)
        fig.suptitle("Pruning image tokens: accuracy against compute, methods at matched FLOPs")
    return fig


def pruning_budgets(budget_table: str | Path | pd.DataFrame) -> Figure:
    """Accuracy (with its bootstrap interval) and agreement at each token budget, per pruning method."""
    table = pd.read_csv(budget_table) if not isinstance(budget_table, pd.DataFrame) else budget_table
    needed = {"method", "budget_share", "kept_tokens", "accuracy", "accuracy_low", "accuracy_high", "agreement"}
    missing = needed - set(table.columns)
    if missing:
        raise ConfigError(
            f"not a budget table (missing columns {sorted(missing)}); make one with "
            "`python -m analysis.pruner sweep --budgets ... -o table.csv`"
        )
    table = table.assign(method_name=table["method"].map(method_label))
    shares = sorted(table["budget_share"].unique())
    methods = list(dict.fromkeys(table["method_name"]))
    width = 0.8 / max(len(methods), 1)
    with _styled():
        fig = Figure(figsize=(11, 4.4), layout="constrained")
        left, right = fig.subplots(1, 2, sharex=True)
        palette = sns.color_palette(n_colors=len(methods))
        for index, name in enumerate(methods):
            rows = table[table["method_name"] == name]
            positions = [
                shares.index(share) + (index - (len(methods) - 1) / 2) * width for share in rows["budget_share"]
            ]
            errors = [rows["accuracy"] - rows["accuracy_low"], rows["accuracy_high"] - rows["accuracy"]]
            left.bar(positions, rows["accuracy"], width, yerr=errors, color=palette[index], label=name, capsize=2)
            right.bar(positions, rows["agreement"], width, color=palette[index], label=name)
        kept = table.groupby("budget_share")["kept_tokens"].median()
        for ax, title in ((left, "Accuracy (95% bootstrap interval)"), (right, "Same answer as unpruned")):
            ax.set_xticks(range(len(shares)))
            ax.set_xticklabels(
                [
                    f"{share:.0%} of the image\n(~{kept[share]:.0f} tokens)" if kept is not None else ""
                    for share in shares
                ]
            )
            ax.set_title(title)
            ax.set_ylabel("%")
        if "baseline_accuracy" in table:
            left.axhline(float(table["baseline_accuracy"].iloc[0]), color="0.3", lw=1, ls="--", label="unpruned")
        handles, names = left.get_legend_handles_labels()
        fig.legend(handles, names, loc="outside lower center", ncols=len(names), fontsize=9)
        fig.suptitle("Pruning image tokens at the classic budgets (64 / 128 / 192 of LLaVA-1.5's image tokens)")
    return fig
