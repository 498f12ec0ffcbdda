"""The benchmark tools for every cell: ``compare``'s GRU and LSTM steps, ``bench --cell`` and ``profile --cell``.

Tiny problems only and no assertion on any time: the tools report figures, they do not
judge them. What is checked is that each implementation computes the same step (so the
cross-check before the timing is real: a wrong weight copy is caught), and the shape
of the output.
"""

import copy
import json

import numpy as np
import pytest

import fastbptt
from fastbptt import benchmark, compare, profile
from fastbptt.benchmarking import _loadbench

GATED = ["gru", "lstm"]
# two configurations, one round each, no GEMM peak, no pauses
TINY = ["--config", "4,2,3,5,3", "--config", "6,1,2,4,3", "--repeats", "1", "--reference-repeats", "1",
        "--min-time", "0", "--peak-n", "0", "--pause", "0", "--no-progress"]
FAST_IMPLS = ["fastbptt", "fastbptt-parallel", "fastbptt:fused", "fastbptt:blas", "reference"]


def run_cli(capsys, *argv):
    rc = benchmark.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


def swap_gates(a, H, i=0, j=1):
    """``a`` with the blocks of gates i and j (rows i·H.. and j·H..) swapped: PyTorch's layout misread."""
    a = np.array(a)
    a[[*range(i * H, (i + 1) * H), *range(j * H, (j + 1) * H)]] = \
        a[[*range(j * H, (j + 1) * H), *range(i * H, (i + 1) * H)]]
    return a


# ----------------------------------------------------------------------------- compare.py


def test_flops_count_the_gates():
    T, B, D, H, O = 7, 3, 5, 11, 2
    for cell, G in (("rnn", 1), ("gru", 3), ("lstm", 4)):
        forward = 2 * T * B * (G * D * H + G * H * H + H * O)
        backward = 2 * T * B * (G * D * H + 2 * G * H * H + 2 * H * O)    # no ∂L/∂X
        assert compare.step_flops(T, B, D, H, O, cell) == forward + backward
        assert benchmark.Config(T, B, D, H, O, cell=cell).flops == forward + backward
    assert compare.step_flops(T, B, D, H, O) == compare.step_flops(T, B, D, H, O, "rnn")
    with pytest.raises(ValueError, match="unknown cell"):
        compare.step_flops(T, B, D, H, O, "elman")


@pytest.mark.parametrize("cell", GATED)
def test_make_problem_builds_each_cell(cell):
    model, X, Y = compare.make_problem(4, 2, 3, 5, 6, cell=cell, dtype=np.float64)
    assert isinstance(model, fastbptt.CELLS[cell]) and model.cell == cell and model.dtype == np.float64
    assert model.params["W_ih"].shape == (compare.GATES[cell] * 5, 3)
    assert X.shape == (4, 2, 3) and X.dtype == np.float64 and Y.shape == (4, 2)
    with pytest.raises(ValueError, match="unknown cell"):
        compare.make_problem(4, 2, 3, 5, 6, cell="transformer")


@pytest.mark.parametrize("cell", GATED)
@pytest.mark.parametrize("dtype, bias", [(np.float32, True), (np.float64, True), (np.float64, False)])
def test_every_numpy_step_agrees_with_the_oracle(cell, dtype, bias):
    model, X, Y = compare.make_problem(7, 3, 4, 6, 5, dtype=dtype, bias=bias, seed=1, cell=cell)
    expected = compare.oracle(model, X, Y)
    assert set(expected[1]) == set(model.params)              # no bias gradients without biases
    for name in FAST_IMPLS:
        step = compare.make_step(name, model, X, Y)
        for _ in range(2):                                    # the second call must not accumulate
            result = compare.check(step(), expected, dtype)
            assert result["ok"], (name, result)


@pytest.mark.parametrize("cell", GATED)
@pytest.mark.parametrize("name", ["torch", "jax"])
@pytest.mark.parametrize("dtype, bias", [(np.float32, True), (np.float64, True), (np.float64, False)])
def test_torch_and_jax_steps_agree_with_the_oracle(cell, name, dtype, bias):
    pytest.importorskip(name)
    model, X, Y = compare.make_problem(7, 3, 4, 6, 5, dtype=dtype, bias=bias, seed=1, cell=cell)
    assert compare.supports(name, model.activation, cell)
    expected = compare.oracle(model, X, Y)
    step = compare.make_step(name, model, X, Y)
    for _ in range(2):                                        # gradients are not accumulated across calls
        loss, grads = step()
        assert set(grads) == set(model.params)
        result = compare.check((loss, grads), expected, model.dtype)
        assert result["ok"], result


