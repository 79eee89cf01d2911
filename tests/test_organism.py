"""The model organism: its training pipeline end to end (smoke preset), offline loading and its file checks."""

from __future__ import annotations

import dataclasses
import json
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import save_file

from analysis.data.shapes import ShapesConfig, generate_items, generate_samples, item_sample, render
from analysis.errors import ConfigError, DataError, ModelError
from analysis.models.llava import LlavaAdapter
from analysis.organism import ORGANISM_DIR, check_organism_files
from analysis.organism.build import IMAGE_TOKEN, build_processor, image_token_count, organism_config
from analysis.organism.data import build_training_data, expand_marker_ids, pixel_values, scene_conversations
from analysis.organism.train import (
    DEFAULT_CONFIG,
    SMOKE_OVERRIDES,
    OrganismTrainConfig,
    load_config,
    main,
    question_pool,
)

FAMILY_KEYS = {"color", "shape", "count", "exist", "spatial", "read", "control", "overall"}


@pytest.fixture(scope="module")
def processor():
    return build_processor(ShapesConfig())


@pytest.fixture(scope="module")
def adapter(processor):
    from transformers import LlavaForConditionalGeneration

    tokenizer = processor.tokenizer
    config = organism_config(len(tokenizer), tokenizer.convert_tokens_to_ids(IMAGE_TOKEN))
    return LlavaAdapter(LlavaForConditionalGeneration(config))


@pytest.fixture(scope="module")
def smoke_dir(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("organism")
    assert main(["--out", str(out), "--preset", "smoke", "--device", "cpu"]) == 0
    return out


def test_smoke_training_writes_a_complete_organism(smoke_dir):
    for name in (
        "model.safetensors",
        "config.json",
        "processor_config.json",
        "tokenizer.json",
        "chat_template.jinja",
        "training_config.json",
        "training_log.jsonl",
    ):
        assert (smoke_dir / name).is_file(), name
    assert (smoke_dir / "model.safetensors").stat().st_size < 25_000_000
    check_organism_files(smoke_dir)
    records = [json.loads(line) for line in (smoke_dir / "training_log.jsonl").read_text().splitlines()]
    steps = {r["stage"] for r in records if "loss" in r}
    assert steps == {"vision", "language", "alignment", "finetune"}
    assert all(torch.isfinite(torch.tensor(r["loss"])) for r in records if "loss" in r)
    evals = [r for r in records if "accuracy" in r]
    assert any(r["stage"] == "finetune" and r["epoch"] == 1 and r["split"] == "validation" for r in evals)
    assert any(r["stage"] == "saved" and r["split"] == "test" for r in evals)
    assert all(set(r["accuracy"]) == FAMILY_KEYS for r in evals)
    saved = json.loads((smoke_dir / "training_config.json").read_text())
    assert saved["preset"] == "smoke" and saved["config"]["vision_steps"] == SMOKE_OVERRIDES["vision_steps"]


def test_smoke_organism_loads_offline_and_answers(smoke_dir, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    from transformers import AutoModelForImageTextToText, AutoProcessor

    model = AutoModelForImageTextToText.from_pretrained(smoke_dir).eval()
    processor = AutoProcessor.from_pretrained(smoke_dir)
    assert type(model).__name__ == "LlavaForConditionalGeneration"
    assert next(model.parameters()).dtype == torch.float32  # float16 file, float32 config
    text = model.config.text_config
    assert text.num_hidden_layers >= 12 and text.num_key_value_heads == text.num_attention_heads
    assert model.config.vision_feature_layer == -2
    adapter = LlavaAdapter(model)
    samples = generate_samples("test", 3, ShapesConfig())
    inputs = adapter.build_inputs(processor, samples)
    assert [layout.n_image_tokens for layout in inputs.layouts] == [image_token_count()] * 3
    with torch.no_grad():
        output = model.generate(**inputs.tensors, max_new_tokens=3, do_sample=False)
    replies = processor.tokenizer.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert len(replies) == 3 and all(isinstance(reply, str) for reply in replies)


def test_smoke_organism_loads_through_the_registry(smoke_dir):
    from analysis.models.registry import load_model

    loaded = load_model(str(smoke_dir))
    assert loaded.adapter.model_type == "llava" and loaded.adapter.num_layers >= 12


def test_chat_template_matches_the_adapter_prompt(processor):
    sample = generate_samples("test", 1, ShapesConfig())[0]
    messages = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}]
    rendered = processor.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == LlavaAdapter.render_prompt(None, processor, sample).text


