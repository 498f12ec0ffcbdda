"""The benchmark tools: ``fastbptt.compare`` (the same step in PyTorch and JAX) and ``python -m fastbptt bench``.

Tiny grids only, and no assertion on any time: these machines are noisy, and the
benchmark reports figures rather than judging them.
"""

import importlib.util
import json
import sys

import numpy as np
import pytest

import fastbptt.__main__
from fastbptt import _progress, benchmark, compare

# a tiny run: two configurations, one round each, no GEMM peak, no pauses
TINY = ["--config", "4,2,3,5,3", "--config", "6,1,2,4,3", "--repeats", "1", "--reference-repeats", "1",
        "--min-time", "0", "--peak-n", "0", "--pause", "0", "--no-progress"]
NUMPY_ONLY = ["--impl", "fastbptt,reference"]


def run_cli(capsys, *argv):
    rc = benchmark.main(list(argv))
    out, err = capsys.readouterr()
    return rc, out, err


# ----------------------------------------------------------------------------- compare.py


def test_flop_count_is_the_matrix_products_of_forward_and_backward():
    T, B, D, H, O = 7, 3, 5, 11, 2
    forward = 2 * T * B * (D * H + H * H + H * O)
    backward = 2 * T * B * (D * H + 2 * H * H + 2 * H * O)   # no ∂L/∂X
    assert compare.step_flops(T, B, D, H, O) == forward + backward
    assert benchmark.Config(T, B, D, H, O).flops == forward + backward


def test_fastbptt_and_reference_steps_agree_with_the_oracle():
    model, X, Y = compare.make_problem(5, 3, 4, 6, 5, dtype=np.float32)
    expected = compare.oracle(model, X, Y)
    for name in ("fastbptt", "fastbptt-parallel", "reference"):
        step = compare.make_step(name, model, X, Y)
        for _ in range(2):                        # the second call must not accumulate
            result = compare.check(step(), expected, np.float32)
            assert result["ok"], (name, result)


def test_check_catches_a_wrong_gradient():
    model, X, Y = compare.make_problem(5, 2, 4, 6, 5, dtype=np.float64)
    expected = compare.oracle(model, X, Y)
    loss, grads = compare.make_step("fastbptt", model, X, Y)()
    grads = {k: np.array(v) for k, v in grads.items()}
    grads["b_h"] *= 1.001
    result = compare.check((loss, grads), expected, np.float64)
    assert not result["ok"] and result["worst"] == "b_h"


def test_comparison_steps_take_dense_inputs_only():
    model, X, Y = compare.make_problem(3, 2, 4, 5, 4)
    with pytest.raises(ValueError, match="dense inputs"):
        compare.make_step("reference", model, Y, Y)
    with pytest.raises(ValueError, match="unknown implementation"):
        compare.make_step("tensorflow", model, X, Y)


CASES = [{"activation": "tanh", "dtype": np.float32, "bias": True},
         {"activation": "relu", "dtype": np.float64, "bias": True},
         {"activation": "tanh", "dtype": np.float32, "bias": False},
         {"activation": "identity", "dtype": np.float64, "bias": True}]


@pytest.mark.parametrize("name", ["torch", "jax"])
def test_torch_and_jax_steps_agree_with_the_reference(name):
    pytest.importorskip(name)
    for case in CASES:
        model, X, Y = compare.make_problem(7, 3, 4, 6, 5, seed=1, **case)
        if not compare.supports(name, model.activation):
            with pytest.raises(ValueError, match="activation"):
                compare.make_step(name, model, X, Y)
            continue
        expected = compare.oracle(model, X, Y)
        step = compare.make_step(name, model, X, Y)
        for _ in range(2):                        # gradients are not accumulated across calls
            loss, grads = step()
            assert set(grads) == set(model.params)
            result = compare.check((loss, grads), expected, model.dtype)
            assert result["ok"], (case, result)


# ----------------------------------------------------------------------------- the command line


