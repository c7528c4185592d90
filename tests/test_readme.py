"""The README stays true and short: its metric table matches the code, its commands are the ones CI runs,
it fits on a page, and its links and those of docs/ lead to pages that exist."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from mfumon.metrics import METRIC_KEYS

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()
DOCS = sorted((ROOT / "docs").glob("*.md"))
MAX_README_LINES = 250  # a front door: what it is, two commands, three front ends, metrics, links

_FENCED = re.compile(r"^```.*?^```", flags=re.S | re.M)
_CODE_SPAN = re.compile(r"`[^`\n]*`")
_INLINE_LINK = re.compile(r"\[[^\]]*\]\(([^)\s]+)(?:\s+\"[^\"]*\")?\)")
_REFERENCE_LINK = re.compile(r"^\s*\[[^\]]+\]:\s*(\S+)", flags=re.M)
_EXTERNAL = re.compile(r"^[a-z][a-z0-9+.-]*:", flags=re.I)  # https:, mailto:, ...


def relative_links(markdown: str) -> list[str]:
    """Targets of the Markdown links in `markdown` that are not URLs; code blocks and spans are not text."""
    text = _CODE_SPAN.sub("code", _FENCED.sub("", markdown))
    targets = _INLINE_LINK.findall(text) + _REFERENCE_LINK.findall(text)
    return [t for t in targets if not _EXTERNAL.match(t)]


def test_metric_table_matches_the_keys_in_code() -> None:
    rows = dict(re.findall(r"^\| `(mfumon/[a-z_]+)` \| (.+) \|$", README, flags=re.M))
    assert rows == METRIC_KEYS


def test_ci_runs_exactly_the_readme_test_command() -> None:
    block = re.search(r"<!-- test-command -->\n```bash\n(.+?)\n```", README, flags=re.S)
    assert block is not None
    extracted = subprocess.run(
        [
            "awk",
            r"/<!-- test-command -->/{f=1; next} f && /^```bash/{g=1; next} g && /^```/{exit} g{print}",
            "README.md",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout.strip()
    assert extracted == block.group(1).strip()
    assert "awk '/<!-- test-command -->/" in (ROOT / ".ci" / "run").read_text()
    assert "pytest" in extracted and "pip install" in extracted


def test_example_command_runs_the_main_example() -> None:
    block = re.search(r"<!-- example-command -->\n```bash\n(.+?)\n```", README, flags=re.S)
    assert block is not None and "python examples/train_tiny_gpt.py" in block.group(1)


def test_readme_fits_on_a_page() -> None:
    lines = len(README.splitlines())
    assert lines < MAX_README_LINES, f"README.md has {lines} lines; move depth into docs/"


def test_relative_links_lead_to_existing_files_without_anchors() -> None:
    pages = [ROOT / "README.md", *DOCS]
    assert len(pages) > 1, "docs/ has no pages"
    checked, broken = 0, []
    for page in pages:
        for target in relative_links(page.read_text()):
            checked += 1
            where = f"{page.relative_to(ROOT)} -> {target}"
            if "#" in target:
                broken.append(f"{where}: link to the page, not an anchor (anchors break silently)")
            elif not (page.parent / target).is_file():
                broken.append(f"{where}: no such file")
    assert checked > len(DOCS), "found too few links: is relative_links() still reading them?"
    assert broken == []


def test_every_docs_page_is_linked_from_the_readme_documentation_section() -> None:
    section = re.search(r"^## Documentation\n(.*?)(?=^## |\Z)", README, flags=re.S | re.M)
    assert section is not None, "README.md has a '## Documentation' section"
    linked = {(ROOT / target).resolve() for target in relative_links(section.group(1))}
    unlinked = [page.name for page in DOCS if page.resolve() not in linked]
    assert DOCS and unlinked == []


def test_every_docs_page_says_what_it_covers_and_links_back() -> None:
    for page in DOCS:
        title, first_paragraph = page.read_text().strip().split("\n\n", 2)[:2]
        assert title.startswith("# "), f"{page.name}: starts with its title"
        assert "\n" not in first_paragraph, f"{page.name}: what it covers, in one line"
        assert "../README.md" in relative_links(first_paragraph), f"{page.name}: links back to the README"
