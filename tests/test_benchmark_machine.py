"""What the benchmark tools say about the machine: its load, its BLAS kernels and CPU, progress, --load.

/proc/stat, /proc/cpuinfo and threadpoolctl's answers are faked by passing their text in;
no test times anything or asserts on a measured time.
"""

import io
import json
import sys
import threading

import numba
import pytest

from fastbptt import _load, _loadbench, _machine, _progress, benchmark

# ----------------------------------------------------------------------------- /proc/stat


def stat_text(busy_user, idle, cores=2, steal=0, system=0, iowait=0, guest=0):
    """/proc/stat's text with the given aggregate counters (ticks) and ``cores`` cpuN lines."""
    total = f"cpu  {busy_user} 0 {system} {idle} {iowait} 0 0 {steal} {guest} 0"
    per_cpu = [f"cpu{i} 1 0 0 1 0 0 0 0 0 0" for i in range(cores)]
    return "\n".join([total, *per_cpu, "intr 1 2 3", "ctxt 99", "btime 1700000000", "processes 7"]) + "\n"


def test_parse_proc_stat_counts_busy_and_steal_ticks_and_cores():
    busy, steal, cores = _load.parse_proc_stat(stat_text(100, 500, cores=4, steal=7, system=20, iowait=30, guest=5))
    assert busy == 100 + 20 + 7          # user + system + steal; idle, iowait and guest (already in user) are not
    assert steal == 7 and cores == 4
    # an old kernel's four counters: user nice system idle
    assert _load.parse_proc_stat("cpu  10 2 3 400\ncpu0 10 2 3 400\n") == (15, 0, 1)


@pytest.mark.parametrize("text", ["", "intr 1 2\n", "cpu  1 2\ncpu0 1 2\n", "cpu  a b c d\n"])
def test_parse_proc_stat_refuses_what_it_cannot_read(text):
    with pytest.raises(ValueError, match="cpu"):
        _load.parse_proc_stat(text)


def test_load_math():
    # 2 s on 4 cores = 8 core-seconds; 5 busy, 1 of them ours: others 4 s = half the machine, 2 cores
    load = _load.Load(wall_s=2.0, cores=4, busy_s=5.0, own_s=1.0, tick_s=0.01)
    assert load.others_s == pytest.approx(4.0)
    assert load.fraction == pytest.approx(0.5)
    assert load.others_cores == pytest.approx(2.0)
    assert load.resolution == pytest.approx(0.005)
    assert load.disturbed(0.4) and not load.disturbed(0.5)
    # our own CPU time is never counted as someone else's, and coarse ticks never make it negative
    assert _load.Load(1.0, 2, busy_s=1.0, own_s=1.3).others_s == 0.0
    # a share the ticks push over the machine is cut at 1
    assert _load.Load(0.01, 2, busy_s=0.05, own_s=0.0).fraction == 1.0


def test_load_within_the_ticks_resolution_is_not_disturbed():
    # 0.05 s on 2 cores: one tick per core is 0.01 / 0.05 = 20 % of the machine
    short = _load.Load(wall_s=0.05, cores=2, busy_s=0.02, own_s=0.0, tick_s=0.01)
    assert short.fraction == pytest.approx(0.2) and short.resolution == pytest.approx(0.2)
    assert not short.disturbed(0.1)
    longer = _load.Load(wall_s=1.0, cores=2, busy_s=0.4, own_s=0.0, tick_s=0.01)
    assert longer.disturbed(0.1)


def test_loads_add_up_and_round_trip_through_json():
    a = _load.Load(1.0, 2, busy_s=1.5, own_s=1.0, steal_s=0.1)
    b = _load.Load(3.0, 2, busy_s=2.5, own_s=2.0)
    both = a + b
    assert (both.wall_s, both.busy_s, both.own_s, both.steal_s) == (4.0, 4.0, 3.0, 0.1)
    assert both.fraction == pytest.approx(1.0 / 8)
    assert _load.total([None, a, None, b]) == both and _load.total([None]) is None
    d = json.loads(json.dumps(both.as_dict(0.1)))
    assert _load.Load.from_dict(d) == both
    assert d["others_cpu_s"] == pytest.approx(1.0) and d["disturbed"] is True


