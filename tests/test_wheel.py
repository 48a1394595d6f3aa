"""Issue #29, item 8: a normal (non-editable) wheel holds the whole package and works from a clean venv.

The wheel is built once per session, offline (``pip wheel --no-deps --no-build-isolation --no-index``
with the venv's own setuptools, which ``scripts/dev.sh`` installs), from a copy of the source so the
checkout gets no ``build/`` or ``*.egg-info``.  It is installed into a fresh venv that sees the test
venv's site-packages (torch, safetensors, ...) through a ``.pth`` line; such a line only adds a folder
to ``sys.path`` and does not run that folder's ``.pth`` files, so the test venv's editable install of
this checkout is not active there, and ``prompt_fragments.__file__`` is checked to lie in the new venv.
"""
from __future__ import annotations

import importlib.util
import json
import os
import shutil
import site
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from prompt_fragments.fragment.format.store import save_fragment
from prompt_fragments.fragment.library.sharing import pack

from test_library import synthetic

ROOT = Path(__file__).resolve().parent.parent
PKG = "prompt_fragments"
# Not part of the installed package: tests, developer tools and scripts run by path, and the documentation
# (none has an __init__.py).
NOT_INSTALLED = {"tests", "tools", "scripts", "docs"}
# Build and run-time leftovers a working tree may hold; never copied into the build.
LEFTOVERS = {".git", ".venv", "build", "dist", "__pycache__", ".pytest_cache", ".hypothesis", "outputs", "reports",
             ".cache", ".whl", ".gl"}
# Root files that belong to the repository, not the installed package (LICENSE goes into the wheel's dist-info).
REPO_ONLY_ROOT_FILES = {"README.md", "CHANGELOG.md", "LICENSE", "pyproject.toml", "requirements.txt", "requirements-test.txt",
                        ".gitignore"}
# Import needs ComfyUI (nodes: its __init__ imports comfy; judge.comfy, the judge inside ComfyUI) or runs the CLI on import (__main__: run below instead).
NOT_IMPORTED = {f"{PKG}.nodes", f"{PKG}.judge.comfy", f"{PKG}.__main__"}


def source_files() -> list[Path]:
    """The checkout's files relative to ROOT: git's tracked and not-ignored ones, or a walk skipping LEFTOVERS."""
    try:
        out = subprocess.run(["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"], cwd=ROOT,
                             capture_output=True, check=True).stdout.decode()
        files = [Path(p) for p in out.split("\0") if p]
    except (OSError, subprocess.CalledProcessError):  # not a git checkout (an unpacked tarball)
        files = [p.relative_to(ROOT) for p in ROOT.rglob("*") if p.is_file()]
    return sorted(p for p in files if (ROOT / p).is_file() and not (set(p.parts) & LEFTOVERS)
                  and not any(part.endswith(".egg-info") for part in p.parts))


def package_files(files: list[Path]) -> list[Path]:
    """The files that belong to the installed package."""
    return [p for p in files if p.parts[0] not in NOT_INSTALLED and not p.parts[0].startswith(".")
            and not (len(p.parts) == 1 and p.name in REPO_ONLY_ROOT_FILES)]


def module_name(rel: Path) -> str:
    parts = list(rel.with_suffix("").parts)
    if parts[-1] == "__init__":
        parts = parts[:-1]
    return ".".join([PKG, *parts])


def run(cmd: list[str], **kwargs) -> subprocess.CompletedProcess:
    result = subprocess.run(cmd, capture_output=True, text=True, **kwargs)
    assert result.returncode == 0, f"{cmd} exit {result.returncode}\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    return result


@pytest.fixture(scope="session")
def wheel(tmp_path_factory) -> Path:
    if importlib.util.find_spec("setuptools") is None:
        pytest.fail("setuptools is not in the test venv: the wheel is built without build isolation (no download); "
                    "bash scripts/dev.sh installs it")
    src = tmp_path_factory.mktemp("wheel-src") / "src"
    for rel in source_files():
        (src / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(ROOT / rel, src / rel)
    out = tmp_path_factory.mktemp("wheel-out")
    run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "--no-index", "-q", "-w", str(out), str(src)])
    (found,) = out.glob("prompt_fragments-*.whl")
    return found


@pytest.fixture(scope="session")
def clean_venv(wheel: Path, tmp_path_factory) -> tuple[Path, dict[str, str]]:
    """A new venv with the wheel installed; (its bin folder, the environment to run it in)."""
    venv = tmp_path_factory.mktemp("clean-venv") / "venv"
    run([sys.executable, "-m", "venv", "--without-pip", str(venv)])
    python = venv / "bin" / "python"
    run([sys.executable, "-m", "pip", "--python", str(python), "install", "--no-deps", "--no-index", "--no-compile", "-q",
         str(wheel)])
    purelib = Path(run([str(python), "-c", "import sysconfig; print(sysconfig.get_paths()['purelib'])"]).stdout.strip())
    # The test venv's libraries, after the new venv's own site-packages on sys.path.
    (purelib / "zz_test_venv_libraries.pth").write_text("\n".join(site.getsitepackages()) + "\n")
    env = {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "PYTHONHOME", "PYTHONSTARTUP", "PYTHONSAFEPATH")}
    return venv / "bin", env