def test_training_tokens_match_inference_inputs(processor, adapter):
    config = ShapesConfig(train_size=40)
    data = build_training_data(processor, adapter, config, 40)
    samples = [item_sample(item, render(item.scene)) for item in generate_items("train", 40, config)]
    inputs = adapter.build_inputs(processor, samples)
    tokenizer = processor.tokenizer
    for row in range(len(samples)):
        reference = inputs.input_ids[row][inputs.attention_mask[row].bool()].tolist()
        mask = data.vqa.attention_mask[row].bool()
        trained = data.vqa.input_ids[row][mask].tolist()
        answer = data.vqa.labels[row][mask][len(reference) :].tolist()
        assert trained[: len(reference)] == reference
        assert answer == [
            *tokenizer(samples[row].answer, add_special_tokens=False)["input_ids"],
            tokenizer.eos_token_id,
        ]
        assert (data.vqa.labels[row][mask][: len(reference)] == -100).all()
    images = pixel_values(data.pixels[data.vqa.image_index], processor.image_processor)
    torch.testing.assert_close(images, inputs.tensors["pixel_values"], atol=1e-5, rtol=0)


def test_conversations_tokenise_as_the_chat_template_renders_them(processor, adapter):
    """Multi-turn rows: each image's questions once, each row the template's rendering of its chat (the first turn
    exactly the inference prompt), and the loss on every answer and its end of turn only."""
    config = ShapesConfig(train_size=40)
    data = build_training_data(processor, adapter, config, 40, turns=3, seed=1)
    single = build_training_data(processor, adapter, config, 40)
    samples = [item_sample(item, render(item.scene)) for item in generate_items("train", 40, config)]
    tokenizer = processor.tokenizer
    groups = scene_conversations(single.vqa.image_index.tolist(), 3, seed=1)
    assert sorted(i for group in groups for i in group) == list(range(len(samples)))
    assert len(data.vqa) == len(groups) < len(samples) and max(map(len, groups)) == 3
    n_image = image_token_count()
    for row, group in enumerate(groups):
        messages: list[dict] = []
        for turn, index in enumerate(group):
            content = [{"type": "text", "text": samples[index].prompt}]
            messages.append({"role": "user", "content": ([{"type": "image"}] if turn == 0 else []) + content})
            messages.append({"role": "assistant", "content": [{"type": "text", "text": samples[index].answer}]})
        text = processor.apply_chat_template(messages, tokenize=False)
        expected = expand_marker_ids(tokenizer(text)["input_ids"], tokenizer.convert_tokens_to_ids("<image>"), n_image)
        mask = data.vqa.attention_mask[row].bool()
        assert data.vqa.input_ids[row][mask].tolist() == expected
        first = single.vqa.input_ids[group[0]][single.vqa.attention_mask[group[0]].bool()]
        first_prompt = first[single.vqa.labels[group[0]][single.vqa.attention_mask[group[0]].bool()] == -100]
        assert expected[: len(first_prompt)] == first_prompt.tolist()
        labelled = data.vqa.labels[row][mask]
        eos = tokenizer.eos_token_id
        answers = [
            t for i in group for t in [*tokenizer(samples[i].answer, add_special_tokens=False)["input_ids"], eos]
        ]
        assert labelled[labelled != -100].tolist() == answers
        assert int(data.vqa.image_index[row]) == int(single.vqa.image_index[group[0]])


def test_followup_pieces_render_each_answer_once_and_refuse_rewriting_templates(processor, adapter):
    """The reply piece is rendered once per distinct answer and equals a fresh rendering; a template that rewrites
    earlier turns when one is added (here: it counts the messages up front) is refused with the reason."""
    import copy

    from analysis.errors import ModelError

    turns = [("What color is it?", "red"), ("What shape is it?", "red"), ("How many?", "2")]
    pieces = adapter.followup_texts(processor, turns)
    assert pieces[0][0] == pieces[1][0] != pieces[2][0]
    assert [piece[1] for piece in pieces[:2]] != [pieces[0][1]] * 2  # the user turn carries its own prompt
    assert pieces == [adapter.followup_texts(processor, [turn])[0] for turn in turns]
    rewriting = copy.deepcopy(processor)
    rewriting.chat_template = "{{ messages | length }}" + processor.chat_template
    with pytest.raises(ModelError, match="rewrites earlier turns"):
        adapter.followup_texts(rewriting, turns[:1])


