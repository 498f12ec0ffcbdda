"""``python -m fastbptt bench-torch`` (fastbptt/benchmarking/torch_step.py): its rows, checks, timing order and report.

Tiny problems only, and no assertion on any time. What is checked: the sets hold the
rows they say (latency-bound or not, the goal of each kind), the flags are checked
before anything runs, the rounds of the two steps really alternate, the check before
the timing catches modules that differ, the core model of the overhead rows holds the
torch module's weights (so its time is of the same work), and a quick run's report has
every field the README table is made from.
"""

import importlib.util
import json
import statistics

import numpy as np
import pytest

import fastbptt.__main__
from fastbptt.benchmarking import torch_step as ts

HAS_TORCH = importlib.util.find_spec("torch") is not None
needs_torch = pytest.mark.skipif(not HAS_TORCH, reason="PyTorch is not installed")


def has_bridge():
    if not HAS_TORCH:
        return False
    try:
        import fastbptt.torch  # noqa: F401
    except ImportError:
        return False
    return True


needs_bridge = pytest.mark.skipif(not has_bridge(), reason="PyTorch or fastbptt.torch is not available")
# one round of each, no pauses, no calibration beyond one call
FAST = ["--repeats", "2", "--min-time", "0", "--pause", "0", "--no-progress"]


def parse(*argv):
    parser = ts.build_parser()
    args = parser.parse_args(list(argv))
    ts.check_args(args, parser)
    return args


# ----------------------------------------------------------------------------- rows and flags


def test_sets_hold_the_rows_they_say():
    assert all(c.latency_bound and c.kind == "latency-bound" and c.goal == 2 for c in ts.LATENCY)
    assert {(c.B, c.H) for c in ts.LATENCY} == {(B, H) for B in (1, 8, 32) for H in (32, 64)}
    assert all(not c.latency_bound and c.kind == "larger" and c.goal == 1 for c in ts.LARGE)
    assert {(c.B, c.H) for c in ts.LARGE} == {(64, 256), (128, 512)}
    assert all(c.bidirectional for c in ts.BIDIRECTIONAL)
    assert all(c.packed and c.kind == "packed" and c.goal == 5 for c in ts.PACKED)
    for name, rows in ts.SETS.items():
        assert {c.cell for c in rows} == set(ts.CELLS), name
        assert len(set(rows)) == len(rows), name
        assert str(len(rows)) in ts.SET_TEXT[name] or name == "quick"
    assert {c.layers for c in ts.LATENCY} == {1, 2} and {c.T for c in ts.LATENCY} == {100}


def test_selection_of_rows():
    assert ts.select_cases(parse()) == [c for n in ts.DEFAULT_SETS for c in ts.SETS[n]]
    assert ts.overhead_Ts(parse()) == list(ts.OVERHEAD_T)
    got = ts.select_cases(parse("--configs", "packed", "--cell", "gru"))
    assert got and all(c.cell == "gru" and c.packed for c in got)
    got = ts.select_cases(parse("--config", "7,3,2,5,4", "--layers", "1,2", "--directions", "1,2",
                                "--lengths", "full,packed", "--cell", "lstm,rnn", "--dtype", "float64"))
    assert len(got) == 2 * 2 * 2 * 2
    assert {(c.layers, c.bidirectional, c.packed, c.cell) for c in got} == \
        {(L, bi, p, cell) for L in (1, 2) for bi in (False, True) for p in (False, True) for cell in ("rnn", "lstm")}
    assert all((c.T, c.B, c.D, c.H, c.O, c.dtype) == (7, 3, 2, 5, 4, "float64") for c in got)
    assert ts.overhead_Ts(parse("--config", "7,3,2,5,4")) == []
    assert ts.overhead_Ts(parse("--configs", "quick")) == [1]
    assert ts.overhead_Ts(parse("--overhead-T", "0")) == []
    assert ts.overhead_Ts(parse("--overhead-T", "3,4")) == [3, 4]


