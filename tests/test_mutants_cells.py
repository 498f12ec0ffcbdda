"""Tests written against the mutants that survived mutation testing of the issue-8 core
(the generic sweep, ``fastbptt/core/kernels/sweep.py``, and the cells in
``fastbptt/core/cells/``); see docs/mutation-testing.md. Each test names the bug it catches.

They are small and in float64 on purpose: the mutation run recompiles the sweep for every
mutant, so each test here compiles few kernels and compares against the plain NumPy
references (``fastbptt.reference``, ``fastbptt.reference_cells``) or bit for bit.
"""

import numba
import numpy as np
import pytest

import fastbptt
from cells_registry import BY_ID, assert_grads_close, make_carry, make_problem
from helpers import assert_close


def _threads_up_to(n):
    """Thread counts 1 .. n that Numba can use here (fewer on a small machine)."""
    return list(range(1, min(n, numba.config.NUMBA_NUM_THREADS) + 1))


# ----------------------------------------------------------------------------- parallel blocks


@pytest.mark.parametrize("inputs", ["dense", "tokens"])
def test_fused_parallel_sweep_equals_the_reference_and_serial_bits(inputs):
    """The parallel fused kernels split the batch into blocks of sequences (B = 5: a multiple of
    no thread count) and, for token ids, dW_ih's rows over threads. A wrong block bound leaves a
    sequence uncomputed or computes it twice at once; a wrong row split in
    ``scatter_input_grad_parallel`` loses or doubles a row of ∂L/∂W_ih."""
    cell = BY_ID["rnn"]
    T, B = 4, 5
    model, X, Y, state0 = make_problem(cell, T=T, B=B, D=4, H=6, O=5, inputs=inputs, seed=21)
    c = make_carry("TB", T, B)
    want = cell.reference(model, X, Y, state0, carry=c)
    serial = fastbptt.loss_and_grad(model, X, Y, state0, carry=c, method="fused",
                                    return_dh0=True, return_dX=True)
    serial = [serial[0], {k: v.copy() for k, v in serial[1].items()}, serial[2].copy(),
              serial[3].copy(), serial[4].copy()]
    before = numba.get_num_threads()
    try:
        for threads in _threads_up_to(3):
            numba.set_num_threads(threads)
            L, grads, h_T, dh0, dX = fastbptt.loss_and_grad(
                model, X, Y, state0, carry=c, method="fused", parallel=True, return_dh0=True, return_dX=True)
            where = f"{threads} threads"
            assert_close(f"loss ({where})", L, want[0], np.float64)
            assert_grads_close(grads, want[1], np.float64)
            assert_close(f"h_T ({where})", h_T, want[2], np.float64)
            assert_close(f"dh0 ({where})", dh0, want[3], np.float64)
            assert_close(f"dX ({where})", dX, want[4], np.float64)
            for name, g in grads.items():
                assert g.tobytes() == serial[1][name].tobytes(), f"{name} ({where}) differs from serial"
            for name, got, ref in (("h_T", h_T, serial[2]), ("dh0", dh0, serial[3]), ("dX", dX, serial[4])):
                assert got.tobytes() == ref.tobytes(), f"{name} ({where}) differs from serial"
    finally:
        numba.set_num_threads(before)


# ----------------------------------------------------------------------------- small kernels


def test_scale_rows_scales_each_row_by_its_own_weight():
    """``sweep.scale_rows`` (a[b] *= c[b]) is no longer called by the API but is still a public
    kernel of ``fastbptt.core.kernels.sweep``: a /= for *=, or one weight for every row, is caught."""
    from fastbptt.core.kernels import sweep
    rng = np.random.default_rng(3)
    a = rng.normal(size=(4, 3))
    c = np.array([0.0, 1 / 0.7, -2.0, 1 / np.pi])
    want = a * c[:, None]
    sweep.scale_rows(a, c)
    assert a.tobytes() == want.tobytes()


def test_each_cells_param_layout_has_biases_by_default():
    """Every caller in the package passes ``bias``; the cells' ``param_layout`` still documents
    bias=True as the default (like the models'): a default turned to False is caught here."""
    from fastbptt.core.cells import CELLS
    for name, module in CELLS.items():
        default = module.param_layout(3, 5, 4)
        assert default == module.param_layout(3, 5, 4, bias=True), name
        assert default != module.param_layout(3, 5, 4, bias=False), name


@pytest.mark.parametrize("cell_id", ["rnn", "gru", "lstm"])
def test_state_buffers_hold_exactly_the_states_0_to_T(cell_id):
    """hs (and the LSTM's cs) hold s_0 .. s_T, T + 1 rows, and state_T views their last row: a
    buffer declared a row longer would leave an unused row (memory) and a state_T apart from it."""
    cell = BY_ID[cell_id]
    T, B, H = 3, 2, 4
    model, X, _, state0 = make_problem(cell, T=T, B=B, D=3, H=H, O=2, seed=5)
    ws = fastbptt.Workspace(model, T, B)
    _, state_T = fastbptt.layer_forward(model, X, state0, workspace=ws, method="fused")
    buffers = [ws.hs, ws.cs] if cell.paired else [ws.hs]
    last = list(state_T) if cell.paired else [state_T]
    for buf, s in zip(buffers, last):
        assert buf.shape == (T + 1, B, H)
        assert np.shares_memory(s, buf[-1]) and s.shape == (B, H)
