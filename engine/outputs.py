"""The output a command writes: one command at a time, checked before the work, its leftovers only.

    with claim_output(out, "python -m merge", key="--out"):
        ... write into out ...

`claim_output` is what every entry point (train, the pipeline, merge, export, evals) does with
the file or folder it writes, for the whole command:

* **one writer.** An exclusive lock (fcntl.flock on `.<name>.lock` beside the output) is held
  until the command ends; a second command on the same output is refused at once with exit 2,
  naming the holder's pid and command. The lock dies with its process (the kernel drops it), so
  a killed command never leaves the output locked.
* **writable, before the work.** The output's parent must be a directory this user may write
  in, and the output itself a folder (or a file, for `kind="file"`), or absent: refused with
  one line naming the key otherwise (a file where a folder goes, a read-only filesystem, a
  name too long for the filesystem, a dangling symlink).

Everything here raises `OutputError` (a ValueError: the command lines print it as one `error:`
line and exit 2).
"""
from __future__ import annotations

import errno
import fcntl
import os
from contextlib import contextmanager
from typing import Iterator


class OutputError(ValueError):
    """The output cannot be written (in use, not writable, not a folder); the message names it."""


def lock_path(out: str) -> str:
    """`.<name>.lock` beside `out`: outside the output, so the output itself can be swapped whole."""
    out = os.path.abspath(out)
    return os.path.join(os.path.dirname(out), f".{os.path.basename(out)}.lock")


# A file name holds 255 bytes; the engine's own names beside an output add up to 18 to it (its lock
# `.<name>.lock`, a folder's temporaries `.<name>.scratch-XXXXXXXX`, a file's `<name>.tmp-<pid>`).
MAX_NAME_BYTES = 255 - 18


def check_writable(out: str, key: str, kind: str = "dir") -> None:
    """OutputError unless `out` can be written as a `kind` ("dir" or "file"), before any work."""
    path = os.path.abspath(os.path.expanduser(out))
    name = os.path.basename(path)
    if len(name.encode()) > MAX_NAME_BYTES:
        raise OutputError(f"{key}: {out}: the name is {len(name.encode())} bytes; an output's name holds at most "
                          f"{MAX_NAME_BYTES} (a file name holds 255, and the engine's temporaries beside it add 18)")
    if os.path.islink(path) and not os.path.exists(path):
        raise OutputError(f"{key}: {out} is a symlink to {os.readlink(path)}, which does not exist")
    if os.path.exists(path):
        if kind == "dir" and not os.path.isdir(path):
            raise OutputError(f"{key}: {out} exists and is not a directory")
        if kind == "file" and os.path.isdir(path):
            raise OutputError(f"{key}: {out} is a directory, not a file")
    here = os.path.dirname(path)
    while not os.path.exists(here):  # the nearest existing ancestor: where the folders will be made
        here = os.path.dirname(here)
    if not os.path.isdir(here):
        raise OutputError(f"{key}: {out} cannot be created: {here} is a file")
    if not os.access(here, os.W_OK | os.X_OK):
        raise OutputError(f"{key}: {out}: {here} is not writable")
    try:  # os.access does not know a read-only mount: ask the filesystem itself
        st = os.statvfs(here)
    except OSError:
        return
    if st.f_flag & os.ST_RDONLY:
        raise OutputError(f"{key}: {out}: {here} is on a read-only filesystem")


@contextmanager
def claim_output(out: str, command: str, key: str = "--out", kind: str = "dir") -> Iterator[None]:
    """Hold `out` for this command: checked writable, then locked until the block ends (see above)."""
    check_writable(out, key, kind)
    path = lock_path(out)
    os.makedirs(os.path.dirname(path), exist_ok=True)
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as e:
            holder = _read_holder(fd)
            os.close(fd)
            if e.errno in (errno.EWOULDBLOCK, errno.EACCES):
                raise OutputError(f"{key}: {out} is in use by another command ({holder or 'unknown holder'}); "
                                  f"wait for it to finish, or choose another {key}") from None
            raise
        # The holder before us may have removed the file after we opened it: then our lock is on an
        # unlinked file that a third command cannot see. Lock what the path names now, or try again.
        try:
            same = os.fstat(fd).st_ino == os.stat(path).st_ino
        except FileNotFoundError:
            same = False
        if same:
            break
        os.close(fd)
    try:
        try:
            os.ftruncate(fd, 0)
            os.write(fd, f"pid {os.getpid()}: {command}\n".encode())
        except OSError as e:  # a full disk: say which file, before any work
            raise OutputError(f"{key}: {out}: cannot write its lock file {path} ({e.strerror})") from None
        yield
    finally:
        try:
            os.remove(path)  # while still holding the lock: a waiter then retries on a fresh file
        except OSError:
            pass
        os.close(fd)


def _read_holder(fd: int) -> str:
    try:
        os.lseek(fd, 0, os.SEEK_SET)
        return os.read(fd, 300).decode("utf-8", "replace").strip()
    except OSError:
        return ""