def test_question_pool_repeats_families():
    pool = question_pool(["color", "spatial", "read"], {"spatial": 3})
    assert pool.tolist() == [0, 1, 1, 1, 2]


def test_full_preset_is_valid_and_unknown_or_missing_keys_fail(tmp_path):
    full = load_config("full")
    assert full.finetune_batch_size >= 64 and full.text_layers >= 12
    assert load_config("smoke", seed=5).seed == 5
    values = json.loads(DEFAULT_CONFIG.read_text())
    with pytest.raises(ConfigError, match="unknown"):
        OrganismTrainConfig.from_mapping({**values, "learning_rate": 1.0})
    values.pop("vision_lr")
    with pytest.raises(ConfigError, match="missing"):
        OrganismTrainConfig.from_mapping(values)
    path = tmp_path / "bad.json"
    path.write_text(json.dumps({**json.loads(DEFAULT_CONFIG.read_text()), "family_repeats": {"colour": 2}}))
    with pytest.raises(ConfigError, match="family_repeats"):
        load_config("full", path)
    with pytest.raises(ConfigError, match="preset"):
        load_config("huge")


def test_organism_weights_fit_the_size_limit(adapter):
    parameters = sum(p.numel() for p in adapter.model.parameters())
    assert 2 * parameters < 25_000_000  # float16 bytes


def _valid_folder(folder: Path) -> Path:
    folder.mkdir()
    (folder / "config.json").write_text("{}")
    save_file({"weight": torch.ones(4, 4, dtype=torch.float16)}, str(folder / "model.safetensors"))
    return folder


def test_check_organism_files_accepts_a_valid_folder(tmp_path):
    check_organism_files(_valid_folder(tmp_path / "ok"))


@pytest.mark.parametrize(
    "damage",
    ["missing", "truncated", "lfs_pointer", "empty", "not_finite"],
)
def test_check_organism_files_rejects_missing_or_corrupted_weights(tmp_path, damage):
    folder = _valid_folder(tmp_path / "organism")
    weights = folder / "model.safetensors"
    if damage == "missing":
        weights.unlink()
    elif damage == "truncated":
        weights.write_bytes(weights.read_bytes()[:-8])
    elif damage == "lfs_pointer":
        weights.write_text("version https://git-lfs.github.com/spec/v1\noid sha256:0\nsize 20000000\n")
    elif damage == "empty":
        weights.write_bytes(b"")
    else:
        save_file({"weight": torch.full((2,), float("nan"), dtype=torch.float16)}, str(weights))
    with pytest.raises(ModelError, match=r"python -m analysis\.organism\.train --out") as error:
        check_organism_files(folder)
    assert "\n" not in str(error.value)


def test_organism_dir_is_inside_the_package():
    assert ORGANISM_DIR.parent == Path(__file__).resolve().parents[1] / "analysis" / "organism"


