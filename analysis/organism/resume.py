"""``python -m analysis.organism.resume``: continue fine-tuning a saved organism on a chosen question mix and log
how one family's validation accuracy moves: a cheap screen of what lets a family the full recipe fails on be learnt.

It changes nothing on disk but its log: the weights it trains are dropped at the end, so a screen never touches a
shipped organism. Each variant (rows of one question or multi-turn chats, families, draws, repeats, learning rates)
is one call; several calls share a GPU.
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

import torch

from analysis.cli import run_cli
from analysis.config import HelpFormatter
from analysis.data.shapes import FAMILIES, KNOWN_FAMILIES, ShapesConfig
from analysis.errors import ConfigError
from analysis.models.adapters import get_adapter
from analysis.models.hf import HFModel
from analysis.organism import ORGANISM_576_DIR, check_organism_files
from analysis.organism.data import build_training_data, pixel_values
from analysis.organism.train import (
    TrainingLog,
    adamw,
    build_eval_set,
    eval_items,
    evaluate,
    question_pool,
    trainable,
)

logger = logging.getLogger(__name__)

WARMUP_STEPS = 50  # linear warm-up from a trained model, then a constant rate: a screen has no planned length
DATA_SEED = 1  # a different draw of conversations than the training run's seed 0


def _json_counts(text: str) -> dict[str, int]:
    """A family -> count mapping from the command line (``{"spatial": 4}``)."""
    try:
        value = json.loads(text)
    except json.JSONDecodeError as error:
        raise argparse.ArgumentTypeError(f"not JSON ({error.msg}); write it like '{{\"spatial\": 4}}'") from None
    if not isinstance(value, dict) or not all(isinstance(n, int) and n >= 1 for n in value.values()):
        raise argparse.ArgumentTypeError("needs an object of positive whole counts, like '{\"spatial\": 4}'")
    unknown = sorted(set(value) - set(FAMILIES))
    if unknown:
        raise argparse.ArgumentTypeError(f"unknown families {unknown}; choose from {list(FAMILIES)}")
    return value


def _families(text: str) -> tuple[str, ...]:
    """Comma-separated ShapesVQA families, the training-only ones (grounding) included."""
    chosen = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = sorted(set(chosen) - set(KNOWN_FAMILIES))
    if unknown or not chosen:
        raise argparse.ArgumentTypeError(f"unknown or no families {unknown}; choose from {list(KNOWN_FAMILIES)}")
    return chosen


def build_parser() -> argparse.ArgumentParser:
    """The screen's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.organism.resume",
        description="Continue fine-tuning a saved organism on a question mix; log one family's validation accuracy.",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--model", type=Path, default=ORGANISM_576_DIR, help="saved organism to start from")
    parser.add_argument("--out", type=Path, required=True, help="JSONL log to write")
    parser.add_argument("--watch", default="spatial", choices=FAMILIES, help="family whose accuracy is logged")
    parser.add_argument("--families", type=_families, default=FAMILIES, help="families trained on (comma list)")
    parser.add_argument("--turns", type=int, default=1, help="questions per row (1: one question per row)")
    parser.add_argument("--draws", type=_json_counts, default={}, help="distinct questions per image (turns > 1)")
    parser.add_argument("--repeats", type=_json_counts, default={}, help="row repeats per family (turns = 1)")
    parser.add_argument("--questions", type=int, default=60000, help="train questions generated")
    parser.add_argument("--lr", type=float, default=5e-4, help="projector and decoder rate")
    parser.add_argument("--tower-lr", type=float, default=0.0, help="vision tower rate (0: frozen)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--steps", type=int, default=10**9, help="stop after this many steps")
    parser.add_argument("--seconds", type=float, default=float("inf"), help="or after this much training time")
    parser.add_argument("--eval-every", type=int, default=200, help="steps between accuracy checks")
    parser.add_argument("--eval-questions", type=int, default=300, help="validation questions of --watch")
    parser.add_argument("--final-questions", type=int, default=1000, help="validation questions scored at the end")
    parser.add_argument("--weight-decay", type=float, default=0.05)
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    return parser


