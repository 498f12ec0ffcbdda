"""Hostile use of the core: attributes changed by hand, inputs that alias the workspace,
copies and pickles, Python threads, fork, and bitwise determinism under a BLAS whose bits
depend on its thread count."""

import copy
import multiprocessing
import os
import pickle
import subprocess
import sys
import textwrap
import threading
import warnings

import numpy as np
import pytest

import fastbptt
from fastbptt import threads
from helpers import has_avx2, make_problem


def _result(model, X, Y, h0=None, **kw):
    """loss_and_grad on a fresh workspace, everything copied out."""
    loss, grads, h, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, return_dh0=True, **kw)
    return loss, {k: v.copy() for k, v in grads.items()}, h.copy(), dh0.copy()


def _assert_same(a, b):
    assert a[0] == b[0], "losses differ"
    for name in a[1]:
        assert np.array_equal(a[1][name], b[1][name]), f"grad {name} differs"
    assert np.array_equal(a[2], b[2]), "h_T differs"
    assert np.array_equal(a[3], b[3]), "dh0 differs"


# ----------------------------------------------------------------------------- the model by hand

@pytest.mark.parametrize("name", ["input_size", "hidden_size", "output_size", "dtype", "bias", "layout"])
def test_sizes_are_read_only(name):
    model = fastbptt.RNN(3, 4, 2)
    with pytest.raises(AttributeError):
        setattr(model, name, 1000)


def test_params_mapping_is_read_only():
    model = fastbptt.RNN(3, 4, 2)
    with pytest.raises(TypeError):
        model.params["W_hh"] = np.zeros((4, 4), np.float32)
    with pytest.raises(TypeError):
        del model.params["W_hh"]
    with pytest.raises(AttributeError):
        model.params = {}


def test_activation_set_by_hand_is_checked():
    model = fastbptt.RNN(3, 4, 2)
    with pytest.raises(ValueError, match="activation must be one of"):
        model.activation = "sigmoid"
    model.activation = "relu"
    assert model.activation == "relu"


def test_rebinding_flat_updates_the_parameters():
    """``m.flat = m.flat - lr * g`` used to leave the parameters behind: the loss stayed constant."""
    model, X, Y, h0 = make_problem(T=6, B=3, D=4, H=8, O=4)
    ws = fastbptt.Workspace(model, 6, 3)
    losses = []
    for _ in range(5):
        loss, *_ = fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws)
        losses.append(loss)
        model.flat = model.flat - 0.1 * ws.grad_flat
    assert losses[-1] < losses[0] - 1e-3
    assert np.shares_memory(model.params["W_hh"], model.flat)
    twin = fastbptt.RNN.from_params(model.params, activation=model.activation)
    assert np.array_equal(twin.flat, model.flat)


def test_rebinding_flat_with_a_wrong_shape_is_refused():
    model = fastbptt.RNN(3, 4, 2)
    before = model.flat.copy()
    with pytest.raises(ValueError, match=r"model\.flat must be set from an array of shape"):
        model.flat = np.zeros(3)
    assert np.array_equal(model.flat, before)


def test_a_public_view_reshaped_in_place_does_not_reach_the_kernels():
    model, X, Y, h0 = make_problem(T=5, B=2, D=3, H=6, O=3)
    want = _result(model, X, Y, h0)
    model.params["W_hh"].shape = (36,)      # legal NumPy on the view the user holds
    _assert_same(_result(model, X, Y, h0), want)


@pytest.mark.parametrize("name", ["hs", "carry_full", "tokens", "grad_flat", "T", "B", "grads"])
def test_workspace_buffers_cannot_be_replaced(name):
    """A smaller array put in by hand would let a kernel write out of bounds."""
    model = fastbptt.RNN(3, 4, 2)
    ws = fastbptt.Workspace(model, 5, 2)
    with pytest.raises(AttributeError, match=rf"Workspace\.{name} is fixed"):
        setattr(ws, name, np.zeros(1))
    getattr(ws, name)                         # still there


def test_masked_parameters_are_refused():
    model = fastbptt.RNN(3, 4, 2)
    params = {k: np.ma.masked_array(v.copy()) for k, v in model.params.items()}
    with pytest.raises(TypeError, match=r"params\['W_hx'\] is a masked array"):
        model.load_params(params)


