"""Writing the engine's files safely: a file or a folder appears whole under its name, or not at all.

A file is written under a temporary name beside it (`<path>.tmp-<pid>`, the same
directory so the rename is atomic) and renamed over `path` only once it is complete; a directory
is built as `.<name>.tmp-XXXX` beside it and renamed into place. A killed write leaves at most that
temporary, never a half-written file under the real name; `engine.checkpoint.remove_stale_temporaries`
clears them from a run directory at the next start, `remove_own_temporaries` from beside a merge's
or an export's --out. A write that fails (a full disk, a read-only filesystem) is an OSError naming
the file (`write_error`), which every command prints as one line (`os_error_line`) with exit 2.

One way to write, used everywhere a file is written: `atomic_write` (a file object), `atomic_file` (a
temporary path, for writers that take a name: safetensors, savefig), `write_text`, `write_json`,
`save_safetensors`, and `atomic_dir` for a folder. (Reading: engine/safeio.py.)
"""
from __future__ import annotations

import ctypes
import errno
import functools
import json
import os
import re
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

from engine.safeio import short_reason

def temporary_name(path: str) -> str:
    """The name a file is written under until it is complete (engine.checkpoint clears leftovers)."""
    return f"{path}.tmp-{os.getpid()}"


def os_error_line(err: OSError) -> str:
    """An OSError as the one line a command prints: `PATH: reason` (Python's own str() puts the
    errno first and the path last, in quotes), or its text when it names no file."""
    if err.filename is not None and err.strerror:
        return f"{err.filename}: {err.strerror}"
    return " ".join(str(err).split())


def write_error(err: BaseException, path: str) -> BaseException:
    """A failed write of `path` as an OSError that names `path`; any other error unchanged.

    open() and write() raise OSError, but a write() to a full disk names no file, and
    safetensors' writer raises its own SafetensorError ("I/O error: No space left on device
    (os error 28)"). Every command catches OSError and prints `os_error_line`, so the user reads
    which file could not be written and why, never a traceback. An error that is not about the
    disk (a SafetensorError for a non-contiguous tensor) is a bug and stays what it is."""
    if isinstance(err, OSError):
        if err.filename is None:  # a write() or flush() on an open file: say which file it was
            return OSError(err.errno, err.strerror or short_reason(err), path)
        return err
    code = re.search(r"os error (\d+)", str(err))
    if code:
        n = int(code.group(1))
        return OSError(n, os.strerror(n), path)
    if "I/O error" in str(err):
        return OSError(errno.EIO, f"cannot write ({short_reason(err)})", path)
    return err


@functools.lru_cache(maxsize=1)
def _renameat2():
    """glibc's renameat2 (Linux, glibc >= 2.28), or None."""
    try:
        return getattr(ctypes.CDLL(None, use_errno=True), "renameat2", None)
    except OSError:
        return None


_AT_FDCWD, _RENAME_NOREPLACE = -100, 1


def rename_noreplace(src: str, dst: str) -> None:
    """Rename `src` to `dst` unless `dst` exists (then FileExistsError, and nothing moves).

    os.replace would silently replace a file or an empty folder that another process created
    in the meantime; the kernel's renameat2(RENAME_NOREPLACE) checks and renames in one step.
    Where it is missing (not Linux, an old glibc, a filesystem without the flag) this falls back
    to a check and a rename, which leaves a window of microseconds."""
    fn = _renameat2()
    if fn is not None:
        if fn(_AT_FDCWD, os.fsencode(src), _AT_FDCWD, os.fsencode(dst), _RENAME_NOREPLACE) == 0:
            return
        err = ctypes.get_errno()
        if err not in (errno.ENOSYS, errno.EINVAL, errno.ENOTSUP):
            raise OSError(err, os.strerror(err), dst)
    if os.path.lexists(dst):
        raise FileExistsError(errno.EEXIST, os.strerror(errno.EEXIST), dst)
    os.rename(src, dst)


