"""The README stays a user's guide (issue #25): short, the two set-up commands, and links that lead somewhere.

Everything else lives in docs/ and CHANGELOG.md; these tests check that every relative link in those
pages (and the README) names a file that exists and, when it has an anchor, a heading that file has.
"""
from __future__ import annotations

import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
README = ROOT / "README.md"
#: "at most about 200 lines" (issue #25), with a little room for an edit that does not add a section.
MAX_README_LINES = 220
#: The two set-up commands on a fresh machine, as CI and scripts/dev.sh know them.
SETUP_COMMANDS = ["bash scripts/dev.sh demo --out outputs/demo", "bash scripts/dev.sh test"]
LINK = re.compile(r"!?\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.S | re.M)
HEADING = re.compile(r"^#{1,6}\s+(.+?)\s*#*\s*$", re.M)


def pages() -> list[Path]:
    """The Markdown pages a user reads: the README, the changelog and docs/."""
    return [README, ROOT / "CHANGELOG.md", *sorted((ROOT / "docs").glob("*.md"))]


def slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens (see the test below)."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def anchors(page: Path) -> set[str]:
    """Every anchor a Markdown page defines through its headings (repeated headings get -1, -2, ... as on GitHub)."""
    seen: dict[str, int] = {}
    out = set()
    for heading in HEADING.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        base = slug(heading)
        count = seen.get(base, 0)
        seen[base] = count + 1
        out.add(base if count == 0 else f"{base}-{count}")
    return out


def broken_links(page: Path, root: Path = ROOT) -> list[str]:
    """Relative links in ``page`` (outside code blocks) whose file or heading anchor does not exist."""
    broken = []
    for target in LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8"))):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target):  # https:, mailto: ...: not a file of this repository
            continue
        path_part, _, anchor = target.partition("#")
        resolved = (page.parent / path_part).resolve() if path_part else page
        where = f"{page.relative_to(root)}: ({target})"
        if not resolved.exists():
            broken.append(f"{where} names {resolved}, which does not exist")
        elif anchor and resolved.suffix == ".md" and anchor not in anchors(resolved):
            broken.append(f"{where} names heading #{anchor}, which {resolved.name} does not have")
    return broken


def test_slug_follows_github() -> None:
    # GitHub's rule: lower case, punctuation other than "-" and "_" dropped (the en dash too), spaces to hyphens
    assert slug("Speed for batches: `bench batch`") == "speed-for-batches-bench-batch"
    assert slug("H1–H5") == "h1h5"
    assert slug("Nodes (category `fragments`)") == "nodes-category-fragments"


def test_readme_is_short() -> None:
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= MAX_README_LINES, (
        f"README.md has {len(lines)} lines, expected at most {MAX_README_LINES}: move reference material to docs/")


def test_readme_has_exactly_the_two_setup_commands() -> None:
    text = README.read_text(encoding="utf-8")
    commands = [line.split("#")[0].strip() for line in text.splitlines() if line.startswith("bash scripts/dev.sh")]
    assert commands == SETUP_COMMANDS, f"README.md set-up commands: expected {SETUP_COMMANDS}, found {commands}"
    # the jobs exist in the script, and CI runs the second command as written
    jobs = re.search(r"^\s*([\w|]+)\)\s*;;", (ROOT / "scripts" / "dev.sh").read_text(), re.M)
    assert jobs is not None and set(jobs.group(1).split("|")) == {"demo", "test"}, "scripts/dev.sh: jobs demo|test"
    assert SETUP_COMMANDS[1] in (ROOT / ".ci" / "run").read_text().splitlines(), ".ci/run must run the README's command 2"


@pytest.mark.parametrize("page", pages(), ids=lambda p: str(p.relative_to(ROOT)))
def test_every_relative_link_leads_somewhere(page: Path) -> None:
    assert page.is_file(), f"{page} is missing"
    # an unclosed code fence would hide the rest of the page from the link check (and from the reader)
    fences = [line for line in page.read_text(encoding="utf-8").splitlines() if line.startswith("```")]
    assert len(fences) % 2 == 0, f"{page.relative_to(ROOT)}: a code block is not closed"
    assert broken_links(page) == []


def test_a_planted_broken_link_is_reported(tmp_path: Path) -> None:
    """Control for the link test: a missing file and a missing heading are both caught; good links are not."""
    (tmp_path / "other.md").write_text("# A heading: `with code`\n\n## Twice\n\n## Twice\n")
    page = tmp_path / "page.md"
    page.write_text("[ok](other.md#a-heading-with-code) [ok2](other.md#twice-1) [web](https://example.org/x)\n"
                    "```\n[in code](nowhere.md)\n```\n"
                    "[gone](missing.md) [bad anchor](other.md#no-such-heading) ![img](images/none.png)\n")
    found = broken_links(page, root=tmp_path)
    assert len(found) == 3, found
    assert "missing.md" in found[0] and "#no-such-heading" in found[1] and "none.png" in found[2]
