"""The package's metadata: what ``pip install fastbptt`` brings."""

import re
import sys
from pathlib import Path

import pytest

from fastbptt.core import threads

ROOT = Path(__file__).resolve().parent.parent

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - Python 3.10
    tomllib = pytest.importorskip("tomli")


def _requirement_names(requirements):
    return {re.split(r"[<>=!~;\[ ]", r, maxsplit=1)[0].lower() for r in requirements}


def test_threadpoolctl_is_a_runtime_dependency_not_an_extra():
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert {"numpy", "numba", "threadpoolctl"} <= _requirement_names(project["dependencies"])
    for extra, requirements in project["optional-dependencies"].items():
        assert "threadpoolctl" not in _requirement_names(requirements), extra


def test_blas_threads_are_controlled_per_product_in_an_installed_fastbptt():
    # the test environment installs ".[test]", which no longer names threadpoolctl: only the
    # runtime dependencies bring it
    assert threads.available()