@contextmanager
def atomic_file(path: str, *, replace: bool = True) -> Iterator[str]:
    """A temporary path beside `path` for a writer that takes a file name (safetensors' save_file,
    matplotlib's savefig, ...); a clean exit renames it over `path` (one os.replace), an exception
    deletes it and leaves any old `path` untouched. `replace=False`: an existing `path` is never
    replaced (FileExistsError; see rename_noreplace). An OSError names `path` (write_error)."""
    tmp = temporary_name(path)
    try:
        yield tmp
        (os.replace if replace else rename_noreplace)(tmp, path)
    except BaseException as e:
        if os.path.exists(tmp):
            os.remove(tmp)
        named = write_error(e, path)
        if isinstance(e, OSError) and e.filename == tmp:  # open(tmp) failed: the user knows `path`
            named = OSError(e.errno, e.strerror, path)
        if named is e:
            raise
        raise named from None


@contextmanager
def atomic_write(path: str, mode: str = "w", *, fsync: bool = False, replace: bool = True) -> Iterator:
    """Open `path` for writing so that it appears whole or not at all:

        with atomic_write("summary.json") as f:
            json.dump(summary, f)

    The file object is a temporary beside `path` (atomic_file, `replace` as there). `fsync`
    flushes the bytes to the disk before the rename (for a file the next run trusts, e.g. a
    checkpoint's state)."""
    with atomic_file(path, replace=replace) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
        yield f
        if fsync:
            f.flush()
            os.fsync(f.fileno())


def write_text(path: str, text: str) -> None:
    with atomic_write(path) as f:
        f.write(text)


def write_json(path: str, obj: Any, **dump_args) -> None:
    """`obj` as JSON (json.dump's arguments pass through, e.g. indent=1), atomically."""
    with atomic_write(path) as f:
        json.dump(obj, f, **dump_args)


def save_safetensors(tensors: dict, path: str, metadata: dict | None = None) -> None:
    """safetensors.torch.save_file, atomically; a full disk is an OSError naming `path`."""
    from safetensors.torch import save_file
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


