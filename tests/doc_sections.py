"""The files and commands a docs section shows, for the tests that run a page's walkthrough as a reader would."""

from __future__ import annotations

import re
from pathlib import Path


def files_and_commands(page: Path, heading: str) -> tuple[dict[str, str], list[str]]:
    """The section of ``page`` under ``## heading``: its files (path from each non-bash block's first-line
    comment -> the block's text) and its bash commands (line continuations joined), in order."""
    section = page.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    files, commands = {}, []
    for language, body in re.findall(r"```(\w+)\n(.*?)```", section, flags=re.DOTALL):
        if language == "bash":
            commands.append(body.strip().replace("\\\n", " "))
        else:
            files[body.splitlines()[0].removeprefix("# ")] = body
    return files, commands
