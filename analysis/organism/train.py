"""``python -m analysis.organism.train``: train the LLaVA model organism on ShapesVQA, the way LLaVA is made.

Stages, each on the ShapesVQA train split only (validation is for monitoring, test is scored once at the end):

0. vision: pretrain the CLIP tower (contrastive + captioning; see ``analysis.organism.vision``); frozen until
   the fine-tune.
1. language: the Llama decoder learns the task language from text alone (captions, questions, answers in the
   Vicuna v1 prompt, no image tokens), with a loss on every token.
2. alignment: only the projector trains, on image -> caption in the Vicuna prompt (LLaVA's feature alignment).
3. finetune: everything trains on the VQA questions (the tower at ``finetune_vision_lr``; 0 keeps it frozen as
   LLaVA-1.5 does), with a loss on the answer and EOS only, using the prompt LlavaAdapter renders at inference.

After stage 2 the float32 organism is kept in ``OUT/after-alignment``; ``--resume-from`` runs stage 3 alone from
it, so a run cut off while fine-tuning goes on later and gives the organism a continuous run would.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn

from analysis.cli import run_cli
from analysis.config import HelpFormatter, from_dict
from analysis.data.samples import Sample
from analysis.data.scoring import is_correct
from analysis.data.shapes import (
    FAMILIES,
    GROUNDING_FAMILIES,
    ShapesConfig,
    ShapesItem,
    caption,
    generate_items,
    item_sample,
    render,
)
from analysis.errors import ConfigError, ModelError
from analysis.models import hf
from analysis.models.adapters import FamilyAdapter, get_adapter
from analysis.models.hf import HFModel
from analysis.organism import check_organism_files
from analysis.organism.build import IMAGE_TOKEN, build_processor, organism_config
from analysis.organism.data import (
    SequenceSet,
    TrainingData,
    build_training_data,
    pack_sequences,
    pixel_values,
    text_only_sample,
)
from analysis.organism.vision import VisionPretrainer

logger = logging.getLogger(__name__)

DEFAULT_CONFIG = Path(__file__).resolve().parents[2] / "configs" / "organism.json"
LOG_NAME = "training_log.jsonl"
CONFIG_NAME = "training_config.json"
# While fine-tuning runs, the organism as of the last finished epoch, so that a run cut off (a lent machine taken
# back) still leaves a loadable model; removed once the final organism is saved.
CHECKPOINT_NAME = "checkpoint"
CHECKPOINT_INFO = "checkpoint.json"
# The organism in float32 when the stages before fine-tuning are done (each stage starts its own optimiser, so the
# weights are the whole state): ``--resume-from`` fine-tunes from it, in a later session or with another schedule.
STAGE_NAME = "after-alignment"
STAGE_INFO = "stage.json"
# Settings read only by fine-tuning (or by logging): a resumed run may change them, and nothing else.
FINETUNE_ONLY = frozenset(
    {"finetune_epochs", "finetune_batch_size", "finetune_lr", "finetune_vision_lr", "compile_finetune"}
    | {"eval_batch_size", "log_every"}
)
MAX_NEW_TOKENS = 3
# Fewer, smaller everything so the whole pipeline runs on a CPU in seconds; the architecture stays the full one
# so the smoke output loads exactly like the real organism.
SMOKE_OVERRIDES: dict[str, Any] = {
    "train_size": 28,
    "validation_size": 7,
    "test_size": 7,
    "vision_steps": 2,
    "vision_batch_size": 4,
    "language_steps": 2,
    "language_batch_size": 4,
    "alignment_steps": 2,
    "alignment_batch_size": 2,
    "finetune_epochs": 1,
    "finetune_batch_size": 4,
    "eval_batch_size": 7,
    "log_every": 1,
}
PRESETS = ("full", "smoke")

# A stage's loss on a batch of row indices: the loss to minimise and named parts to log.
LossFn = Callable[[torch.Tensor], tuple[torch.Tensor, dict[str, torch.Tensor]]]


@dataclass(frozen=True)
class OrganismTrainConfig:
    """Every hyperparameter of the organism's training; ``configs/organism.json`` holds the full preset."""

    seed: int
    train_size: int
    validation_size: int
    test_size: int
    vision_hidden_size: int
    vision_intermediate_size: int
    vision_layers: int
    vision_heads: int
    image_size: int  # the vision tower's input (ShapesVQA's scenes are resized to it)
    patch_size: int
    text_hidden_size: int
    text_intermediate_size: int
    text_layers: int
    text_heads: int
    pretrain_text_hidden_size: int
    pretrain_text_layers: int
    captioner_layers: int
    caption_loss_weight: float
    vision_steps: int
    vision_batch_size: int
    vision_lr: float
    language_steps: int
    language_batch_size: int
    language_lr: float
    # Tokens per row of the text-only stage: 0 trains one question per row; a context as long as the image
    # prompts packs several per row, so the decoder learns attention over the distances it meets with images
    language_context: int
    alignment_steps: int
    alignment_batch_size: int
    alignment_lr: float
    finetune_epochs: int
    finetune_batch_size: int
    finetune_lr: float
    finetune_vision_lr: float
    # Questions about one image per fine-tuning row, as a multi-turn chat (LLaVA's instruction data holds several
    # per image): 1 is one question per row; more shares each row's image tokens among its questions
    finetune_turns: int
    # torch.compile the fine-tune's forward (CUDA only; batches then keep their set's full width, one shape)
    compile_finetune: bool
    # How much more a family trains: its rows repeated (one question per row), or that many distinct questions
    # of it per image (multi-turn rows)
    family_repeats: dict[str, int]
    warmup_fraction: float
    weight_decay: float
    grad_clip: float
    eval_batch_size: int
    log_every: int
    # Also train on one grounding question per scene, as LLaVA-1.5's mix holds region-level data: "where" asks
    # "Where is the X?" (the object's 3 x 3 region), "box" its bounding box in tenths of the image. Training only:
    # validation and test keep the seven families.
    grounding: bool = False
    grounding_family: str = "where"

    def __post_init__(self) -> None:
        unknown = sorted(set(self.family_repeats) - set(FAMILIES))
        bad = [n for n in self.family_repeats.values() if isinstance(n, bool) or not isinstance(n, int) or n < 1]
        if unknown or bad:
            raise ConfigError(
                "OrganismTrainConfig.family_repeats needs positive whole repeat counts keyed by families of "
                f"{list(FAMILIES)}, got {self.family_repeats}"
            )
        if self.grounding_family not in GROUNDING_FAMILIES:
            raise ConfigError(
                f"OrganismTrainConfig.grounding_family must be one of {list(GROUNDING_FAMILIES)}, "
                f"got {self.grounding_family!r}"
            )
        for flag in ("compile_finetune", "grounding"):
            if not isinstance(getattr(self, flag), bool):
                raise ConfigError(f"OrganismTrainConfig.{flag} must be true or false, got {getattr(self, flag)!r}")
        for field in dataclasses.fields(self):
            if field.name in ("family_repeats", "compile_finetune", "grounding", "grounding_family"):
                continue
            value = getattr(self, field.name)
            expected = float if field.type in ("float", float) else int
            if isinstance(value, bool) or not isinstance(value, (int, float) if expected is float else int):
                raise ConfigError(f"OrganismTrainConfig.{field.name} must be a {expected.__name__}, got {value!r}")
            if value < 0 or (
                value == 0
                and field.name not in ("seed", "test_size", "weight_decay", "finetune_vision_lr", "language_context")
            ):
                raise ConfigError(f"OrganismTrainConfig.{field.name} must be positive, got {value!r}")
        if self.image_size % self.patch_size:
            raise ConfigError(
                f"OrganismTrainConfig.image_size {self.image_size} must be a multiple of patch_size {self.patch_size}"
            )
        if not self.warmup_fraction < 1:
            raise ConfigError(f"OrganismTrainConfig.warmup_fraction must be below 1, got {self.warmup_fraction}")

    @classmethod
    def from_mapping(cls, values: dict[str, Any]) -> OrganismTrainConfig:
        """Build from a mapping that names every field; unknown or missing keys are a ConfigError."""
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING}
        missing = sorted(required - set(values))
        if missing:
            raise ConfigError(f"OrganismTrainConfig is missing keys {missing}; configs/organism.json lists them all")
        return from_dict(cls, values)


