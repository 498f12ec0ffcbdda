"""The benchmark tools for stacks and lengths: ``compare``'s stacked and packed steps, ``bench --layers/--lengths``.

Tiny problems only and no assertion on any time. What is checked is that every
implementation times the same work as fastbptt (the same loss and gradients from the
same weights, batch and lengths: the check before the timing is real, a wrong layer copy
or a loss over the padding is caught), that ``fastbptt-full`` really runs the full
lengths, and the options and output of the command line.
"""

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from fastbptt import benchmark, compare

CELLS = ["rnn", "gru", "lstm"]
ROOT = Path(__file__).resolve().parents[1]
# one configuration, one round each, no GEMM peak, no pauses
TINY = ["--config", "6,3,3,5,4", "--repeats", "1", "--reference-repeats", "1", "--min-time", "0",
        "--peak-n", "0", "--pause", "0", "--no-progress"]
HAS_TORCH = compare.available("torch")


def run_cli(capsys, *argv):
    rc = benchmark.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def problem(cell, layers=2, T=7, B=4, dtype=np.float64, bias=True, seed=1):
    """(model, X, Y, lengths) with lengths drawn as the benchmark draws them, padding zeroed."""
    model, X, Y = compare.make_problem(T, B, 3, 5, 6, dtype=dtype, bias=bias, seed=seed, cell=cell,
                                       num_layers=layers)
    lengths = compare.make_lengths(T, B, "uniform", seed=seed)
    X, Y = compare.zero_padding(X, Y, lengths)
    return model, X, Y, lengths


def table_rows(out):
    """The table's rows (split on spaces), without the header."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["T", "B"])
    rows = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        rows.append(line.split())
    return lines[start].split(), rows


def column(out, name):
    """The cells of column ``name`` (right-aligned under its header) of the table's rows."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.split()[:2] == ["T", "B"])
    end = lines[start].index(f" {name}") + 1 + len(name)
    cells = []
    for line in lines[start + 1:]:
        if not line.strip():
            break
        cells.append(line[:end].split()[-1])
    return cells


# ----------------------------------------------------------------------------- compare.py


def test_flops_of_a_stack_and_of_lengths():
    T, B, D, H, O = 7, 3, 5, 11, 2
    for cell, G in (("rnn", 1), ("gru", 3), ("lstm", 4)):
        one = compare.step_flops(T, B, D, H, O, cell)
        assert compare.step_flops(T, B, D, H, O, cell, num_layers=1) == one
        # layer 1: forward input + recurrence, backward dW_ih, dX for layer 0, recurrence's two
        upper = 2 * T * B * (G * H * H + G * H * H + G * H * H + G * H * H + 2 * G * H * H)
        assert compare.step_flops(T, B, D, H, O, cell, num_layers=2) == one + upper
        assert compare.step_flops(T, B, D, H, O, cell, num_layers=3) == one + 2 * upper
        assert compare.step_flops(T, B, D, H, O, cell, num_layers=2, positions=5) * T * B == \
            compare.step_flops(T, B, D, H, O, cell, num_layers=2) * 5
    with pytest.raises(ValueError, match="num_layers"):
        compare.step_flops(T, B, D, H, O, "gru", num_layers=0)
    config = benchmark.Config(T, B, D, H, O, cell="gru", activation=None, layers=2, lengths="uniform")
    lengths = compare.make_lengths(T, B, "uniform")
    assert config.positions == lengths.sum() < T * B
    assert config.flops == compare.step_flops(T, B, D, H, O, "gru", 2, lengths.sum())