# ----------------------------------------------------------------------------- aliasing

@pytest.mark.parametrize("method", ["fused", "blas"])
def test_rollout_inputs_that_are_the_workspace_states(method):
    """X a view of ws.hs (D == H): the result equals the result on a copy."""
    model, X, Y, h0 = make_problem(T=6, B=3, D=5, H=5, O=4)
    ws = fastbptt.Workspace(model, 6, 3)
    fastbptt.forward(model, X, h0, workspace=ws, method=method)
    X2 = ws.hs[:-1]                          # h_0 .. h_{T-1} as the next inputs
    want = _result(model, X2.copy(), Y, h0, method=method)
    got = fastbptt.loss_and_grad(model, X2, Y, h0, workspace=ws, return_dh0=True, method=method)
    _assert_same((got[0], got[1], got[2], got[3]), want)


def test_forward_outputs_as_mse_targets():
    model, X, _, h0 = make_problem(T=5, B=3, D=4, H=6, O=4, loss="mse")
    ws = fastbptt.Workspace(model, 5, 3)
    Y, _ = fastbptt.forward(model, X, h0, workspace=ws)
    want = _result(model, X, Y.copy(), h0, loss="mse")
    got = fastbptt.loss_and_grad(model, X, Y, h0, loss="mse", workspace=ws, return_dh0=True)
    _assert_same(got, want)


def test_carry_that_is_a_workspace_buffer():
    model, X, Y, h0 = make_problem(T=5, B=3, D=4, H=6, O=4)
    ws = fastbptt.Workspace(model, 5, 3)
    carry = ws.dz[:, :, 0]                   # (T, B), overwritten by the sweep
    carry[...] = np.linspace(0, 1, 15).reshape(5, 3)
    want = _result(model, X, Y, h0, carry=carry.copy())
    _assert_same(fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws, carry=carry, return_dh0=True), want)


def test_h0_that_is_the_last_state_or_dh0():
    model, X, Y, h0 = make_problem(T=5, B=3, D=4, H=6, O=4)
    ws = fastbptt.Workspace(model, 5, 3)
    _, _, h, dh0 = fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws, return_dh0=True)
    for state in (h, dh0):
        want = _result(model, X, Y, state.copy())
        _assert_same(fastbptt.loss_and_grad(model, X, Y, state, workspace=ws, return_dh0=True), want)


def test_backward_dO_that_is_the_forward_output():
    model, X, _, h0 = make_problem(T=5, B=3, D=4, H=6, O=4)
    ref_ws = fastbptt.Workspace(model, 5, 3)
    O_ref, _ = fastbptt.forward(model, X, h0, workspace=ref_ws)
    want = {k: v.copy() for k, v in fastbptt.backward(model, O_ref.copy(), workspace=ref_ws).items()}
    ws = fastbptt.Workspace(model, 5, 3)
    O, _ = fastbptt.forward(model, X, h0, workspace=ws)
    got = fastbptt.backward(model, O, workspace=ws)       # dO = o, a view of ws.out
    for name in want:
        assert np.array_equal(got[name], want[name]), name


# ----------------------------------------------------------------------------- copies and pickles

def _check_independent(model, twin):
    assert np.array_equal(twin.flat, model.flat)
    assert not np.shares_memory(twin.flat, model.flat)
    for name, view in twin.params.items():
        assert np.shares_memory(view, twin.flat), f"{name} is not a view into the copy's flat"
    twin.params["W_hh"][...] += 1
    assert not np.array_equal(twin.flat, model.flat)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_model_copy_is_independent(how):
    model = fastbptt.RNN(5, 7, 3, activation="relu", bias=False, dtype=np.float64, seed=3)
    twin = copy.deepcopy(model) if how == "deepcopy" else pickle.loads(pickle.dumps(model))
    assert repr(twin) == repr(model)
    _check_independent(model, twin)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_workspace_copy_is_independent_and_usable(how):
    model, X, Y, h0 = make_problem(T=5, B=3, D=4, H=6, O=4)
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws)
    twin = copy.deepcopy(ws) if how == "deepcopy" else pickle.loads(pickle.dumps(ws))
    assert np.array_equal(twin.grad_flat, ws.grad_flat)
    for name, view in twin.grads.items():
        assert np.shares_memory(view, twin.grad_flat)
        assert not np.shares_memory(view, ws.grad_flat)
    model2 = copy.deepcopy(model)
    model2.flat *= 0.5
    want = _result(model2, X, Y, h0)
    _assert_same(fastbptt.loss_and_grad(model2, X, Y, h0, workspace=twin, return_dh0=True), want)