def load_config(preset: str = "full", path: Path = DEFAULT_CONFIG, seed: int | None = None) -> OrganismTrainConfig:
    """The ``full`` preset from ``path``, or ``smoke`` (full with SMOKE_OVERRIDES); ``seed`` replaces its seed."""
    if preset not in PRESETS:
        raise ConfigError(f"unknown organism preset {preset!r}; choose one of {list(PRESETS)}")
    try:
        values = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as error:
        raise ConfigError(f"cannot read the organism config {path} ({error}); pass --config PATH") from None
    if preset == "smoke":
        values = {**values, **SMOKE_OVERRIDES}
    if seed is not None:
        values["seed"] = seed
    return OrganismTrainConfig.from_mapping(values)


class TrainingLog:
    """Appends one JSON record per line to the out dir's training log."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.path.write_text("")
        self.start = time.monotonic()

    @property
    def elapsed(self) -> float:
        """Seconds since training started."""
        return time.monotonic() - self.start

    def write(self, record: dict[str, Any]) -> None:
        """Append ``record`` with the elapsed time."""
        with self.path.open("a") as handle:
            handle.write(json.dumps({**record, "elapsed_s": round(self.elapsed, 1)}) + "\n")


@dataclass
class Stage:
    """One optimisation stage: what trains at which peak learning rate, on which rows (``pool``, repeats
    allowed), and for how long."""

    name: str
    groups: list[tuple[list[nn.Parameter], float]]
    loss: LossFn
    pool: torch.Tensor
    batch_size: int
    steps: int
    on_epoch_end: Callable[[int, int], None] | None = None

    @property
    def parameters(self) -> list[nn.Parameter]:
        """Every parameter the stage trains."""
        return [parameter for parameters, _ in self.groups for parameter in parameters]


def adamw(
    groups: Sequence[tuple[list[nn.Parameter], float]], weight_decay: float, device: torch.device
) -> torch.optim.AdamW:
    """The organism's AdamW over (parameters, peak rate) groups: matrices decayed, norms and biases not."""
    # Norm weights and biases (the 1-D parameters) are not decayed, as is usual for transformers.
    param_groups = [
        {"params": chosen, "lr": lr, "weight_decay": decay}
        for parameters, lr in groups
        for chosen, decay in (
            ([p for p in parameters if p.ndim >= 2], weight_decay),
            ([p for p in parameters if p.ndim < 2], 0.0),
        )
        if chosen
    ]
    return torch.optim.AdamW(
        param_groups, betas=(0.9, 0.95), eps=1e-8, **({"fused": True} if device.type == "cuda" else {})
    )