def test_shipped_organism_answers_fixed_test_questions_offline(monkeypatch):
    """The shipped weights load through the Auto classes with no hub access and answer two questions per family."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_organism_files(ORGANISM_DIR)
    model = AutoModelForImageTextToText.from_pretrained(ORGANISM_DIR)
    processor = AutoProcessor.from_pretrained(ORGANISM_DIR)
    assert model.config.model_type == "llava" and model.config.text_config.num_hidden_layers >= 12
    samples = generate_samples("test", 14)
    assert sorted(s.family for s in samples) == sorted(
        2 * ["color", "shape", "count", "exist", "spatial", "read", "control"]
    )
    replies = {}
    for sample in samples:
        conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": sample.prompt}]}]
        text = processor.apply_chat_template(conversation, add_generation_prompt=True)
        inputs = processor(images=sample.images, text=text, return_tensors="pt")
        output = model.generate(**inputs, max_new_tokens=3, do_sample=False)
        replies[sample.sample_id] = processor.tokenizer.decode(
            output[0, inputs["input_ids"].shape[1] :], skip_special_tokens=True
        ).strip()
    assert replies == {sample.sample_id: sample.answer for sample in samples}


def test_the_576_token_organism_ships_and_loads_through_its_alias(monkeypatch):
    """The LLaVA-1.5-regime organism: in the package, offline through its alias, 576 image tokens (>= 85% of every
    prompt) into 16 layers, and right on its fixed test questions of every family it has learnt (spatial questions
    are at chance in this version: README, issue 16)."""
    from analysis.models.registry import ORGANISM_576_ALIAS, load_model, local_source, resolve
    from analysis.organism import ORGANISM_576_DIR

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    check_organism_files(ORGANISM_576_DIR)
    assert (ORGANISM_576_DIR / "model.safetensors").stat().st_size <= 25_000_000
    assert local_source(resolve(ORGANISM_576_ALIAS)) == str(ORGANISM_576_DIR)
    loaded = load_model(ORGANISM_576_ALIAS)
    assert loaded.adapter.num_layers == 16
    samples = [s for s in generate_samples("test", 21) if s.family != "spatial"]
    inputs = loaded.adapter.build_inputs(loaded.processor, samples)
    assert {layout.n_image_tokens for layout in inputs.layouts} == {576}
    assert min(layout.n_image_tokens / layout.length for layout in inputs.layouts) >= 0.85
    output = loaded.model.generate(**inputs.tensors, max_new_tokens=3, do_sample=False)
    replies = loaded.processor.tokenizer.batch_decode(output[:, inputs.input_ids.shape[1] :], skip_special_tokens=True)
    assert [reply.strip() for reply in replies] == [sample.answer for sample in samples]


def test_an_organism_in_llava_15s_regime_trains_in_smoke_mode(tmp_path) -> None:
    """configs/organism-576.json, in smoke mode, trains a 336 px tower (576 image tokens) over a 16-layer decoder
    with its text stage packed; the image is >= 85% of every prompt, and the saved model loads through the
    registry like the shipped one (issue 16's architecture)."""
    from analysis.models.registry import load_model
    from analysis.organism.train import train

    config = load_config("smoke", DEFAULT_CONFIG.with_name("organism-576.json"))
    assert (config.image_size, config.text_layers, config.language_context) == (336, 16, 640)
    assert config.finetune_turns > 1
    # Multi-turn rows with a family asked several times per image (ShapesConfig.draws).
    config = dataclasses.replace(config, family_repeats={"spatial": 3})
    train(config, tmp_path / "organism", torch.device("cpu"), preset="smoke")
    log = [json.loads(line) for line in (tmp_path / "organism" / "training_log.jsonl").read_text().splitlines()]
    assert any(record.get("stage") == "finetune" and "loss" in record for record in log)
    loaded = load_model(str(tmp_path / "organism"))
    assert loaded.adapter.num_layers == 16
    samples = generate_samples("test", 8, ShapesConfig())
    layouts = loaded.adapter.build_inputs(loaded.processor, samples).layouts
    assert {layout.n_image_tokens for layout in layouts} == {image_token_count(336, 14)} == {576}
    assert min(layout.n_image_tokens / layout.length for layout in layouts) >= 0.85
    with pytest.raises(ConfigError, match="multiple of patch_size"):
        dataclasses.replace(config, image_size=330)


def test_fine_tuning_leaves_a_loadable_checkpoint_of_each_epoch_until_the_end(tmp_path, monkeypatch) -> None:
    """While fine-tuning runs, out/checkpoint holds the organism after the last finished epoch (a run cut off still
    leaves a model); the final save removes it."""
    from transformers import AutoModelForImageTextToText

    from analysis.organism import train as training

    out = tmp_path / "organism"
    seen: list[dict] = []
    real_save = training.save_organism

    def save(model, processor, folder):
        if folder == out:  # the final save: epoch 1's checkpoint is there, complete, and loads
            info = json.loads((out / training.CHECKPOINT_NAME / training.CHECKPOINT_INFO).read_text())
            check_organism_files(out / training.CHECKPOINT_NAME)
            AutoModelForImageTextToText.from_pretrained(out / training.CHECKPOINT_NAME)
            seen.append(info)
        real_save(model, processor, folder)

    monkeypatch.setattr(training, "save_organism", save)
    config = dataclasses.replace(load_config("smoke"), finetune_epochs=2)
    training.train(config, out, torch.device("cpu"), preset="smoke")
    assert [(info["epoch"], set(info["validation"])) for info in seen] == [(1, FAMILY_KEYS)]
    log = [json.loads(line) for line in (out / "training_log.jsonl").read_text().splitlines()]
    epoch_one = next(r for r in log if r.get("stage") == "finetune" and r.get("epoch") == 1)
    assert seen[0]["validation"] == epoch_one["accuracy"] and seen[0]["step"] == epoch_one["step"]
    assert not (out / training.CHECKPOINT_NAME).exists()
    assert not (out / (training.CHECKPOINT_NAME + ".partial")).exists()
    check_organism_files(out)


def test_fine_tuning_resumed_from_the_after_alignment_folder_gives_the_continuous_runs_organism(
    smoke_dir, tmp_path
) -> None:
    """A run keeps its float32 organism after alignment; --resume-from fine-tunes from it to the very weights of
    the uninterrupted run, its log holding the skipped stages' records, and a fine-tuning setting may change."""
    from safetensors.torch import load_file

    from analysis.organism import train as training

    stage = smoke_dir / training.STAGE_NAME
    info = json.loads((stage / training.STAGE_INFO).read_text())
    assert info["stage"] == "alignment" and info["config"] == dataclasses.asdict(load_config("smoke"))
    assert {t.dtype for t in load_file(stage / "model.safetensors").values()} == {torch.float32}
    resumed = tmp_path / "resumed"
    assert main(["--out", str(resumed), "--preset", "smoke", "--device", "cpu", "--resume-from", str(stage)]) == 0
    continuous, again = load_file(smoke_dir / "model.safetensors"), load_file(resumed / "model.safetensors")
    assert continuous.keys() == again.keys()
    assert all(torch.equal(continuous[name], again[name]) for name in continuous)
    records = [json.loads(line) for line in (resumed / training.LOG_NAME).read_text().splitlines()]
    assert {r["stage"] for r in records if "loss" in r} == {"vision", "language", "alignment", "finetune"}
    aligned = next(r for r in records if r["stage"] == "alignment" and "accuracy" in r)
    assert next(r for r in records if r["stage"] == "resumed" and "accuracy" in r)["accuracy"] == aligned["accuracy"]
    saved = json.loads((resumed / training.CONFIG_NAME).read_text())
    assert saved["resumed_from"] == str(stage)
    longer = tmp_path / "longer"
    config = dataclasses.replace(load_config("smoke"), finetune_epochs=2, finetune_lr=1e-4)
    training.train(config, longer, torch.device("cpu"), preset="smoke", resume_from=stage)
    epochs = [json.loads(line) for line in (longer / training.LOG_NAME).read_text().splitlines()]
    assert max(r.get("epoch", 0) for r in epochs if r["stage"] == "finetune") == 2


@pytest.mark.parametrize(
    ("damage", "message"),
    [
        ("no_info", "is not a complete after-alignment folder"),
        ("other_config", "trained with other settings than this config \\(vision_steps\\)"),
    ],
)
def test_resuming_refuses_a_folder_it_cannot_continue_in_one_line(smoke_dir, tmp_path, capsys, damage, message):
    """A folder without its stage record, or trained with other pre-fine-tuning settings, is one clear line and no
    half-written organism."""
    import shutil

    from analysis.organism import train as training

    stage = tmp_path / "stage"
    shutil.copytree(smoke_dir / training.STAGE_NAME, stage)
    arguments = ["--preset", "smoke", "--device", "cpu", "--resume-from", str(stage)]
    if damage == "no_info":
        (stage / training.STAGE_INFO).unlink()
    else:
        info = json.loads((stage / training.STAGE_INFO).read_text())
        info["config"]["vision_steps"] += 1
        (stage / training.STAGE_INFO).write_text(json.dumps(info))
    out = tmp_path / "out"
    assert main(["--out", str(out), *arguments]) == 2
    errors = [line for line in capsys.readouterr().err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and re.search(message, errors[0]), errors
    assert not out.exists()


def test_packing_keeps_every_question_once_with_its_labels() -> None:
    """Packed rows hold the chosen rows' real tokens and labels, in order, each exactly once, within the context."""
    from analysis.organism.data import IGNORE_INDEX, SequenceSet, pack_sequences

    lengths = [3, 5, 2, 4, 6]
    width = max(lengths)
    ids = torch.zeros(len(lengths), width, dtype=torch.long)
    labels = torch.full_like(ids, IGNORE_INDEX)
    mask = torch.zeros_like(ids)
    for row, length in enumerate(lengths):
        ids[row, width - length :] = torch.arange(length) + 10 * (row + 1)
        labels[row, width - 1] = 100 + row
        mask[row, width - length :] = 1
    sequences = SequenceSet(ids, mask, labels, torch.arange(len(lengths)))
    order = torch.tensor([4, 0, 1, 3, 2, 0])
    packed = pack_sequences(sequences, order, context=8, pad_token_id=7)
    assert packed.attention_mask.sum(dim=1).max() <= 8 and bool((packed.image_index == -1).all())
    real = packed.attention_mask.bool()
    assert bool((packed.input_ids[~real] == 7).all()) and bool((packed.labels[~real] == IGNORE_INDEX).all())
    expected = torch.cat([ids[row][mask[row].bool()] for row in order.tolist()])
    torch.testing.assert_close(packed.input_ids[real], expected)
    kept = packed.labels[real]
    assert kept[kept != IGNORE_INDEX].tolist() == [100 + row for row in order.tolist()]
    # Greedy: 6 | 3+5 | 2+4 | 3; every row starts where the previous could not take the next question.
    assert packed.attention_mask.sum(dim=1).tolist() == [6, 8, 6, 3]
    with pytest.raises(DataError, match="packing context of 4"):
        pack_sequences(sequences, order, context=4, pad_token_id=7)


@pytest.mark.parametrize("image_size", [112, 336])
def test_training_pixels_match_the_processor(image_size: int) -> None:
    """What training feeds the tower equals the processor's pixel_values, at the shipped size and upscaled."""
    from analysis.organism.data import tower_input

    image_processor = build_processor(ShapesConfig(), image_size, 14).image_processor
    image = render(generate_items("train", 1, ShapesConfig())[0].scene)
    ours = pixel_values(
        torch.from_numpy(tower_input(image, image_processor).copy()).permute(2, 0, 1)[None], image_processor
    )
    theirs = image_processor(images=[image], return_tensors="pt")["pixel_values"]
    assert ours.shape == theirs.shape == (1, 3, image_size, image_size)
    torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=0)


def test_marker_ids_expand_as_the_expanded_prompt_tokenises(processor, adapter) -> None:
    """Expanding each image-marker id after tokenising equals tokenising the prompt with every marker expanded."""
    from analysis.organism.data import expand_marker_ids

    tokenizer = processor.tokenizer
    n = image_token_count()
    samples = generate_samples("test", 4, ShapesConfig())
    prompts = [adapter.render_prompt(processor, sample).text for sample in samples]
    prompts.append(prompts[0].replace(IMAGE_TOKEN, IMAGE_TOKEN + " and " + IMAGE_TOKEN))  # two images
    image_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
    for prompt in prompts:
        expected = tokenizer(prompt.replace(IMAGE_TOKEN, IMAGE_TOKEN * n))["input_ids"]
        assert expand_marker_ids(tokenizer(prompt)["input_ids"], image_id, n) == expected


def test_resume_screen_logs_accuracy_and_leaves_the_model_untouched(smoke_dir, tmp_path) -> None:
    """A short screen from a saved organism logs the watched family at step 0 and every --eval-every steps, the
    loss, then the whole validation split, and writes nothing into the model's folder."""
    from analysis.organism.resume import main as resume_main

    before = {path.name: path.read_bytes() for path in smoke_dir.iterdir() if path.is_file()}
    log = tmp_path / "screen" / "log.jsonl"
    argv = ["--model", str(smoke_dir), "--out", str(log), "--device", "cpu", "--questions", "28", "--batch-size", "4"]
    argv += ["--steps", "3", "--eval-every", "2", "--eval-questions", "4", "--final-questions", "7"]
    assert resume_main([*argv, "--turns", "3", "--draws", '{"spatial": 2}']) == 0
    records = [json.loads(line) for line in log.read_text().splitlines()]
    assert records[0]["stage"] == "resume-config" and records[0]["draws"] == {"spatial": 2}
    checks = [(r["step"], r["split"]) for r in records if "accuracy" in r]
    assert checks == [(0, "validation-spatial"), (2, "validation-spatial"), (3, "validation")]
    assert set(records[-1]["accuracy"]) == {*ShapesConfig().families, "overall"}
    assert any("loss" in r for r in records)
    assert {path.name: path.read_bytes() for path in smoke_dir.iterdir() if path.is_file()} == before


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--draws", "{spatial: 2}"], "not JSON"),
        (["--repeats", '{"colour": 2}'], "unknown families"),
        (["--families", "spatial,depth"], "unknown or no families"),
    ],
)
def test_resume_screen_rejects_bad_arguments_in_one_line(tmp_path, capsys, extra, message) -> None:
    """A malformed count mapping or family list stops the command before any model loads, naming the fix."""
    from analysis.organism.resume import main as resume_main

    with pytest.raises(SystemExit) as stop:
        resume_main(["--out", str(tmp_path / "log.jsonl"), *extra])
    assert stop.value.code == 2
    assert message in capsys.readouterr().err
    assert not (tmp_path / "log.jsonl").exists()


