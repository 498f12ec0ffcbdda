"""parallel=True against serial, bit for bit, at 2, 3 and 4 Numba threads with B not a multiple.

The parallel kernels split the batch (recurrence, reverse sweep), the T·B rows (losses)
or the hidden units (the token-gradient scatter) into one block per thread; a wrong
block boundary shows only when the sizes are not multiples of the thread count. The
machine may have fewer cores than 4, and Numba cannot raise its thread count above
``NUMBA_NUM_THREADS`` once started, so one subprocess started with NUMBA_NUM_THREADS=4
runs every case (the compile cache makes its start quick after the first run).
"""

import json
import os
import subprocess
import sys

import fastbptt

TESTS = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(os.path.dirname(os.path.abspath(fastbptt.__file__)))

# threads -> batch sizes, none a multiple of the thread count; B < threads leaves
# threads without a sequence.
CASES = {2: (1, 3, 5, 7), 3: (2, 4, 5, 7, 8), 4: (3, 5, 6, 7, 9, 10)}
H = 19          # not a multiple of 2, 3 or 4 (the scatter splits the hidden units)
T = 7           # T·B rows for the losses: a multiple of no thread count for odd B

SCRIPT = r"""
import itertools, json, sys
import numba
import numpy as np
import fastbptt
from helpers import make_problem

cases = {int(k): v for k, v in json.loads(sys.argv[1]).items()}
T, H = int(sys.argv[2]), int(sys.argv[3])

def run(model, X, Y, h0, carry, loss, parallel, method):
    L, grads, hT, dh0, dX = fastbptt.loss_and_grad(
        model, X, Y, h0, loss=loss, parallel=parallel, method=method, carry=carry,
        return_dh0=True, return_dX=True)
    out = {"loss": np.float64(L), "h_T": hT, "dh0": dh0, "dX": dX, **grads}
    return {k: np.array(v, copy=True) for k, v in out.items()}

report = {"threads_seen": [], "checked": 0, "mismatches": []}
for threads, batches in cases.items():
    numba.set_num_threads(threads)
    report["threads_seen"].append(numba.get_num_threads())
    for B, method, inputs, loss, dtype in itertools.product(
            batches, ("fused", "blas"), ("dense", "tokens"), ("cross_entropy", "mse"),
            (np.float32, np.float64)):
        model, X, Y, h0 = make_problem(T=T, B=B, D=6, H=H, O=5, loss=loss, inputs=inputs,
                                       dtype=dtype, seed=B)
        carry = np.random.default_rng(B).uniform(0.5, 1.5, size=(T, B))
        serial = run(model, X, Y, h0, carry, loss, False, method)
        parallel = run(model, X, Y, h0, carry, loss, True, method)
        report["checked"] += 1
        for name, want in serial.items():
            got = parallel[name]
            if got.dtype != want.dtype or got.tobytes() != want.tobytes():
                diff = float(np.max(np.abs(got.astype(np.float64) - want.astype(np.float64))))
                report["mismatches"].append(
                    f"{name}: threads={threads} B={B} {method} {inputs} {loss} "
                    f"{np.dtype(dtype).name}: max |parallel - serial| = {diff:.3e}")
print("REPORT" + json.dumps(report))
"""


def test_parallel_equals_serial_at_2_3_4_threads_with_ragged_blocks():
    env = dict(os.environ, NUMBA_NUM_THREADS="4")
    env["PYTHONPATH"] = os.pathsep.join([ROOT, TESTS] + [p for p in [env.get("PYTHONPATH")] if p])
    proc = subprocess.run(
        [sys.executable, "-c", SCRIPT, json.dumps(CASES), str(T), str(H)],
        env=env, cwd=ROOT, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-4000:]
    line = [x for x in proc.stdout.splitlines() if x.startswith("REPORT")][-1]
    report = json.loads(line[len("REPORT"):])
    assert report["threads_seen"] == list(CASES), "NUMBA_NUM_THREADS=4 did not give 2, 3, 4 threads"
    assert report["checked"] == sum(len(b) for b in CASES.values()) * 16
    assert not report["mismatches"], "\n".join(report["mismatches"][:40])
