"""The pack installs as `prompt_fragments`, runs as a command, and its core never imports ComfyUI."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parent.parent


def _run(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run(args, cwd=cwd, capture_output=True, text=True, timeout=300)


def test_core_imports_without_comfy(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "import prompt_fragments\n"
        "import prompt_fragments.profiling.profiler, prompt_fragments.profiling.scoring, prompt_fragments.profiling.anatomy\n"
        "import prompt_fragments.fragment.format.store, prompt_fragments.fragment.export, prompt_fragments.metrics\n"
        "print(sorted(m for m in sys.modules if m == 'comfy' or m.startswith(('comfy.', 'diffusers', 'transformers'))))\n"
        "print(prompt_fragments.NODE_CLASS_MAPPINGS)\n"
    )
    result = _run(sys.executable, "-c", code, cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.splitlines() == ["[]", "{}"]


def test_python_dash_m_and_console_script(tmp_path: Path) -> None:
    result = _run(sys.executable, "-m", "prompt_fragments", "anatomy", "--arch", "sd15", "--json", cwd=tmp_path)
    assert result.returncode == 0, result.stderr
    assert json.loads(result.stdout)["arch"] == "sd15"
    script = shutil.which("prompt-fragments", path=str(Path(sys.executable).parent))
    assert script, "pip install -e . must provide the prompt-fragments console script"
    result = _run(script, "anatomy", "--arch", "sdxl", cwd=tmp_path)
    assert result.returncode == 0 and "feed_forward" in result.stdout


@pytest.mark.parametrize(
    ("command", "file_name", "content"),
    [
        ("verify", "corrupt.fragment.safetensors", b"not a safetensors file"),  # a damaged download
        ("pack", "truncated.json", b'{"name": '),  # a manifest cut off mid-write
        ("pack", "missing.json", None),  # a path that does not exist
    ],
)
def test_known_errors_are_one_line_not_a_traceback(tmp_path: Path, command: str, file_name: str, content: bytes | None) -> None:
    # Arguments argparse accepts, so the failure is a FragmentError raised by the command and
    # handled by cli.main; argparse's own errors also exit 2 but never reach that path.
    path = tmp_path / file_name
    if content is not None:
        path.write_bytes(content)
    result = _run(sys.executable, "-m", "prompt_fragments", command, str(path), cwd=tmp_path)
    assert "Traceback" not in result.stderr, result.stderr
    lines = result.stderr.splitlines()
    assert len(lines) == 1, f"expected one line on stderr, got:\n{result.stderr}"
    assert lines[0].startswith("prompt-fragments: error: ") and str(path) in lines[0], lines[0]
    assert result.returncode == 2 and result.stdout == ""


@pytest.mark.parametrize("name", ["LICENSE", "requirements.txt", "pyproject.toml", "README.md"])
def test_release_files_exist(name: str) -> None:
    text = (REPO / name).read_text()
    if name == "LICENSE":
        assert "Apache License" in text and "Version 2.0" in text
    if name == "requirements.txt":
        assert not any(line.strip().startswith("torch") for line in text.splitlines()), "never pin torch for ComfyUI users"
        # the reference model and the demo need these; ComfyUI users of the nodes must not have to install them
        assert not any(line.strip().startswith(("diffusers", "transformers")) for line in text.splitlines())