def resume(args: argparse.Namespace) -> dict[str, Any]:
    """Fine-tune ``args.model`` further as ``args`` says, logging accuracy; return the last record."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    if min(args.turns, args.batch_size, args.eval_every, args.eval_questions, args.final_questions) < 1:
        raise ConfigError("--turns, --batch-size, --eval-every, --eval-questions and --final-questions must be >= 1")
    check_organism_files(args.model)
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    autocast = device.type == "cuda"
    model: HFModel = AutoModelForImageTextToText.from_pretrained(args.model, dtype=torch.float32)
    model = model.to(device)
    processor = AutoProcessor.from_pretrained(args.model)
    adapter = get_adapter(model)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    log = TrainingLog(args.out)

    shapes = ShapesConfig(families=args.families, draws=args.draws if args.turns > 1 else {})
    data = build_training_data(processor, adapter, shapes, args.questions, turns=args.turns, seed=DATA_SEED).to(device)
    _, watched = eval_items("validation", args.eval_questions, ShapesConfig(families=(args.watch,)))
    _, every = eval_items("validation", args.final_questions, ShapesConfig())
    watch_set = build_eval_set("validation", watched, processor, adapter, 500, device)
    full_set = build_eval_set("validation", every, processor, adapter, 500, device)
    pool = question_pool(data.families, args.repeats) if args.turns == 1 else torch.arange(len(data.vqa))
    if len(pool) < args.batch_size:
        raise ConfigError(f"{len(pool)} training rows cannot fill a batch of {args.batch_size}; raise --questions")

    language = [model.model.multi_modal_projector, model.model.language_model, model.lm_head]
    groups = [(trainable(language, model), args.lr)]
    if args.tower_lr > 0:
        tower = model.model.vision_tower
        tower.requires_grad_(True)
        groups.append((list(tower.parameters()), args.tower_lr))
    trained = [p for params, _ in groups for p in params]
    optimizer = adamw(groups, args.weight_decay, device)
    peaks = [group["lr"] for group in optimizer.param_groups]

    def record(step: int, full: bool = False) -> dict[str, Any]:
        scores = evaluate(model, processor.tokenizer, full_set if full else watch_set, autocast=autocast)
        entry = {
            "stage": "resume",
            "step": step,
            "split": "validation" if full else f"validation-{args.watch}",
            "accuracy": scores,
        }
        log.write(entry)
        logger.info("step %d: %s accuracy %s", step, entry["split"], scores)
        return entry

    log.write(
        {
            "stage": "resume-config",
            **{
                k: (str(v) if isinstance(v, Path) else v)
                for k, v in vars(args).items()
                if k not in ("steps", "seconds")
            },
            "steps": args.steps if args.steps < 10**9 else None,
            "seconds": None if args.seconds == float("inf") else args.seconds,
        }
    )
    record(0)
    generator = torch.Generator().manual_seed(DATA_SEED)
    started, step, losses = time.monotonic(), 0, []
    model.train()
    while step < args.steps and time.monotonic() - started < args.seconds:
        order = pool[torch.randperm(len(pool), generator=generator)]
        for start in range(0, len(order) - args.batch_size + 1, args.batch_size):
            rows = order[start : start + args.batch_size].to(device)
            for group, peak in zip(optimizer.param_groups, peaks, strict=True):
                group["lr"] = peak * min(1.0, (step + 1) / WARMUP_STEPS)
            inputs = data.vqa.batch(rows)
            inputs["pixel_values"] = pixel_values(data.pixels[data.vqa.image_index[rows]], processor.image_processor)
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
                loss = model(**inputs).loss
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(trained, 1.0)
            optimizer.step()
            losses.append(loss.detach().float())
            step += 1
            if step % args.eval_every == 0:
                log.write({"stage": "resume", "step": step, "loss": round(float(torch.stack(losses).mean()), 5)})
                losses = []
                record(step)
            if step >= args.steps or time.monotonic() - started >= args.seconds:
                break
    return record(step, full=True)


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and run the screen."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        resume(args)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
