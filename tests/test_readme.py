"""The README's training-loop example runs as printed."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def training_loop_block():
    text = README.read_text(encoding="utf-8")
    section = re.search(r"<!-- training-loop -->\s*```python\n(.*?)```\s*<!-- /training-loop -->", text, re.S)
    assert section, "README has no <!-- training-loop --> python block"
    return section.group(1)


def test_readme_training_loop_runs_and_learns():
    code = training_loop_block()
    lines = [line for line in code.splitlines() if line.strip()]
    assert 10 <= len(lines) <= 22
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    printed = out.getvalue().splitlines()
    perplexity = float(re.fullmatch(r"perplexity (\S+)", printed[0]).group(1))
    assert 1 < perplexity < 10            # from 28 (uniform over the vocabulary) at the start
    assert printed[1].startswith("beautiful is") and len(printed[1]) == 12 + 40