def test_bench_writes_a_table_and_json(tmp_path, capsys):
    path = tmp_path / "bench.json"
    rc, out, err = run_cli(capsys, *TINY, *NUMPY_ONLY, "--parallel", "--json", str(path))
    assert rc == 0, err
    for column in ("fastbptt ms", "fastbptt-parallel ms", "reference ms", "GFLOP/s", "×reference",
                   "×par", "max err"):
        assert column in out
    assert compare.FLOP_FORMULA in out
    doc = json.loads(path.read_text())
    assert doc["flop_formula"] == compare.FLOP_FORMULA
    assert doc["implementations"] == ["fastbptt", "fastbptt-parallel", "reference"]
    assert [(r["T"], r["B"], r["D"], r["H"], r["O"]) for r in doc["results"]] == [(4, 2, 3, 5, 3),
                                                                                  (6, 1, 2, 4, 3)]
    for r in doc["results"]:
        assert r["flops"] == compare.step_flops(r["T"], r["B"], r["D"], r["H"], r["O"])
        for name in doc["implementations"]:
            entry = r["impls"][name]
            assert entry["ok"] and entry["ms"] > 0 and entry["max_grad_error"] < 1e-4
        assert r["speedup"]["reference"] > 0 and r["fastbptt_gflops"] > 0
        assert r["peak_fraction"] is None            # --peak-n 0 measured no peak


def test_bench_grid_options_and_gemm_peak(tmp_path, capsys):
    path = tmp_path / "grid.json"
    rc, out, _ = run_cli(capsys, "--T", "3,5", "--H", "4", "--B", "2", "--D", "3", "--dtype", "float32,float64",
                         "--activation", "relu", *NUMPY_ONLY, "--repeats", "1", "--min-time", "0",
                         "--pause", "0", "--peak-n", "64", "--no-progress", "--json", str(path))
    assert rc == 0
    assert "sgemm peak (n = 64)" in out and "dgemm peak (n = 64)" in out
    doc = json.loads(path.read_text())
    got = [(r["T"], r["H"], r["B"], r["D"], r["O"], r["dtype"], r["activation"]) for r in doc["results"]]
    assert sorted(got) == sorted((T, 4, 2, 3, 3, dt, "relu") for T in (3, 5) for dt in ("float32", "float64"))
    assert all(r["peak_fraction"] > 0 for r in doc["results"])