def current_umask() -> int:
    """The process's umask, read without changing it where Linux shows it (/proc/self/status)."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("Umask:"):
                    return int(line.split()[1], 8)
    except (OSError, ValueError):
        pass
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


def follow_umask(folder: str) -> None:
    """Give `folder` and everything in it the modes a plain mkdir and open() would: mkdtemp makes
    0700, and some writers (transformers' save_pretrained of safetensors weights) make 0600
    files, whatever the umask; an output then could not be read by the group it was meant for."""
    mask = current_umask()
    for here, dirs, files in os.walk(folder):
        os.chmod(here, 0o777 & ~mask)
        for name in files:
            path = os.path.join(here, name)
            if not os.path.islink(path):
                os.chmod(path, 0o666 & ~mask)


def temporary_dir_prefix(dest: str, kind: str) -> str:
    """`.<name>.<kind>-`: what the folders built beside `dest` are called, followed by mkdtemp's
    eight random characters (kind: tmp, old; merge adds scratch, export export)."""
    return f".{os.path.basename(os.path.abspath(dest))}.{kind}-"


_MKDTEMP_SUFFIX = r"[a-z0-9_]{8}"  # tempfile's random part: 8 of its 37 letters


def remove_own_temporaries(dest: str, kinds: tuple[str, ...] = ("tmp", "old")) -> list[str]:
    """Delete the folders a killed command left beside `dest`; return their paths.

    Only the exact names this module (and the command, for its own `kinds`) gives them:
    `.<name>.<kind>-XXXXXXXX` with XXXXXXXX mkdtemp's random part, real folders (never a link),
    in `dest`'s parent. Anything else, however it is named, is the user's and stays. Call it
    only while holding `dest`'s lock (engine.outputs.claim_output): then no live command is
    writing them. An `.old-` folder with no `dest` beside it is the previous output, moved aside
    by atomic_dir just before the kill: it goes back to `dest` instead."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    own = re.compile(re.escape(f".{os.path.basename(dest)}.") + r"(\w+)-" + _MKDTEMP_SUFFIX)
    removed = []
    for entry in sorted(os.listdir(parent)) if os.path.isdir(parent) else []:
        m, path = own.fullmatch(entry), os.path.join(parent, entry)
        if not m or m.group(1) not in kinds or os.path.islink(path) or not os.path.isdir(path):
            continue
        if m.group(1) == "old" and not os.path.lexists(dest):
            os.rename(path, dest)
            continue
        shutil.rmtree(path, ignore_errors=True)
        removed.append(path)
    return removed


def foreign_entry(folder: str, own) -> str | None:
    """The first entry of `folder` that `own(name)` does not claim, or that is a folder: what a
    command must not delete when it replaces `folder` (None: everything there is its own)."""
    for entry in sorted(os.listdir(folder)):
        path = os.path.join(folder, entry)
        if not own(entry) or (os.path.isdir(path) and not os.path.islink(path)):
            return entry
    return None


def _move_aside(dest: str, replace: bool, own) -> str | None:
    """Make room for the new `dest`: an absent or empty one needs none (None); an existing one is
    renamed to `.<name>.old-XXXXXXXX` if `replace` and everything in it is `own` (FileExistsError
    naming the first entry that is not)."""
    if not os.path.isdir(dest):
        return None
    if not os.listdir(dest):
        os.rmdir(dest)
        return None
    if not replace:
        raise FileExistsError(errno.EEXIST, "already exists", dest)
    foreign = foreign_entry(dest, own) if own is not None else None
    if foreign is not None:
        raise FileExistsError(errno.EEXIST, f"holds {foreign}, which this command did not write; not replaced", dest)
    old = tempfile.mkdtemp(prefix=temporary_dir_prefix(dest, "old"), dir=os.path.dirname(dest))
    os.rmdir(old)
    os.rename(dest, old)
    return old


@contextmanager
def atomic_dir(dest: str, *, replace: bool = False, prefix: str | None = None, own=None) -> Iterator[str]:
    """Build a directory beside `dest` and rename it into place once complete:

        with atomic_dir("out/merged") as tmp:
            write_model(..., tmp)

    The temporary is `.<name>.tmp-XXXX` in `dest`'s parent (the same filesystem, so the rename is
    atomic); an exception removes it. It and its files get the modes the umask gives (follow_umask). An existing empty `dest` is replaced. An existing non-empty `dest` is
    refused (FileExistsError) unless `replace`, and then also if it holds an entry that
    `own(name)` does not claim (a command replaces only what it wrote): the old one is moved
    aside only after the new one is complete, and deleted once the new one is in place, so a
    failure at any point keeps a whole directory under `dest`. The final rename never replaces
    what another process put at `dest` meanwhile (rename_noreplace). An OSError about a file
    inside the temporary names it as `dest/...`."""
    dest = os.path.abspath(dest)
    parent = os.path.dirname(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix or temporary_dir_prefix(dest, "tmp"), dir=parent)
    old = None
    try:
        yield tmp
        follow_umask(tmp)
        old = _move_aside(dest, replace, own)
        rename_noreplace(tmp, dest)
        tmp = None
    except OSError as e:
        if tmp and isinstance(e.filename, str) and e.filename.startswith(tmp):
            e.filename = dest + e.filename[len(tmp):]
        raise
    finally:
        if old is not None and tmp is not None and not os.path.lexists(dest):
            os.rename(old, dest)  # the new one did not take its place: the old one goes back
            old = None
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)


def input_holding(out: str, inputs) -> str | None:
    """The first of `inputs` (paths; names that are no path are skipped) that `out` is, or lies
    inside, after symlinks: a command must never write into what it reads (None: none)."""
    real = os.path.realpath(os.path.expanduser(out))
    for name in inputs:
        path = os.path.expanduser(name) if isinstance(name, str) else None
        if path and os.path.exists(path):
            here = os.path.realpath(path)
            if real == here or real.startswith(here.rstrip(os.sep) + os.sep):
                return name
    return None