def test_torch_gets_the_gated_weights_one_to_one():
    model, _, _ = compare.make_problem(3, 2, 4, 5, 6, cell="lstm")
    weights = compare.torch_weights(model)
    for torch_name, name in (("weight_ih_l0", "W_ih"), ("weight_hh_l0", "W_hh"), ("bias_ih_l0", "b_ih"),
                             ("bias_hh_l0", "b_hh")):
        got_name, value = weights["rnn"][torch_name]
        assert got_name == name and np.array_equal(value, model.params[name])
        assert not np.shares_memory(value, model.params[name])
    assert weights["readout"]["weight"][0] == "W_qh" and weights["readout"]["bias"][0] == "b_q"
    no_bias, _, _ = compare.make_problem(3, 2, 4, 5, 6, cell="gru", bias=False)
    assert set(compare.torch_weights(no_bias)["rnn"]) == {"weight_ih_l0", "weight_hh_l0"}


@pytest.mark.parametrize("cell", GATED)
def test_a_wrong_torch_weight_copy_is_caught(cell, monkeypatch):
    """Gates r and z (i and f) swapped in the copy, the classic misreading of the layout: check() fails."""
    pytest.importorskip("torch")
    real = compare.torch_weights

    def wrong(model):
        weights = real(model)
        name, value = weights["rnn"]["weight_hh_l0"]
        weights["rnn"]["weight_hh_l0"] = (name, swap_gates(value, model.hidden_size))
        return weights

    model, X, Y = compare.make_problem(6, 3, 4, 5, 6, cell=cell, seed=2)
    expected = compare.oracle(model, X, Y)
    assert compare.check(compare.make_step("torch", model, X, Y)(), expected, model.dtype)["ok"]
    monkeypatch.setattr(compare, "torch_weights", wrong)
    result = compare.check(compare.make_step("torch", model, X, Y)(), expected, model.dtype)
    assert not result["ok"] and result["max_grad_error"] > 10 * result["tolerance"]


@pytest.mark.parametrize("cell", GATED)
def test_jax_with_misread_gates_is_caught(cell):
    pytest.importorskip("jax")
    model, X, Y = compare.make_problem(6, 3, 4, 5, 6, cell=cell, seed=2)
    expected = compare.oracle(model, X, Y)
    wrong = copy.deepcopy(model)
    for name in ("W_ih", "W_hh", "b_ih", "b_hh"):
        wrong.params[name][...] = swap_gates(model.params[name], model.hidden_size)
    result = compare.check(compare.make_step("jax", wrong, X, Y)(), expected, model.dtype)
    assert not result["ok"]


def test_gated_cells_support_every_implementation():
    for name in compare.IMPLEMENTATIONS:
        for cell in GATED:
            assert compare.supports(name, None, cell)
    assert not compare.supports("torch", "identity", "rnn") and compare.supports("jax", "identity", "rnn")


# ----------------------------------------------------------------------------- bench --cell


def test_bench_cell_all_runs_each_cell_on_each_shape(tmp_path, capsys):
    path = tmp_path / "cells.json"
    rc, out, err = run_cli(capsys, *TINY, "--cell", "all", "--impl", "fastbptt,reference", "--json", str(path))
    assert rc == 0, err
    assert compare.FLOP_FORMULA in out and " cell " in out
    doc = json.loads(path.read_text())
    got = [(r["T"], r["cell"], r["activation"]) for r in doc["results"]]
    assert got == [(4, "rnn", "tanh"), (4, "gru", None), (4, "lstm", None),
                   (6, "rnn", "tanh"), (6, "gru", None), (6, "lstm", None)]
    for r in doc["results"]:
        assert r["flops"] == compare.step_flops(r["T"], r["B"], r["D"], r["H"], r["O"], r["cell"])
        for entry in r["impls"].values():
            assert entry["ok"] and entry["ms"] > 0
        assert r["speedup"]["reference"] > 0
    table = [row for row in map(str.split, out.splitlines()) if row[:1] in (["4"], ["6"]) and row[5:6] == ["f32"]]
    assert [row[6:8] for row in table] == [["rnn", "tanh"], ["gru", "-"], ["lstm", "-"]] * 2