@pytest.mark.parametrize("argv", [["--repeats", "0"], ["--threads", "0"], ["--min-time", "nan"], ["--pause", "-1"],
                                  ["--busy-threshold", "2"], ["--configs", "nosuchset"], ["--cell", "elman"],
                                  ["--config", "1,2,3"], ["--config", "5,2,3,4,3", "--configs", "quick"],
                                  ["--layers", "2"], ["--lengths", "packed"], ["--directions", "2"],
                                  ["--config", "5,2,3,4,3", "--directions", "3"],
                                  ["--config", "5,2,3,4,3", "--lengths", "sorted"], ["--overhead-T", "0,2"],
                                  ["--optimizer", "adam"], ["--json", "/no/such/dir/x.json"],
                                  ["--wait-quiet", "-1"], ["--retries", "-1"]])
def test_bad_arguments_are_refused_before_anything_runs(argv, capsys, monkeypatch):
    monkeypatch.setattr(ts, "run", lambda *a, **k: pytest.fail("ran despite a bad flag"))
    with pytest.raises(SystemExit) as exc:
        ts.main(argv)
    assert exc.value.code == 2
    assert "error" in capsys.readouterr().err


def test_without_pytorch_it_says_how_to_install(capsys, monkeypatch):
    monkeypatch.setattr(ts, "torch_available", lambda: False)
    monkeypatch.setattr(ts, "run", lambda *a, **k: pytest.fail("ran without PyTorch"))
    assert ts.main(["--configs", "quick"]) == 2
    assert 'pip install "fastbptt[torch]"' in capsys.readouterr().err


def test_subcommand_and_help(capsys):
    with pytest.raises(SystemExit) as exc:
        fastbptt.__main__.main(["bench-torch", "--help"])
    assert exc.value.code == 0
    out = capsys.readouterr().out
    for text in ("python -m fastbptt bench-torch", "state_dict", "enforce_sorted=False", "median",
                 ts.README_COMMAND, "--configs", "--json", "overhead"):
        assert text in out
    assert "``" not in out and "issue" not in out.lower()
    assert fastbptt.__main__.main(["--help"]) == 0
    assert "bench-torch" in capsys.readouterr().out


# ----------------------------------------------------------------------------- timing


def test_rounds_alternate_and_exclude_the_calibration():
    log = []
    fns = {"a": lambda: log.append("a"), "b": lambda: log.append("b")}
    out = ts.interleaved_rounds(fns, rounds=4, min_time=0, pause=0)
    assert {n: len(o["rounds"]) for n, o in out.items()} == {"a": 4, "b": 4}
    assert all(o["calls"] == 1 for o in out.values())
    # calibration: a warm-up call and one round of one call each, a then b; then the rounds
    assert log == ["a", "a", "b", "b"] + ["a", "b", "b", "a", "a", "b", "b", "a"]


def test_summary_is_the_median_of_the_rounds():
    s = ts._summary([0.003, 0.001, 0.002, 0.010])
    assert s["median_ms"] == pytest.approx(2.5) and s["best_ms"] == pytest.approx(1.0)
    assert s["rounds_ms"] == pytest.approx([3, 1, 2, 10])


class FakeMonitor:
    """A LoadMonitor whose windows are busy ``busy`` times, then quiet."""

    available = True

    def __init__(self, busy):
        self.busy, self.windows = busy, 0

    def sample(self):
        return object()

    def since(self, sample):
        self.windows += 1
        disturbed = self.windows <= self.busy
        return type("L", (), {"disturbed": lambda self, threshold: disturbed})()


def test_wait_quiet_waits_for_a_quiet_window_or_gives_up():
    m = FakeMonitor(busy=3)
    ts.wait_quiet(m, 0.1, max_wait=60, window=0, sleep=lambda s: None)
    assert m.windows == 4                                  # three busy windows, then a quiet one
    m = FakeMonitor(busy=10**9)
    assert ts.wait_quiet(m, 0.1, max_wait=0.02, window=0.005) >= 0.02 and m.windows >= 2
    m = FakeMonitor(busy=10**9)
    assert ts.wait_quiet(m, 0.1, max_wait=0) == 0 and m.windows == 0


