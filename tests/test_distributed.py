"""Data-parallel runs under ``torchrun`` (gloo, 2 CPU processes): the same tables as one process, one manifest with
the world size, and a killed run resumed with one process or two holding every sample exactly once."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest

from analysis.distributed import World, share_of
from analysis.errors import ModelError
from analysis.models.registry import replica_memory
from analysis.results import SAMPLES_TABLE, read_table

MODEL = ["--model", "shapes-llava", "--device", "cpu", "--dtype", "float32", "--quiet"]
TRACE = ["analysis.trace", *MODEL, "--limit", "10", "--batch-size", "2"]
PROBES = ["analysis.probes", *MODEL, "--limit", "6", "--batch-size", "2", "--probes", "logit_lens,contribution"]
TRACE_TABLES = ("samples", "attention", "sinks", "image_tokens")
PROBE_TABLES = ("logit_lens", "contributions")


def launch(args: list[str], out: Path, processes: int, *extra: str) -> subprocess.Popen[str]:
    """One command as ``python -m`` (1 process) or under ``torchrun --nproc_per_node`` (several), writing ``out``
    (``--out``, or ``--output`` for ``pruner sweep``)."""
    module, *rest = args
    if processes == 1:
        command = [sys.executable, "-m", module]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(processes), "-m", module]
    environment = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.Popen(
        [*command, *rest, "--output" if "sweep" in rest else "--out", str(out), *extra],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=environment,
        start_new_session=True,
    )


def run(args: list[str], out: Path, processes: int, *extra: str) -> str:
    """Run a command to the end; its standard output (failing with its error output)."""
    process = launch(args, out, processes, *extra)
    stdout, stderr = process.communicate(timeout=900)
    assert process.returncode == 0, stderr[-3000:]
    return stdout


def tables(folder: Path, names: tuple[str, ...]) -> dict[str, pd.DataFrame]:
    """The named tables of a run folder."""
    return {name: read_table(folder, name).to_pandas() for name in names}


def assert_same_tables(left: dict[str, pd.DataFrame], right: dict[str, pd.DataFrame]) -> None:
    """Equal tables, row for row (floats to 1e-6: the two runs may split reductions over threads differently)."""
    for name in left:
        pd.testing.assert_frame_equal(left[name], right[name], check_exact=False, rtol=1e-6, atol=1e-7, obj=name)


@pytest.fixture(scope="module")
def single(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The trace of the samples in one process, then probes added to it."""
    folder = tmp_path_factory.mktemp("single") / "trace"
    run(TRACE, folder, 1)
    run(PROBES, tmp_path_factory.getbasetemp() / "single-probes", 1)
    return folder


def test_torchrun_trace_and_probes_equal_a_single_process_run(single: Path, tmp_path: Path) -> None:
    """Two ranks write the same tables, in the same row order, and one manifest that records the world size."""
    folder = tmp_path / "trace"
    stdout = run(TRACE, folder, 2)
    assert stdout.count("results:") == 1  # rank 0 reports for both
    assert_same_tables(tables(folder, TRACE_TABLES), tables(single, TRACE_TABLES))
    manifest = json.loads((folder / "manifest.json").read_text())
    assert manifest["status"] == "complete" and manifest["world_size"] == 2
    probes = tmp_path / "probes"
    run(PROBES, probes, 2)
    assert_same_tables(tables(probes, PROBE_TABLES), tables(single.parent.parent / "single-probes", PROBE_TABLES))


def kill_one_rank_mid_run(folder: Path) -> None:
    """Start the trace with two ranks, SIGKILL one worker once a part is committed, and wait for torchrun to stop."""
    process = launch([*TRACE[:-4], "--limit", "40", "--batch-size", "1"], folder, 2)
    deadline = time.monotonic() + 600
    while not list((folder / SAMPLES_TABLE).glob("part-*.parquet")):
        assert process.poll() is None and time.monotonic() < deadline, process.communicate()[1][-3000:]
        time.sleep(0.05)
    workers = [
        int(pid)
        for pid in os.listdir("/proc")
        if pid.isdigit() and Path(f"/proc/{pid}/stat").exists() and _parent(int(pid)) == process.pid
    ]
    assert workers, "torchrun has no worker processes"
    os.kill(workers[-1], signal.SIGKILL)
    process.communicate(timeout=600)
    assert process.returncode != 0
    assert json.loads((folder / "manifest.json").read_text())["status"] == "running"


def _parent(pid: int) -> int:
    """A process's parent id (0 when it is gone)."""
    try:
        return int(Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[1])
    except (FileNotFoundError, IndexError, ValueError):
        return 0


@pytest.mark.parametrize("processes", [1, 2])
def test_a_killed_run_resumes_with_any_world_size_holding_every_sample_once(tmp_path: Path, processes: int) -> None:
    """After one rank is killed mid-run, ``--resume`` with 1 or 2 processes completes it: every sample exactly once,
    in dataset order, and the tables of an uninterrupted single-process run."""
    killed = tmp_path / "killed"
    kill_one_rank_mid_run(killed)
    committed = len(read_table(killed, SAMPLES_TABLE))
    assert 0 < committed < 40, "the kill came after the run had finished; it did not test a resume"
    resumed = tmp_path / "resumed"
    shutil.copytree(killed, resumed)
    run([*TRACE[:-4], "--limit", "40", "--batch-size", "1"], resumed, processes, "--resume")
    reference = tmp_path / "reference"
    run([*TRACE[:-4], "--limit", "40", "--batch-size", "1"], reference, 1)
    ids = read_table(resumed, SAMPLES_TABLE).column("sample_id").to_pylist()
    assert len(ids) == len(set(ids)) == 40
    assert ids == read_table(reference, SAMPLES_TABLE).column("sample_id").to_pylist()
    assert_same_tables(tables(resumed, TRACE_TABLES), tables(reference, TRACE_TABLES))
    assert json.loads((resumed / "manifest.json").read_text())["world_size"] == processes


