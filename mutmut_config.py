"""Mutation testing with mutmut 2.x: hooks, and the test command (see docs/mutation-testing.md).

mutmut 2 writes each mutant into the source file and runs a test command. This project
needs two things a plain ``runner`` does not give:

- a fast test selection for each mutated file (``SELECTIONS``), chosen in
  ``pre_mutation``. ``primitives.py`` gets only ``tests/test_primitives.py``: Numba's
  cache keys each cached kernel on its own file's contents, so the kernels of other
  files that inline a mutated primitive would be loaded stale from the cache, while
  test_primitives compiles its own uncached wrappers;
- every failure counted as a kill: mutmut 2 counts only exit status 1, so a mutant that
  crashes the interpreter (an out-of-bounds write in a kernel) or breaks the import would
  count as a survivor. ``python mutmut_config.py FILE`` runs FILE's selection and exits 1
  on any failure, crash, or hang past ``MUTANT_TIMEOUT_S`` (a mutated loop that never ends).

``OPENBLAS_NUM_THREADS=1`` keeps the products off a busy machine's spin-waits: the
kernels, not BLAS, are under test. Without a FILE the command runs every selection
(mutmut's baseline run).
"""

import os
import subprocess
import sys

MUTANT_TIMEOUT_S = 60     # a selection takes 10-20 s; a mutated loop that never ends costs this

# Each entry is one pytest run (its own -k); a file's runs go in order, stopping at the first failure.
_KERNELS = [
    ["tests/test_against_reference.py", "-k", "every_combination and float64-False"],  # quick, kills most
    ["tests/test_against_reference.py", "-k",
     "every_combination or relu_derivative or edge_sizes or larger_sizes or default_h0"],
    ["tests/test_carry.py", "tests/test_parallel.py", "tests/test_thread_counts.py",
     "-k", "not another_blas_kernel"],    # that one is about BLAS's kernels, not ours
]
SELECTIONS = {
    "fastbptt/kernels/primitives.py": [["tests/test_primitives.py"]],
    "fastbptt/kernels/forward.py": _KERNELS,
    "fastbptt/kernels/backward.py": _KERNELS,
    "fastbptt/kernels/losses.py": _KERNELS,
    "fastbptt/api.py": [
        ["tests/test_bad_input.py", "tests/test_against_reference.py", "tests/test_carry.py",
         "tests/test_workspace.py", "tests/test_parallel.py", "tests/test_thread_counts.py",
         "-k", "not another_blas_kernel"]],
}


def run_selection(runs):
    """0 if every pytest run passes, else 1 (a failure, a crash, or a timeout)."""
    env = dict(os.environ, OPENBLAS_NUM_THREADS="1")
    for args in runs:
        cmd = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", *args]
        try:
            status = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL,
                                    stderr=subprocess.DEVNULL, timeout=MUTANT_TIMEOUT_S).returncode
        except subprocess.TimeoutExpired:
            return 1
        if status != 0:
            return 1
    return 0


def pre_mutation(context):
    """Test the mutant with its file's selection; skip the decorator lines.

    A decorator's arguments (``cache``, ``parallel``, ``inline``, ``nogil``) choose how a
    kernel is compiled, never what it computes (a ``parallel=True`` kernel with the flag
    off runs its prange serially, to the same bits): no test can kill those mutants.
    """
    if context.current_source_line.lstrip().startswith("@"):
        context.skip = True
        return
    path = os.path.relpath(context.filename)
    if path in SELECTIONS:
        context.config.test_command = f"{sys.executable} mutmut_config.py {path}"


if __name__ == "__main__":
    if len(sys.argv) > 1:
        chosen = SELECTIONS[sys.argv[1]]
    else:
        chosen = [run for runs in SELECTIONS.values() for run in runs]
        chosen = [r for i, r in enumerate(chosen) if r not in chosen[:i]]
    sys.exit(run_selection(chosen))
