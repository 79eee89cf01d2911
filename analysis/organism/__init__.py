"""The model organism: a small LLaVA-1.5 look-alike trained on ShapesVQA and shipped with the package.

It loads offline like any hub LLaVA: ``AutoProcessor.from_pretrained(ORGANISM_DIR)`` and
``AutoModelForImageTextToText.from_pretrained(ORGANISM_DIR)``. ``python -m analysis.organism.train`` makes it.
"""

from __future__ import annotations

from pathlib import Path

from analysis.errors import ModelError

ORGANISM_DIR = Path(__file__).parent / "weights"
# The LLaVA-1.5-regime organism: 576 image tokens (88% of its prompts) into a 16-layer decoder.
ORGANISM_576_DIR = Path(__file__).parent / "weights-576"
WEIGHTS_NAME = "model.safetensors"
REQUIRED_FILES = ("config.json", WEIGHTS_NAME)


def check_organism_files(path: Path | str = ORGANISM_DIR) -> None:
    """Raise ModelError unless ``path`` holds a config and a complete, readable, finite ``model.safetensors``."""
    import torch
    from safetensors import SafetensorError, safe_open

    folder = Path(path)
    fix = f"retrain it with `python -m analysis.organism.train --out {folder}` or reinstall the package"
    for name in REQUIRED_FILES:
        if not (folder / name).is_file():
            raise ModelError(f"the model organism has no {name} in {folder}; {fix}")
    weights = folder / WEIGHTS_NAME
    try:
        with safe_open(weights, framework="pt") as handle:
            names = list(handle.keys())
            # Reading every tensor catches truncation; a Git LFS pointer or garbage fails at the header.
            bad = [name for name in names if not bool(torch.isfinite(handle.get_tensor(name)).all())]
    except (SafetensorError, OSError, ValueError, RuntimeError) as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise ModelError(f"the model organism's {weights} is corrupted ({reason}); {fix}") from None
    if not names or bad:
        detail = f"non-finite tensor {bad[0]}" if bad else "no tensors"
        raise ModelError(f"the model organism's {weights} is corrupted ({detail}); {fix}")
