"""The README's Quickstart is what CI runs."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _quickstart_commands() -> list[str]:
    """The shell commands of the README's Quickstart code block."""
    text = (ROOT / "README.md").read_text()
    section = text.split("## Quickstart", 1)[1].split("\n## ", 1)[0]
    block = re.search(r"```bash\n(.*?)```", section, re.S)
    assert block, "Quickstart needs a ```bash block"
    return [line for line in block.group(1).splitlines() if line.strip() and not line.startswith("#")]


def test_quickstart_has_two_commands_and_ci_runs_the_second() -> None:
    """Exactly two commands; .ci/run contains the test command verbatim."""
    commands = _quickstart_commands()
    assert len(commands) == 2
    assert commands[1] in (ROOT / ".ci" / "run").read_text()
    assert "analysis.trace" in commands[0] and "pytest" in commands[1]


def test_the_api_example_runs(tmp_path: Path, monkeypatch) -> None:
    """The README's Python API block runs as written (its image and run folder made first)."""
    from PIL import Image

    from analysis.trace.run import TraceConfig, run_trace

    text = (ROOT / "README.md").read_text()
    block = re.search(r"## Python API\n\n```python\n(.*?)```", text, re.S)
    assert block, "the README needs a Python API block"
    monkeypatch.chdir(tmp_path)
    Image.new("RGB", (112, 112), "red").save("scene.png")
    (tmp_path / "configs").symlink_to(ROOT / "configs")
    run_trace(TraceConfig(limit=2, device="cpu", max_new_tokens=1), progress=False)  # the run the block reads
    namespace: dict[str, object] = {}
    exec(compile(block.group(1), "README.md", "exec"), namespace)
    assert {"mass", "probes", "run", "answer"} <= set(namespace)
    assert len(namespace["mass"]) == 12 * 3  # the organism's layers x key regions