def test_resume_screen_refuses_a_folder_without_an_organism(tmp_path, capsys) -> None:
    """Pointing --model at a folder without organism files is one error line and no log."""
    from analysis.organism.resume import main as resume_main

    assert resume_main(["--model", str(tmp_path), "--out", str(tmp_path / "log.jsonl"), "--device", "cpu"]) == 2
    assert "has no config.json" in capsys.readouterr().err
    assert not (tmp_path / "log.jsonl").exists()


@pytest.mark.parametrize(
    ("config_name", "question"), [("organism-576-grounding.json", "Where"), ("organism-576-box.json", "box")]
)
def test_grounding_adds_its_questions_to_training_only(tmp_path, config_name: str, question: str) -> None:
    """The grounding configs (region: run 4; box: run 6) train in smoke mode with their grounding family's words
    in the tokenizer, while validation scores name only the seven evaluated families."""
    from analysis.organism.train import train

    config = load_config("smoke", DEFAULT_CONFIG.with_name(config_name))
    assert config.grounding and not load_config("smoke", DEFAULT_CONFIG.with_name("organism-576.json")).grounding
    train(config, tmp_path / "organism", torch.device("cpu"), preset="smoke")
    log = [json.loads(line) for line in (tmp_path / "organism" / "training_log.jsonl").read_text().splitlines()]
    scored = [record["accuracy"] for record in log if "accuracy" in record]
    assert scored and all(set(scores) <= {*ShapesConfig().families, "overall"} for scores in scored)
    tokenizer = json.loads((tmp_path / "organism" / "tokenizer.json").read_text())
    assert f'"{question}"' in json.dumps(tokenizer["model"]["vocab"])


