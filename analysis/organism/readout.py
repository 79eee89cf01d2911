"""``python -m analysis.organism.readout``: can an organism's answer position see where the objects of a spatial
question are? Ridge read-outs, layer by layer, of both named objects' centres from the last prompt position.

For each spatial validation question the residual stream at the last prompt position is recorded after every layer
(0: the embeddings); ridge regressions fitted on the first 70% of the questions predict the first and the second
object's centre (x, y), their differences and the yes/no answer, scored on the rest (R^2 and accuracy).
"""

from __future__ import annotations

import argparse
import logging
import re
import sys
from pathlib import Path

import numpy as np
import torch
from PIL import Image

from analysis.cli import run_cli
from analysis.config import HelpFormatter
from analysis.data.shapes import RELATIONS, SceneObject, ShapesConfig, generate_items, item_sample, render
from analysis.errors import ConfigError
from analysis.models.registry import load_model
from analysis.organism import ORGANISM_576_DIR

logger = logging.getLogger(__name__)

FIT_SHARE = 0.7
TARGETS = ("x first", "y first", "x second", "y second", "x first - second", "y first - second")
_QUESTION = re.compile(r"Is the (.+?) (" + "|".join(RELATIONS) + r") the (.+?)\?")


def _named(objects: tuple[SceneObject, ...], name: str) -> SceneObject:
    """The object a spatial question names (its names are unique in the scene)."""
    return next(o for o in objects if o.name == name)


def last_position_states(model: str | Path, n_questions: int, batch_size: int = 20) -> tuple[np.ndarray, np.ndarray]:
    """(layers + 1, Q, D) last-prompt-position states over ``n_questions`` spatial validation questions, and (Q, 7)
    targets: the two objects' centres, their differences and the answer (1 for yes)."""
    loaded = load_model(str(model))
    items = generate_items("validation", n_questions, ShapesConfig(families=("spatial",)))
    images: dict[int, Image.Image] = {}
    states, targets = [], []
    for start in range(0, len(items), batch_size):
        chunk = items[start : start + batch_size]
        samples = [item_sample(i, images.setdefault(i.scene.index, render(i.scene))) for i in chunk]
        inputs = loaded.adapter.build_inputs(loaded.processor, samples)
        with torch.no_grad():
            hidden = loaded.model(**inputs.tensors, output_hidden_states=True).hidden_states
        states.append(torch.stack(hidden)[:, :, -1].float().cpu())
        for item in chunk:
            match = _QUESTION.fullmatch(item.question)
            if match is None:
                raise ConfigError(f"not a spatial question: {item.question!r}")
            first, second = _named(item.scene.objects, match[1]).center, _named(item.scene.objects, match[3]).center
            targets.append([*first, *second, first[0] - second[0], first[1] - second[1], item.answer == "yes"])
    return torch.cat(states, dim=1).numpy(), np.asarray(targets, dtype=float)


def ridge_scores(states: np.ndarray, targets: np.ndarray, strength: float) -> list[dict[str, float]]:
    """Per layer: held-out R^2 of each position target and the answer's accuracy (standardised states, unpenalised
    intercept, the first ``FIT_SHARE`` of the questions fitted)."""
    fit = np.arange(len(targets)) < int(FIT_SHARE * len(targets))
    rows: list[dict[str, float]] = []
    for layer_states in states:
        mean, scale = layer_states[fit].mean(0), layer_states[fit].std(0) + 1e-6
        z = (layer_states - mean) / scale
        gram = z[fit].T @ z[fit] + strength * np.eye(z.shape[1])
        row = {"layer": float(len(rows))}
        for column, name in enumerate((*TARGETS, "answer")):
            y = targets[:, column]
            weights = np.linalg.solve(gram, z[fit].T @ (y[fit] - y[fit].mean()))
            predicted = z[~fit] @ weights + y[fit].mean()
            held = y[~fit]
            if name == "answer":
                row["answer accuracy"] = float(((predicted > 0.5) == (held > 0.5)).mean())
            else:
                row[name] = float(1 - ((predicted - held) ** 2).sum() / ((held - held.mean()) ** 2).sum())
        rows.append(row)
    return rows


def build_parser() -> argparse.ArgumentParser:
    """The read-out's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.organism.readout",
        description="Ridge read-outs of a spatial question's object positions from the answer position, per layer.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", default=str(ORGANISM_576_DIR), help="organism folder or registry alias")
    parser.add_argument("--questions", type=int, default=1500, help="spatial validation questions")
    parser.add_argument("--strengths", type=float, nargs="+", default=[10.0, 100.0, 1000.0], help="ridge penalties")
    return parser


def main(argv: list[str] | None = None) -> int:
    """Print one table per ridge strength."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.questions < 10:
            raise ConfigError("--questions must be at least 10 (30% of them are held out)")
        states, targets = last_position_states(args.model, args.questions)
        for strength in args.strengths:
            sys.stdout.write(f"ridge strength {strength:g}: layer, held-out R^2 of {', '.join(TARGETS)}; answer acc\n")
            for row in ridge_scores(states, targets, strength):
                cells = " ".join(f"{row[name]:6.2f}" for name in TARGETS)
                sys.stdout.write(f"{int(row['layer']):>5} {cells} {row['answer accuracy']:6.2f}\n")
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
