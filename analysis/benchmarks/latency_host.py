"""The latency mode's host work per call, counted on the CPU with recorded replays standing in for CUDA graphs.

``python -m analysis.benchmarks.latency_host [--preset llava-1.5-7b-narrow] [--batch-sizes 1 8]`` prints, per batch
size and in one run, for the unpruned model, VisiPruner with its rule live (thresholds calibrated as
``pruned_speed --latency`` does) and FastV at VisiPruner's FLOPs: the eager operations each ``generate`` call runs
outside its captured steps, the share of them that come after the rule's read-backs, and the host time outside the
stand-in replays, each against the unpruned model in the same run.

On a GPU each operation outside a graph costs the host a kernel launch (or a CPU tensor operation), and after a
read-back the device waits for all of them: their count is what the latency mode's batch-1 time depends on beyond
the graphs, and it can be measured without a GPU. A recorded replay re-runs the captured step's operations on the
same tensors without running its Python, as a graph replay would; the stand-in's replays are not timed as a graph's
would be, so only the work outside them is reported.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from analysis.benchmarks.pruned_speed import PINNED, live_visipruner, matched_variant, mean_layer_tokens
from analysis.benchmarks.trace_overhead import PRESETS, build_inputs, build_model
from analysis.models.adapters import ModelInputs
from analysis.models.hf import HFModel
from analysis.pruner import latency
from analysis.pruner.config import PruningConfig
from analysis.pruner.flops import DecoderShape, prefill_flops
from analysis.pruner.latency import LatencyEngine
from analysis.pruner.runtime import PrunedRuntime


class RecordedReplay(TorchDispatchMode):
    """A stand-in for a captured CUDA graph: records every operation of one run of a step with its tensors; a replay
    runs those operations again on the same tensors (refilling each recorded output), none of the step's Python."""

    def __init__(self) -> None:
        super().__init__()
        self.operations: list[tuple[Any, Any, Any, Any]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        """Run the operation and record it."""
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        self.operations.append((func, args, kwargs, out))
        return out

    def replay(self) -> None:
        """Run the recorded operations again."""
        for func, args, kwargs, out in self.operations:
            fresh = func(*args, **kwargs)
            for recorded, value in zip(tree_leaves(out), tree_leaves(fresh), strict=True):
                # In-place operations and views refill the recorded tensor themselves.
                if isinstance(recorded, torch.Tensor) and recorded.data_ptr() != value.data_ptr():
                    recorded.copy_(value)


class RecordingEngine(LatencyEngine):
    """The latency engine taking its capture path on the CPU, each step recorded for replay instead of captured."""

    def __init__(self, model: HFModel, *, width_bucket: int = latency.WIDTH_BUCKET) -> None:
        super().__init__(model, graphs=False, width_bucket=width_bucket)
        self.graphs = True  # the capture path, with recorded replays for graphs
        self.replaying = 0  # while > 0 a stand-in replay runs
        self.replay_seconds = 0.0  # host seconds spent in stand-in replays so far

    def _capture(
        self, key: tuple[Any, ...], run: Callable[[list[torch.Tensor]], Any], values: list[torch.Tensor]
    ) -> latency._Graph | None:
        """Record one run of the step on copies of ``values``."""
        inputs = [value.clone() for value in values]
        recording = RecordedReplay()
        with recording:
            output = run(inputs)
        return latency._Graph(_CountedReplay(self, recording), inputs, output)


@dataclass
class _CountedReplay:
    """A recorded replay that tells its engine while it runs (its operations are the graph's, not the host's)."""

    engine: RecordingEngine
    recording: RecordedReplay

    def replay(self) -> None:
        """Replay the recording, its time added to the engine's replay seconds."""
        self.engine.replaying += 1
        start = time.perf_counter()
        try:
            self.recording.replay()
        finally:
            self.engine.replaying -= 1
            self.engine.replay_seconds += time.perf_counter() - start


@dataclass
class HostWork:
    """Eager operations of one call outside its stand-in replays, and how many of them ran after a read-back."""

    operations: int = 0
    after_reads: int = 0
    by_function: Counter[str] = field(default_factory=Counter)


class _Counting(TorchDispatchMode):
    """Counts the operations the host runs outside the engine's stand-in replays."""

    def __init__(self, engine: RecordingEngine) -> None:
        super().__init__()
        self.engine = engine
        self.work = HostWork()
        self.read = False  # a rule's tests have been read back in this call

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # noqa: ANN001 (torch's signature)
        """Count an operation the host runs itself."""
        if not self.engine.replaying:
            self.work.operations += 1
            self.work.after_reads += self.read
            self.work.by_function[_caller()] += 1
        return func(*args, **kwargs or {})


def _caller() -> str:
    """The innermost function of the toolkit on the stack."""
    frame = sys._getframe(2)
    while frame is not None:
        filename = frame.f_code.co_filename
        if "/analysis/" in filename and "benchmarks" not in filename:
            return frame.f_code.co_name
        frame = frame.f_back  # type: ignore[assignment]
    return "?"


@contextmanager
def _reads_noted(counting: _Counting) -> Iterator[None]:
    """Note when the rule's host update starts (its read-back comes first)."""
    original = latency._LatencyRuntime.apply_measured

    def apply_measured(runtime: PrunedRuntime, layer: int, measured: dict[str, torch.Tensor]) -> None:
        counting.read = True
        original(runtime, layer, measured)

    setattr(latency._LatencyRuntime, "apply_measured", apply_measured)  # noqa: B010 (a method, for this block)
    try:
        yield
    finally:
        setattr(latency._LatencyRuntime, "apply_measured", original)  # noqa: B010


def host_work(engine: RecordingEngine, call: Callable[[], object]) -> HostWork:
    """The eager operations of one call outside the engine's stand-in replays."""
    counting = _Counting(engine)
    with _reads_noted(counting), counting:
        call()
    return counting.work


def host_seconds(engine: RecordingEngine, call: Callable[[], object], repeats: int) -> float:
    """Median host seconds of a call outside its stand-in replays."""
    seconds = []
    for _ in range(repeats):
        replayed = engine.replay_seconds
        start = time.perf_counter()
        call()
        seconds.append(time.perf_counter() - start - (engine.replay_seconds - replayed))
    return statistics.median(seconds)


def main(argv: list[str] | None = None) -> int:
    """Count and print the latency mode's host work per call against the unpruned model's."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.benchmarks.latency_host",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--preset", choices=sorted(PRESETS), default="llava-1.5-7b-narrow")
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--repeats", type=int, default=5, help="timed calls of each variant")
    parser.add_argument("--top", type=int, default=6, help="functions to list by operations, per variant")
    args = parser.parse_args(argv)
    if args.repeats < 1 or min(args.batch_sizes) < 1:
        parser.error("--repeats and every batch size must be >= 1")
    torch.set_num_threads(1)  # host time of one thread, as a launching host has
    preset, pinned = PRESETS[args.preset], PINNED[args.preset]
    device = torch.device("cpu")
    model = build_model(preset, device, torch.float32)
    shape = DecoderShape.from_config(model.config.get_text_config())
    layers = shape.num_layers
    sys.stdout.write(
        f"preset {args.preset} ({layers} layers) on the CPU, graphs stood in by recorded replays; operations: eager "
        "operations of one generate call (1 new token) outside its captured steps; after reads: those after the "
        f"rule's first read-back; host ms: median of {args.repeats} calls outside the replays; x: against unpruned\n"
    )
    for batch_size in args.batch_sizes:
        inputs = build_inputs(model, preset, batch_size, device)
        length, n_image = inputs.input_ids.shape[1], inputs.layouts[0].n_image_tokens
        ours = live_visipruner(model, inputs, layers, pinned["selection_layer"], pinned["keep"], pinned["exit_layer"])
        engine = RecordingEngine(model)
        decisions = engine.generate(inputs, 1, ours).decisions(inputs)
        target = prefill_flops(shape, mean_layer_tokens(decisions, length, layers))["exact"]
        fastv = matched_variant("fastv", shape, length, n_image, target, pinned["fastv_layer"])
        variants: list[tuple[str, PruningConfig | None]] = [
            ("unpruned", None),
            ("visipruner live", ours),
            (f"fastv live {fastv.name.split(' ', 1)[1]}", fastv.config),
        ]
        measured = [(name, *_measure(engine, inputs, config, args.repeats)) for name, config in variants]
        _, base, base_seconds = measured[0]
        for name, work, seconds in measured:
            top = ", ".join(f"{function} {count}" for function, count in work.by_function.most_common(args.top))
            ratio = work.operations / base.operations
            sys.stdout.write(
                f"{batch_size:>5} {name:<32} operations {work.operations:>5} (x{ratio:.2f}), "
                f"after reads {work.after_reads:>4}, host {seconds * 1e3:7.2f} ms (x{seconds / base_seconds:.2f}); "
                f"most: {top}\n"
            )
    return 0


def _measure(
    engine: RecordingEngine, inputs: ModelInputs, config: PruningConfig | None, repeats: int
) -> tuple[HostWork, float]:
    """One variant's host work per call and its host seconds (after a first call that records its steps)."""

    def call() -> object:
        return engine.generate(inputs, 1, config)

    call()
    return host_work(engine, call), host_seconds(engine, call, repeats)


if __name__ == "__main__":
    raise SystemExit(main())
