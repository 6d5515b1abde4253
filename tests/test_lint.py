"""Lint hygiene the linter cannot check itself: every suppression comment names the rule it
silences and says why (``python -m ruff check .`` checks the rest: RUF100, that the rule is enabled
and fires on that line; PGH004, that no suppression is blanket)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
_MARK = "no" + "qa"  # spelled apart, so this file holds no suppression comment itself
_SUPPRESSION = re.compile(rf"#\s*{_MARK}\b")
# the rule codes, then a reason: `- why` or `(why)`
_EXPLAINED = re.compile(rf"#\s*{_MARK}:\s*[A-Z]+\d+(?:,\s*[A-Z]+\d+)*\s+(?:-\s*\S|\(\S)")


def _python_files() -> list[Path]:
    listed = subprocess.run(["git", "ls-files", "*.py"], cwd=ROOT, capture_output=True, text=True, check=False)
    names = listed.stdout.split() if listed.returncode == 0 else [str(path.relative_to(ROOT)) for path in ROOT.rglob("*.py")]
    return [ROOT / name for name in names if (ROOT / name).is_file()]


def test_every_suppression_names_its_rule_and_says_why() -> None:
    unexplained = [f"{path.relative_to(ROOT)}:{number}: {line.strip()}"
                   for path in _python_files()
                   for number, line in enumerate(path.read_text().splitlines(), 1)
                   if _SUPPRESSION.search(line) and not _EXPLAINED.search(line)]
    assert unexplained == [], "suppressions without their rule code and a reason:\n" + "\n".join(unexplained)