def test_grounding_settings_are_checked() -> None:
    """A grounding flag that is not a bool, or a grounding family the data does not know, is a ConfigError."""
    base = json.loads(DEFAULT_CONFIG.with_name("organism-576.json").read_text())
    with pytest.raises(ConfigError, match="grounding must be true or false"):
        OrganismTrainConfig.from_mapping({**base, "grounding": "yes"})
    with pytest.raises(ConfigError, match=r"grounding_family must be one of \['where', 'box'\], got 'color'"):
        OrganismTrainConfig.from_mapping({**base, "grounding": True, "grounding_family": "color"})


def test_readout_recovers_a_linear_target_and_not_noise() -> None:
    """Ridge read-outs score a target that is a linear function of the states near R^2 1 and the answer it
    thresholds near accuracy 1, and noise near R^2 0 or below."""
    from analysis.organism.readout import TARGETS, ridge_scores

    generator = np.random.default_rng(0)
    states = generator.normal(size=(2, 400, 16))
    targets = generator.normal(size=(400, 7))
    targets[:, 0] = states[1] @ generator.normal(size=16)
    targets[:, 6] = targets[:, 0] > 0
    first, second = ridge_scores(states, targets, strength=1.0)
    assert second[TARGETS[0]] > 0.99 and second["answer accuracy"] > 0.8
    assert first[TARGETS[0]] < 0.1 and all(second[name] < 0.1 for name in TARGETS[1:])


def test_readout_cli_prints_every_layer_and_refuses_too_few_questions(capsys) -> None:
    """On the 12-layer organism the table has the embeddings and every layer; fewer than 10 questions is one line."""
    from analysis.organism.readout import main as readout_main

    assert readout_main(["--model", "shapes-llava", "--questions", "20", "--strengths", "100"]) == 0
    lines = capsys.readouterr().out.strip().splitlines()
    assert lines[0].startswith("ridge strength 100") and [line.split()[0] for line in lines[1:]] == [
        str(layer) for layer in range(13)
    ]
    assert readout_main(["--questions", "5"]) == 2
    assert "at least 10" in capsys.readouterr().err
