"""The documentation holds together: no numbered work periods in any tracked file (history lives in git log),
and every relative link in README.md and docs/ points at a file that exists."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
# written with \s so that this file does not match itself
NUMBERED_PERIOD = re.compile(r"\bsession\s[0-9]", re.IGNORECASE)
FENCED = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
INLINE_CODE = re.compile(r"`[^`\n]*`")
LINK = re.compile(r"!?\[[^\]\n]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
REFERENCE = re.compile(r"^\s*\[[^\]\n]+\]:\s*<?(\S+?)>?(?:\s+\"[^\"]*\")?\s*$", re.M)
HTML_REF = re.compile(r"""<(?:a|img)\b[^>]*?\b(?:href|src)\s*=\s*["']([^"']+)["']""", re.I)


def tracked_files() -> list[Path]:
    try:
        done = subprocess.run(
            ["git", "ls-files", "-z"], cwd=ROOT, capture_output=True, check=True, timeout=60
        )
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout")
    return [ROOT / name for name in done.stdout.decode().split("\0") if name]


def text_of(path: Path) -> str | None:
    """The file's text, or None for a binary file (a NUL byte, or not UTF-8) or one that is not there."""
    try:
        raw = path.read_bytes()
    except (FileNotFoundError, IsADirectoryError):
        return None
    if b"\0" in raw[:8192]:
        return None
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError:
        return None


def test_no_numbered_work_periods_in_tracked_files():
    hits = []
    for path in tracked_files():
        text = text_of(path)
        if text is None:
            continue
        for n, line in enumerate(text.splitlines(), 1):
            if NUMBERED_PERIOD.search(line):
                hits.append(f"{path.relative_to(ROOT)}:{n}: {line.strip()[:120]}")
    assert not hits, "history belongs in git log, not in the project:\n" + "\n".join(hits)


def markdown_files() -> list[Path]:
    return [ROOT / "README.md", *sorted((ROOT / "docs").rglob("*.md"))]


def relative_links(text: str) -> list[str]:
    """Link targets of a markdown text outside code (inline, reference-style and HTML), fragments dropped;
    links with a scheme (https:, mailto:) and same-page anchors left out."""
    text = INLINE_CODE.sub("", FENCED.sub("", text))
    targets = LINK.findall(text) + REFERENCE.findall(text) + HTML_REF.findall(text)
    out = []
    for target in targets:
        if target.startswith("#") or re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):
            continue
        path = target.split("#", 1)[0].split("?", 1)[0]
        if path:
            out.append(path)
    return out


def test_link_parser_finds_what_it_should():
    text = (
        'see [a](docs/a.md#x), ![img](b.png "t"), [web](https://x.org), [here](#top)\n'
        '`[code](not/a/link.md)`\n```\n[fenced](nor/this.md)\n```\n[ref]: c/d.md\n<img src="e.png">\n'
    )
    assert relative_links(text) == ["docs/a.md", "b.png", "c/d.md", "e.png"]


@pytest.mark.parametrize("doc", markdown_files(), ids=lambda p: str(p.relative_to(ROOT)))
def test_relative_links_point_at_existing_files(doc):
    missing = [t for t in relative_links(doc.read_text()) if not (doc.parent / t).exists()]
    assert not missing, f"{doc.relative_to(ROOT)} links to missing files: {missing}"