def test_keep_the_best_model_pattern():
    model, X, Y, h0 = make_problem(T=5, B=3, D=4, H=6, O=4)
    best = copy.deepcopy(model)
    model.flat -= 1.0
    assert not np.array_equal(best.flat, model.flat)
    assert fastbptt.loss_and_grad(best, X, Y, h0)[0] == _result(copy.deepcopy(best), X, Y, h0)[0]


def _loss_in_child(model, X, Y):
    return fastbptt.loss_and_grad(model, X, Y)[0]


def test_spawn_multiprocessing_takes_a_model():
    model, X, Y, _ = make_problem(T=4, B=2, D=3, H=5, O=3)
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        got = pool.apply(_loss_in_child, (model, X, Y))
    assert got == fastbptt.loss_and_grad(model, X, Y)[0]


# ----------------------------------------------------------------------------- threads

def test_kernels_release_the_gil():
    from fastbptt import kernels, optim
    compiled = [getattr(m, n) for m in (kernels.sweep, kernels.losses, optim)
                for n in dir(m) if hasattr(getattr(m, n), "py_func")
                and getattr(m, n).targetoptions.get("inline") != "always"]   # inlined helpers
    assert len(compiled) >= 19
    for kernel in compiled:
        assert kernel.targetoptions.get("nogil"), f"{kernel.py_func.__name__} holds the GIL"


def _in_threads(problems, n=8):
    """Each problem run 5 times in each of ``n`` threads at once (parallel and serial mixed)."""
    got, errors = [None] * n, []

    def work(i):
        try:
            model, X, Y, h0 = problems[i % len(problems)]
            ws = fastbptt.Workspace(model, X.shape[0], X.shape[1])
            for _ in range(5):
                r = fastbptt.loss_and_grad(model, X, Y, h0, workspace=ws, parallel=i % 2 == 1,
                                           return_dh0=True)
            got[i] = (r[0], {k: v.copy() for k, v in r[1].items()}, r[2].copy(), r[3].copy())
        except Exception as exc:  # pragma: no cover - reported below
            errors.append(exc)

    pool = [threading.Thread(target=work, args=(i,)) for i in range(n)]
    for t in pool:
        t.start()
    for t in pool:
        t.join()
    assert not errors, errors
    return got


def _thread_problems():
    # float64 at this size: one- and two-thread OpenBLAS products differ in the last bits
    return [make_problem(T=50, B=9, D=28, H=64, O=28, dtype=dt, inputs=inp, seed=s)
            for s, (dt, inp) in enumerate([(np.float32, "dense"), (np.float32, "tokens"),
                                           (np.float64, "dense"), (np.float64, "tokens")])]


def test_python_threads_with_blas_on_one_thread_give_the_main_thread_bits():
    """The README's recipe for several threads: BLAS limited to one thread, then every call
    gives the main thread's bits, parallel or not, and BLAS's setting comes back."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    problems = _thread_problems()
    with threadpoolctl.threadpool_limits(1, user_api="blas"):
        want = [_result(*p) for p in problems]
        got = _in_threads(problems)
        inside = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    for i, result in enumerate(got):
        _assert_same(result, want[i % 4])
    assert set(inside) == {1}


@pytest.mark.filterwarnings("ignore:fastbptt called from a thread other than the main one")
def test_python_threads_are_deterministic_and_never_see_the_main_threads_setting():
    """With BLAS's own setting, threads other than the main one run products with it: the same
    bits in every thread and every run, while the main thread computes at the same time."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    before = [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"]
    problems = _thread_problems()
    first = _in_threads(problems)
    later, main_results = [], []
    runner = threading.Thread(target=lambda: later.extend(_in_threads(problems)))
    runner.start()
    while runner.is_alive():                     # the main thread sets one BLAS thread meanwhile
        main_results.append(_result(*problems[0]))
    runner.join()
    assert main_results
    for a, b in zip(first, later, strict=True):
        _assert_same(a, b)
    for i in range(4, 8):
        _assert_same(first[i], first[i - 4])
    want_main = _result(*problems[0])
    for r in main_results:
        _assert_same(r, want_main)
    assert [i["num_threads"] for i in threadpoolctl.threadpool_info() if i["user_api"] == "blas"] == before