def test_make_lengths_and_zero_padding():
    assert compare.make_lengths(9, 5, "full") is None
    lengths = compare.make_lengths(9, 50, "uniform")
    assert lengths.shape == (50,) and lengths.dtype == np.int64
    assert lengths.min() == 1 and lengths.max() == 9 and set(lengths) == set(range(1, 10))
    assert not np.array_equal(lengths, np.sort(lengths))                            # shuffled
    for T, B in ((200, 8), (100, 32), (50, 64), (7, 4), (1000, 3)):                 # stratified: mean ≈ (T + 1) / 2
        drawn = compare.make_lengths(T, B, "uniform")
        assert drawn.max() == T and drawn.min() >= 1
        assert abs(drawn.mean() - (T + 1) / 2) <= T / B, (T, B, drawn)
        assert np.bincount(np.minimum((drawn - 1) * B // T, B - 1), minlength=B).max() <= 2   # one per bin (+ T)
    assert np.array_equal(compare.make_lengths(1, 3, "uniform"), [1, 1, 1])
    assert np.array_equal(lengths, compare.make_lengths(9, 50, "uniform"))          # seeded
    assert not np.array_equal(lengths, compare.make_lengths(9, 50, "uniform", seed=1))
    with pytest.raises(ValueError, match="unknown lengths"):
        compare.make_lengths(9, 5, "random")
    _, X, Y = compare.make_problem(6, 4, 3, 5, 6)
    X0, Y0 = X.copy(), Y.copy()
    lengths = np.array([6, 2, 1, 4])
    Xp, Yp = compare.zero_padding(X, Y, lengths)
    assert np.array_equal(X, X0) and np.array_equal(Y, Y0)                          # inputs untouched
    for b, n in enumerate(lengths):
        assert np.array_equal(Xp[:n, b], X[:n, b]) and not Xp[n:, b].any() and not Yp[n:, b].any()


def test_torch_gets_every_layers_weights():
    model, _, _ = compare.make_problem(3, 2, 4, 5, 6, cell="lstm", num_layers=3)
    weights = compare.torch_weights(model)["rnn"]
    assert len(weights) == 4 * 3
    for k in range(3):
        for torch_name, name in (("weight_ih", "W_ih"), ("weight_hh", "W_hh"), ("bias_ih", "b_ih"),
                                 ("bias_hh", "b_hh")):
            got_name, value = weights[f"{torch_name}_l{k}"]
            assert got_name == f"{name}_l{k}" and np.array_equal(value, model.params[got_name])
            assert not np.shares_memory(value, model.params[got_name])
    elman, _, _ = compare.make_problem(3, 2, 4, 5, 6, num_layers=2)
    weights = compare.torch_weights(elman)["rnn"]
    assert weights["weight_ih_l1"][0] == "W_hx_l1" and weights["bias_ih_l1"][0] == "b_h_l1"
    assert weights["bias_hh_l1"][0] is None and not weights["bias_hh_l1"][1].any()


@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype", [np.float32, np.float64])
def test_every_numpy_step_with_lengths_agrees_with_the_oracle(cell, dtype):
    model, X, Y, lengths = problem(cell, dtype=dtype)
    expected = compare.oracle(model, X, Y, lengths)
    full = compare.oracle(model, X, Y)
    assert abs(expected[0] - full[0]) > 1e-3                 # the lengths change the loss: the check can tell
    for name in ("fastbptt", "fastbptt-parallel", "fastbptt:fused", "fastbptt:blas", "reference"):
        step = compare.make_step(name, model, X, Y, lengths=lengths)
        for _ in range(2):                                   # the second call must not accumulate
            result = compare.check(step(), expected, dtype)
            assert result["ok"], (name, result)
    # fastbptt-full ignores the lengths: it runs every sequence to T
    for name in ("fastbptt-full", "fastbptt-full:blas"):
        loss, grads = compare.make_step(name, model, X, Y, lengths=lengths)()
        assert compare.check((loss, grads), full, dtype)["ok"]
        assert not compare.check((loss, grads), expected, dtype)["ok"]


@pytest.mark.parametrize("cell", CELLS)
def test_a_stack_without_lengths_agrees_with_the_oracle(cell):
    model, X, Y = compare.make_problem(6, 3, 4, 5, 6, dtype=np.float64, cell=cell, num_layers=3, seed=2)
    expected = compare.oracle(model, X, Y)
    assert set(expected[1]) == set(model.params) and "W_hh_l2" in expected[1]
    for name in ("fastbptt", "fastbptt-full", "reference"):
        assert compare.check(compare.make_step(name, model, X, Y)(), expected, model.dtype)["ok"], name


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("cell", CELLS)
@pytest.mark.parametrize("dtype, bias", [(np.float32, True), (np.float64, True), (np.float64, False)])
def test_torch_packed_and_padded_compute_fastbptts_loss(cell, dtype, bias):
    """The benchmark times equivalent work: PyTorch's two ways give fastbptt's loss and gradients."""
    model, X, Y, lengths = problem(cell, dtype=dtype, bias=bias)
    fast_loss, fast_grads = compare.make_step("fastbptt", model, X, Y, lengths=lengths)()
    expected = compare.oracle(model, X, Y, lengths)
    tol = compare.tolerance(dtype)
    for name in ("torch-packed", "torch-padded"):
        step = compare.make_step(name, model, X, Y, lengths=lengths)
        for _ in range(2):                                   # gradients are not accumulated across calls
            loss, grads = step()
            assert set(grads) == set(model.params)
            assert abs(loss - fast_loss) <= tol * abs(fast_loss), (name, loss, fast_loss)
            assert compare.check((loss, grads), (fast_loss, fast_grads), dtype)["ok"], name
            assert compare.check((loss, grads), expected, dtype)["ok"], name
    # at full lengths the three PyTorch steps and fastbptt agree too
    full = compare.oracle(model, X, Y)
    for name in ("torch", "torch-packed", "torch-padded"):
        assert compare.check(compare.make_step(name, model, X, Y)(), full, dtype)["ok"], name


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_a_padded_loss_over_every_position_is_caught():
    """The mask matters: torch-padded's loss against the full-length oracle fails the check."""
    model, X, Y, lengths = problem("gru")
    result = compare.make_step("torch-padded", model, X, Y, lengths=lengths)()
    assert not compare.check(result, compare.oracle(model, X, Y), model.dtype)["ok"]
    assert compare.check(result, compare.oracle(model, X, Y, lengths), model.dtype)["ok"]


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
@pytest.mark.parametrize("cell", ["gru", "lstm"])
def test_a_wrong_upper_layer_copy_is_caught(cell, monkeypatch):
    """Layer 1's W_hh given to PyTorch as layer 0's and back: the check before the timing fails."""
    real = compare.torch_weights

    def swapped(model):
        weights = real(model)
        w = weights["rnn"]
        w["weight_hh_l0"], w["weight_hh_l1"] = w["weight_hh_l1"], w["weight_hh_l0"]
        return weights

    model, X, Y, lengths = problem(cell)
    expected = compare.oracle(model, X, Y, lengths)
    monkeypatch.setattr(compare, "torch_weights", swapped)
    for name in ("torch-packed", "torch-padded"):
        assert not compare.check(compare.make_step(name, model, X, Y, lengths=lengths)(), expected,
                                 model.dtype)["ok"]


def test_steps_that_cannot_take_stacks_or_lengths_say_why():
    assert compare.unsupported("jax", None, "gru", num_layers=2) == "the JAX step has one layer"
    assert "lengths" in compare.unsupported("jax", None, "gru", variable_lengths=True)
    assert "torch-packed" in compare.unsupported("torch", None, "lstm", variable_lengths=True)
    for name in ("fastbptt", "fastbptt-parallel", "fastbptt-full", "reference", "torch-packed", "torch-padded"):
        assert compare.supports(name, None, "gru", num_layers=3, variable_lengths=True), name
    for name in ("torch", "torch-packed", "torch-padded"):
        assert not compare.supports(name, "identity", "rnn")
    assert compare.supports("torch", None, "lstm", num_layers=2)
    model, X, Y, lengths = problem("gru", dtype=np.float32)
    with pytest.raises(ValueError, match="one layer"):
        compare.make_step("jax", model, X, Y)
    with pytest.raises(ValueError, match="lengths must be"):
        compare.make_step("fastbptt", model, X, Y, lengths=np.array([1, 2]))
    with pytest.raises(ValueError, match="lengths must be"):
        compare.make_step("reference", model, X, Y, lengths=np.array([0, 1, 2, 3]))
    with pytest.raises(ValueError, match="only fastbptt"):
        compare.parse_name("torch-packed:blas")
    assert compare.parse_name("fastbptt-full:fused") == ("fastbptt-full", {"method": "fused"})


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_plain_torch_refuses_lengths():
    model, X, Y, lengths = problem("lstm", dtype=np.float32)
    with pytest.raises(ValueError, match="torch-packed or torch-padded"):
        compare.make_step("torch", model, X, Y, lengths=lengths)
    with pytest.raises(ValueError, match="unknown mode"):
        compare.make_torch_step(model, X, Y, mode="sorted")


def test_availability_follows_torch():
    for name in ("torch-packed", "torch-padded"):
        assert compare.available(name) == HAS_TORCH
        assert compare.version(name) == (compare.version("torch") if HAS_TORCH else None)
    assert compare.available("fastbptt-full") and compare.version("fastbptt-full") == compare.version("fastbptt")


# ----------------------------------------------------------------------------- the command line


def test_bench_selects_layers_and_lengths():
    parser = benchmark.build_parser()

    def configs(*argv):
        return benchmark.select_configs(parser.parse_args(list(argv)), parser)

    stacks = configs("--configs", "layers")
    assert len(stacks) == len(benchmark.LAYER_SIZES) * 3 * 2
    assert [(c.cell, c.layers) for c in stacks[:6]] == [("rnn", 1), ("rnn", 2), ("gru", 1), ("gru", 2),
                                                       ("lstm", 1), ("lstm", 2)]
    assert {(c.T, c.B, c.D, c.H, c.O) for c in stacks} == set(benchmark.LAYER_SIZES)
    assert not any(c.variable for c in stacks)
    assert any(c.B * c.H <= 2048 for c in stacks) and any(c.B * c.H > 2048 for c in stacks)
    two = configs("--layers", "2", "--cell", "gru,lstm")           # the layers set, at 2 layers only
    assert {c.layers for c in two} == {2} and {c.cell for c in two} == {"gru", "lstm"}
    assert len(two) == 2 * len(benchmark.LAYER_SIZES)
    lengths = configs("--lengths", "uniform")
    assert len(lengths) == 3 * len(benchmark.LENGTH_SIZES)
    assert all(c.variable and c.layers == 1 for c in lengths)
    both = configs("--config", "3,2,3,4,3", "--layers", "1,2", "--lengths", "full,uniform")
    assert [(c.cell, c.layers, c.lengths) for c in both] == [("rnn", 1, "full"), ("rnn", 1, "uniform"),
                                                             ("rnn", 2, "full"), ("rnn", 2, "uniform")]
    grid = configs("--layers", "3", "--T", "4,5", "--H", "5", "--B", "2")       # a grid: the Elman cell
    assert [(c.T, c.cell, c.layers) for c in grid] == [(4, "rnn", 3), (5, "rnn", 3)]
    assert configs() == configs("--layers", "1") == configs("--lengths", "full")   # today's default, unchanged
    assert benchmark.Config(3, 2, 3, 4, 3, cell="gru", activation=None, layers=2,
                            lengths="uniform").label.endswith("gru L=2 lengths uniform")


def test_default_implementations_for_stacks_and_lengths():
    C = benchmark.Config
    assert benchmark.default_impls([C(3, 2, 3, 4, 3)]) == ("fastbptt", "reference", "torch", "jax")
    assert benchmark.default_impls([C(3, 2, 3, 4, 3, layers=2)]) == ("fastbptt", "torch")
    assert benchmark.default_impls([C(3, 2, 3, 4, 3, lengths="uniform")]) == \
        ("fastbptt", "fastbptt-full", "torch-packed", "torch-padded")
    assert benchmark.default_impls([C(3, 2, 3, 4, 3), C(3, 2, 3, 4, 3, lengths="uniform")]) == \
        ("fastbptt", "fastbptt-full", "torch", "torch-packed", "torch-padded")


def test_bench_layers_runs_and_reports(tmp_path, capsys):
    path = tmp_path / "layers.json"
    rc, out, err = run_cli(capsys, *TINY, "--layers", "1,2", "--cell", "gru", "--impl", "fastbptt,reference",
                           "--json", str(path))
    assert rc == 0, err
    assert compare.STACK_FLOP_FORMULA in out and "num_layers" in out
    header, rows = table_rows(out)
    assert header[:10] == ["T", "B", "D", "H", "O", "dtype", "cell", "act", "L", "lengths"]
    assert [row[6:10] for row in rows] == [["gru", "-", "1", "full"], ["gru", "-", "2", "full"]]
    doc = json.loads(path.read_text())
    assert doc["flop_formula"] == compare.STACK_FLOP_FORMULA
    assert [r["layers"] for r in doc["results"]] == [1, 2]
    for r in doc["results"]:
        assert r["flops"] == compare.step_flops(6, 3, 3, 5, 4, "gru", r["layers"])
        assert all(e["ok"] and e["ms"] > 0 for e in r["impls"].values())


def test_bench_lengths_runs_and_reports(tmp_path, capsys):
    path = tmp_path / "lengths.json"
    rc, out, err = run_cli(capsys, *TINY, "--lengths", "uniform", "--layers", "2", "--cell", "lstm",
                           "--impl", "fastbptt,fastbptt-full,reference", "--json", str(path))
    assert rc == 0, err
    assert "var/full" in out and "fastbptt-full ms" in out
    header, rows = table_rows(out)
    assert len(rows) == 1 and rows[0][8:10] == ["2", "uniform"]
    r = json.loads(path.read_text())["results"][0]
    lengths = compare.make_lengths(6, 3, "uniform")
    assert r["lengths"] == "uniform" and r["positions"] == lengths.sum()
    assert all(e["ok"] for e in r["impls"].values())
    assert r["lengths_ratio"] == pytest.approx(r["impls"]["fastbptt"]["ms"] / r["impls"]["fastbptt-full"]["ms"])
    assert r["fastbptt_variant"] == "fastbptt" and set(r["speedup"]) == {"reference"}
    assert column(out, "var/full") == [f"{r['lengths_ratio']:.2f}"]


@pytest.mark.skipif(not HAS_TORCH, reason="torch is not installed")
def test_bench_lengths_with_torch(tmp_path, capsys):
    path = tmp_path / "torch.json"
    rc, out, err = run_cli(capsys, *TINY, "--lengths", "full,uniform", "--cell", "gru", "--json", str(path))
    assert rc == 0, err
    doc = json.loads(path.read_text())
    assert doc["implementations"] == ["fastbptt", "fastbptt-full", "torch", "torch-packed", "torch-padded"]
    full, uniform = doc["results"]
    assert "lengths_ratio" not in full and "ms" in full["impls"]["torch"]
    assert uniform["impls"]["torch"]["skipped"].startswith("torch runs every sequence to T")
    for name in ("torch-packed", "torch-padded"):
        assert uniform["impls"][name]["ok"] and uniform["speedup"][name] > 0
    for column in ("×torch-packed", "×torch-padded", "var/full"):
        assert column in out


def test_bench_without_torch_skips_it_cleanly(monkeypatch, capsys):
    real = compare.available
    monkeypatch.setattr(compare, "available",
                        lambda name: False if compare.parse_name(name)[0] in compare.TORCH else real(name))
    rc, out, err = run_cli(capsys, *TINY, "--lengths", "uniform", "--cell", "rnn")
    assert rc == 0, err
    assert "torch-packed is not installed: skipped (pip install torch)" in out
    assert "torch-packed ms" not in out and "fastbptt-full ms" in out
    with pytest.raises(SystemExit) as exc:
        benchmark.main([*TINY, "--layers", "2", "--impl", "fastbptt,torch-padded"])
    assert exc.value.code == 2 and "pip install torch" in capsys.readouterr().err


def test_bench_skips_jax_on_a_stack(capsys):
    if not compare.available("jax"):
        pytest.skip("jax is not installed")
    rc, out, err = run_cli(capsys, *TINY, "--layers", "2", "--cell", "gru", "--impl", "fastbptt,jax")
    assert rc == 0, err
    assert "skip" in table_rows(out)[1][0]


def test_the_row_is_about_fastbptt_not_fastbptt_full():
    result = {"B": 2, "H": 5, "lengths": "uniform", "impls": {
        "fastbptt": {"ms": 3.0, "gflops": 1.0}, "fastbptt-full": {"ms": 1.0, "gflops": 3.0},
        "torch-packed": {"ms": 30.0}}}
    benchmark.summarize(result, None)
    assert result["fastbptt_variant"] == "fastbptt" and result["speedup"] == {"torch-packed": 10.0}
    assert result["lengths_ratio"] == pytest.approx(3.0)
    methods = {"B": 2, "H": 5, "lengths": "uniform", "impls": {
        "fastbptt:blas": {"ms": 2.0, "gflops": 1.0}, "fastbptt-full:blas": {"ms": 4.0, "gflops": 3.0},
        "fastbptt-full:fused": {"ms": 1.0, "gflops": 3.0}}}
    assert benchmark.summarize(methods, None)["lengths_ratio"] == pytest.approx(0.5)   # the same method
    full = {"B": 2, "H": 5, "impls": {"fastbptt": {"ms": 3.0, "gflops": 1.0}, "fastbptt-full": {"ms": 1.0}}}
    assert "lengths_ratio" not in benchmark.summarize(full, None)


def test_a_plain_table_has_no_stack_columns(capsys):
    rc, out, err = run_cli(capsys, *TINY, "--impl", "fastbptt")
    assert rc == 0, err
    header, _ = table_rows(out)
    assert "L" not in header and "lengths" not in header and "var/full" not in header


def test_interleaved_rounds_alternate():
    from fastbptt.benchmarking.timing import best_times_interleaved

    calls = []

    def fn(name):
        return lambda: calls.append(name)

    def broken():
        calls.append("c")
        if calls.count("c") > 2:
            raise RuntimeError("boom")

    out = best_times_interleaved({"a": fn("a"), "b": (fn("b"), 2), "c": broken}, repeats=4, min_time=0)
    # warm-up + calibration round of each in order, then one round of each in turn
    assert calls == ["a", "a", "b", "b", "c", "c", "a", "b", "c", "a", "a"]
    assert len(out["a"][1]) == 4 and len(out["b"][1]) == 2 and isinstance(out["c"], RuntimeError)
    assert out["a"][0] == min(out["a"][1]) and out["a"][2] is not None


def test_bench_interleave_runs_and_records_it(tmp_path, capsys):
    path = tmp_path / "interleave.json"
    rc, out, err = run_cli(capsys, *TINY, "--lengths", "uniform", "--cell", "gru", "--interleave",
                           "--impl", "fastbptt,fastbptt-full,reference", "--json", str(path))
    assert rc == 0, err
    assert "in turn" in out
    doc = json.loads(path.read_text())
    assert doc["interleave"] is True
    r = doc["results"][0]
    assert list(r["impls"]) == ["fastbptt", "fastbptt-full", "reference"]
    assert [len(e["rounds_ms"]) for e in r["impls"].values()] == [1, 1, 1]
    assert all(e["ok"] and e["ms"] > 0 for e in r["impls"].values()) and r["lengths_ratio"] > 0


@pytest.mark.parametrize("argv", [["--load", "--interleave"], ["--layers", "0"], ["--layers", "two"], ["--layers", ""],
                                  ["--lengths", "random"], ["--lengths", ""], ["--load", "--layers", "2"],
                                  ["--load", "--lengths", "uniform"], ["--impl", "torch-sorted"],
                                  ["--configs", "layers", "--T", "5"], ["--configs", "lengths", "--H", "5"]])
def test_bench_rejects_bad_layer_and_length_options(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bench_help_names_the_new_options(capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(["--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in ("--layers", "--lengths", "uniform", "torch-packed", "torch-padded", "fastbptt-full",
                 "var/full", "pack_padded_sequence", compare.STACK_FLOP_FORMULA):
        assert text in out
    assert "issue" not in out.lower() and "target" not in out.lower()


@pytest.mark.skipif(importlib.util.find_spec("pytest_benchmark") is None, reason="pytest-benchmark is not installed")
def test_the_benchmark_suite_has_layer_and_length_cases():
    proc = subprocess.run([sys.executable, "-m", "pytest", str(ROOT / "bench"), "--collect-only", "-q",
                           "-p", "no:cacheprovider", "-k", "layers or lengths"],
                          capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    ids = [line.split("[", 1)[1].rstrip("]") for line in proc.stdout.splitlines() if "test_step[" in line]
    assert "layers-T200-B4-D16-H96-O16-float32-gru-L2-torch" in ids
    assert "layers-T200-B4-D16-H96-O16-float32-lstm-fastbptt" in ids
    for impl in ("fastbptt", "fastbptt-full", "torch-packed", "torch-padded"):
        assert f"lengths-T100-B32-D28-H128-O28-float32-gru-uniform-{impl}" in ids
    assert not any(i.startswith(("layers", "lengths")) and i.endswith(("-jax", "-reference")) for i in ids)
    assert not any(i.startswith("sizes") and "torch-packed" in i for i in ids)
