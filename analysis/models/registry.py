"""Model aliases and loading: an alias, a hub id or a local path becomes (model, processor, adapter)."""

from __future__ import annotations

import hashlib
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from analysis.errors import ModelError
from analysis.models import hf
from analysis.models.adapters import FAMILIES, FamilyAdapter, adapter_class, get_adapter
from analysis.models.hf import HFModel

logger = logging.getLogger(__name__)

ORGANISM_ALIAS = "shapes-llava"
ORGANISM_576_ALIAS = "shapes-llava-576tok-16l"
DEFAULT_MODEL = ORGANISM_ALIAS  # every command's default model: the organism that ships with the package


@dataclass(frozen=True)
class ModelSpec:
    """A named model: where it comes from and which adapter family it belongs to."""

    alias: str
    source: str
    model_type: str
    description: str


def _family_aliases() -> dict[str, ModelSpec]:
    """Every registered family's checkpoint aliases and tiny model, plus the bundled organism."""
    specs = [
        ModelSpec(
            ORGANISM_ALIAS,
            f"package:{ORGANISM_ALIAS}",
            "llava",
            "the bundled model organism: a small LLaVA trained on ShapesVQA, 64 image tokens, 12 layers (fast)",
        ),
        ModelSpec(
            ORGANISM_576_ALIAS,
            f"package:{ORGANISM_576_ALIAS}",
            "llava",
            "the bundled organism in LLaVA-1.5's regime: 576 image tokens (88% of the prompt), 16 layers",
        ),
    ]
    for model_type in FAMILIES.names():
        family = FAMILIES.get(model_type)
        specs += [ModelSpec(alias, source, model_type, text) for alias, (source, text) in family.checkpoints.items()]
        specs.append(
            ModelSpec(
                family.tiny_alias,
                f"builtin:{model_type}",
                model_type,
                f"tiny random {model_type} model built in memory (tests, smoke runs)",
            )
        )
    return {spec.alias: spec for spec in specs}


DTYPES: dict[str, Any] = {
    "auto": "auto",
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}


@dataclass
class LoadedModel:
    """A model ready for analysis: the HF model, its processor, its family adapter and provenance."""

    model: HFModel
    processor: Any
    adapter: FamilyAdapter
    name: str
    source: str
    revision: str | None

    @property
    def device(self) -> torch.device:
        """Where the model's first weights are (inputs go there; a sharded model takes them on its first device)."""
        return next(self.model.parameters()).device


def default_device() -> str:
    """cuda when a GPU is visible, else cpu."""
    return "cuda" if torch.cuda.is_available() else "cpu"


def check_device(device: str) -> str:
    """``device`` if this machine's torch can run on it ("auto" shards over what is visible), else a ModelError."""
    if device == "auto":
        return device
    try:
        parsed = torch.device(device)
    except (RuntimeError, ValueError):
        raise ModelError(f"unknown device {device!r}; use cpu, cuda, cuda:N, mps or auto") from None
    if parsed.type == "cuda":
        if not torch.cuda.is_available():
            build = (
                "a CPU-only torch build" if torch.version.cuda is None else f"torch built for CUDA {torch.version.cuda}"
            )
            raise ModelError(
                f"--device {device}: no CUDA GPU is usable here ({build}); use --device cpu, or install "
                "a CUDA build of torch on a machine with an NVIDIA GPU"
            )
        if parsed.index is not None and parsed.index >= torch.cuda.device_count():
            raise ModelError(
                f"--device {device}: this machine has {torch.cuda.device_count()} CUDA device(s), "
                f"cuda:0..cuda:{torch.cuda.device_count() - 1}"
            )
    elif parsed.type == "mps" and not torch.backends.mps.is_available():
        raise ModelError(f"--device {device}: MPS is not available here; use --device cpu")
    elif parsed.type not in ("cpu", "cuda", "mps"):
        raise ModelError(f"--device {device}: the toolkit runs on cpu, cuda or mps devices")
    return device