def test_a_call_from_another_thread_with_threaded_blas_warns_once(monkeypatch):
    threadpoolctl = pytest.importorskip("threadpoolctl")
    if not threads.available():
        pytest.skip("threadpoolctl found no BLAS")
    monkeypatch.setattr(threads, "_warned_other_thread", False)
    model, X, Y, h0 = make_problem(T=50, B=9, D=28, H=64, O=28)    # products BLAS may thread
    with threadpoolctl.threadpool_limits(2, user_api="blas"), warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        for _ in range(2):
            worker = threading.Thread(target=fastbptt.loss_and_grad, args=(model, X, Y, h0))
            worker.start()
            worker.join()
    messages = [str(w.message) for w in seen if "thread other than the main one" in str(w.message)]
    assert len(messages) == 1 and "threadpool_limits(1)" in messages[0]


def test_gnu_openmp_workers_do_not_spin_for_milliseconds():
    done = _run("import os, fastbptt; print(os.environ['GOMP_SPINCOUNT'])", env={"GOMP_SPINCOUNT": ""})
    assert done.stdout.strip() == "", "a value the user set must be kept"
    env = {k: v for k, v in os.environ.items() if k != "GOMP_SPINCOUNT"}
    done = subprocess.run([sys.executable, "-c", "import os, fastbptt; print(os.environ['GOMP_SPINCOUNT'])"],
                          capture_output=True, text=True, env=env, timeout=300)
    assert done.stdout.strip() == "10000", done.stderr


def test_products_blas_runs_on_one_thread_anyway_leave_the_setting_alone(monkeypatch):
    """A T = 100, B = 1, H = 32 step: every product is below OpenBLAS's own one-thread sizes, so
    the call changes no setting (a change costs microseconds each way)."""
    pytest.importorskip("threadpoolctl")
    if not threads.available() or not threads._GEMM_ONE:
        pytest.skip("needs OpenBLAS through threadpoolctl")
    if max(get() for get in threads._getters) == 1:
        pytest.skip("BLAS is at one thread already: no product needs a change")
    calls = []
    monkeypatch.setattr(threads, "_setters", [lambda k: calls.append(k)] * len(threads._libs))
    model, X, Y, _ = make_problem(T=100, B=1, D=1, H=32, O=1, inputs="tokens", dtype=np.float32)
    fastbptt.loss_and_grad(model, X, Y)
    assert calls == []
    model, X, Y, _ = make_problem(T=35, B=32, D=28, H=64, O=28, inputs="tokens", dtype=np.float32)
    fastbptt.loss_and_grad(model, X, Y)
    assert calls                                  # bigger products do get their one thread


def test_small_products_run_on_one_blas_thread(monkeypatch):
    pytest.importorskip("threadpoolctl")
    if not threads.available():
        pytest.skip("threadpoolctl found no BLAS")
    seen = []
    real = np.dot

    def spy(a, b, out=None):
        seen.append(tuple(lib.get_num_threads() for lib in threads._libs))
        return real(a, b, out=out)

    monkeypatch.setattr(threads.np, "dot", spy)
    model, X, Y, h0 = make_problem(T=35, B=32, D=28, H=64, O=28, dtype=np.float32)
    fastbptt.loss_and_grad(model, X, Y, h0, method="blas")
    assert len(seen) > 70 and all(set(s) == {1} for s in seen)


# ----------------------------------------------------------------------------- subprocesses

def _run(code, env=None, timeout=600):
    full_env = dict(os.environ, **(env or {}))
    tests = os.path.dirname(__file__)
    full_env["PYTHONPATH"] = os.pathsep.join(filter(None, [tests, full_env.get("PYTHONPATH")]))
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True,
                          text=True, timeout=timeout, env=full_env)


