"""The README stays a five-minute read that links every docs/ page; links between the pages resolve (files and
#anchors, as GitHub renders headings); every `make <target>` the pages name is a Makefile target."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from conftest import ROOT

README = ROOT / "README.md"
DOCS = sorted((ROOT / "docs").glob("*.md"))
PAGES = [README, *DOCS]
LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)\)")
FENCE = re.compile(r"^```.*?^```", re.M | re.S)


def links(page: Path) -> list[str]:
    return LINK.findall(FENCE.sub("", page.read_text(encoding="utf-8")))


def anchors(page: Path) -> set[str]:
    """GitHub's heading ids: lower case, punctuation dropped except - and _, each space a hyphen."""
    headings = re.findall(r"^#{1,6} (.+)$", FENCE.sub("", page.read_text(encoding="utf-8")), re.M)
    return {re.sub(r"[^\w\- ]", "", h.strip().lower()).replace(" ", "-") for h in headings}


def test_readme_is_short_and_links_every_docs_page():
    lines = README.read_text(encoding="utf-8").splitlines()
    assert len(lines) <= 200, f"README.md has {len(lines)} lines: move detail into a docs/ page"
    linked = {(README.parent / target.split("#")[0]).resolve() for target in links(README)}
    assert DOCS and not [p.name for p in DOCS if p.resolve() not in linked], "docs/ pages the README does not link"


def test_readme_keeps_the_two_commands():
    block = re.search(r"## The two commands\n.*?```bash\n(.*?)```", README.read_text(encoding="utf-8"), re.S)
    assert block, "README: the 'The two commands' section with its bash block"
    commands = [line.split("#")[0].strip() for line in block.group(1).splitlines()]
    assert commands[:2] == ["make repro", "make test"], commands


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_relative_links_resolve(page):
    bad = []
    for target in links(page):
        if re.match(r"[a-z]+:", target):  # https:, mailto:
            continue
        path, _, anchor = target.partition("#")
        file = (page.parent / path).resolve() if path else page
        if not file.exists():
            bad.append(f"{target}: no such file")
        elif anchor and file.suffix == ".md" and anchor not in anchors(file):
            bad.append(f"{target}: no heading #{anchor} in {file.relative_to(ROOT)}")
    assert not bad, f"{page.relative_to(ROOT)}: {bad}"


def test_named_make_targets_exist():
    targets = set(re.findall(r"^([a-z][a-z-]*):", (ROOT / "Makefile").read_text(), re.M))
    named = {m for page in PAGES
             for m in re.findall(r"(?:`|^\s*)make ([a-z][a-z-]*)", page.read_text(encoding="utf-8"), re.M)}
    assert {"repro", "test", "verify"} <= named
    assert not named - targets, f"make targets the docs name but the Makefile lacks: {sorted(named - targets)}"