def test_bench_cell_with_torch_and_jax(tmp_path, capsys):
    present = [name for name in ("torch", "jax") if compare.available(name)]
    if not present:
        pytest.skip("neither torch nor jax is installed")
    path = tmp_path / "cells.json"
    rc, out, err = run_cli(capsys, *TINY[:2], *TINY[4:], "--cell", "gru,lstm",
                           "--impl", ",".join(["fastbptt"] + present), "--json", str(path))
    assert rc == 0, err
    for name in present:
        assert f"{name} ms" in out and f"×{name}" in out
    results = json.loads(path.read_text())["results"]
    assert [r["cell"] for r in results] == ["gru", "lstm"]
    for r in results:
        assert set(r["impls"]) == {"fastbptt", *present}
        assert all(e["ok"] for e in r["impls"].values()) and set(r["speedup"]) == set(present)


@pytest.mark.parametrize("cell", GATED)
def test_bench_fails_on_a_wrong_torch_copy(cell, monkeypatch, capsys):
    pytest.importorskip("torch")
    real = compare.torch_weights

    def wrong(model):
        weights = real(model)
        name, value = weights["rnn"]["weight_ih_l0"]
        weights["rnn"]["weight_ih_l0"] = (name, swap_gates(value, model.hidden_size, 1, 2))
        return weights

    monkeypatch.setattr(compare, "torch_weights", wrong)
    rc, out, err = run_cli(capsys, *TINY[:2], *TINY[4:], "--cell", cell, "--impl", "fastbptt,torch")
    assert rc == 1
    assert f"FAILED torch at T=4 B=2 D=3 H=5 O=3 float32 {cell}" in err and "!" in out


def test_bench_method_columns_name_the_faster_method(tmp_path, capsys):
    from fastbptt.core.api import choose_method
    path = tmp_path / "methods.json"
    rc, out, err = run_cli(capsys, *TINY, "--cell", "all", "--impl", "fastbptt",
                           "--method", "auto,fused,blas", "--json", str(path))
    assert rc == 0, err
    for column in ("fastbptt:auto ms", "fastbptt:fused ms", "fastbptt:blas ms", "faster", "auto"):
        assert column in out
    for r in json.loads(path.read_text())["results"]:
        m = r["methods"]
        ms = {k: r["impls"][f"fastbptt:{k}"]["ms"] for k in ("fused", "blas")}
        assert m["fastest"] == min(ms, key=ms.get) and m["ratio"] == pytest.approx(max(ms.values()) / min(ms.values()))
        assert m["auto"] == choose_method(r["B"], r["H"])
        # the ratios and %peak are about what users get: method="auto", not the fastest forced method
        assert r["fastbptt_variant"] == "fastbptt:auto"


def test_the_row_is_about_auto_even_when_a_forced_method_is_faster():
    result = {"B": 2, "H": 5, "cell": "gru", "impls": {
        "fastbptt:auto": {"ms": 3.0, "gflops": 1.0}, "fastbptt:fused": {"ms": 1.0, "gflops": 3.0},
        "fastbptt:blas": {"ms": 2.0, "gflops": 1.5}, "torch": {"ms": 6.0}}}
    benchmark.summarize(result, peak_gflops=10.0)
    assert result["fastbptt_variant"] == "fastbptt:auto" and result["speedup"] == {"torch": 2.0}
    assert result["peak_fraction"] == pytest.approx(0.1)
    assert result["methods"]["fastest"] == "fused" and result["methods"]["ratio"] == pytest.approx(2.0)
    forced_only = {"B": 2, "H": 5, "impls": {"fastbptt:fused": {"ms": 1.0, "gflops": 3.0},
                                             "fastbptt:blas": {"ms": 2.0, "gflops": 1.5}}}
    assert benchmark.summarize(forced_only, None)["fastbptt_variant"] == "fastbptt:fused"