def test_fork_after_a_parallel_call_does_not_hang():
    """GNU OpenMP's pool does not survive fork: the child runs the serial kernels (same bits)."""
    if sys.platform != "linux":
        pytest.skip("fork is Linux's default start method")
    done = _run("""
        import multiprocessing, warnings
        import numpy as np, fastbptt
        from helpers import make_problem
        model, X, Y, h0 = make_problem(T=30, B=8, D=6, H=16, O=5, dtype=np.float32)
        want = fastbptt.loss_and_grad(model, X, Y, h0, parallel=True, method="fused")[0]
        def child(_):
            with warnings.catch_warnings(record=True) as caught:
                warnings.simplefilter("always")
                loss = fastbptt.loss_and_grad(model, X, Y, h0, parallel=True, method="fused")[0]
            return loss, [(str(w.message), w.filename) for w in caught]
        with multiprocessing.get_context("fork").Pool(2) as pool:
            results = pool.map(child, range(4), chunksize=1)
        assert all(loss == want for loss, _ in results), results
        warned = [w for _, ws in results for w in ws if "runs the serial kernels" in w[0]]
        assert warned and all(filename == "<string>" for _, filename in warned), warned   # the caller's line
        print("ok", results[0][1])
    """, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok")


@pytest.mark.skipif(not has_avx2(), reason="needs an x86 CPU with AVX2 for OpenBLAS's Haswell kernels")
def test_parallel_equals_serial_with_a_blas_whose_bits_depend_on_threads():
    """OpenBLAS's Haswell SGEMM splits long reductions between threads, so its one- and
    two-thread results differ; the parallel path used to run its products on one thread.
    Realistic sizes, every method and input kind, float32 and float64, carry given."""
    pytest.importorskip("threadpoolctl")
    done = _run("""
        import numpy as np, fastbptt
        from helpers import make_problem
        from threadpoolctl import threadpool_info
        bad = []
        for dtype in (np.float32, np.float64):
            for inputs in ("dense", "tokens"):
                for loss in ("cross_entropy", "mse"):
                    for T, B, D, H, O in [(50, 48, 40, 128, 30), (100, 32, 28, 64, 28), (40, 7, 20, 96, 12)]:
                        model, X, Y, h0 = make_problem(T, B, D, H, O, loss=loss, inputs=inputs, dtype=dtype)
                        carry = np.random.default_rng(1).uniform(0, 2, size=(T, B)).astype(dtype)
                        for method in ("fused", "blas", "auto"):
                            runs = []
                            for parallel in (False, True):
                                r = fastbptt.loss_and_grad(model, X, Y, h0, loss=loss, parallel=parallel,
                                                           method=method, carry=carry, return_dh0=True,
                                                           return_dX=True)
                                runs.append((r[0], r[1]["W_hh"].copy(), np.concatenate(
                                    [g.ravel() for g in r[1].values()]), r[2].copy(), r[3].copy(), r[4].copy()))
                            a, b = runs
                            if a[0] != b[0] or not all(np.array_equal(x, y) for x, y in zip(a[1:], b[1:])):
                                bad.append((np.dtype(dtype).name, inputs, loss, (T, B, H), method))
        print("blas", [i.get("architecture") for i in threadpool_info() if i["user_api"] == "blas"])
        print("bad", bad)
    """, env={"OPENBLAS_CORETYPE": "Haswell"})
    assert done.returncode == 0, done.stderr[-3000:]
    assert "bad []" in done.stdout, done.stdout


# ----------------------------------------------------------------------------- found by attacking

def _tamper(obj, edit):
    """Pickle ``obj`` with ``edit`` applied to its pickled state, then unpickle."""
    make, args, state = obj.__reduce_ex__(2)[:3]
    state = copy.deepcopy(state)
    edit(state)
    twin = make(*args)
    twin.__setstate__(state)
    return twin


@pytest.mark.parametrize("name", ["SGD", "Adam", "Adagrad"])
def test_optimizer_state_model_and_hyper_cannot_be_rebound(name):
    from fastbptt import optim
    model = fastbptt.RNN(5, 8, 5)
    opt = getattr(optim, name)(model, lr=0.1, **({"momentum": 0.9} if name == "SGD" else {}))
    state_name = next(iter(opt.state))
    with pytest.raises(TypeError):
        opt.state[state_name] = np.zeros(3, np.float32)       # used to write past a 3-element array
    for attr, value in (("model", fastbptt.RNN(50, 80, 50)), ("state", {}), ("hyper", {}), ("t", -1)):
        with pytest.raises(AttributeError):
            setattr(opt, attr, value)
    with pytest.raises(TypeError):
        opt.hyper["lr"] = "x"
    opt.state[state_name].shape = (1, opt.state[state_name].size)   # legal NumPy, wrong layout
    with pytest.raises(ValueError, match=rf"optimizer state {state_name!r} no longer matches model\.flat"):
        opt.step(np.ones_like(model.flat))


@pytest.mark.parametrize("edit,match", [
    (lambda s: s["state_dict"]["state"].update({k: v[:3] for k, v in s["state_dict"]["state"].items()}),
     "has shape"),
    (lambda s: s["state_dict"].update(t=-1), "t"),
    (lambda s: s["state_dict"]["hyper"].update(lr="x"), "lr"),
])
def test_tampered_optimizer_pickle_is_refused(edit, match):
    from fastbptt import optim
    opt = optim.Adam(fastbptt.RNN(5, 8, 5), lr=0.1)
    opt.step(np.ones_like(opt.model.flat))
    with pytest.raises((ValueError, TypeError), match=match):
        _tamper(opt, edit)


def test_read_only_model_flat_in_an_optimizer_step():
    from fastbptt import optim
    model = fastbptt.RNN(5, 8, 5)
    opt = optim.SGD(model, lr=0.1)
    model.flat.flags.writeable = False
    with pytest.raises(ValueError, match=r"model\.flat is read-only"):
        opt.step(np.ones_like(model.flat))


def test_a_read_only_gradient_may_be_stepped_from():
    from fastbptt import optim
    model = fastbptt.RNN(5, 8, 5)
    g = np.ones_like(model.flat)
    g.flags.writeable = False
    before = model.flat.copy()
    optim.SGD(model, lr=0.1).step(g)
    assert np.allclose(model.flat, before - 0.1)


def test_token_ids_written_into_the_workspace_by_hand_are_refused_by_backward():
    """forward() keeps the ids in ws.tokens, a public buffer: an id put there by hand used to
    reach the scatter kernel (a segfault)."""
    model, X, _, h0 = make_problem(T=5, B=3, D=4, H=6, O=4, inputs="tokens")
    ws = fastbptt.Workspace(model, 5, 3)
    fastbptt.forward(model, X, h0, workspace=ws)
    ws.tokens[2, 1] = 10 ** 9
    with pytest.raises(ValueError, match=r"workspace\.tokens must hold token ids in \[0, 4\)"):
        fastbptt.backward(model, np.zeros((5, 3, 4)), workspace=ws)


def test_forward_kind_set_by_hand_is_refused():
    model, *_ = make_problem(T=5, B=3, D=4, H=6, O=4)
    ws = fastbptt.Workspace(model, 5, 3)
    ws.forward_kind = "dense"
    with pytest.raises(ValueError, match="without the inputs of a forward pass"):
        fastbptt.backward(model, np.zeros((5, 3, 4)), workspace=ws)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s["buffers"].update(hs=s["buffers"]["hs"][:1]), "hs has shape"),
    (lambda s: s["buffers"].update(tokens=np.zeros(1, np.intp)), "tokens has shape"),
    (lambda s: s.update(T=0), "T must be a positive int"),
    (lambda s: s.update(forward_kind="dense"), "forward_kind"),
])
def test_tampered_workspace_pickle_is_refused(edit, match):
    model, *_ = make_problem(T=5, B=3, D=4, H=6, O=4)
    with pytest.raises((ValueError, TypeError), match=match):
        _tamper(fastbptt.Workspace(model, 5, 3), edit)