class FakeMachine:
    """A /proc/stat reader, a process CPU clock and a wall clock that the test moves by hand."""

    def __init__(self, cores=2):
        self.cores, self.busy, self.idle, self.own, self.wall = cores, 1000, 5000, 0.0, 100.0
        self.readable = True

    def run(self, seconds, own_cores, other_cores, tick=0.01):
        """``seconds`` pass with this process on ``own_cores`` cores and others on ``other_cores``."""
        self.wall += seconds
        self.own += own_cores * seconds
        busy = round((own_cores + other_cores) * seconds / tick)
        self.busy += busy
        self.idle += round(self.cores * seconds / tick) - busy

    def monitor(self):
        return _load.LoadMonitor(read_stat=lambda: stat_text(self.busy, self.idle, self.cores) if self.readable
                                 else None, own_time=lambda: self.own, clock=lambda: self.wall,
                                 ticks_per_second=100)


def test_monitor_takes_our_own_cpu_time_out():
    machine = FakeMachine(cores=2)
    monitor = machine.monitor()
    assert monitor.available and monitor.cores == 2
    start = monitor.sample()
    machine.run(2.0, own_cores=2.0, other_cores=0.0)         # we use both cores: nobody else
    quiet = monitor.since(start)
    assert quiet.others_s == pytest.approx(0.0, abs=1e-9) and not quiet.disturbed()
    start = monitor.sample()
    machine.run(2.0, own_cores=1.0, other_cores=1.0)         # a neighbour takes one of the two cores
    busy = monitor.since(start)
    assert busy.fraction == pytest.approx(0.5) and busy.others_cores == pytest.approx(1.0)
    assert busy.disturbed() and "50%" in _load.describe(busy) and "busy" in _load.describe(busy)


def test_monitor_degrades_where_proc_stat_does_not_exist(tmp_path):
    monitor = _load.LoadMonitor(read_stat=lambda: _load.read_proc_stat(str(tmp_path / "no-such-stat")))
    assert not monitor.available and "/proc/stat" in monitor.why_unavailable
    assert monitor.sample() is None and monitor.since(None) is None
    garbled = _load.LoadMonitor(read_stat=lambda: "nothing here\n")
    assert not garbled.available and garbled.since(garbled.sample()) is None
    # a file that disappears half way: no figure, no exception
    machine = FakeMachine()
    monitor = machine.monitor()
    start = monitor.sample()
    machine.readable = False
    assert monitor.since(start) is None


def test_the_real_proc_stat_parses_where_it_exists():
    text = _load.read_proc_stat()
    if text is None:
        pytest.skip("no /proc/stat here")
    busy, _, cores = _load.parse_proc_stat(text)
    assert busy > 0 and cores >= 1


# ----------------------------------------------------------------------------- bench's load column


class ScriptedMonitor:
    """A LoadMonitor whose every window reports the same share of the machine used by others."""

    def __init__(self, fraction, cores=2, available=True):
        self.fraction, self.cores, self.available = fraction, cores, available
        self.why_unavailable = None if available else "/proc/stat cannot be read on this system"

    def sample(self):
        return object() if self.available else None

    def since(self, start):
        if start is None:
            return None
        return _load.Load(wall_s=1.0, cores=self.cores, busy_s=0.5 + self.fraction * self.cores, own_s=0.5)


TINY = ["--config", "4,2,3,5,3", "--config", "6,1,2,4,3", "--repeats", "1", "--reference-repeats", "1",
        "--min-time", "0", "--peak-n", "0", "--pause", "0", "--no-progress", "--impl", "fastbptt,reference"]


