"""How a run folder is written: every file atomically, by one run at a time.

A file is written under a hidden temporary name beside it and renamed over the old one, so a crash
or a full disk leaves either the old file or the new one, never half of one. A run takes an
exclusive lock on `RUN_DIR/.lock` (fcntl.flock, released when the process ends however it ends);
a second run into the same folder waits up to LOCK_WAIT_SECONDS and then fails naming the holder.
"""

from __future__ import annotations

import os
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Callable

from .errors import StudyError

try:
    import fcntl
except ImportError:  # Windows: no flock; runs are not locked there
    fcntl = None

LOCK_FILE = ".lock"
LOCK_WAIT_SECONDS = 10.0
PARTIAL_SUFFIX = ".partial"


def atomic_write(path: str | os.PathLike, data: bytes | str | Callable[[Path], object]) -> Path:
    """Write `data` (bytes, text, or a callback that writes the file at the path it is given) to `path`.

    The file appears complete or not at all. An OSError names `path`, whatever the writer said.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    partial = path.with_name(f".{path.name}.{os.getpid()}-{threading.get_ident()}{PARTIAL_SUFFIX}")
    try:
        if callable(data):
            data(partial)
        else:
            with open(partial, "wb") as handle:
                handle.write(data.encode() if isinstance(data, str) else data)
        _fsync(partial)
        os.replace(partial, path)
    except OSError as error:
        partial.unlink(missing_ok=True)
        raise OSError(error.errno, error.strerror or str(error), str(path)) from error
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return path


def _fsync(path: Path) -> None:
    """The data on disk before the rename, so a power cut cannot leave a renamed but empty file."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def remove_partials(run_dir: Path) -> None:
    """Delete temporary files a killed writer left behind (only while holding the run's lock)."""
    for partial in Path(run_dir).rglob(f"*{PARTIAL_SUFFIX}"):
        partial.unlink(missing_ok=True)


@contextmanager
def run_folder_lock(run_dir: Path, wait_seconds: float | None = None):
    """Hold the run folder for this run; StudyError when another run holds it past `wait_seconds`."""
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    if fcntl is None:
        yield
        return
    wait = LOCK_WAIT_SECONDS if wait_seconds is None else wait_seconds
    handle = open(run_dir / LOCK_FILE, "a+")
    try:
        deadline = time.monotonic() + wait
        while True:
            try:
                fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() >= deadline:
                    handle.seek(0)
                    holder = handle.read().strip() or "unknown"
                    raise StudyError(f"{run_dir} is in use by another run (pid {holder}); wait for it to finish, "
                                     "or choose another folder") from None
                time.sleep(0.1)
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        yield
    finally:
        handle.close()  # releases the lock


def output_error(run_dir: Path, error: OSError) -> StudyError | None:
    """One line for an OSError writing into `run_dir` (read-only, full, no permission); None otherwise."""
    if not error.filename:
        return None
    folder, where = Path(os.path.abspath(run_dir)), Path(os.path.abspath(error.filename))
    if where == folder:
        what = ""
    elif folder in where.parents:
        what = f" {where.relative_to(folder)}"
    elif where in folder.parents:  # could not create the folder itself
        what = f" {where}"
    else:
        return None
    reason = error.strerror or str(error)
    return StudyError(f"{run_dir}: cannot write{what}: {reason}. Finished images stay on disk; make room or "
                      "choose a writable folder, then run the same study again")