@pytest.mark.parametrize("edit,match", [
    (lambda s: s.update(sizes=(0, 8, 5, True)), "input_size must be a positive int"),
    (lambda s: s.update(sizes=(5, 8, 5, "no")), "bias"),
    (lambda s: s.update(flat=np.full(s["flat"].size, 1e300)), "float32 can hold"),
    (lambda s: s.update(flat=np.ma.masked_array(s["flat"])), "plain 1-D ndarray"),
])
def test_tampered_model_pickle_is_refused(edit, match):
    with pytest.raises((ValueError, TypeError), match=match):
        _tamper(fastbptt.RNN(5, 8, 5), edit)


def test_flat_set_from_values_the_dtype_cannot_hold():
    model = fastbptt.RNN(5, 8, 5)
    before = model.flat.copy()
    with pytest.raises(ValueError, match=r"float32 can hold, got 1e\+300"):
        model.flat = np.full(model.n_params, 1e300)
    assert np.array_equal(model.flat, before)


def test_masked_corpus_and_carry_buffer_are_refused():
    from fastbptt import data, training
    corpus = np.ma.masked_array(np.arange(100) % 7, mask=np.arange(100) % 5 == 0)
    with pytest.raises(TypeError, match=r"corpus is a masked array.*compressed"):
        data.SeqDataLoader(corpus, 5, 2)
    with pytest.raises(TypeError, match="plain"):
        training.random_truncation(5, 0.5, 0, out=np.ma.masked_array(np.zeros(5)))