def test_every_rank_refuses_a_folder_of_another_config(single: Path, tmp_path: Path) -> None:
    """A folder written by another config stops both ranks before any model loads, with the reason on each."""
    folder = tmp_path / "other"
    shutil.copytree(single, folder)
    process = launch([*TRACE[:-4], "--limit", "4", "--batch-size", "2"], folder, 2, "--resume")
    _, stderr = process.communicate(timeout=600)
    assert process.returncode != 0
    assert stderr.count("holds a run with a different config") == 2, stderr[-3000:]


def test_a_model_sharded_over_memory_and_disk_traces_as_on_one_device(single: Path, tmp_path: Path) -> None:
    """``--device auto`` with a memory cap below the organism's size splits it between the CPU and disk (accelerate
    loads offloaded layers as they run); its tables equal the one-device run's to 1e-5, and the manifest records the
    placement."""
    from analysis.trace.run import TraceConfig, run_trace

    config = TraceConfig(
        model="shapes-llava",
        limit=10,
        batch_size=2,
        device="auto",
        max_memory="cpu=12MB",
        dtype="float32",
        out=str(tmp_path / "sharded"),
    )
    run_trace(config, progress=False)
    placement = json.loads((tmp_path / "sharded" / "manifest.json").read_text())["model"]["device_map"]
    assert {"cpu", "disk"} <= set(placement.values())
    sharded, reference = tables(tmp_path / "sharded", TRACE_TABLES), tables(single, TRACE_TABLES)
    for name in TRACE_TABLES:
        pd.testing.assert_frame_equal(sharded[name], reference[name], check_exact=False, rtol=1e-5, atol=1e-5, obj=name)


def test_max_memory_needs_device_auto_and_a_readable_value(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A memory cap without ``--device auto``, or one that is not DEVICE=SIZE items, is one error line."""
    from analysis.trace.__main__ import main as trace_main

    base = ["--model", "shapes-llava", "--limit", "2", "--quiet"]
    assert trace_main([*base, "--device", "cpu", "--max-memory", "cpu=1GB", "--out", str(tmp_path / "a")]) == 2
    assert "add --device auto" in capsys.readouterr().err
    assert trace_main([*base, "--device", "auto", "--max-memory", "gpu0:1GB", "--out", str(tmp_path / "b")]) == 2
    assert "write DEVICE=SIZE" in capsys.readouterr().err


def test_torchrun_pruner_sweep_equals_a_single_process_sweep(tmp_path: Path) -> None:
    """Two ranks share the samples of every evaluated config and of the budget table; rank 0 alone reports, and its
    tables (matched baselines included, which need every sample's FLOPs) equal one process's."""
    config = Path(__file__).resolve().parents[1] / "configs" / "shapes-llava.visipruner.json"
    sweep = ["analysis.pruner", "sweep", str(config), "--model", "shapes-llava", "--device", "cpu", "--limit", "9"]
    sweep += ["--batch-size", "2", "--budgets"]
    outputs = {}
    for processes in (1, 2):
        csv = tmp_path / f"sweep-{processes}.csv"
        process = launch(sweep, csv, processes)
        stdout, stderr = process.communicate(timeout=900)
        assert process.returncode == 0, stderr[-3000:]
        assert stdout.count("visipruner ") == 1  # one table printed, by rank 0
        outputs[processes] = [pd.read_csv(csv), pd.read_csv(csv.with_name(f"{csv.stem}-budgets.csv"))]
    for single, shared in zip(outputs[1], outputs[2], strict=True):
        pd.testing.assert_frame_equal(shared, single, check_exact=False, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("count", [0, 1, 7, 9, 16])
@pytest.mark.parametrize("size", [1, 2, 3, 8])
def test_rank_shares_hold_every_item_once_in_order(count: int, size: int) -> None:
    """The ranks' shares of a sequence, in rank order, are the sequence; no two differ by more than one item."""
    items = list(range(count))
    shares = [list(share_of(World(rank, size, rank), items)) for rank in range(size)]
    assert [item for share in shares for item in share] == items
    assert max(map(len, shares)) - min(map(len, shares)) <= 1


def test_replicas_on_a_node_each_shard_over_their_own_gpu_group() -> None:
    """With --device auto under torchrun, 2 processes on a node of 4 GPUs shard over GPUs 0-1 and 2-3, keeping the
    caps given for their GPUs and the CPU; 3 processes on 8 GPUs take 2 each; more processes than GPUs is refused."""
    available: dict[int | str, Any] = {0: 100, 1: 100, 2: 100, 3: 100, "cpu": 500}
    assert replica_memory(None, available, 0, 2) == {0: 100, 1: 100, "cpu": 500}
    assert replica_memory({3: "70GiB", "cpu": "200GiB"}, available, 1, 2) == {2: 100, 3: "70GiB", "cpu": "200GiB"}
    eight: dict[int | str, Any] = {gpu: 1 for gpu in range(8)} | {"cpu": 2}
    assert [sorted(k for k in replica_memory(None, eight, r, 3) or {} if k != "cpu") for r in range(3)] == [
        [0, 1],
        [2, 3],
        [4, 5],
    ]
    assert replica_memory({"cpu": "1GiB"}, {"cpu": 500}, 1, 2) == {"cpu": "1GiB"}  # no GPUs: the caps as given
    assert replica_memory(None, available, 0, 1) is None  # one copy shards over everything visible
    with pytest.raises(ModelError, match="at most 4"):
        replica_memory(None, available, 0, 5)
