"""The user docs: the generated reference pages are current, the links resolve, and nothing in them
speaks of how the project itself is built and run."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
USER_DOCS = [*sorted(ROOT.glob("*.md")), *sorted((ROOT / "docs").glob("*.md"))]


def _gen_docs():
    spec = importlib.util.spec_from_file_location("gen_docs", ROOT / "scripts" / "gen_docs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_generated_pages_are_current() -> None:
    """docs/configuration.md and docs/results.md are what scripts/gen_docs.py makes of the configs and
    the results schema now: a changed default, key or comment needs `python scripts/gen_docs.py`."""
    stale = _gen_docs().stale_pages()
    assert stale == [], f"{', '.join(stale)} out of date: run python scripts/gen_docs.py and commit the pages"


def test_stale_page_is_detected(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    gen_docs = _gen_docs()
    monkeypatch.setattr(gen_docs, "DOCS", tmp_path)
    assert gen_docs.main([]) == 0
    assert gen_docs.stale_pages() == []
    (tmp_path / "results.md").write_text((tmp_path / "results.md").read_text().replace("`status`", "`state`"))
    assert gen_docs.stale_pages() == ["docs/results.md"]
    assert gen_docs.main(["--check"]) == 1


def test_every_results_key_is_documented() -> None:
    from approxtrain.run.schema import EPOCH_KEYS, RESULT_KEYS

    page = (ROOT / "docs" / "results.md").read_text()
    missing = [key for key in (*RESULT_KEYS, *EPOCH_KEYS) if f"| `{key}` |" not in page]
    assert missing == []


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_links_resolve(path: Path) -> None:
    """Every relative link of a page names a file that exists, and an anchor a heading of it."""
    text = path.read_text()
    broken = []
    for target in re.findall(r"\]\(([^)\s]+)\)", text):
        if re.match(r"[a-z]+://|mailto:", target):
            continue
        file, _, anchor = target.partition("#")
        linked = (path.parent / file).resolve() if file else path
        if not linked.exists():
            broken.append(target)
        elif anchor and linked.suffix == ".md" and anchor not in _anchors(linked.read_text()):
            broken.append(target)
    assert broken == [], f"{path.relative_to(ROOT)}: broken links"


def _anchors(markdown: str) -> set[str]:
    """GitHub's anchors of a page's headings (lower case, punctuation dropped, spaces as hyphens)."""
    headings = re.findall(r"^#+ (.+)$", markdown, flags=re.MULTILINE)
    return {re.sub(r"[^\w\- ]", "", heading.strip().lower()).replace(" ", "-") for heading in headings}


# How this project is built and checked, which a user neither has nor needs.
_BUILD_MACHINERY = re.compile(r"\.\./shared|/work/|device[- ]prep|device tool|\bcarry\b|\bhelpers?\b|\bsessions?\b")


@pytest.mark.parametrize("path", USER_DOCS, ids=lambda path: str(path.relative_to(ROOT)))
def test_no_build_machinery(path: Path) -> None:
    lines = [line for line in path.read_text().splitlines() if _BUILD_MACHINERY.search(line)]
    assert lines == []


def test_library_page_runs_as_written(capsys: pytest.CaptureFixture[str]) -> None:
    """docs/library.md's example: a model made approximate and trained by a plain loop; the measured
    compute reduction it prints equals the plan's."""
    text = (ROOT / "docs" / "library.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.DOTALL)
    assert blocks
    for block in blocks:
        exec(compile(block, "docs/library.md", "exec"), {})
    planned, measured = re.findall(r"compute reduction: ([\d.]+%)", capsys.readouterr().out)
    assert planned == measured


def test_the_trainer_example_runs_as_written(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture) -> None:
    """docs/trainer.md's Python example, run as a reader would (in an empty dir): it trains and its callback reports."""
    page = (ROOT / "docs" / "trainer.md").read_text()
    (example,) = re.findall(r"```python\n(.*?)```", page, flags=re.DOTALL)
    monkeypatch.chdir(tmp_path)
    exec(compile(example, "docs/trainer.md", "exec"), {"__name__": "docs_trainer_example"})  # the page's own code
    printed = capsys.readouterr().out.split("\n")
    assert "finished 20" in printed and any(line.startswith("20 ") for line in printed)
    assert (tmp_path / "outputs" / "my_run" / "results.json").is_file()
