"""The README and docs/ as a reader meets them: every local link and picture they name exists, and every example
workflow has its row in the README's gallery with its screenshot (no ComfyUI needed)."""
from __future__ import annotations

import re
from pathlib import Path

import pytest

from atelier_testlib import ROOT

DOCS = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").glob("*.md"))]
# Markdown links/images ](target) and HTML src="target" / href="target".
LINK = re.compile(r"\]\(([^)\s]+)\)|(?:src|href)=\"([^\"]+)\"")


def _local_targets(doc: Path) -> list[str]:
    text = doc.read_text(encoding="utf-8")
    text = re.sub(r"```.*?```", "", text, flags=re.S)  # code blocks are not links
    out = []
    for m in LINK.finditer(text):
        target = (m.group(1) or m.group(2)).split("#", 1)[0]
        if target and not re.match(r"^[a-z][a-z0-9+.-]*:", target):  # http:, mailto:, …
            out.append(target)
    return out


@pytest.mark.parametrize("doc", DOCS, ids=lambda p: p.relative_to(ROOT).as_posix())
def test_every_local_link_and_picture_exists(doc):
    missing = [t for t in _local_targets(doc) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} names files that do not exist: {missing}"


def test_every_example_workflow_has_a_gallery_row_with_its_picture():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    rows = {m.group(2): m.group(1) for m in re.finditer(
        r"^\| (.*?) \| `([A-Za-z0-9_]+)\.json` —", readme, flags=re.M)}
    problems = []
    for wf in sorted((ROOT / "workflows").glob("*.json")):
        cell = rows.get(wf.stem)
        if cell is None:
            problems.append(f"{wf.name}: no row in the README gallery")
        elif f'src="docs/gallery/{wf.stem}.png"' not in cell:
            problems.append(f"{wf.name}: its gallery row shows no docs/gallery/{wf.stem}.png ({cell!r})")
        elif not (ROOT / "docs" / "gallery" / f"{wf.stem}.png").is_file():
            problems.append(f"{wf.name}: docs/gallery/{wf.stem}.png is missing")
    stale = sorted(set(rows) - {wf.stem for wf in (ROOT / "workflows").glob("*.json")})
    assert not problems and not stale, (problems, f"gallery rows of workflows that do not exist: {stale}")