def test_masked_gradient_in_clipping_is_a_type_error_naming_it():
    from fastbptt import optim
    g = np.ma.masked_array(np.ones(10), mask=np.arange(10) == 3)
    with pytest.raises(TypeError, match=r"grad is a masked array"):
        optim.clip_grad_norm(g, 1.0)


def test_a_model_too_big_for_memory_names_its_sizes():
    with pytest.raises(MemoryError, match=r"hidden_size=1099511627776, output_size=2 has .* parameters .* GiB"):
        fastbptt.RNN(2 ** 40, 2 ** 40, 2)


def test_what_used_to_segfault_is_refused_in_a_child_process():
    """The red team's crashes, each in a child so that a regression fails this test instead of
    killing pytest: a short optimizer state array, an optimizer pickled with one, and an id
    written into the workspace by hand before backward."""
    done = _run("""
        import copy, pickle
        import numpy as np, fastbptt
        from fastbptt import optim
        m = fastbptt.RNN(5, 8, 5)
        for make in (lambda: optim.SGD(m, lr=0.1, momentum=0.9), lambda: optim.Adagrad(m, lr=0.1)):
            opt = make()
            name = next(iter(opt.state))
            try:
                opt.state[name] = np.zeros(3, np.float32)
            except TypeError:
                print("state refused")
            sd = opt.__getstate__()
            sd["state_dict"]["state"][name] = np.zeros(3, np.float32)
            twin = type(opt).__new__(type(opt))
            try:
                twin.__setstate__(sd)
            except ValueError:
                print("pickle refused")
        X = np.random.default_rng(0).integers(0, 5, size=(20, 4))
        ws = fastbptt.Workspace(m, 20, 4)
        fastbptt.forward(m, X, workspace=ws)
        ws.tokens[3, 2] = 10 ** 12
        try:
            fastbptt.backward(m, np.zeros((20, 4, 5), np.float32), workspace=ws)
        except ValueError:
            print("ids refused")
    """)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.split("\n")[:5] == ["state refused", "pickle refused"] * 2 + ["ids refused"]


def test_fork_after_the_users_own_parallel_code_also_runs_serially():
    """A pool started by the user's own @njit(parallel=True) code does not survive fork either."""
    if sys.platform != "linux":
        pytest.skip("fork is Linux's default start method")
    done = _run("""
        import multiprocessing, warnings
        import numba, numpy as np, fastbptt
        from numba import njit, prange
        from fastbptt import threads
        @njit(parallel=True)
        def own(a):
            for i in prange(a.size):
                a[i] += 1
        own(np.zeros(100))
        def child(_):
            warnings.simplefilter("ignore")
            return threads.parallel_allowed()
        if numba.threading_layer() in ("tbb", "workqueue"):
            print("ok fork-safe layer")
        else:
            with multiprocessing.get_context("fork").Pool(1) as pool:
                print("ok" if pool.map(child, [0]) == [False] else "parallel allowed in the child")
    """, timeout=240)
    assert done.returncode == 0, done.stderr[-3000:]
    assert done.stdout.startswith("ok"), done.stdout