def test_bench_marks_rows_timed_while_the_machine_was_busy(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark, "LoadMonitor", lambda: ScriptedMonitor(0.5))
    path = tmp_path / "busy.json"
    assert benchmark.main([*TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "busy" in out.splitlines()[next(i for i, l in enumerate(out.splitlines()) if "fastbptt ms" in l)]
    assert out.count("50%*") == 2
    assert "warning: 2 of 2 rows were timed while other processes used over 10%" in out
    assert "load average" not in out
    doc = json.loads(path.read_text())
    assert doc["load"]["measured"] and doc["load"]["disturbed_rows"] == 2
    for r in doc["results"]:
        assert r["disturbed"] and r["load"]["others_fraction"] == pytest.approx(0.5)
        assert r["impls"]["fastbptt"]["load"]["disturbed"]


def load_warnings(out):
    """The warnings about load; not the one about BLAS's kernels, which depends on the environment
    (OPENBLAS_CORETYPE set on a CPU with wider vectors, as on some CI machines)."""
    return [line for line in out.splitlines() if line.startswith("warning") and " kernels " not in line]


def test_bench_quiet_machine_and_threshold(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark, "LoadMonitor", lambda: ScriptedMonitor(0.05))
    path = tmp_path / "quiet.json"
    assert benchmark.main([*TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "5%" in out and "*" not in out.split("max err")[1].split("\n\n")[0] and not load_warnings(out)
    assert json.loads(path.read_text())["load"]["disturbed_rows"] == 0
    assert benchmark.main([*TINY, "--busy-threshold", "0.01"]) == 0
    assert "warning: 2 of 2 rows" in capsys.readouterr().out


def test_bench_without_proc_stat_says_the_load_was_not_measured(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(benchmark, "LoadMonitor", lambda: ScriptedMonitor(0.0, available=False))
    path = tmp_path / "noproc.json"
    assert benchmark.main([*TINY, "--json", str(path)]) == 0
    out = capsys.readouterr().out
    assert "machine load: not measured (/proc/stat cannot be read" in out
    assert " busy" not in out and not load_warnings(out)
    doc = json.loads(path.read_text())
    assert doc["load"]["measured"] is False and all("load" not in r for r in doc["results"])


# ----------------------------------------------------------------------------- CPU and BLAS kernels


def cpuinfo(*flags):
    return f"processor\t: 0\nmodel name\t: Some CPU\nflags\t\t: fpu sse sse2 {' '.join(flags)}\n\n"


@pytest.mark.parametrize("flags, widest", [(("sse4_2", "avx", "avx2", "avx512f", "avx512bw"), "avx512f"),
                                           (("sse4_2", "avx", "avx2"), "avx2"), (("sse4_2", "avx"), "avx"),
                                           (("ssse3", "sse4_1", "sse4_2"), "sse4_2"), (("ssse3",), "older")])
def test_cpu_vector_extension_is_the_widest_flag(flags, widest):
    assert _machine.cpu_vector_extension(cpuinfo(*flags), machine="x86_64") == widest


def test_cpu_vector_extension_off_x86_or_without_flags():
    assert _machine.cpu_vector_extension(cpuinfo("avx2"), machine="aarch64") is None
    assert "not x86" in _machine.describe_cpu(None, machine="aarch64")
    assert _machine.cpu_vector_extension("processor : 0\n", machine="x86_64") is None
    assert "unknown" in _machine.describe_cpu(None, machine="x86_64")


def openblas(arch):
    return [{"user_api": "blas", "internal_api": "openblas", "version": "0.3.27", "num_threads": 2,
             "architecture": arch, "prefix": "libopenblas", "filepath": "/x/libopenblas.so"},
            {"user_api": "openmp", "internal_api": "openmp", "version": None, "num_threads": 2}]


def test_blas_libraries_name_their_kernels_vector_extension():
    libs = _machine.blas_libraries(openblas("SkylakeX"))
    assert len(libs) == 1 and libs[0]["architecture"] == "SkylakeX" and libs[0]["extension"] == "avx512f"
    assert _machine.blas_libraries(openblas("Haswell"))[0]["extension"] == "avx2"
    assert _machine.blas_libraries(openblas("Zen"))[0]["extension"] == "avx2"
    assert _machine.blas_libraries(openblas("NewCore9000"))[0]["extension"] is None
    text = _machine.describe_blas(_machine.blas_libraries(openblas("Haswell")))
    assert "openblas 0.3.27" in text and "Haswell kernels (avx2)" in text and "2 threads" in text
    assert "pip install threadpoolctl" in _machine.describe_blas(None)


def test_a_haswell_kernel_on_an_avx512_cpu_is_warned_about():
    libs = _machine.blas_libraries(openblas("Haswell"))
    forced = _machine.kernel_warnings(libs, "avx512f", {"OPENBLAS_CORETYPE": "Haswell", "OPENBLAS_L2_SIZE": "1"})
    assert len(forced) == 1
    assert "Haswell kernels (avx2) on a CPU with avx512f" in forced[0]
    assert "OPENBLAS_CORETYPE=Haswell and OPENBLAS_L2_SIZE=1" in forced[0]
    assert "env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE" in forced[0]
    unforced = _machine.kernel_warnings(libs, "avx512f", {})
    assert len(unforced) == 1 and "are not set" in unforced[0]


@pytest.mark.parametrize("arch, cpu", [("SkylakeX", "avx512f"), ("Haswell", "avx2"), ("Haswell", "avx"),
                                       ("NewCore9000", "avx512f"), ("Haswell", None)])
def test_matching_or_unknown_kernels_are_not_warned_about(arch, cpu):
    env = {"OPENBLAS_CORETYPE": arch}
    assert _machine.kernel_warnings(_machine.blas_libraries(openblas(arch)), cpu, env) == []
    assert _machine.kernel_warnings(None, "avx512f", env) == []


def test_bench_header_shows_the_kernels_and_the_warning(monkeypatch, capsys):
    haswell = _machine.blas_libraries(openblas("Haswell"))
    monkeypatch.setattr(_machine, "blas_libraries", lambda info=None: haswell)
    monkeypatch.setattr(_machine, "cpu_vector_extension", lambda cpuinfo=None, machine=None: "avx512f")
    monkeypatch.setenv("OPENBLAS_CORETYPE", "Haswell")     # only this test's copy of the environment
    assert benchmark.main(TINY) == 0
    out = capsys.readouterr().out
    head = out.split("one step:")[0]
    assert "BLAS openblas 0.3.27 with Haswell kernels (avx2)" in head and "CPU up to avx512f" in head
    assert "warning: openblas runs its Haswell kernels" in head and "OPENBLAS_CORETYPE=Haswell" in head


def test_header_on_this_machine_names_blas_and_cpu(capsys):
    assert benchmark.main(TINY) == 0
    head = capsys.readouterr().out.split("one step:")[0]
    assert "BLAS" in head and "CPU" in head


# ----------------------------------------------------------------------------- progress


class Terminal(io.StringIO):
    def isatty(self):
        return True


def test_progress_off_a_terminal_is_plain_lines():
    stream = io.StringIO()
    progress = _progress.Progress(2, stream=stream)
    progress.step("first")
    progress.step("second")
    progress.close()
    assert stream.getvalue() == "[1/2] first\n[2/2] second\n"
    quiet = io.StringIO()
    progress = _progress.Progress(2, stream=quiet, lines=False)
    progress.step("first")
    progress.close()
    assert quiet.getvalue() == ""


def test_progress_on_a_terminal_is_a_bar_or_says_how_to_get_one(monkeypatch):
    pytest.importorskip("tqdm")
    stream = Terminal()
    progress = _progress.Progress(2, stream=stream)
    progress.step("first")
    progress.step("second")
    progress.close()
    assert "\r" in stream.getvalue() and "2/2" in stream.getvalue()
    monkeypatch.setitem(sys.modules, "tqdm", None)
    stream = Terminal()
    _progress.Progress(1, stream=stream).step("only")
    assert "pip install tqdm" in stream.getvalue() and "[1/1] only" in stream.getvalue()


def test_compiling_says_nothing_when_quick():
    stream = Terminal()
    with _progress.compiling(stream=stream, after=60):
        pass
    assert stream.getvalue() == ""


@pytest.mark.parametrize("terminal", [False, True])
def test_compiling_tells_about_a_long_wait(terminal, monkeypatch):
    if terminal:
        pytest.importorskip("tqdm")
    stream = Terminal() if terminal else io.StringIO()
    with _progress.compiling(stream=stream, after=0):
        numba.njit(lambda x: x + 1)(1)          # a compilation (a cache hit would show nothing)
        # wait (not time) until the notice is out
        for _ in range(500):
            if "compiling kernels" in stream.getvalue():
                break
            threading.Event().wait(0.01)
    text = stream.getvalue()
    assert "compiling kernels (first run only" in text and "cached afterwards" in text
    assert "kernels ready after" in text
    assert ("\r" in text) == terminal


# ----------------------------------------------------------------------------- bench --load


class FakeCompetitors:
    """Records when the busy loops would run, instead of starting them."""

    running = False
    entered = []

    def __init__(self, n):
        self.n = n

    def __enter__(self):
        FakeCompetitors.running = True
        FakeCompetitors.entered.append(self.n)
        return self

    def __exit__(self, *exc):
        FakeCompetitors.running = False
        return False


def test_interleaved_phases_alternate_and_load_only_the_loaded_ones():
    seen = []

    def step():
        seen.append(FakeCompetitors.running)

    ticks = iter(range(10 ** 6))
    FakeCompetitors.entered = []
    machine = FakeMachine()
    phases = _loadbench.run_interleaved(step, pairs=3, min_time=2, competitors=1, monitor=machine.monitor(),
                                        load=FakeCompetitors, clock=lambda: next(ticks))
    assert [p["condition"] for p in phases] == ["idle", "loaded", "loaded", "idle", "idle", "loaded"]
    assert FakeCompetitors.entered == [1, 1, 1] and not FakeCompetitors.running
    assert all(len(p["times"]) >= 5 for p in phases)
    # every call of a loaded phase (its untimed first one too) ran beside the competitors, no idle one did
    calls = iter(seen)
    for p in phases:
        assert {next(calls) for _ in range(len(p["times"]) + 1)} == {p["condition"] == "loaded"}


def phase(condition, times_ms, load=None):
    return {"condition": condition, "times": [t / 1e3 for t in times_ms], "load": load}


def test_summary_medians_ratio_and_loads():
    quiet = _load.Load(1.0, 2, busy_s=1.0, own_s=1.0)
    one_core = _load.Load(1.0, 2, busy_s=2.0, own_s=1.0)           # the competitor's one core
    phases = [phase("idle", [1, 2, 3], quiet), phase("loaded", [2, 4, 100], one_core),
              phase("loaded", [3, 5, 6], one_core), phase("idle", [1, 2, 9], quiet)]
    s = _loadbench.summarize(phases, competitors=1)
    assert s["idle_ms"] == pytest.approx(2.0) and s["loaded_ms"] == pytest.approx(4.5)
    assert s["ratio"] == pytest.approx(2.25)
    assert s["idle_phase_ms"] == pytest.approx([2, 2]) and s["loaded_phase_ms"] == pytest.approx([4, 5])
    assert s["idle_calls"] == 6 and s["loaded_calls"] == 6
    assert not s["idle_disturbed"] and not s["loaded_disturbed"] and s["competitors_ran"]
    assert s["loaded_load"]["others_cores"] == pytest.approx(1.0)


def test_summary_flags_a_busy_idle_phase_a_third_party_and_a_starved_competitor():
    busy = _load.Load(1.0, 2, busy_s=2.0, own_s=1.0)               # someone used a core while "idle"
    crowded = _load.Load(1.0, 4, busy_s=4.0, own_s=1.0)            # 3 cores of others, 1 of them ours
    s = _loadbench.summarize([phase("idle", [1], busy), phase("loaded", [2], crowded)], competitors=1)
    assert s["idle_disturbed"] and s["loaded_disturbed"] and s["competitors_ran"]
    starved = _load.Load(1.0, 2, busy_s=1.2, own_s=1.0)            # the busy loop got 0.2 of a core
    s = _loadbench.summarize([phase("idle", [1]), phase("loaded", [2], starved)], competitors=1)
    assert s["competitors_ran"] is False and "idle_load" not in s


def test_bound_is_the_share_of_cores_left():
    assert _loadbench.bound(2, 1) == 2.0
    assert _loadbench.bound(16, 8) == 2.0
    assert _loadbench.bound(4, 1) == pytest.approx(4 / 3)
    assert _loadbench.bound(2, 2) is None


def test_competitors_really_run_and_are_gone_after():
    with _loadbench.Competitors(2) as load:
        procs = list(load.procs)
        assert len(procs) == 2 and all(p.poll() is None for p in procs)
    assert all(p.poll() is not None for p in procs)
    with pytest.raises(ValueError, match="competing processes"):
        _loadbench.Competitors(-1)


def test_competitors_that_cannot_start_are_reported_and_cleaned_up(tmp_path):
    with pytest.raises((RuntimeError, OSError)):
        with _loadbench.Competitors(1, python=str(tmp_path / "no-python")):
            pass


def test_bench_load_prints_medians_ratio_and_json(monkeypatch, tmp_path, capsys):
    monkeypatch.setattr(_loadbench, "Competitors", FakeCompetitors)
    path = tmp_path / "load.json"
    rc = benchmark.main(["--load", "--config", "3,2,3,4,3", "--repeats", "2", "--min-time", "0",
                         "--no-progress", "--load-procs", "1", "--json", str(path)])
    out = capsys.readouterr().out
    assert rc == 0, out
    for text in ("load benchmark", "BLAS", "idle ms", "loaded ms", "×slower", "others idle",
                 "beside 1 busy-loop process", "2 pairs"):
        assert text in out
    doc = json.loads(path.read_text())
    assert doc["competitors"] == 1 and doc["pairs"] == 2 and doc["implementations"] == ["fastbptt"]
    (row,) = doc["results"]
    assert row["ok"] and row["impl"] == "fastbptt" and (row["T"], row["H"]) == (3, 4)
    assert row["ratio"] == pytest.approx(row["loaded_ms"] / row["idle_ms"])
    assert [p["condition"] for p in row["phases"]] == ["idle", "loaded", "loaded", "idle"]


def test_bench_load_reports_a_wrong_step(monkeypatch, capsys):
    from fastbptt import compare

    def wrong(model, X, Y, **options):
        step = compare.make_reference_step(model, X, Y)
        return lambda: (step()[0], {k: 2 * v for k, v in step()[1].items()})

    monkeypatch.setattr(_loadbench, "Competitors", FakeCompetitors)
    monkeypatch.setitem(compare.MAKERS, "reference", wrong)
    rc = benchmark.main(["--load", "--config", "3,2,3,4,3", "--impl", "reference", "--repeats", "1",
                         "--min-time", "0", "--no-progress"])
    assert rc == 1 and "FAILED reference" in capsys.readouterr().err


# ----------------------------------------------------------------------------- output paths and --help


@pytest.mark.parametrize("flag", ["--json", "--plot"])
@pytest.mark.parametrize("where", ["directory", "missing folder", "empty", "proc"])
def test_bench_refuses_an_unwritable_output_before_running(flag, where, tmp_path, monkeypatch, capsys):
    if flag == "--plot":
        pytest.importorskip("matplotlib")
    path = {"directory": str(tmp_path), "missing folder": str(tmp_path / "nope" / "x.png"), "empty": "",
            "proc": "/proc/fastbptt-bench.png"}[where]
    if where == "proc" and not _load.read_proc_stat():
        pytest.skip("no /proc here")
    monkeypatch.setattr(benchmark, "run_config", lambda *a, **k: pytest.fail("benchmarked before checking"))
    monkeypatch.setattr(benchmark, "gemm_peak", lambda *a, **k: pytest.fail("benchmarked before checking"))
    with pytest.raises(SystemExit) as exc:
        benchmark.main([*TINY, flag, path])
    assert exc.value.code == 2
    assert flag in capsys.readouterr().err


def test_bench_refuses_a_plot_format_matplotlib_lacks(tmp_path, capsys):
    pytest.importorskip("matplotlib")
    json_path = tmp_path / "kept.json"
    with pytest.raises(SystemExit) as exc:
        benchmark.main([*TINY, "--json", str(json_path), "--plot", str(tmp_path / "plot.xyz")])
    assert exc.value.code == 2 and "cannot write .xyz" in capsys.readouterr().err
    assert not json_path.exists()                      # the check leaves nothing behind


def test_bench_output_check_keeps_an_existing_file(tmp_path, capsys):
    path = tmp_path / "old.json"
    path.write_text("old contents")
    with pytest.raises(SystemExit):
        benchmark.main([*TINY, "--json", str(path), "--repeats", "0"])
    assert path.read_text() == "old contents"


def _actions(parser):
    return [a for a in parser._actions if a.option_strings and a.dest != "help"]


def test_every_bench_and_profile_flag_has_help():
    from fastbptt import profile

    for parser in (benchmark.build_parser(), profile.build_parser()):
        assert all(a.help and len(a.help) > 10 for a in _actions(parser)), \
            [a.option_strings for a in _actions(parser) if not a.help]


@pytest.mark.parametrize("argv", [["--help"], ["bench", "--help"], ["profile", "--help"]])
def test_help_is_plain_text(argv, capsys):
    import fastbptt.__main__

    try:
        rc = fastbptt.__main__.main(argv)
    except SystemExit as exc:
        rc = exc.code
    out = capsys.readouterr().out
    assert rc == 0 and "usage" in out.lower()
    assert "``" not in out and ":func:" not in out and ":class:" not in out


def test_profile_header_names_blas_and_cpu(capsys):
    from fastbptt import profile

    assert profile.main(["--T", "3", "--H", "4", "--no-progress"]) == 0
    out = capsys.readouterr().out
    assert "BLAS" in out and "CPU" in out and "fastbptt ms" in out
