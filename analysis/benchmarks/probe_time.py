"""Wall time of every probe over a dataset on the CPU.

``python -m analysis.benchmarks.probe_time [--model shapes-llava] [--limit 200] [--each]`` runs the
default probes (or ``--probes``) with their default settings in one run, as a user would, into a
temporary folder and prints its time next to the time of a plain greedy evaluation of the same
samples (the baseline); ``--each`` first times every probe in a run of its own.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time

import torch

from analysis.evaluate import EvalConfig, evaluate
from analysis.models.registry import load_model
from analysis.probes.run import ProbeConfig, run_probes


def main(argv: list[str] | None = None) -> int:
    """Time the probes together (and, with --each, one by one) against a greedy evaluation."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.benchmarks.probe_time",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", default="shapes-llava")
    parser.add_argument("--dataset", default="shapes-vqa")
    parser.add_argument("--limit", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--probes", default=ProbeConfig.probes, help="comma-separated probes (default: %(default)s)")
    parser.add_argument("--each", action="store_true", help="also time every probe in a run of its own")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    loaded = load_model(args.model, device="cpu", dtype="float32")
    sys.stdout.write(
        f"model {args.model}, {args.limit} samples of {args.dataset}, batch {args.batch_size}, "
        f"cpu threads {torch.get_num_threads()}\n"
    )
    start = time.perf_counter()
    evaluate(
        EvalConfig(model=args.model, dataset=args.dataset, limit=args.limit, batch_size=args.batch_size, device="cpu"),
        loaded=loaded,
        progress=False,
    )
    baseline = time.perf_counter() - start
    sys.stdout.write(f"{'greedy evaluation (baseline)':32s} {baseline:8.1f} s\n")
    timings = {}
    with tempfile.TemporaryDirectory() as root:
        chosen = args.probes.split(",")
        for probes in [*(chosen if args.each else []), ",".join(chosen)]:
            config = ProbeConfig(
                model=args.model,
                dataset=args.dataset,
                limit=args.limit,
                probes=probes,
                batch_size=args.batch_size,
                out=f"{root}/{probes.replace(',', '+')}",
                device="cpu",
            )
            start = time.perf_counter()
            run_probes(config, loaded=loaded, progress=False)
            timings[probes] = time.perf_counter() - start
            label = "all probes together" if probes == ",".join(chosen) and len(chosen) > 1 else probes
            sys.stdout.write(f"{label:32s} {timings[probes]:8.1f} s  ({timings[probes] / baseline:5.1f}x baseline)\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