def test_bench_plot(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    path = tmp_path / "bench.png"
    rc, out, _ = run_cli(capsys, "--T", "3,6", "--H", "4,8", "--B", "1", "--D", "3", *NUMPY_ONLY,
                         "--repeats", "1", "--min-time", "0", "--pause", "0", "--peak-n", "0",
                         "--no-progress", "--plot", str(path))
    assert rc == 0 and f"wrote {path}" in out
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_bench_plot_without_matplotlib_fails_before_running(monkeypatch, tmp_path, capsys):
    monkeypatch.setitem(sys.modules, "matplotlib", None)          # import matplotlib -> ImportError
    with pytest.raises(SystemExit) as exc:
        benchmark.main([*TINY, "--plot", str(tmp_path / "x.png")])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "--plot needs matplotlib" in err and "pip install" in err


def test_bench_progress_bar_on_a_terminal_and_its_fallback(monkeypatch, capsys):
    argv = [a for a in TINY if a != "--no-progress"] + NUMPY_ONLY
    monkeypatch.setattr(_progress, "is_terminal", lambda stream: True)
    if importlib.util.find_spec("tqdm") is not None:
        rc, _, err = run_cli(capsys, *argv)
        assert rc == 0 and "6/6" in err and "100%" in err and "\r" in err
    monkeypatch.setitem(sys.modules, "tqdm", None)
    rc, _, err = run_cli(capsys, *argv)
    assert rc == 0
    assert "tqdm is not installed" in err and "[1/6] T=4 B=2" in err and "[6/6]" in err


def test_bench_progress_without_a_terminal_is_plain_lines(capsys):
    # capsys's stderr is no terminal, as a file or a CI log is not: no carriage returns
    rc, _, err = run_cli(capsys, *[a for a in TINY if a != "--no-progress"], *NUMPY_ONLY)
    assert rc == 0
    assert "\r" not in err and "[1/6] T=4 B=2" in err and "[6/6]" in err
    assert "tqdm is not installed" not in err


def test_bench_without_torch_and_jax_skips_them(monkeypatch, capsys):
    real = compare.available
    monkeypatch.setattr(compare, "available", lambda name: name not in ("torch", "jax") and real(name))
    rc, out, _ = run_cli(capsys, *TINY)
    assert rc == 0
    assert "torch is not installed: skipped" in out and "jax is not installed: skipped" in out
    assert "torch ms" not in out and "reference ms" in out


def test_bench_with_torch_and_jax(capsys):
    present = [name for name in ("torch", "jax") if compare.available(name)]
    if not present:
        pytest.skip("neither torch nor jax is installed")
    rc, out, err = run_cli(capsys, "--config", "5,2,3,4,3", "--impl", ",".join(["fastbptt"] + present),
                           *TINY[4:])
    assert rc == 0, err
    for name in present:
        assert f"{name} ms" in out and f"×{name}" in out


def test_bench_times_each_method(capsys):
    from fastbptt import api
    methods = getattr(api, "METHODS", None)
    if methods is None:
        pytest.skip("this fastbptt has no method keyword")
    rc, out, err = run_cli(capsys, *TINY, "--impl", "fastbptt", "--method", ",".join(methods))
    assert rc == 0, err
    for m in methods:
        assert f"fastbptt:{m} ms" in out
    with pytest.raises(SystemExit) as exc:
        benchmark.main([*TINY, "--method", "no-such-method"])
    assert exc.value.code == 2 and "--method: unknown" in capsys.readouterr().err


def test_bench_flags_a_wrong_implementation(monkeypatch, capsys, tmp_path):
    def wrong_step(model, X, Y, **options):
        step = compare.make_reference_step(model, X, Y)

        def run():
            loss, grads = step()
            return loss, {k: 2 * v for k, v in grads.items()}
        return run

    monkeypatch.setitem(compare.MAKERS, "reference", wrong_step)
    path = tmp_path / "wrong.json"
    rc, out, err = run_cli(capsys, *TINY, *NUMPY_ONLY, "--json", str(path))
    assert rc == 1
    assert "FAILED reference at T=4 B=2" in err and "!" in out
    entry = json.loads(path.read_text())["results"][0]["impls"]
    assert entry["fastbptt"]["ok"] and not entry["reference"]["ok"]


def test_bench_selects_named_sets():
    parser = benchmark.build_parser()

    def configs(*argv):
        return benchmark.select_configs(parser.parse_args(list(argv)), parser)

    assert [(c.T, c.B, c.D, c.H, c.O) for c in configs("--configs", "sizes")] == benchmark.SIZES
    assert configs("--configs", "issue") == configs("--configs", "sizes")      # the old name still works
    assert len(configs()) == 18 and {c.dtype for c in configs()} == {"float32"}
    assert len(configs("--quick")) == 8
    assert len(configs("--configs", "sizes", "--dtype", "float32,float64")) == 16
    assert [(c.T, c.B, c.D, c.H, c.O) for c in configs("--load")] == benchmark.LOAD_SIZES
    assert len(configs("--load", "--T", "3,4")) == 2 * 3 * 2   # a grid with --load: the default grid's H and B
    assert [(c.T, c.H) for c in configs("--load", "--config", "3,2,3,4,3")] == [(3, 4)]


@pytest.mark.parametrize("argv", [["--config", "1,2,3"], ["--impl", "tensorflow"], ["--configs", "sizes", "--T", "5"],
                                  ["--config", "1,1,1,1,1", "--H", "3"], ["--repeats", "0"], ["--T", "0"],
                                  ["--json", "/no/such/dir/x.json"], ["--dtype", "float16"], ["--D", "0"],
                                  ["--configs", "nosuchset"], ["--min-time", "nan"], ["--busy-threshold", "2"],
                                  ["--load-procs", "1"], ["--load", "--load-procs", "0"],
                                  ["--load", "--plot", "x.png"]])
def test_bench_rejects_bad_arguments(argv, capsys):
    with pytest.raises(SystemExit) as exc:
        benchmark.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_bench_help_explains_itself(capsys):
    with pytest.raises(SystemExit) as exc:
        fastbptt.__main__.main(["bench", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in ("python -m fastbptt bench", "PyTorch", "JAX", "float64", "GFLOP/s", compare.FLOP_FORMULA,
                 "--json", "--plot", "--configs", "sizes", "--quick", "--load", "--busy-threshold",
                 "architecture", "OPENBLAS_CORETYPE"):
        assert text in out
    assert "issue" not in out.lower() and "target" not in out.lower()       # no internal references


def test_best_time_counts_rounds_and_warmup():
    calls = []
    best, rounds, first = benchmark.best_time(lambda: calls.append(1), repeats=3, min_time=0, warmup=2)
    assert len(rounds) == 3 and best == min(rounds) and first is not None
    assert len(calls) == 2 + 3