def test_disturbed_rows_are_retried_and_the_least_disturbed_kept():
    fractions = iter([0.5, 0.3, 0.6, 0.05, 0.9])

    def row():
        f = next(fractions)
        return {"load": {"others_fraction": f}, "disturbed": f > 0.1, "f": f}
    got = ts.least_disturbed(row, retries=10)
    assert got["f"] == 0.05 and got["attempts"] == 4 and got["waited_s"] == 0
    fractions = iter([0.5, 0.3, 0.6])
    got = ts.least_disturbed(row, retries=2)
    assert got["f"] == 0.3 and got["attempts"] == 3
    fractions = iter([0.5, 0.3])
    assert ts.least_disturbed(row)["f"] == 0.5                  # no retries by default
    calls = []
    assert "error" in ts.least_disturbed(lambda: calls.append(1) or {"error": "x", "disturbed": True}, retries=3)
    assert len(calls) == 1


# ----------------------------------------------------------------------------- with PyTorch


@needs_torch
@pytest.mark.parametrize("cell, layers, bi", [("rnn", 1, False), ("gru", 2, False), ("lstm", 2, True)])
def test_core_model_holds_the_torch_weights(cell, layers, bi):
    import torch

    import fastbptt

    cls = {"rnn": torch.nn.RNN, "gru": torch.nn.GRU, "lstm": torch.nn.LSTM}[cell]
    torch.manual_seed(3)
    m = cls(3, 5, num_layers=layers, bidirectional=bi, dtype=torch.float64)
    with torch.no_grad():
        for name, p in m.named_parameters():
            if name.startswith("bias_hh"):
                p.add_(0.3)                               # the Elman cell sums its two biases
    model = ts.core_model_from(m, cell, "float64")
    x = torch.randn(6, 2, 3, dtype=torch.float64)
    want, _ = m(x)
    got, _ = fastbptt.layer_forward(model, x.numpy(), workspace=fastbptt.Workspace(model, 6, 2))
    np.testing.assert_allclose(got, want.detach().numpy(), rtol=0, atol=1e-12)


@needs_torch
def test_header_names_the_libraries_and_the_forcing_variables():
    info = ts.machine_info(environ={})
    text = "\n".join(ts.header_lines(info))
    assert "BLAS" in text and "PyTorch" in text and "MKL" in text and "oneDNN" in text
    assert "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are not set" in text
    assert info["openblas_forcing"] == {"OPENBLAS_CORETYPE": None, "OPENBLAS_L2_SIZE": None}
    forced = ts.machine_info(environ={"OPENBLAS_CORETYPE": "Haswell"})
    text = "\n".join(ts.header_lines(forced))
    assert "warning: OPENBLAS_CORETYPE=Haswell" in text and ts.README_COMMAND in text


@needs_bridge
def test_check_catches_modules_that_differ():
    import torch

    case = ts.Case("gru", 4, 3, 5, D=3, O=4, packed=True)
    parts = ts.make_modules(case)
    x, y, lengths = ts.make_batch(case)
    steps = [ts.make_step(m, h, x, y, lengths) for m, h in ((parts[0], parts[2]), (parts[1], parts[3]))]
    assert ts.check_same(*steps, parts)["ok"]
    with torch.no_grad():
        parts[1].weight_hh_l0[0, 0] += 1e-2
    checked = ts.check_same(*steps, parts)
    assert not checked["ok"] and checked["max_grad_error"] > 1e-4