def test_bench_selects_cells():
    parser = benchmark.build_parser()

    def configs(*argv):
        return benchmark.select_configs(parser.parse_args(list(argv)), parser)

    default = configs()
    assert {c.cell for c in default} == {"rnn"} and len(default) == 18          # today's default, unchanged
    assert configs("--cell", "rnn") == default
    assert [(c.T, c.B, c.D, c.H, c.O) for c in configs("--cell", "gru")] == benchmark.CELL_SIZES
    assert [c.cell for c in configs("--cell", "all")[:3]] == ["rnn", "gru", "lstm"]
    assert len(configs("--cell", "all")) == 3 * len(benchmark.CELL_SIZES)
    assert configs("--cell", "lstm,gru") == configs("--cell", "gru,lstm")
    assert len(configs("--cell", "all", "--configs", "default")) == 3 * 18
    both = configs("--cell", "all", "--config", "3,2,3,4,3", "--activation", "tanh,relu")
    assert [(c.cell, c.activation) for c in both] == [("rnn", "tanh"), ("gru", None), ("lstm", None),
                                                      ("rnn", "relu")]
    assert [c.cell for c in configs("--cell", "gru", "--T", "3,4", "--H", "5")] == ["gru"] * 2 * 2
    assert [c.cell for c in configs("--cell", "lstm", "--load")] == ["lstm"] * len(benchmark.LOAD_SIZES)
    assert benchmark.Config(3, 2, 3, 4, 3, cell="gru", activation=None).label.endswith("float32 gru")


@pytest.mark.parametrize("argv", [["--cell", "elman"], ["--cell", ""], ["--cell", "gru", "--activation", "relu"]])
def test_bench_rejects_bad_cells(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv)
    assert exc.value.code == 2
    assert "--cell" in capsys.readouterr().err


def test_bench_cell_errors_say_what_to_do(capsys):
    with pytest.raises(SystemExit):
        benchmark.main(["--cell", "elman"])
    assert "choose from rnn, gru, lstm or all" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        benchmark.main(["--cell", "gru", "--activation", "relu"])
    assert "gru and lstm cells have none" in capsys.readouterr().err


def test_bench_plot_with_cells(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "cells.png"
    rc, out, err = run_cli(capsys, "--T", "3,6", "--H", "4", "--B", "1", "--D", "3", "--cell", "all",
                           "--impl", "fastbptt", "--repeats", "1", "--min-time", "0", "--pause", "0",
                           "--peak-n", "0", "--no-progress", "--plot", str(path))
    assert rc == 0, err
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


class NoCompetitors:
    """Stands in for the busy-loop processes of --load: starts nothing."""

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_bench_load_with_a_gated_cell(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(_loadbench, "Competitors", NoCompetitors)
    path = tmp_path / "load.json"
    rc = benchmark.main(["--load", "--config", "3,2,3,4,3", "--cell", "lstm", "--repeats", "1",
                         "--min-time", "0", "--no-progress", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    (row,) = json.loads(path.read_text())["results"]
    assert row["ok"] and row["cell"] == "lstm"
    assert any(line.split()[6:8] == ["lstm", "fastbptt"] for line in out.splitlines())


# ----------------------------------------------------------------------------- profile --cell


def test_profile_each_cell(capsys):
    assert profile.main(["--cell", "all", "--T", "3", "--H", "4,5", "--no-progress"]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines() if line.split()[:1] in (["rnn"], ["gru"], ["lstm"])]
    assert [(r[0], r[1], r[2]) for r in rows] == [(c, "3", H) for c in ("rnn", "gru", "lstm") for H in ("4", "5")]
    assert all(float(r[-1]) < 1e-5 for r in rows)                 # max |Δgrad| against the reference
    assert "rnn (tanh), gru, lstm" in out


@pytest.mark.parametrize("cell", GATED)
def test_profile_step_checks_the_gated_cell_against_its_reference(cell):
    row = profile.profile_step(4, 5, B=2, cell=cell)
    assert row["cell"] == cell and row["max_grad_error"] < 1e-5
    with pytest.raises(ValueError, match="unknown cell"):
        profile.profile_step(4, 5, cell="elman")


def test_profile_rejects_a_bad_cell(capsys):
    with pytest.raises(SystemExit) as exc:
        profile.main(["--cell", "elman"])
    assert exc.value.code == 2 and "choose from rnn, gru, lstm or all" in capsys.readouterr().err