def resolve(name: str) -> ModelSpec:
    """Turn an alias, a local path or a hub id into a ModelSpec (model_type '' until loaded)."""
    aliases = _family_aliases()
    if name in aliases:
        return aliases[name]
    if Path(name).expanduser().exists():
        return ModelSpec(name, str(Path(name).expanduser()), "", "local checkpoint")
    parts = name.split("/")
    if len(parts) == 2 and all(parts):
        return ModelSpec(name, name, "", "hub checkpoint")
    raise ModelError(
        f"unknown model {name!r}: not an alias ({', '.join(sorted(aliases))}), not an existing path, "
        "and not a hub id of the form owner/name; run `python -m analysis --list-models`"
    )


def local_source(spec: ModelSpec) -> str:
    """What ``from_pretrained`` reads for a spec: the installed folder of a packaged model, else its source."""
    if spec.source.startswith("package:"):
        from analysis.organism import ORGANISM_576_DIR, ORGANISM_DIR

        folders = {ORGANISM_ALIAS: ORGANISM_DIR, ORGANISM_576_ALIAS: ORGANISM_576_DIR}
        return str(folders[spec.source.removeprefix("package:")])
    return spec.source


WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")
_FINGERPRINT_BYTES = 1 << 20


def weights_fingerprint(name: str) -> str | None:
    """A short hash of a local checkpoint's weight files (None for hub ids and built-in tiny models).

    It reads each file's size and its first and last MiB, so it takes milliseconds even for a 7B checkpoint and
    still changes when the weights are retrained in place; runs record it so a resume never mixes two models.
    """
    spec = resolve(name)
    if spec.source.startswith("builtin:"):
        return None
    folder = Path(local_source(spec))
    if not folder.exists():
        return None  # a hub id: its revision names the weights
    files = [folder] if folder.is_file() else sorted(p for p in folder.iterdir() if p.suffix in WEIGHT_SUFFIXES)
    digest = hashlib.sha256()
    for path in files:
        size = path.stat().st_size
        digest.update(f"{path.name}:{size}".encode())
        with path.open("rb") as handle:
            digest.update(handle.read(_FINGERPRINT_BYTES))
            handle.seek(max(0, size - _FINGERPRINT_BYTES))
            digest.update(handle.read(_FINGERPRINT_BYTES))
    return digest.hexdigest()[:16]


def _pretrained_config(source: str, revision: str | None) -> Any:
    """The HF config at ``source``, or a ModelError naming how to get it."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(source, revision=revision)
    except (OSError, ValueError) as error:
        raise ModelError(
            f"cannot load the config of {source!r} ({_first_line(error)}); check the id or path, "
            "or download the model first (HF_HUB_OFFLINE=1 uses the local cache only)"
        ) from None


def load_text_config(name: str, revision: str | None = None) -> Any:
    """The language model's HF config of a named model, without reading its weights."""
    spec = resolve(name)
    if spec.source.startswith("builtin:"):
        return adapter_class(spec.model_type).tiny_model(seed=0).config.get_text_config()
    return _pretrained_config(local_source(spec), revision).get_text_config()


@dataclass(frozen=True)
class ModelSize:
    """A model's parameter counts, and its language model's config."""

    parameters: int  # everything: vision tower, projector, language model, LM head
    language: int  # the language model (embeddings, decoder layers, final norm) and the LM head
    dtype_bytes: int  # bytes per parameter of the dtype its config names (2 when it names none)
    text_config: Any


def model_size(name: str, revision: str | None = None) -> ModelSize:
    """Parameter counts of a named model, built from its config on the meta device: no weights are read."""
    spec = resolve(name)
    if spec.source.startswith("builtin:"):
        model: HFModel = adapter_class(spec.model_type).tiny_model(seed=0)
    else:
        from transformers import AutoModelForImageTextToText

        config = _pretrained_config(local_source(spec), revision)
        adapter_class(config.model_type)  # an unsupported family fails here, as it would at loading
        with torch.device("meta"):
            model = AutoModelForImageTextToText.from_config(config)
    adapter = get_adapter(model)
    language = {id(p): p.numel() for part in (adapter.language_model(), adapter.lm_head()) for p in part.parameters()}
    dtype = getattr(model.config, "dtype", None) or getattr(model.config.get_text_config(), "dtype", None)
    dtype_bytes = dtype.itemsize if isinstance(dtype, torch.dtype) else 2
    return ModelSize(
        sum(p.numel() for p in model.parameters()), sum(language.values()), dtype_bytes, adapter.text_config
    )


