"""The finding notebooks: stored clean and thin; each runs top to bottom on tiny models with only parameters changed."""

from __future__ import annotations

import ast
import asyncio
import json
import os
from pathlib import Path
from typing import Any

import pytest
from conftest import FAMILIES
from fixtures_runs import variable_grid_dataset

nbformat = pytest.importorskip("nbformat")
nbclient = pytest.importorskip("nbclient")

NOTEBOOKS_DIR = Path(__file__).resolve().parent.parent / "notebooks"
NOTEBOOKS = sorted(NOTEBOOKS_DIR.glob("*.ipynb"))
EXPECTED = [
    "01_attention_sinks",
    "02_task_intent",
    "03_three_stages",
    "04_redundancy_paradox",
    "05_critical_tokens",
    "06_pruning",
]
REQUIRED_PARAMETERS = ("MODEL", "DATASET", "LIMIT", "RUN_DIR", "FIGURES")


def _parameters_index(notebook: nbformat.NotebookNode) -> int:
    """Index of the cell tagged ``parameters`` (papermill's convention)."""
    tagged = [i for i, cell in enumerate(notebook.cells) if "parameters" in cell.metadata.get("tags", [])]
    assert len(tagged) == 1, "exactly one cell must be tagged 'parameters'"
    return tagged[0]


def _inject(path: Path, overrides: dict[str, object]) -> nbformat.NotebookNode:
    """The notebook with a papermill-style ``injected-parameters`` cell right after its parameters cell."""
    notebook = nbformat.read(path, as_version=4)
    injected = nbformat.v4.new_code_cell("\n".join(f"{name} = {value!r}" for name, value in overrides.items()))
    injected.metadata["tags"] = ["injected-parameters"]
    notebook.cells.insert(_parameters_index(notebook) + 1, injected)
    return notebook


async def _execute_all(jobs: dict[str, nbformat.NotebookNode], workers: int) -> dict[str, BaseException | None]:
    """Execute notebooks in ``notebooks/`` (their working directory), a few kernels at a time; None = success."""
    slots = asyncio.Semaphore(workers)

    async def run(notebook: nbformat.NotebookNode) -> None:
        async with slots:
            client = nbclient.NotebookClient(
                notebook, timeout=300, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS_DIR)}}
            )
            # One torch thread per kernel: tiny models gain nothing from more, and concurrent kernels would contend.
            await client.async_execute(env={**os.environ, "OMP_NUM_THREADS": "1"})

    outcomes = await asyncio.gather(*(run(notebook) for notebook in jobs.values()), return_exceptions=True)
    return dict(zip(jobs, outcomes, strict=True))


def test_all_findings_have_a_notebook() -> None:
    """One notebook per finding, named as the issue lists them."""
    assert [path.stem for path in NOTEBOOKS] == EXPECTED


@pytest.mark.parametrize("path", NOTEBOOKS, ids=lambda path: path.stem)
def test_stored_clean_and_thin(path: Path) -> None:
    """No outputs stored, the parameters cell first with the organism defaults, and no plotting code in cells."""
    notebook = nbformat.read(path, as_version=4)
    nbformat.validate(notebook)
    code = [cell for cell in notebook.cells if cell.cell_type == "code"]
    assert all(cell.outputs == [] and cell.execution_count is None for cell in code)
    assert notebook.cells.index(code[0]) == _parameters_index(notebook)
    parameters = {node.targets[0].id: ast.literal_eval(node.value) for node in ast.parse(code[0].source).body}
    assert set(REQUIRED_PARAMETERS) <= set(parameters)
    assert parameters["MODEL"] == "shapes-llava" and parameters["DATASET"] == "shapes-vqa"
    assert str(parameters["RUN_DIR"]).startswith("../runs/notebooks/") and parameters["FIGURES"] == "../figures"
    for cell in code[1:]:
        assert not any(word in cell.source for word in ("import matplotlib", "seaborn", "plt.", "def ", "class "))