@needs_bridge
def test_quick_run_report(tmp_path, capsys):
    path = tmp_path / "r.json"
    assert ts.main(["--configs", "quick", "--breakdown", "--json", str(path)] + FAST) == 0
    out = capsys.readouterr().out
    for text in ("torch.nn ms", "fastbptt ms", "overhead µs", "goal >=", "per-call overhead"):
        assert text in out
    report = json.loads(path.read_text())
    assert report["command"][:4] == ["python", "-m", "fastbptt", "bench-torch"]
    assert report["readme_command"] == ts.README_COMMAND and report["threads"] == 2 and not report["interrupted"]
    assert set(report["machine"]["openblas_forcing"]) == set(ts.FORCING)
    assert report["machine"]["torch"]["version"]
    assert len(report["rows"]) == len(ts.QUICK)
    for row, case in zip(report["rows"], ts.QUICK):
        assert (row["cell"], row["T"], row["B"], row["H"], row["packed"]) == (case.cell, case.T, case.B, case.H,
                                                                             case.packed)
        assert row["check"]["ok"] and row["goal"] == case.goal and row["B_H"] == case.B * case.H
        assert row["grad_fn"]["fastbptt.torch"] != row["grad_fn"]["torch.nn"]
        medians = {}
        for name in ts.IMPLS:
            e = row["impls"][name]
            assert len(e["rounds_ms"]) == 2 and e["median_ms"] == pytest.approx(statistics.median(e["rounds_ms"]))
            medians[name] = e["median_ms"]
        assert row["ratio"] == pytest.approx(medians["torch.nn"] / medians["fastbptt.torch"])
        assert row["met"] == (row["ratio"] >= row["goal"]) and row["head_ms"] > 0
        assert ("positions" in row) == case.packed and row["waited_s"] == 0 and row["attempts"] == 1
    assert [(r["cell"], r["T"]) for r in report["overhead"]] == [(c, 1) for c in ts.CELLS]
    for r in report["overhead"]:
        e = r["impls"]
        assert r["overhead_us"] == pytest.approx(1e3 * (e["fastbptt.torch"]["median_ms"] - e["core"]["median_ms"]))
        assert r["met"] == (r["overhead_us"] < ts.OVERHEAD_GOAL_US)


@needs_bridge
def test_a_run_restores_the_thread_count_and_sgd_steps_change_the_weights(capsys):
    import torch

    before = torch.get_num_threads()
    report = ts.run(parse("--config", "4,2,3,5,3", "--cell", "rnn", "--threads", "1", "--optimizer", "sgd", *FAST))
    assert torch.get_num_threads() == before and report["threads"] == 1 and report["optimizer"] == "sgd"
    assert report["rows"][0]["check"]["ok"]                  # checked before any optimizer step

    case = ts.Case("rnn", 4, 2, 5, D=3, O=3)
    parts = ts.make_modules(case)
    x, y, _ = ts.make_batch(case)
    w = parts[1].weight_hh_l0.detach().clone()
    ts.make_step(parts[1], parts[3], x, y, optimizer="none")()
    assert torch.equal(parts[1].weight_hh_l0, w)
    ts.make_step(parts[1], parts[3], x, y, optimizer="sgd")()
    assert not torch.equal(parts[1].weight_hh_l0, w)


@needs_bridge
def test_rows_print_as_they_are_done_and_an_interrupted_run_keeps_them(tmp_path, capsys, monkeypatch):
    real, calls = ts.run_case, []

    def run_case(*a, **k):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt
        return real(*a, **k)
    monkeypatch.setattr(ts, "run_case", run_case)
    path = tmp_path / "r.json"
    assert ts.main(["--configs", "quick", "--json", str(path)] + FAST) == 130
    out = capsys.readouterr().out
    assert "1 rows and 0 overhead rows" in out and "interrupted" in out
    table = [line.split() for line in out.splitlines() if line.split()[:1] in (["rnn"], ["gru"], ["lstm"])]
    assert [r[:2] for r in table] == [["rnn", "5"]] and "torch.nn ms" in out    # the header and the row done
    report = json.loads(path.read_text())
    assert report["interrupted"] and len(report["rows"]) == 1 and report["overhead"] == []