def parse_max_memory(text: str | None) -> dict[int | str, str] | None:
    """A ``--max-memory`` value (``0=70GiB,1=70GiB,cpu=200GiB``) as accelerate's per-device caps (None: no caps)."""
    if text is None:
        return None
    caps: dict[int | str, str] = {}
    for item in (part.strip() for part in text.split(",") if part.strip()):
        device, _, size = item.partition("=")
        device, size = device.strip(), size.strip()
        if not size or not (device == "cpu" or device.isdigit()):
            raise ModelError(
                f"--max-memory item {item!r}: write DEVICE=SIZE with DEVICE a GPU index or cpu, e.g. 0=70GiB,cpu=200GiB"
            )
        caps[int(device) if device.isdigit() else device] = size
    if not caps:
        raise ModelError("--max-memory is empty; write DEVICE=SIZE items, e.g. 0=70GiB,cpu=200GiB")
    return caps


def replica_memory(
    max_memory: dict[int | str, str] | None, available: dict[int | str, Any], replica: int, replicas: int
) -> dict[int | str, Any] | None:
    """Per-device caps for copy ``replica`` of ``replicas`` on one node: its contiguous, equal group of the GPUs in
    ``available`` (what each device can hold), each at its ``max_memory`` cap or all it has, and the CPU's cap.

    GPUs left over by an uneven split stay unused; without GPUs (or with one copy) the caps are ``max_memory``.
    """
    gpus = sorted(key for key in available if isinstance(key, int))
    if replicas <= 1 or not gpus:
        return max_memory
    if len(gpus) < replicas:
        raise ModelError(
            f"{replicas} processes on this node share {len(gpus)} GPUs with --device auto: each copy of the model "
            f"needs one or more; start at most {len(gpus)} (torchrun --nproc_per_node)"
        )
    width = len(gpus) // replicas
    caps = dict(max_memory or {})
    group = gpus[replica * width : (replica + 1) * width]
    chosen: dict[int | str, Any] = {gpu: caps.get(gpu, available[gpu]) for gpu in group}
    chosen["cpu"] = caps.get("cpu", available.get("cpu", 0))
    return chosen


def load_model(
    name: str,
    *,
    dtype: str = "auto",
    device: str = "cpu",
    attn_implementation: str = "sdpa",
    revision: str | None = None,
    max_memory: dict[int | str, str] | None = None,
    replica: tuple[int, int] = (0, 1),
) -> LoadedModel:
    """Load model, processor and adapter; ``attn_implementation='eager'`` when attention weights are needed.

    ``device`` is a torch device ("cpu", "cuda:0") or "auto" to shard with accelerate's device_map, within
    ``max_memory`` per device when given (what does not fit goes to disk, loaded layer by layer as it runs).
    ``replica`` (index, count) is this process's copy among those on its node: with "auto" each copy shards over its
    own group of the node's GPUs (``replica_memory``).
    """
    if dtype not in DTYPES:
        raise ModelError(f"unknown dtype {dtype!r}; choose one of {', '.join(DTYPES)}")
    check_device(device)
    if max_memory is not None and device != "auto":
        raise ModelError("--max-memory caps what --device auto places on each device; add --device auto")
    if device == "auto" and replica[1] > 1:
        from accelerate.utils import get_max_memory

        max_memory = replica_memory(max_memory, get_max_memory(), *replica)
    spec = resolve(name)
    if spec.source.startswith("builtin:"):
        return _load_tiny(spec, dtype=dtype, device=device, attn_implementation=attn_implementation)
    source = local_source(spec)
    if spec.source.startswith("package:"):
        from analysis.organism import check_organism_files

        check_organism_files(Path(source))
    from transformers import AutoModelForImageTextToText

    config = _pretrained_config(source, revision)
    adapter_class(config.model_type)  # fails before the weights are read when no adapter fits
    # Sharding across devices needs accelerate; a single device is a plain .to() after loading.
    device_kwargs: dict[str, Any] = {"device_map": "auto"} if device == "auto" else {}
    if max_memory is not None:
        device_kwargs.update(max_memory=max_memory, offload_folder=_offload_folder())
    try:
        model: HFModel = AutoModelForImageTextToText.from_pretrained(
            source,
            revision=revision,
            dtype=DTYPES[dtype],
            attn_implementation=attn_implementation,
            **device_kwargs,
        )
        processor = _load_processor(source, revision, model.config.model_type)
    except (OSError, ValueError) as error:
        raise ModelError(f"cannot load {source!r}: {_first_line(error)}") from None
    except ImportError as error:
        # A processor whose library is missing, e.g. num2words for SmolVLM2.
        raise ModelError(
            f"cannot load {source!r}: {_first_line(error)} (pip install the package it names; the README's support "
            "matrix lists what each family needs)"
        ) from None
    if device != "auto":
        model = model.to(device)
    model.eval()
    adapter = get_adapter(model)
    check_image_token(adapter, processor)
    commit = getattr(config, "_commit_hash", None)
    return LoadedModel(model, processor, adapter, name, source, revision or commit)


