"""The README's snippets: how the doc test finds them and their skip markers, and mistakes caught without running.

``tests/integration/test_readme.py`` runs every snippet not marked to skip, against a real Redis and CPU worker.
"""

from __future__ import annotations

import re

import pytest

from tests.support.readme import ReadmeMarkerError, readme_snippets, snippets

SAMPLE = """# A readme

```bash
echo runs
```

<!-- readme-test: skip: needs a GPU -->
```bash
gpufleet worker --gpu 0
```

```
not code: sample output
```

```python
print("runs too")
```
"""


def test_every_bash_and_python_block_is_a_snippet_and_a_marker_skips_the_one_under_it() -> None:
    found = snippets(SAMPLE)
    assert [(s.line, s.language, s.skip) for s in found] == [
        (3, "bash", None),
        (8, "bash", "needs a GPU"),
        (16, "python", None),
    ]
    assert found[0].code == "echo runs\n"
    assert found[1].name == "README.md:8 (bash)"


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("<!-- readme-test: skip -->\n```bash\necho\n```\n", "unreadable marker"),
        ("<!-- readme-test: run -->\n```bash\necho\n```\n", "unreadable marker"),
        ("<!-- readme-test: skip: why -->\nSome prose.\n```bash\necho\n```\n", "no snippet under it"),
        ("<!-- readme-test: skip: why -->\n```\noutput\n```\n", "above a '' block"),
        ("```bash\necho\n```\n<!-- readme-test: skip: why -->\n", "no snippet under it"),
    ],
)
def test_a_marker_that_skips_nothing_is_an_error(text: str, message: str) -> None:
    with pytest.raises(ReadmeMarkerError, match=message):
        snippets(text)


def test_the_readme_has_snippets_that_run_and_says_why_the_others_do_not() -> None:
    found = readme_snippets()  # raises on a misplaced marker
    running = {s.language for s in found if s.skip is None}
    assert running == {"bash", "python"}
    assert all(s.skip for s in found if s.skip is not None)


def test_no_bash_snippet_uses_a_variable_it_set_for_one_command_only() -> None:
    # `VAR=value cmd` sets VAR in cmd's environment only: a later `$VAR` in the same snippet is empty (the README's
    # API example sent an empty token this way, and got 401).
    for snippet in readme_snippets():
        if snippet.language != "bash":
            continue
        lines = snippet.code.splitlines()
        for number, line in enumerate(lines):
            prefix = re.match(r"""\s*([A-Za-z_]\w*)=(?:\$\([^)]*\)|"[^"]*"|'[^']*'|[^\s"'()]+)\s+[\w./-]""", line)
            if prefix is None:
                continue
            variable = prefix.group(1)
            later = "\n".join(lines[number + 1 :])
            assert not re.search(rf"\${{?{variable}\b", later), (
                f"{snippet.name}: {variable} is set for one command only (line {number + 1}) but read after it: "
                f"export it on a line of its own"
            )
