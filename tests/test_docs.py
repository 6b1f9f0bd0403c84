"""Every ```python block in docs/ runs, page by page, and every relative link resolves.

Each page runs in its own subprocess (a fresh interpreter, so signal handlers, JAX
state and globals never leak between pages) with the current directory set to a
temporary folder, so run dirs written by the examples land there. The blocks of
one page share one namespace (a module named ``docs_page``, not ``__main__``) and
run in order, like a notebook. A block opened with ```python notest is shown but
not run; the page says why next to it.

Run one page by hand with ``python tests/test_docs.py docs/PAGE.md``.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import time
import types
from pathlib import Path
from typing import NamedTuple

import pytest

REPO = Path(__file__).resolve().parents[1]
DOCS = REPO / "docs"
PAGES = sorted(DOCS.glob("*.md"))

# Pages meant to have no runnable block. Any other page must run at least one, and
# a page listed here must run none, so this set cannot drift from the pages.
WITHOUT_CODE = {"index.md", "artifact-format.md", "cli.md", "comparison.md", "api.md"}

# Pages whose blocks run in another test, in a setting closer to a user's: skipped here.
RUN_ELSEWHERE = {"tour.md": "tests/test_first_hour.py runs it in order with the README and demo"}

# Each page should run in well under this on 2 CPU cores; the limit only stops hangs.
TIMEOUT_S = 240

_FENCE = re.compile(r"^(?P<fence>`{3,}|~{3,})(?P<info>.*)$")


class Block(NamedTuple):
    line: int  # 1-based line of the first code line in the page
    info: str  # the fence's info string, e.g. "python" or "python notest"
    code: str

    @property
    def language(self) -> str:
        return self.info.split()[0] if self.info.split() else ""

    @property
    def runs(self) -> bool:
        return self.language == "python" and "notest" not in self.info.split()[1:]


def blocks(text: str, name: str = "page") -> list[Block]:
    """The fenced code blocks of a markdown page, in order."""
    found, lines, i = [], text.splitlines(), 0
    while i < len(lines):
        opening = _FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        fence, info = opening["fence"], opening["info"].strip()
        start = i + 1
        i = start
        while i < len(lines) and not lines[i].startswith(fence):
            i += 1
        if i == len(lines):
            raise ValueError(f"{name}:{start}: code block opened with {fence} is never closed")
        found.append(Block(start + 1, info, "\n".join(lines[start:i]) + "\n"))
        i += 1
    return found


def run_page(path: Path) -> None:
    """Run the page's runnable blocks in one namespace; tracebacks point into the page."""
    # A real module, so dataclasses and typing.get_type_hints resolve the page's names;
    # it is not "__main__", so an `if __name__ == "__main__":` guard in a page is skipped.
    module = types.ModuleType("docs_page")
    module.__file__ = str(path)
    sys.modules[module.__name__] = module
    namespace = module.__dict__
    for block in blocks(path.read_text(encoding="utf-8"), str(path)):
        if not block.runs:
            continue
        # Pad with blank lines so line numbers in tracebacks are the page's own.
        source = "\n" * (block.line - 1) + block.code
        t0 = time.perf_counter()
        exec(compile(source, str(path), "exec"), namespace)
        print(f"[docs] {path.name}:{block.line} ran in {time.perf_counter() - t0:.1f}s", flush=True)


def test_pages_exist():
    names = {p.name for p in PAGES}
    expected = {
        "index.md",
        "quickstart.md",
        "models.md",
        "losses.md",
        "training.md",
        "experiments.md",
        "checkpoints.md",
    }
    assert expected <= names, f"missing pages: {sorted(expected - names)}"
    assert not WITHOUT_CODE - names, f"WITHOUT_CODE names missing pages: {WITHOUT_CODE - names}"


@pytest.mark.slow
@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_page_runs(page: Path, tmp_path: Path):
    runnable = [b for b in blocks(page.read_text(encoding="utf-8"), page.name) if b.runs]
    if page.name in WITHOUT_CODE:
        assert not runnable, (
            f"{page.name} is listed in WITHOUT_CODE but has runnable blocks at lines "
            f"{[b.line for b in runnable]}; remove it from WITHOUT_CODE"
        )
        pytest.skip(f"{page.name} has no python code by design")
    assert runnable, (
        f"{page.name} has no runnable ```python block; add one, or list the page in "
        "WITHOUT_CODE if it is meant to have none"
    )
    if page.name in RUN_ELSEWHERE:
        pytest.skip(RUN_ELSEWHERE[page.name])
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONUNBUFFERED": "1"}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "src"), env.get("PYTHONPATH")]))
    out = subprocess.run(
        [sys.executable, str(Path(__file__).resolve()), str(page)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    if out.returncode != 0:
        pytest.fail(
            f"{page.name} failed (exit {out.returncode})\n--- stdout ---\n{out.stdout[-4000:]}"
            f"\n--- stderr ---\n{out.stderr[-6000:]}",
            pytrace=False,
        )


# Images the site build draws from real runs (docs/_hooks/figures.py); not in the repo.
GENERATED = ("figures/",)

_LINK = re.compile(r"\]\((?P<target>[^)\s]+)\)")
_HEADING = re.compile(r"^#{1,6}\s+(?P<title>.+?)\s*$", re.MULTILINE)


def _prose(text: str, name: str) -> str:
    """The page without its code blocks (links and headings there are code)."""
    for block in blocks(text, name):
        text = text.replace(block.code, "")
    return text


def anchors(text: str, name: str = "page") -> set[str]:
    """GitHub-style anchors of the page's headings: lower case, punctuation dropped."""
    return {
        re.sub(r"[^\w\- ]", "", m["title"].lower()).replace(" ", "-")
        for m in _HEADING.finditer(_prose(text, name))
    }


@pytest.mark.parametrize("page", PAGES, ids=lambda p: p.name)
def test_relative_links_resolve(page: Path):
    for match in _LINK.finditer(_prose(page.read_text(encoding="utf-8"), page.name)):
        target, _, fragment = match["target"].partition("#")
        if re.match(r"^[a-z]+:", target):
            continue  # an absolute URL
        if target.startswith(GENERATED):
            continue  # drawn at site build time; `mkdocs build --strict` checks these links
        path = page.parent / target if target else page
        assert path.exists(), f"{page.name} links to missing {target}"
        if fragment and path.suffix == ".md":
            found = anchors(path.read_text(encoding="utf-8"), path.name)
            assert fragment in found, f"{page.name} links to missing #{fragment} in {path.name}"


def test_block_parser():
    text = "x\n```python\na = 1\n```\n\n```python notest\nb = 2\n```\n```bash\nls\n```\n"
    found = blocks(text)
    assert [(b.line, b.language, b.runs, b.code) for b in found] == [
        (3, "python", True, "a = 1\n"),
        (7, "python", False, "b = 2\n"),
        (10, "bash", False, "ls\n"),
    ]
    with pytest.raises(ValueError, match="never closed"):
        blocks("```python\na = 1\n")
    assert anchors("# Top\n## The `--fresh` flag: `fit(fresh=True)`\n") == {
        "top",
        "the---fresh-flag-fitfreshtrue",
    }


if __name__ == "__main__":
    run_page(Path(sys.argv[1]).resolve())
