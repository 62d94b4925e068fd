"""The README's code blocks, for the doc test (``tests/integration/test_readme.py``).

Every fenced block whose language is ``bash`` or ``python`` is a snippet, and runs, unless the last non-blank line
above its opening fence is a skip marker, an HTML comment (GitHub does not show it) with the reason::

    <!-- readme-test: skip: starts a worker that runs until stopped, on GPUs -->

So a snippet added to the README later runs without anyone listing it here; one that cannot run offline on a
CPU machine (it needs a GPU, Docker, the network, root, or runs for minutes) says so where it stands. Blocks in
other languages (a diagram, sample output) never run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

README = Path(__file__).resolve().parents[2] / "README.md"
RUNNABLE = ("bash", "python")

_FENCE = re.compile(r"^```(?P<language>[\w+-]*)\s*$")
_DIRECTIVE = re.compile(r"<!--\s*readme-test:(?P<rest>.*?)-->")
_SKIP = re.compile(r"^\s*skip:\s*(?P<reason>\S.*?)\s*$")


class ReadmeMarkerError(ValueError):
    """A ``readme-test`` marker the doc test cannot read, or one with no snippet under it."""


@dataclass(frozen=True)
class Snippet:
    """One runnable block of the README.

    Attributes:
        line: the line of its opening fence (1-based).
        language: ``bash`` or ``python``.
        code: the block's text, without the fences.
        skip: why it is not run (its marker's reason), or ``None`` when it runs.
    """

    line: int
    language: str
    code: str
    skip: str | None = None

    @property
    def name(self) -> str:
        """``README.md:133 (bash)``: where to find it, for test ids and failure messages."""
        return f"README.md:{self.line} ({self.language})"


def snippets(text: str) -> list[Snippet]:
    """Every ``bash`` and ``python`` block of a README's text, in order, with its skip reason.

    Raises:
        ReadmeMarkerError: a marker is not ``skip: REASON``, or is not right above a bash or python block.
    """
    lines = text.splitlines()
    found: list[Snippet] = []
    pending: tuple[int, str] | None = None  # a marker waiting for its block: (line, reason)
    index = 0
    while index < len(lines):
        line = lines[index]
        directive = _DIRECTIVE.search(line)
        fence = _FENCE.match(line)
        if directive is not None:
            if pending is not None:
                raise ReadmeMarkerError(f"README.md:{pending[0]}: a readme-test marker with no snippet under it")
            skip = _SKIP.match(directive.group("rest"))
            if skip is None:
                raise ReadmeMarkerError(
                    f"README.md:{index + 1}: unreadable marker {line.strip()!r}: write <!-- readme-test: skip: WHY -->"
                )
            pending = (index + 1, skip.group("reason"))
        elif fence is not None:
            end = next((i for i in range(index + 1, len(lines)) if lines[i].startswith("```")), len(lines))
            language = fence.group("language")
            if language in RUNNABLE:
                code = "\n".join(lines[index + 1 : end]) + "\n"
                found.append(Snippet(index + 1, language, code, None if pending is None else pending[1]))
            elif pending is not None:
                raise ReadmeMarkerError(f"README.md:{pending[0]}: a readme-test marker above a {language!r} block")
            pending = None
            index = end
        elif line.strip() and pending is not None:
            raise ReadmeMarkerError(f"README.md:{pending[0]}: a readme-test marker with no snippet under it")
        index += 1
    if pending is not None:
        raise ReadmeMarkerError(f"README.md:{pending[0]}: a readme-test marker with no snippet under it")
    return found


def readme_snippets() -> list[Snippet]:
    """The snippets of this repository's README."""
    return snippets(README.read_text(encoding="utf-8"))