def run_stage(stage: Stage, config: OrganismTrainConfig, log: TrainingLog, device: torch.device) -> None:
    """Train ``stage.parameters`` with AdamW, linear warmup then cosine decay, clipping and bf16 on CUDA."""
    optimizer = adamw(stage.groups, config.weight_decay, device)
    warmup = max(1, round(config.warmup_fraction * stage.steps))

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, stage.steps - warmup)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
    peak_lr = max(lr for _, lr in stage.groups)
    generator = torch.Generator().manual_seed(config.seed + sum(map(ord, stage.name)))
    per_epoch = len(stage.pool) // stage.batch_size
    totals: dict[str, torch.Tensor | float] = defaultdict(float)
    window = 0
    logger.info("stage %s: %d steps of %d rows, peak lr %.1e", stage.name, stage.steps, stage.batch_size, peak_lr)
    for step, rows in enumerate(_batches(stage.pool, stage.batch_size, stage.steps, generator)):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda"):
            loss, parts = stage.loss(rows.to(device))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(stage.parameters, config.grad_clip)
        optimizer.step()
        lr = max(scheduler.get_last_lr())
        scheduler.step()
        # Accumulating on the device avoids a host sync per step; the log reads it every log_every steps.
        for name, value in {"loss": loss, **parts}.items():
            totals[name] = totals[name] + value.detach().float()
        window += 1
        if (step + 1) % config.log_every == 0 or step + 1 == stage.steps:
            means = {name: round(float(total) / window, 5) for name, total in totals.items()}
            log.write({"stage": stage.name, "step": step + 1, "lr": lr, **means})
            logger.info(
                "%s step %d/%d loss %.4f lr %.2e (%.0f s)",
                stage.name,
                step + 1,
                stage.steps,
                means["loss"],
                lr,
                log.elapsed,
            )
            totals, window = defaultdict(float), 0
        if stage.on_epoch_end is not None and per_epoch and (step + 1) % per_epoch == 0:
            stage.on_epoch_end((step + 1) // per_epoch, step + 1)


def _batches(pool: torch.Tensor, batch_size: int, steps: int, generator: torch.Generator) -> Iterator[torch.Tensor]:
    """``steps`` batches of rows from ``pool``, epoch by epoch without replacement (the last partial one dropped)."""
    if batch_size > len(pool):
        raise ConfigError(f"a batch of {batch_size} rows needs at least that many training rows, got {len(pool)}")
    produced = 0
    while True:
        order = pool[torch.randperm(len(pool), generator=generator)]
        for start in range(0, len(pool) - batch_size + 1, batch_size):
            if produced == steps:
                return
            produced += 1
            yield order[start : start + batch_size]


def question_pool(families: Sequence[str], repeats: dict[str, int]) -> torch.Tensor:
    """Question row indices, each family's rows listed ``repeats[family]`` times (default once)."""
    counts = torch.tensor([repeats.get(family, 1) for family in families])
    return torch.repeat_interleave(torch.arange(len(families)), counts)


@dataclass
class EvalSet:
    """Validation or test samples with their model inputs built once, batch by batch."""

    split: str
    samples: list[Sample]
    batches: list[dict[str, torch.Tensor]]


def eval_items(split: str, n: int, shapes_config: ShapesConfig) -> tuple[list[ShapesItem], list[Sample]]:
    """The first ``n`` questions of ``split`` and their samples (as ``generate_samples`` makes them), over the seven
    evaluated families whatever extra families the training data has."""
    items = generate_items(split, n, dataclasses.replace(shapes_config, families=FAMILIES)) if n else []
    images: dict[int, Image.Image] = {}
    samples = [item_sample(item, images.setdefault(item.scene.index, render(item.scene))) for item in items]
    return items, samples


def build_eval_set(
    split: str, samples: list[Sample], processor: Any, adapter: FamilyAdapter, batch_size: int, device: torch.device
) -> EvalSet:
    """Image questions tokenised by ``adapter.build_inputs``, exactly as at inference."""
    batches = [
        adapter.build_inputs(processor, samples[start : start + batch_size], device=device).tensors
        for start in range(0, len(samples), batch_size)
    ]
    return EvalSet(split, samples, batches)


def build_text_eval_set(
    split: str,
    items: list[ShapesItem],
    samples: list[Sample],
    processor: Any,
    adapter: FamilyAdapter,
    batch_size: int,
    device: torch.device,
) -> EvalSet:
    """The same questions with each image replaced by its caption, as the text-only stage trains on them."""
    texts = [text_only_sample(s, caption(item.scene)) for item, s in zip(items, samples, strict=True)]
    prompts = [adapter.render_prompt(processor, sample).text for sample in texts]
    batches = [
        processor.tokenizer(
            prompts[start : start + batch_size], padding=True, padding_side="left", return_tensors="pt"
        ).to(device)
        for start in range(0, len(prompts), batch_size)
    ]
    return EvalSet(f"{split}-text", texts, [dict(batch) for batch in batches])


@torch.no_grad()
def evaluate(model: HFModel, tokenizer: Any, eval_set: EvalSet, *, autocast: bool) -> dict[str, float]:
    """Greedy-decode up to 3 tokens per sample and score with ``is_correct``: accuracy per family and overall."""
    was_training = model.training
    model.eval()
    replies: list[str] = []
    for tensors in eval_set.batches:
        device_type = tensors["input_ids"].device.type
        with torch.autocast(device_type, dtype=torch.bfloat16, enabled=autocast and device_type == "cuda"):
            output = model.generate(
                **tensors, max_new_tokens=MAX_NEW_TOKENS, do_sample=False, pad_token_id=tokenizer.pad_token_id
            )
        replies += tokenizer.batch_decode(output[:, tensors["input_ids"].shape[1] :], skip_special_tokens=True)
    model.train(was_training)
    return accuracy_by_family(eval_set.samples, replies)


def accuracy_by_family(samples: Sequence[Sample], replies: Sequence[str]) -> dict[str, float]:
    """Fraction of correct replies per family (in FAMILIES order) and ``overall``."""
    hits: dict[str, list[bool]] = defaultdict(list)
    for sample, reply in zip(samples, replies, strict=True):
        hits[sample.family].append(is_correct(reply, sample))
    scores = {family: round(sum(hits[family]) / len(hits[family]), 4) for family in FAMILIES if hits[family]}
    total = [hit for family_hits in hits.values() for hit in family_hits]
    scores["overall"] = round(sum(total) / max(1, len(total)), 4)
    return scores


def trainable(modules: Iterable[nn.Module], everything: nn.Module) -> list[nn.Parameter]:
    """Freeze ``everything`` except ``modules`` and return the parameters left trainable."""
    everything.requires_grad_(False)
    parameters: list[nn.Parameter] = []
    for module in modules:
        module.requires_grad_(True)
        parameters += list(module.parameters())
    return parameters


def train(
    config: OrganismTrainConfig,
    out: Path,
    device: torch.device,
    preset: str = "full",
    resume_from: Path | None = None,
) -> dict[str, float]:
    """Run all four stages (or fine-tune from ``resume_from``, a run's after-alignment folder), save model and
    processor to ``out`` and return the reloaded model's test accuracy."""
    import transformers
    from transformers import AutoModelForImageTextToText, AutoProcessor

    earlier_log = check_resume_folder(resume_from, config) if resume_from is not None else None
    out.mkdir(parents=True, exist_ok=True)
    log = TrainingLog(out / LOG_NAME)
    environment = {"device": str(device), "torch": torch.__version__, "transformers": transformers.__version__}
    resumed = {"resumed_from": str(resume_from)} if resume_from is not None else {}
    (out / CONFIG_NAME).write_text(
        json.dumps({"preset": preset, "config": dataclasses.asdict(config), **resumed, **environment}, indent=2) + "\n"
    )
    if earlier_log is not None:
        # The stages the resumed run skips keep their records, so the log tells the organism's whole training.
        with log.path.open("a") as handle:
            handle.write(earlier_log)
    torch.manual_seed(config.seed)
    # Multi-turn rows weight a family by asking it several distinct questions per image instead of repeating rows.
    shapes_config = ShapesConfig(
        train_size=config.train_size,
        validation_size=config.validation_size,
        test_size=config.test_size,
        draws=config.family_repeats if config.finetune_turns > 1 else {},
        families=(*FAMILIES, config.grounding_family) if config.grounding else FAMILIES,
    )
    _train_and_save(config, shapes_config, out, log, device, resume_from)

    # Score what was written, as a user would load it: float32 from the float16 file.
    reloaded: HFModel = AutoModelForImageTextToText.from_pretrained(out, dtype=torch.float32)
    reloaded = reloaded.to(device)
    reloaded_processor = AutoProcessor.from_pretrained(out)
    reloaded_adapter = get_adapter(reloaded)
    scores: dict[str, float] = {}
    for split, n in (("validation", config.validation_size), ("test", config.test_size)):
        if not n:
            continue
        _, samples = eval_items(split, n, shapes_config)
        eval_set = build_eval_set(split, samples, reloaded_processor, reloaded_adapter, config.eval_batch_size, device)
        scores = record_eval(log, "saved", 0, 0, reloaded, reloaded_processor.tokenizer, eval_set, autocast=False)
    logger.info("done in %.0f s; organism files in %s", log.elapsed, out)
    return scores


def check_resume_folder(folder: Path, config: OrganismTrainConfig) -> str:
    """The training log kept in a run's after-alignment ``folder``, once it is checked to hold a complete stage
    trained with ``config`` (fine-tuning settings apart)."""
    try:
        info = json.loads((folder / STAGE_INFO).read_text())
        earlier_log = (folder / LOG_NAME).read_text()
        check_organism_files(folder)
    except (OSError, json.JSONDecodeError, ModelError) as error:
        raise ConfigError(
            f"{folder} is not a complete {STAGE_NAME} folder ({error}); pass OUT/{STAGE_NAME} of a run that "
            "finished its alignment stage"
        ) from None
    saved = info.get("config", {})
    differing = sorted(
        name
        for name, value in dataclasses.asdict(config).items()
        if name not in FINETUNE_ONLY and saved.get(name) != value
    )
    if info.get("stage") != "alignment" or differing:
        raise ConfigError(
            f"{folder} was trained with other settings than this config ({', '.join(differing) or 'stage'}); "
            f"only {sorted(FINETUNE_ONLY)} may change when resuming: pass the config of the run that wrote it"
        )
    return earlier_log


def save_stage(model: HFModel, processor: Any, folder: Path, info: dict[str, Any], log: TrainingLog) -> None:
    """Write ``folder`` with the float32 organism, ``info`` and the training log so far, complete or not at all."""

    def write(staging: Path) -> None:
        state = {name: t.detach().to("cpu") for name, t in model.state_dict().items()}
        model.save_pretrained(staging, state_dict=state)
        processor.save_pretrained(staging)
        shutil.copyfile(log.path, staging / LOG_NAME)
        (staging / STAGE_INFO).write_text(json.dumps(info, indent=2) + "\n")

    replace_folder(folder, write)
    logger.info("saved the organism after alignment to %s (float32, for --resume-from)", folder)


def _train_and_save(
    config: OrganismTrainConfig,
    shapes_config: ShapesConfig,
    out: Path,
    log: TrainingLog,
    device: torch.device,
    resume_from: Path | None = None,
) -> None:
    """Stages 0-3 (vision pretraining, language, alignment, VQA fine-tuning), or stage 3 alone from
    ``resume_from``, then the organism saved to ``out``."""
    from transformers import AutoModelForImageTextToText, LlavaForConditionalGeneration

    processor = build_processor(shapes_config, config.image_size, config.patch_size)
    tokenizer = processor.tokenizer
    model_config = organism_config(
        len(tokenizer),
        tokenizer.convert_tokens_to_ids(IMAGE_TOKEN),
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
        vision_hidden_size=config.vision_hidden_size,
        vision_intermediate_size=config.vision_intermediate_size,
        vision_layers=config.vision_layers,
        vision_heads=config.vision_heads,
        text_hidden_size=config.text_hidden_size,
        text_intermediate_size=config.text_intermediate_size,
        text_layers=config.text_layers,
        text_heads=config.text_heads,
        image_size=config.image_size,
        patch_size=config.patch_size,
    )
    hf.set_attention_implementation(model_config, "sdpa")
    model: HFModel = LlavaForConditionalGeneration(model_config)
    model = model.to(device)
    for name in ("pad_token_id", "bos_token_id", "eos_token_id"):
        setattr(model.generation_config, name, getattr(tokenizer, name))
    adapter = get_adapter(model)
    logger.info("organism: %.2fM parameters", sum(p.numel() for p in model.parameters()) / 1e6)

    data = build_training_data(
        processor, adapter, shapes_config, config.train_size, turns=config.finetune_turns, seed=config.seed
    ).to(device)
    validation_items, validation_samples = eval_items("validation", config.validation_size, shapes_config)
    validation = build_eval_set("validation", validation_samples, processor, adapter, config.eval_batch_size, device)
    validation_text = build_text_eval_set(
        "validation", validation_items, validation_samples, processor, adapter, config.eval_batch_size, device
    )
    log.write({"stage": "data", "train_questions": len(data.vqa), "train_images": len(data.pixels)})
    logger.info("data ready: %d questions, %d images (%.0f s)", len(data.vqa), len(data.pixels), log.elapsed)
    image_processor = processor.image_processor
    language = [model.model.language_model, model.lm_head]
    # Both question stages see the same mixture; repeating a family gives its harder questions more updates.
    questions = question_pool(data.families, config.family_repeats if config.finetune_turns == 1 else {})

    if resume_from is None:
        _pretrain_and_align(model, processor, data, questions, validation, validation_text, config, out, log, device)
    else:
        saved: HFModel = AutoModelForImageTextToText.from_pretrained(resume_from, dtype=torch.float32)
        model.load_state_dict(saved.state_dict())
        model.train()
        del saved
        log.write({"stage": "resumed", "from": str(resume_from)})
        record_eval(log, "resumed", 0, 0, model, tokenizer, validation)

    def epoch_end(epoch: int, step: int) -> None:
        scores = record_eval(log, "finetune", epoch, step, model, tokenizer, validation)
        if epoch < config.finetune_epochs:
            save_checkpoint(
                model, processor, out / CHECKPOINT_NAME, {"epoch": epoch, "step": step, "validation": scores}
            )

    # Conversations hold every question of their image once (a repeated family as several distinct questions).
    finetune_pool = questions if config.finetune_turns == 1 else torch.arange(len(data.vqa))
    per_epoch = len(finetune_pool) // config.finetune_batch_size
    groups = [(trainable([model.model.multi_modal_projector, *language], model), config.finetune_lr)]
    # Everything is fine-tuned on VQA, the tower at its own (usually lower) rate; a rate of 0 keeps it frozen
    # as in LLaVA-1.5.
    if config.finetune_vision_lr > 0:
        tower = model.model.vision_tower
        tower.requires_grad_(True)
        groups.append((list(tower.parameters()), config.finetune_vision_lr))
    # Compiling pays for itself only on the long fine-tune (about 1.6x per step on an H200, after about 80 s).
    compiled = config.compile_finetune and device.type == "cuda"
    forward = torch.compile(model, dynamic=False) if compiled else model
    run_stage(
        Stage(
            "finetune",
            groups,
            chat_loss(model, data, image_processor, data.vqa, True, forward),
            finetune_pool,
            config.finetune_batch_size,
            config.finetune_epochs * per_epoch,
            on_epoch_end=epoch_end,
        ),
        config,
        log,
        device,
    )
    save_organism(model, processor, out)
    shutil.rmtree(out / CHECKPOINT_NAME, ignore_errors=True)


def chat_loss(
    model: HFModel,
    data: TrainingData,
    image_processor: Any,
    sequences: SequenceSet,
    with_images: bool,
    forward: Callable[..., Any],
) -> LossFn:
    """The language-modelling loss of ``forward`` (``model`` or its compiled form) on rows of ``sequences``."""

    def loss(rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        # A compiled forward sees one shape for the whole stage instead of recompiling per batch width.
        inputs = sequences.batch(rows, full_width=forward is not model)
        if with_images:
            inputs["pixel_values"] = pixel_values(data.pixels[sequences.image_index[rows]], image_processor)
        return forward(**inputs).loss, {}

    return loss


def _pretrain_and_align(
    model: HFModel,
    processor: Any,
    data: TrainingData,
    questions: torch.Tensor,
    validation: EvalSet,
    validation_text: EvalSet,
    config: OrganismTrainConfig,
    out: Path,
    log: TrainingLog,
    device: torch.device,
) -> None:
    """Stages 0-2 (vision pretraining, text-only language, alignment), then the after-alignment folder saved."""
    tokenizer = processor.tokenizer
    # Stage 0: the vision tower, pretrained on its own and then frozen for good.
    _pretrain_vision(model, tokenizer, data, processor.image_processor, config, log, device)
    model.train()
    language = [model.model.language_model, model.lm_head]
    text_qa, text_pool = data.text_qa, questions
    if config.language_context:
        shuffle = torch.Generator().manual_seed(config.seed)
        order = questions[torch.randperm(len(questions), generator=shuffle)]
        text_qa = pack_sequences(
            data.text_qa.to(torch.device("cpu")), order, config.language_context, tokenizer.pad_token_id
        ).to(device)
        text_pool = torch.arange(len(text_qa))
        logger.info(
            "text-only stage: %d questions packed into %d rows of %d tokens",
            len(order),
            len(text_qa),
            config.language_context,
        )
    run_stage(
        Stage(
            "language",
            [(trainable(language, model), config.language_lr)],
            chat_loss(model, data, processor.image_processor, text_qa, False, model),
            text_pool,
            config.language_batch_size,
            config.language_steps,
        ),
        config,
        log,
        device,
    )
    # The language model alone, reading captions: what it can answer once the image is described in words.
    record_eval(log, "language", 0, config.language_steps, model, tokenizer, validation_text)
    run_stage(
        Stage(
            "alignment",
            [(trainable([model.model.multi_modal_projector], model), config.alignment_lr)],
            chat_loss(model, data, processor.image_processor, data.caption_chat, True, model),
            torch.arange(len(data.caption_chat)),
            config.alignment_batch_size,
            config.alignment_steps,
        ),
        config,
        log,
        device,
    )
    record_eval(log, "alignment", 0, config.alignment_steps, model, tokenizer, validation)
    save_stage(model, processor, out / STAGE_NAME, {"stage": "alignment", "config": dataclasses.asdict(config)}, log)


def _pretrain_vision(
    model: HFModel,
    tokenizer: Any,
    data: TrainingData,
    image_processor: Any,
    config: OrganismTrainConfig,
    log: TrainingLog,
    device: torch.device,
) -> None:
    """Stage 0: a CLIP-style tower pretrained with its own text side and captioner, copied into ``model``."""
    model_config = model.config
    pretrainer = VisionPretrainer(
        model_config.vision_config,
        vocab_size=len(tokenizer),
        max_caption_length=data.caption_ids.shape[1],
        text_hidden_size=config.pretrain_text_hidden_size,
        text_layers=config.pretrain_text_layers,
        captioner_layers=config.captioner_layers,
        pad_token_id=tokenizer.pad_token_id,
        bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id,
    ).to(device)

    def vision_loss(rows: torch.Tensor) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        mask = data.caption_mask[rows]
        width = int(mask.sum(dim=1).max())
        contrastive, captioning = pretrainer(
            pixel_values(data.pixels[rows], image_processor), data.caption_ids[rows][:, :width], mask[:, :width]
        )
        return contrastive + config.caption_loss_weight * captioning, {
            "contrastive": contrastive,
            "captioning": captioning,
        }

    run_stage(
        Stage(
            "vision",
            [(list(pretrainer.parameters()), config.vision_lr)],
            vision_loss,
            torch.arange(len(data.pixels)),
            config.vision_batch_size,
            config.vision_steps,
        ),
        config,
        log,
        device,
    )
    copy_vision_tower(pretrainer.vision_model, model.model.vision_tower)


def copy_vision_tower(source: nn.Module, target: nn.Module) -> None:
    """Load the pretrained CLIP tower into LLaVA's, whichever of them wraps its weights in ``vision_model.``."""

    # transformers versions differ in whether CLIPVisionModel nests a CLIPVisionTransformer.
    def bare(name: str) -> str:
        return name.removeprefix("vision_model.")

    state = {bare(name): tensor for name, tensor in source.state_dict().items()}
    names = {bare(name): name for name in target.state_dict()}
    if set(state) != set(names):
        mismatch = sorted(set(state) ^ set(names))[:4]
        raise ModelError(f"the pretrained vision tower's weights do not match LLaVA's, e.g. {mismatch}")
    target.load_state_dict({names[name]: tensor for name, tensor in state.items()})


def record_eval(
    log: TrainingLog,
    stage: str,
    epoch: int,
    step: int,
    model: HFModel,
    tokenizer: Any,
    eval_set: EvalSet,
    *,
    autocast: bool = True,
) -> dict[str, float]:
    """Evaluate ``model`` on ``eval_set`` after ``stage``'s ``epoch`` and log the accuracy per family."""
    scores = evaluate(model, tokenizer, eval_set, autocast=autocast)
    log.write({"stage": stage, "epoch": epoch, "step": step, "split": eval_set.split, "accuracy": scores})
    logger.info("%s epoch %d: %s accuracy %s", stage, epoch, eval_set.split, scores)
    return scores


def save_organism(model: HFModel, processor: Any, out: Path) -> None:
    """Save the processor and the model with float16 weights (under 25 MB) and a float32 config."""
    state = model.state_dict()
    largest = max(float(t.abs().max()) for t in state.values() if t.is_floating_point())
    if largest > torch.finfo(torch.float16).max:
        raise ConfigError(f"a weight of magnitude {largest:.3g} overflows float16; lower the learning rates")
    # The config keeps dtype float32, so "auto" loading upcasts these float16 tensors for exact CPU analysis.
    model.save_pretrained(out, state_dict={name: t.detach().to("cpu", torch.float16) for name, t in state.items()})
    processor.save_pretrained(out)
    check_organism_files(out)
    size = (out / "model.safetensors").stat().st_size / 2**20
    logger.info("saved the organism to %s (model.safetensors %.1f MiB)", out, size)


def save_checkpoint(model: HFModel, processor: Any, folder: Path, info: dict[str, Any]) -> None:
    """Replace ``folder`` with the organism as it is now and ``info`` (epoch, step, validation accuracy) beside it."""

    def write(staging: Path) -> None:
        save_organism(model, processor, staging)
        (staging / CHECKPOINT_INFO).write_text(json.dumps(info) + "\n")

    replace_folder(folder, write)


def replace_folder(folder: Path, write: Callable[[Path], None]) -> None:
    """Fill a staging folder beside ``folder`` with ``write`` and only then put it in ``folder``'s place."""
    staging = folder.with_name(folder.name + ".partial")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    write(staging)
    # Renamed only when complete, so a run cut off mid-save leaves the previous folder or none, never half of one.
    shutil.rmtree(folder, ignore_errors=True)
    staging.rename(folder)


def build_parser() -> argparse.ArgumentParser:
    """The training command's argument parser."""
    parser = argparse.ArgumentParser(
        prog="python -m analysis.organism.train",
        description="Train the LLaVA model organism on ShapesVQA (vision pretraining, language, alignment, VQA).",
        formatter_class=HelpFormatter,
    )
    parser.add_argument("--out", type=Path, required=True, help="folder for the model, processor, config and log")
    parser.add_argument("--preset", choices=PRESETS, default="full", help="full (one GPU) or smoke (CPU, seconds)")
    parser.add_argument("--seed", type=int, default=None, help="training seed (default: the preset's)")
    parser.add_argument("--config", type=Path, default=DEFAULT_CONFIG, help="JSON with the full preset")
    parser.add_argument("--device", default=None, help="torch device (default: cuda if available, else cpu)")
    parser.add_argument(
        "--resume-from",
        type=Path,
        default=None,
        metavar="DIR",
        help=f"skip to fine-tuning from DIR, the {STAGE_NAME} folder of an earlier run with the same config "
        "(its fine-tuning settings may differ): a run cut off while fine-tuning goes on in a later session",
    )
    return parser


def main(argv: list[str] | None = None) -> int:
    """Parse arguments and train."""
    args = build_parser().parse_args(argv)

    def body() -> int:
        config = load_config(args.preset, args.config, args.seed)
        device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        train(config, args.out, device, args.preset, resume_from=args.resume_from)
        return 0

    return run_cli(body)


if __name__ == "__main__":
    sys.exit(main())