def test_pyproject_lists_every_package_folder() -> None:
    # Fast, without a build: every folder with .py files is a package (has __init__.py) and is listed.
    tomllib = pytest.importorskip("tomllib", reason="reading pyproject.toml needs Python 3.11 (the wheel tests below still run)")
    config = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    files = package_files(source_files())
    folders = {p.parent for p in files if p.suffix == ".py"}
    assert all((ROOT / f / "__init__.py").is_file() for f in folders), sorted(map(str, folders))
    assert sorted(config["packages"]) == sorted(module_name(f / "__init__.py") for f in folders)
    assert config["package-dir"] == {PKG: "."}


def test_the_wheel_holds_every_module_and_data_file(wheel: Path) -> None:
    names = set(zipfile.ZipFile(wheel).namelist())
    inside = {n for n in names if n.startswith(f"{PKG}/")}
    expected = {f"{PKG}/{p.as_posix()}" for p in package_files(source_files())}
    assert sorted(expected - inside) == [], "missing from the wheel"
    assert sorted(inside - expected) == [], "in the wheel but not in the package (tests/, tools/, scripts/, leftovers?)"
    # what e89ab0b's wheel left out, by name, in case the source listing above ever came back empty
    for data in ("fragment/format/manifest_schema.json", "fragment/format/__init__.py", "fragment/library/__init__.py",
                 "fragment/surgery/__init__.py", "fragment/schedule/__init__.py", "bench/__init__.py", "thresholds.yaml",
                 "reference/weights/reference.safetensors", "workflows/full_pipeline.json", "workflows/api/full_pipeline.json", "web/fragments_text.js"):
        assert f"{PKG}/{data}" in names, data
    assert not any(n.split("/")[0] in NOT_INSTALLED for n in names)


def test_the_installed_wheel_imports_every_module_and_finds_its_data(clean_venv, tmp_path: Path) -> None:
    bin_dir, env = clean_venv
    script = f"""
import importlib, json, pkgutil, sys
from pathlib import Path
import prompt_fragments
root = Path(prompt_fragments.__file__).parent
def walk(folder, prefix):
    for info in sorted(pkgutil.iter_modules([str(folder)]), key=lambda i: i.name):
        name = prefix + info.name
        if name in {sorted(NOT_IMPORTED)!r}:
            continue
        yield name
        if info.ispkg:
            yield from walk(folder / info.name, name + ".")
modules = ["prompt_fragments", *walk(root, "prompt_fragments.")]
failed = {{}}
for name in modules:
    try:
        importlib.import_module(name)
    except Exception as exc:
        failed[name] = repr(exc)
from prompt_fragments.fragment.format.untrusted import SCHEMA_FILE
from prompt_fragments.defaults import DEFAULT_THRESHOLDS
from prompt_fragments.reference.model import load_reference
unet = load_reference().unet
print(json.dumps({{"file": prompt_fragments.__file__, "prefix": sys.prefix, "modules": modules, "failed": failed,
                  "schema": str(SCHEMA_FILE), "schema_ok": SCHEMA_FILE.is_file(), "thresholds_ok": DEFAULT_THRESHOLDS.is_file(),
                  "unet_params": sum(p.numel() for p in unet.parameters())}}))
"""
    report = json.loads(run([str(bin_dir / "python"), "-c", script], cwd=tmp_path, env=env).stdout.strip().splitlines()[-1])
    prefix = Path(report["prefix"]).resolve()
    assert Path(report["file"]).resolve().is_relative_to(prefix), report["file"]  # the wheel, not this checkout
    assert not Path(report["file"]).resolve().is_relative_to(ROOT)
    assert report["failed"] == {}
    expected = sorted(module_name(p) for p in package_files(source_files()) if p.suffix == ".py")
    expected = [m for m in expected if not any(m == n or m.startswith(n + ".") for n in NOT_IMPORTED)]
    assert sorted(report["modules"]) == expected
    assert report["schema_ok"] and report["thresholds_ok"] and Path(report["schema"]).resolve().is_relative_to(prefix)
    assert report["unet_params"] > 0


def test_the_installed_command_runs_help_and_verify(clean_venv, tmp_path: Path) -> None:
    bin_dir, env = clean_venv
    cli = str(bin_dir / "prompt-fragments")
    help_text = run([cli, "--help"], cwd=tmp_path, env=env).stdout
    assert "usage: prompt-fragments" in help_text and "verify" in help_text
    packed = pack(save_fragment(synthetic("wheeldog"), tmp_path / "frag"), tmp_path / "wheeldog.fragment.safetensors")
    result = run([cli, "verify", str(packed)], cwd=tmp_path, env=env)
    assert result.stdout.startswith("OK") and "wheeldog" in result.stdout, result.stdout
    # python -m prompt_fragments (the __main__ module the import walk leaves out) is the same command
    assert "usage: prompt-fragments" in run([str(bin_dir / "python"), "-m", PKG, "--help"], cwd=tmp_path, env=env).stdout