def _offload_folder() -> str:
    """A temporary folder for the weights accelerate offloads to disk, removed when the process ends."""
    import atexit
    import shutil
    import tempfile

    folder = tempfile.mkdtemp(prefix="analysis-offload-")
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


def check_image_token(adapter: FamilyAdapter, processor: Any) -> None:
    """Fail if the model's image token id is not the processor's image token."""
    tokenizer = getattr(processor, "tokenizer", None)
    if tokenizer is None or not hasattr(processor, "image_token"):
        raise ModelError("the processor has no tokenizer or image token; load the model's own multimodal processor")
    token = adapter.expanded_image_token(processor)
    processor_id = tokenizer.convert_tokens_to_ids(token)
    if processor_id != adapter.image_token_id:
        raise ModelError(
            f"the model's image_token_id {adapter.image_token_id} is not the processor's image token "
            f"{token!r} (id {processor_id}); fix config.image_token_id"
        )


def _load_tiny(spec: ModelSpec, *, dtype: str, device: str, attn_implementation: str) -> LoadedModel:
    """Build a tiny random model of a family in memory (no files, no network)."""
    family = adapter_class(spec.model_type)
    model = family.tiny_model(seed=0)
    model.set_attn_implementation(attn_implementation)
    if dtype != "auto":
        model = model.to(DTYPES[dtype])
    model = model.to("cpu" if device == "auto" else device)
    processor = family.tiny_processor()
    adapter = get_adapter(model)
    check_image_token(adapter, processor)
    return LoadedModel(model, processor, adapter, spec.alias, spec.source, "seed-0")


def _load_processor(source: str, revision: str | None, model_type: str) -> Any:
    """The checkpoint's processor; one of an image-and-video family without torchvision is loaded without its
    video part (images work; videos are not a toolkit input)."""
    from transformers import AutoProcessor

    try:
        return AutoProcessor.from_pretrained(source, revision=revision)
    except (ImportError, OSError) as error:
        # The video part's class needs torchvision, or a folder was saved without the video part.
        message = str(error).lower()
        if not ("torchvision" in message or "video processor" in message) or model_type not in FAMILIES.names():
            raise
    logger.warning("%s: its processor is loaded without the video part (torchvision missing or not saved)", source)
    return hf.load_processor_without_video(source, revision, FAMILIES.get(model_type).video_processor_standin())


def _first_line(error: BaseException) -> str:
    """The first line of an exception message, for one-line errors."""
    text = str(error).strip().splitlines()
    return text[0] if text else type(error).__name__


def list_models() -> dict[str, str]:
    """Alias -> 'source: description' for every registered model."""
    return {
        alias: f"{spec.source} ({spec.model_type}): {spec.description}" for alias, spec in _family_aliases().items()
    }