def _figures_written(folder: Path) -> set[str]:
    """Stems of figures saved as both PNG and SVG."""
    return {p.stem for p in folder.glob("*.png")} & {p.stem for p in folder.glob("*.svg")}


def _displayed_images(notebook: nbformat.NotebookNode) -> int:
    """How many PNG outputs the executed notebook shows."""
    return sum("image/png" in output.get("data", {}) for cell in notebook.cells for output in cell.get("outputs", []))


# Every notebook on the bundled organism (what the committed figures come from) and on every family's tiny model
# (images of several sizes, tiles, markers): another model through the parameters alone.
RUNS = [("shapes-llava", path.stem) for path in NOTEBOOKS] + [
    (alias, path.stem) for alias in FAMILIES.values() for path in NOTEBOOKS
]
RUN_IDS = [f"{model}/{stem}" for model, stem in RUNS]


@pytest.fixture(scope="module")
def executed(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """Execute the selected notebook runs; maps run id -> (notebook, outcome, work folder)."""
    # Concurrently, so that kernel start-ups and imports (most of the time) overlap.
    selected = {
        item.callspec.id
        for item in request.session.items
        if item.originalname == "test_notebook_runs" and hasattr(item, "callspec")
    }
    root = tmp_path_factory.mktemp("notebooks")
    dataset = variable_grid_dataset(root / "data")
    jobs, folders = {}, {}
    for run_id, (model, stem) in zip(RUN_IDS, RUNS, strict=True):
        if run_id not in selected:
            continue
        work = root / run_id.replace("/", "-")
        overrides: dict[str, object] = {
            "MODEL": model,
            "DATASET": "shapes-vqa",
            "LIMIT": 4,
            "RUN_DIR": str(work / "run"),
            "FIGURES": str(work / "figures"),
            "N_BOOTSTRAP": 50,
            "EVAL_LIMIT": 4,
            "TARGETS": [0.9],
        }
        # Tiny models read the variable-size images; the pruning study needs ShapesVQA's calibration and test splits.
        if model.startswith("tiny-") and stem != "06_pruning":
            overrides.update(DATASET=str(dataset), LIMIT=None)
        elif model.startswith("tiny-"):
            # Enough calibration questions that knocking out a random model's image access changes some answers.
            overrides.update(LIMIT=12)
        jobs[run_id] = _inject(NOTEBOOKS_DIR / f"{stem}.ipynb", overrides)
        folders[run_id] = work
    outcomes = asyncio.run(_execute_all(jobs, workers=max(1, min(4, os.cpu_count() or 1))))
    return {run_id: (jobs[run_id], outcomes[run_id], folders[run_id]) for run_id in jobs}


# Where a tiny random model gives the pruning study nothing to prune from: knocking out its image access changes no
# calibration answer, so the export stops with its one-line error instead of inventing a stage (README).
NOTHING_TO_PRUNE = {"tiny-llava/06_pruning", "tiny-internvl/06_pruning"}


@pytest.mark.parametrize("run_id", RUN_IDS)
def test_notebook_runs(run_id: str, executed: dict[str, Any]) -> None:
    """The notebook executes top to bottom with only its parameters overridden, and saves and shows its figures."""
    notebook, outcome, work = executed[run_id]
    if run_id in NOTHING_TO_PRUNE:
        assert outcome is not None and "no layer where image access matters was found" in str(outcome)
        assert json.loads((work / "run" / "calibration" / "manifest.json").read_text())["status"] == "complete"
        return
    if outcome is not None:
        pytest.fail(f"{run_id} failed:\n{outcome}")
    saved = _figures_written(work / "figures")
    stem = run_id.split("/")[1]
    assert saved and all(name.startswith(stem[:3]) for name in saved)
    assert _displayed_images(notebook) == len(saved)
    run = work / "run" / "calibration" if stem == "06_pruning" else work / "run"
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["model"]["name"] == run_id.split("/")[0] and manifest["status"] == "complete"
