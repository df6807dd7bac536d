"""The documentation stays true to the repository: the config page is what the schema renders, every
relative link in README.md, ARCHITECTURE.md and docs/ points at a file (and heading) that exists, the
README stays a short front door, and its test command is the one CI runs."""

from __future__ import annotations

import re
from pathlib import Path

from hierdino.config.docs import COMMAND, render

ROOT = Path(__file__).resolve().parent.parent
PAGES = [ROOT / "README.md", ROOT / "ARCHITECTURE.md", *sorted((ROOT / "docs").rglob("*.md"))]
LINK = re.compile(r"!?\[[^\]]*\]\(\s*<?([^)\s>]+)>?(?:\s+\"[^\"]*\")?\s*\)")
FENCE = re.compile(r"^(```|~~~).*?^\1", re.S | re.M)
CODE_SPAN = re.compile(r"`[^`\n]*`")


def test_configuration_page_is_generated_from_the_schema():
    page = ROOT / "docs" / "configuration.md"
    assert page.read_text() == render(), f"docs/configuration.md is stale: run `{COMMAND}`"


def test_configuration_page_lists_every_key():
    from hierdino.config.schema import Config

    def keys(obj, prefix=""):
        for name, value in vars(obj).items():
            if hasattr(value, "__dataclass_fields__"):
                yield from keys(value, f"{prefix}{name}.")
            else:
                yield f"{prefix}{name}"

    text = render()
    missing = [k for k in keys(Config()) if f"| `{k}` |" not in text]
    assert not missing, f"keys without a row: {missing}"


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower().replace("`", ""))
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    seen: dict[str, int] = {}
    out = set()
    for m in re.finditer(r"^#{1,6}\s+(.*?)\s*#*\s*$", text, re.M):
        slug = _slug(m.group(1))
        n = seen.get(slug, 0)
        seen[slug] = n + 1
        out.add(slug if n == 0 else f"{slug}-{n}")
    return out


def _links(page: Path) -> list[str]:
    text = CODE_SPAN.sub("", FENCE.sub("", page.read_text()))
    return [m.group(1) for m in LINK.finditer(text)]


def test_relative_links_resolve():
    broken = []
    for page in PAGES:
        for target in _links(page):
            if re.match(r"^[a-z][a-z0-9+.-]*:", target, re.I):  # http:, https:, mailto:
                continue
            path, _, anchor = target.partition("#")
            dest = (page.parent / path).resolve() if path else page
            where = f"{page.relative_to(ROOT)}: {target}"
            if not dest.exists():
                broken.append(f"{where} (no such file)")
            elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                broken.append(f"{where} (no heading #{anchor})")
    assert not broken, "broken links:\n" + "\n".join(broken)


def test_link_checker_sees_a_broken_link(tmp_path):
    page = tmp_path / "page.md"
    page.write_text("# A title\n\n[ok](#a-title) [gone](missing.md) `[not a link](nowhere.md)`\n\n"
                    "```\n[in code](nowhere.md)\n```\n")
    assert _links(page) == ["#a-title", "missing.md"]
    assert _anchors(page) == {"a-title"}


def test_readme_is_a_short_front_door():
    lines = (ROOT / "README.md").read_text().splitlines()
    assert len(lines) <= 150, f"README.md has {len(lines)} lines; move the detail into docs/"


def test_readme_test_command_is_the_one_ci_runs():
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    marker = next(i for i, line in enumerate(ci) if "README test command" in line)
    command = ci[marker + 1].strip()
    assert command in (ROOT / "README.md").read_text(), f"README.md lacks CI's test command: {command}"
