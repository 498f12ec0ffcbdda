"""The package layout: core / training / benchmarking, with every old module path an alias
of the moved module (never a second copy, which would compile the Numba kernels twice)."""

import ast
import importlib
import sys
from pathlib import Path

import pytest

import fastbptt

PACKAGE = Path(fastbptt.__file__).resolve().parent

MOVED = {
    "api": "core.api", "model": "core.model", "workspace": "core.workspace", "threads": "core.threads",
    "reference": "core.reference", "reference_cells": "core.reference_cells",
    "data": "training.data", "optim": "training.optim", "diagnostics": "training.diagnostics",
    "generate": "training.generate", "charrnn": "training.charrnn", "checkpoint": "training.saving",
    "compare": "benchmarking.compare", "benchmark": "benchmarking.benchmark",
    "profile": "benchmarking.profile", "_load": "benchmarking._load",
    "_loadbench": "benchmarking._loadbench", "_machine": "benchmarking._machine",
    "kernels": "core.kernels", "kernels.sweep": "core.kernels.sweep", "kernels.losses": "core.kernels.losses",
    "kernels.primitives": "core.kernels.primitives",
}


@pytest.mark.parametrize("old, new", MOVED.items())
def test_old_module_paths_are_the_moved_modules(old, new):
    moved = importlib.import_module(f"fastbptt.{new}")
    assert importlib.import_module(f"fastbptt.{old}") is moved
    assert sys.modules[f"fastbptt.{old}"] is moved


def test_the_examples_old_attribute_paths_are_the_moved_modules():
    import fastbptt.kernels.primitives  # noqa: F401
    assert fastbptt.api is fastbptt.core.api
    assert sys.modules["fastbptt.kernels.primitives"] is fastbptt.core.kernels.primitives
    assert fastbptt.checkpoint is fastbptt.training.saving


def test_no_module_file_is_loaded_twice():
    for old in MOVED:
        importlib.import_module(f"fastbptt.{old}")
    files = [m.__file__ for name, m in list(sys.modules.items())
             if name.startswith("fastbptt") and getattr(m, "__file__", None)]
    modules = {id(m) for name, m in list(sys.modules.items()) if name.startswith("fastbptt")}
    assert len(set(files)) == len(modules), "a module file was loaded as two modules"


def test_every_public_name_is_importable():
    for name in fastbptt.__all__:
        assert getattr(fastbptt, name) is not None, name


def test_training_keeps_the_old_training_modules_names():
    from fastbptt.training import tbptt
    for name in ("train_epoch", "train_step", "random_truncation", "perplexity", "StepResult",
                 "EpochResult", "_carry_weight", "api"):
        assert getattr(fastbptt.training, name) is getattr(tbptt, name), name


def test_old_private_check_names_are_the_validation_functions():
    from fastbptt.core import api, model, validation
    from fastbptt.training import optim
    assert api._check_carry is validation.check_carry
    assert api._as_array is validation.as_array
    assert model._positive_int is validation.positive_int
    assert optim._number is validation.number


def _imports(path):
    """The module names ``path`` imports, relative ones resolved inside its package."""
    package = ".".join(path.relative_to(PACKAGE.parent).with_suffix("").parts[:-1])
    names = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.Import):
            names |= {alias.name for alias in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = package.rsplit(".", node.level - 1)[0] if node.level else ""
            module = ".".join(filter(None, [base, node.module]))
            names |= {module} | {f"{module}.{alias.name}" for alias in node.names}
    return names


def test_benchmark_and_profile_do_not_import_each_other():
    bench = PACKAGE / "benchmarking" / "benchmark.py"
    prof = PACKAGE / "benchmarking" / "profile.py"
    assert not any(name.endswith("profile") for name in _imports(bench))
    assert not any(name.endswith(".benchmark") for name in _imports(prof))
    assert "fastbptt.benchmarking.timing" in _imports(bench) & _imports(prof)
