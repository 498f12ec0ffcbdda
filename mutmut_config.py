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
kernels, not BLAS, are under test; ``BLAS_AS_IS`` lists the files tested with BLAS's own
setting instead. Without a FILE the command runs every selection (mutmut's baseline run).
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
# the thread tests of test_hardening, the direct ones first (node ids run in the order given)
_THREAD_TESTS = [f"tests/test_hardening.py::test_{name}" for name in (
    "blas_threads_follow_the_product_size",
    "products_blas_runs_on_one_thread_anyway_leave_the_setting_alone",
    "small_products_run_on_one_blas_thread",
    "a_call_from_another_thread_with_threaded_blas_warns_once",
    "python_threads_with_blas_on_one_thread_give_the_main_thread_bits",
    "python_threads_are_deterministic_and_never_see_the_main_threads_setting",
    "gnu_openmp_workers_do_not_spin_for_milliseconds",
    "fork_after_a_parallel_call_does_not_hang",
    "parallel_equals_serial_with_a_blas_whose_bits_depend_on_threads")]
_API = [
    ["tests/test_bad_input.py", "tests/test_against_reference.py", "tests/test_carry.py",
     "tests/test_workspace.py", "tests/test_parallel.py", "tests/test_thread_counts.py",
     "-k", "not another_blas_kernel"],
    ["tests/test_hardening.py", "tests/test_mutants_api.py"]]   # aliasing, masks, threads
SELECTIONS = {
    "fastbptt/core/kernels/primitives.py": [["tests/test_primitives.py"]],
    "fastbptt/core/kernels/forward.py": _KERNELS,
    "fastbptt/core/kernels/backward.py": _KERNELS,
    "fastbptt/core/kernels/losses.py": _KERNELS,
    "fastbptt/core/api.py": _API,
    "fastbptt/core/validation.py": _API,     # the argument checks api.py calls (they were in api.py)
    "fastbptt/training/saving.py": [["tests/test_checkpoint_untrusted.py", "tests/test_checkpoint.py"]],
    "fastbptt/training/data.py": [["tests/test_data_padding.py"]],
    "fastbptt/core/threads.py": [
        _THREAD_TESTS,
        ["tests/test_parallel.py"],
        ["tests/test_hardening.py", "tests/test_mutants_api.py",
         *(f"--deselect={test}" for test in _THREAD_TESTS)]],
}
# Tested with BLAS's own thread count, not OPENBLAS_NUM_THREADS=1: threads.py decides it per
# product, and with one thread everywhere its choices cannot be seen (and api.py calls it).
BLAS_AS_IS = {"fastbptt/core/threads.py", "fastbptt/core/api.py", "fastbptt/core/validation.py"}


def run_selection(runs, blas_as_is=False):
    """0 if every pytest run passes, else 1 (a failure, a crash, or a timeout)."""
    env = dict(os.environ) if blas_as_is else dict(os.environ, OPENBLAS_NUM_THREADS="1")
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
    if os.environ.get("MUTMUT_LINES"):      # a JSON file {path: [1-based line numbers]}: mutate only those
        import json
        with open(os.environ["MUTMUT_LINES"]) as f:
            lines = json.load(f).get(path)
        if lines is not None and context.current_line_index + 1 not in lines:
            context.skip = True
            return
    if path in SELECTIONS:
        context.config.test_command = f"{sys.executable} mutmut_config.py {path}"


if __name__ == "__main__":
    todo = []                            # (run, BLAS as is), each once, in order
    for path in sys.argv[1:] or SELECTIONS:
        todo += [(run, path in BLAS_AS_IS) for run in SELECTIONS[path]
                 if (run, path in BLAS_AS_IS) not in todo]
    sys.exit(1 if any(run_selection([run], as_is) for run, as_is in todo) else 0)
