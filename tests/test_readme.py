"""The README's training-loop example runs as printed."""

import contextlib
import io
import re
from pathlib import Path

README = Path(__file__).resolve().parents[1] / "README.md"


def readme_block(tag):
    text = README.read_text(encoding="utf-8")
    section = re.search(rf"<!-- {tag} -->\s*```python\n(.*?)```\s*<!-- /{tag} -->", text, re.S)
    assert section, f"README has no <!-- {tag} --> python block"
    return section.group(1)


def training_loop_block():
    return readme_block("training-loop")


def test_readme_using_it_runs_and_prints_a_falling_loss():
    code = readme_block("using-it")
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        exec(compile(code, str(README), "exec"), {"__name__": "readme"})
    printed = out.getvalue().splitlines()
    steps = [int(re.fullmatch(r"step +(\d+)  loss (\S+)", line).group(1)) for line in printed]
    losses = [float(line.split()[-1]) for line in printed]
    assert steps == [0, 25, 50, 75, 99]
    assert abs(losses[0] - 3.33) < 0.05                    # ln 28: uniform at the start
    assert all(b < a for a, b in zip(losses, losses[1:]))


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
