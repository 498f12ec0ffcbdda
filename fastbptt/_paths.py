"""Output paths checked before the work whose result they will hold.

A command that trains or benchmarks for minutes and then fails to write its result has
thrown the minutes away. ``check_output_path`` tries, up front, exactly what the final
write will do (open the file for writing, or create a file in its folder) and removes
whatever it created, so a run starts only when its results can be kept.
"""

from __future__ import annotations

import os
import stat
import tempfile


def check_output_path(path, name, *, replace=False):
    """Check that ``path`` can be written later, leaving no file behind; return it as a str.

    Parameters
    ----------
    path : str or os.PathLike
        The file to be written. A file that exists is opened for appending and closed
        again (not changed); a file that does not exist is created and removed.
    name : str
        How the caller calls the path (``"--json"``, ``"path"``): every message starts
        with it.
    replace : bool
        The file will be written to a temporary file in the same folder and renamed
        over ``path`` (as ``fastbptt.checkpoint.save`` does): the folder must accept a
        new file, and ``path`` must be a regular file or absent. Without ``replace``
        the file is opened and written directly, so a character device such as
        ``/dev/null`` or ``/dev/stdout`` is accepted too.

    Raises
    ------
    TypeError
        ``path`` is not a str or path-like.
    ValueError
        It is empty, names a directory, a FIFO or another file that is not writable, or
        lies in a folder that does not exist or does not accept a new file. The message
        names ``name`` and says what to do.
    """
    if isinstance(path, bytes) or not isinstance(path, (str, os.PathLike)):
        raise TypeError(f"{name} must be a path (str), got {type(path).__name__}")
    path = os.fspath(path)
    if not path.strip():
        raise ValueError(f"{name}: the path is empty; name the file to write")
    folder = os.path.dirname(os.path.abspath(path))
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        mode = None
    except OSError as exc:
        raise ValueError(f"{name}: cannot use {path!r}: {exc.strerror}; choose another path") from None
    if mode is not None and stat.S_ISDIR(mode):
        raise ValueError(f"{name}: {path!r} is a directory; name a file inside it, such as "
                         f"{os.path.join(path, 'result')!r}")
    if path.endswith(os.sep) or (os.altsep and path.endswith(os.altsep)):
        raise ValueError(f"{name}: {path!r} names a directory (it ends with a separator); name a file")
    if mode is None and not os.path.isdir(folder):
        raise ValueError(f"{name}: directory {folder!r} does not exist; create it first")
    if mode is not None and not stat.S_ISREG(mode) and (replace or not stat.S_ISCHR(mode)):
        kind = "a FIFO (named pipe)" if stat.S_ISFIFO(mode) else "not a regular file"
        raise ValueError(f"{name}: {path!r} is {kind}; name a regular file")
    try:
        if mode is not None:
            with open(path, "ab"):          # opens for writing, changes nothing
                pass
        elif not replace:
            fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            os.close(fd)
            os.remove(path)
        if replace:                         # the temporary file of the final write
            fd, tmp = tempfile.mkstemp(dir=folder, prefix=".fastbptt-check-")
            os.close(fd)
            os.remove(tmp)
    except OSError as exc:
        raise ValueError(f"{name}: cannot write {path!r}: {exc.strerror or exc}; "
                         f"choose a writable path") from None
    return path
