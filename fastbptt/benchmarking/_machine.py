"""What a benchmark's figures depend on: the CPU's vector extension and the BLAS kernels in use.

OpenBLAS picks its kernels for the CPU it finds at start-up, unless ``OPENBLAS_CORETYPE``
forces a core type (and ``OPENBLAS_L2_SIZE`` a cache size). Forcing an AVX2 core type such
as Haswell on an AVX-512 CPU halves the speed of its matrix products, so the benchmark
headers print both, and a warning when the kernels are narrower than the CPU.
"""

from __future__ import annotations

import os
import platform

#: Vector extensions of x86 CPUs, narrowest first, as named in /proc/cpuinfo's flags.
VECTOR_EXTENSIONS = ("sse4_2", "avx", "avx2", "avx512f")

#: The widest extension each BLAS kernel family uses (OpenBLAS core types and BLIS
#: configurations, lower case). "older" means narrower than SSE4.2.
KERNEL_EXTENSION = {
    # OpenBLAS (its Zen and Excavator kernels are the Haswell ones)
    "skylakex": "avx512f", "cooperlake": "avx512f", "sapphirerapids": "avx512f",
    "haswell": "avx2", "zen": "avx2", "excavator": "avx2",
    "sandybridge": "avx", "bulldozer": "avx", "piledriver": "avx", "steamroller": "avx",
    "nehalem": "sse4_2",
    "prescott": "older", "core2": "older", "penryn": "older", "dunnington": "older", "atom": "older",
    "nano": "older", "opteron": "older", "opteron_sse3": "older", "barcelona": "older", "bobcat": "older",
    "katmai": "older", "coppermine": "older", "northwood": "older", "banias": "older", "athlon": "older",
    # BLIS
    "skx": "avx512f", "knl": "avx512f", "zen4": "avx512f", "zen5": "avx512f",
    "zen2": "avx2", "zen3": "avx2",
}

_X86 = {"x86_64", "amd64", "i386", "i486", "i586", "i686", "x86"}


def is_x86(machine=None):
    """Whether ``machine`` (default ``platform.machine()``) is an x86 processor."""
    return (machine if machine is not None else platform.machine()).lower() in _X86


def _read(path):
    try:
        with open(path) as f:
            return f.read()
    except OSError:
        return None


def cpu_vector_extension(cpuinfo=None, machine=None):
    """The widest of ``VECTOR_EXTENSIONS`` the CPU has, from /proc/cpuinfo's ``flags``.

    Parameters
    ----------
    cpuinfo : str, optional
        The text of /proc/cpuinfo (read from the file by default).
    machine : str, optional
        ``platform.machine()`` by default.

    Returns
    -------
    str or None
        ``"avx512f"``, ``"avx2"``, ``"avx"``, ``"sse4_2"``, ``"older"`` (none of them), or None
        when it cannot be told: not an x86 CPU, or no /proc/cpuinfo flags.
    """
    if not is_x86(machine):
        return None
    if cpuinfo is None:
        cpuinfo = _read("/proc/cpuinfo")
    if not cpuinfo:
        return None
    for line in cpuinfo.splitlines():
        key, sep, value = line.partition(":")
        if sep and key.strip() == "flags":
            flags = set(value.split())
            found = [ext for ext in VECTOR_EXTENSIONS if ext in flags]
            return found[-1] if found else "older"
    return None


def _level(extension):
    return -1 if extension == "older" else VECTOR_EXTENSIONS.index(extension)


def blas_libraries(info=None):
    """The BLAS libraries loaded in this process, as threadpoolctl describes them.

    Parameters
    ----------
    info : list of dict, optional
        ``threadpoolctl.threadpool_info()`` (called by default).

    Returns
    -------
    list of dict, or None when threadpoolctl is not installed.
        Each has ``internal_api`` (openblas, mkl, blis...), ``version``, ``num_threads``,
        ``architecture`` (the kernels in use; None where the library does not say) and
        ``extension`` (the widest vector extension of those kernels, None when unknown).
    """
    if info is None:
        try:
            import numpy  # noqa: F401 -- loads NumPy's BLAS, so that threadpoolctl finds it
            from threadpoolctl import threadpool_info
        except ImportError:
            return None
        info = threadpool_info()
    out = []
    for lib in info:
        if lib.get("user_api") != "blas":
            continue
        arch = lib.get("architecture")
        out.append({"internal_api": lib.get("internal_api"), "version": lib.get("version"),
                    "num_threads": lib.get("num_threads"), "architecture": arch,
                    "extension": KERNEL_EXTENSION.get(str(arch).lower()) if arch else None,
                    "filepath": lib.get("filepath")})
    return out


def describe_blas(libraries):
    """One phrase on the BLAS libraries: name, version, kernels and threads of each."""
    if libraries is None:
        return "BLAS kernels unknown (pip install threadpoolctl to see them)"
    if not libraries:
        return "no BLAS library found by threadpoolctl"
    parts = []
    for lib in libraries:
        text = f"{lib['internal_api']} {lib['version']}"
        if lib["architecture"]:
            text += f" with {lib['architecture']} kernels"
            if lib["extension"]:
                text += f" ({lib['extension']})"
        text += f", {lib['num_threads']} threads"
        parts.append(text)
    return "BLAS " + "; ".join(parts)


def describe_cpu(extension, machine=None):
    """One phrase on the CPU's widest vector extension."""
    if extension is None:
        machine = machine if machine is not None else platform.machine()
        if not is_x86(machine):
            return f"CPU {machine}: not x86, vector extensions not checked"
        return "CPU vector extensions unknown (no /proc/cpuinfo flags)"
    return f"CPU up to {extension}" if extension != "older" else "CPU older than SSE4.2"


def kernel_warnings(libraries, extension, environ=None):
    """A warning for each BLAS whose kernels are narrower than the CPU's widest vector extension.

    Parameters
    ----------
    libraries : list of dict or None
        ``blas_libraries()``.
    extension : str or None
        ``cpu_vector_extension()``.
    environ : mapping, optional
        The environment (``os.environ``): OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are named
        in the warning when set.

    Returns
    -------
    list of str
    """
    environ = os.environ if environ is None else environ
    if not libraries or extension is None:
        return []
    forced = [f"{name}={environ[name]}" for name in ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE") if name in environ]
    out = []
    for lib in libraries:
        if lib["extension"] is None or _level(lib["extension"]) >= _level(extension):
            continue
        text = (f"warning: {lib['internal_api']} runs its {lib['architecture']} kernels ({lib['extension']}) "
                f"on a CPU with {extension}: its matrix products may run at half the speed this CPU "
                f"allows, or less. ")
        if forced:
            text += (f"This environment sets {' and '.join(forced)}, which forces that choice; to measure "
                     f"with the kernels OpenBLAS picks itself, run the command without them, e.g. "
                     f"'env -u OPENBLAS_CORETYPE -u OPENBLAS_L2_SIZE python -m fastbptt bench'.")
        else:
            text += ("OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are not set, so this build may not know the "
                     "CPU; a newer NumPy (with a newer OpenBLAS) may.")
        out.append(text)
    return out


def environment_notes(environ=None):
    """The BLAS-tuning variables set in the environment, as 'NAME=value' strings."""
    environ = os.environ if environ is None else environ
    names = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE", "OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
             "MKL_NUM_THREADS", "NUMBA_NUM_THREADS", "NUMBA_THREADING_LAYER")
    return [f"{name}={environ[name]}" for name in names if name in environ]
