"""The documentation stands on its own: README.rst and docs/ name no file outside the released
tree (the developers' ../shared notes) and no path of a developer's machine, and every docs/
page they point to exists."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PAGES = [ROOT / "README.rst", *sorted((ROOT / "docs").glob("*.md"))]


def test_pages_are_found():
    names = {p.name for p in PAGES}
    assert {"README.rst", "ARCHITECTURE.md", "CONFIGURATION.md", "POP3.md",
            "SUBMISSION.md"} <= names


def test_no_reference_outside_the_tree_or_to_a_machine_path():
    hits = []
    for page in PAGES:
        for number, line in enumerate(page.read_text().splitlines(), 1):
            for needle in ("../shared", "/work/"):
                if needle in line:
                    hits.append(f"{page.relative_to(ROOT)}:{number}: {needle}")
    assert hits == []


def test_docs_pages_named_in_the_docs_exist():
    named = set()
    for page in PAGES:
        named |= set(re.findall(r"(?<![\w/.])((?:[a-z]+/)?[A-Z][A-Z0-9_]+\.md)\b",
                                page.read_text()))
    assert "docs/CONFIGURATION.md" in named
    # "docs/X.md" and "benchmarks/README.md" from the top of the tree; a bare "X.md" is a page
    # of docs/ (the pages name each other that way).
    missing = sorted(n for n in named
                     if not (ROOT / n).exists() and not (ROOT / "docs" / n).exists())
    assert missing == []
