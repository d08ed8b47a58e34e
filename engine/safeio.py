"""Reading and writing the engine's files safely: one loader per format, one error that names
the file, and one way to write (`atomic_write` for a file, `atomic_dir` for a directory).

Every file the engine reads from disk (a recipe, a JSONL data file, a checkpoint's JSON and
safetensors, an adapter, a model directory) goes through these functions. A damaged file
(truncated by a kill, bytes flipped on disk, emptied, not UTF-8) raises `CorruptFile`, a
ValueError whose one-line message starts with the file's path, so each command line prints
`error: <path>: ...` and exits 2 instead of a traceback from the parser underneath.

Integrity beyond what a parser can see: a flipped byte in a tensor's data still parses.
Checkpoints therefore record a SHA-256 digest of every file they hold (`file_digests`) and
of their own JSON (`checksum`, over the canonical JSON of everything else), and
`engine.checkpoint.verify_checkpoint` compares them before a run resumes.

Writing: a file is written under a temporary name beside it (`<path>.tmp-<pid>`, the same
directory so the rename is atomic) and renamed over `path` only once it is complete; a directory
is built as `.<name>.tmp-XXXX` beside it and renamed into place. A killed write leaves at most that
temporary, never a half-written file under the real name; `engine.checkpoint.remove_stale_temporaries`
clears them from a run directory at the next start.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from typing import Any, Iterator

import yaml


class CorruptFile(ValueError):
    """A file exists but cannot be read as what it should be; the message names the file."""


def _reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def read_text(path: str) -> str:
    """The file as UTF-8 text (a file that is not UTF-8 is CorruptFile, not a UnicodeDecodeError)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CorruptFile(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def read_json(path: str) -> Any:
    try:
        return json.loads(read_text(path))
    except json.JSONDecodeError as e:
        raise CorruptFile(f"{path}:{e.lineno}: not valid JSON ({e.msg})") from None


def read_yaml(path: str) -> Any:
    """A YAML file parsed safely (no python tags); parse errors name the file and line."""
    try:
        return yaml.safe_load(read_text(path))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise CorruptFile(f"{path}{where}: not valid YAML ({getattr(e, 'problem', None) or _reason(e)})") from None


def is_clean_text(obj: Any) -> bool:
    """True if every string inside `obj` is encodable as UTF-8 (JSON's \\ud800 escapes give lone
    surrogates, which tokenizers reject with a TypeError)."""
    if isinstance(obj, str):
        try:
            obj.encode("utf-8")
        except UnicodeEncodeError:
            return False
        return True
    if isinstance(obj, dict):
        return all(is_clean_text(k) and is_clean_text(v) for k, v in obj.items())
    if isinstance(obj, list):
        return all(is_clean_text(v) for v in obj)
    return True


def read_jsonl_rows(path: str) -> list[Any]:
    """The rows of a JSONL data file, line by line: row i is line i + 1.

    A line that is not UTF-8, not JSON, or holds a lone surrogate is None (a malformed row,
    which the data loaders count against data.max_bad_fraction and report by line number).
    Blank lines at the end are not rows.
    """
    with open(path, "rb") as f:
        lines = f.read().split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for raw in lines:
        try:
            row = json.loads(raw.decode("utf-8"))
        except (UnicodeDecodeError, json.JSONDecodeError):
            row = None
        rows.append(row if is_clean_text(row) else None)
    return rows


def check_safetensors(path: str) -> list[str]:
    """Open `path` as safetensors without reading its data; return its keys.

    safetensors checks the header and that the data covers exactly what the header says, so a
    truncated, extended, emptied or header-damaged file is caught here (data bytes are not).
    """
    from safetensors import safe_open
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        with safe_open(path, framework="pt") as f:
            return list(f.keys())
    except Exception as e:  # noqa: BLE001 - SafetensorError is not exported under a stable name
        raise CorruptFile(f"{path}: not a readable safetensors file ({_reason(e)})") from None


def load_safetensors(path: str, device: str = "cpu") -> dict:
    """safetensors.torch.load_file, with a damaged file reported as CorruptFile naming it."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(path, device=device)
    except Exception as e:  # noqa: BLE001
        raise CorruptFile(f"{path}: not a readable safetensors file ({_reason(e)})") from None


def check_model_dir(path: str) -> None:
    """Every safetensors file of a local model directory opens (before transformers reads them)."""
    for name in sorted(os.listdir(path)):
        if name.endswith(".safetensors"):
            check_safetensors(os.path.join(path, name))
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.isfile(index):
        read_json(index)


def file_digest(*paths: str) -> str:
    """sha256 over the bytes of one file, or of several read one after the other (an adapter's
    config and weights as one input identity), read in 1 MiB blocks."""
    h = hashlib.sha256()
    for path in paths:
        with open(path, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()


def json_checksum(obj: dict) -> str:
    """SHA-256 of the canonical JSON of `obj` without its own `checksum` key."""
    body = {k: v for k, v in obj.items() if k != "checksum"}
    return hashlib.sha256(json.dumps(body, sort_keys=True).encode("utf-8")).hexdigest()


# --------------------------------------------------------------------------- writing

def temporary_name(path: str) -> str:
    """The name a file is written under until it is complete (engine.checkpoint clears leftovers)."""
    return f"{path}.tmp-{os.getpid()}"


@contextmanager
def atomic_file(path: str) -> Iterator[str]:
    """A temporary path beside `path` for a writer that takes a file name (safetensors' save_file,
    matplotlib's savefig, ...); a clean exit renames it over `path` (one os.replace), an exception
    deletes it and leaves any old `path` untouched."""
    tmp = temporary_name(path)
    try:
        yield tmp
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


@contextmanager
def atomic_write(path: str, mode: str = "w", *, fsync: bool = False) -> Iterator:
    """Open `path` for writing so that it appears whole or not at all:

        with atomic_write("summary.json") as f:
            json.dump(summary, f)

    The file object is a temporary beside `path` (atomic_file). `fsync` flushes the bytes to the
    disk before the rename (for a file the next run trusts, e.g. a checkpoint's state)."""
    with atomic_file(path) as tmp, open(tmp, mode, encoding=None if "b" in mode else "utf-8") as f:
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
    """safetensors.torch.save_file, atomically."""
    from safetensors.torch import save_file
    with atomic_file(path) as tmp:
        save_file(tensors, tmp, metadata=metadata)


@contextmanager
def atomic_dir(dest: str, *, replace: bool = False, prefix: str | None = None) -> Iterator[str]:
    """Build a directory beside `dest` and rename it into place once complete:

        with atomic_dir("out/merged") as tmp:
            write_model(..., tmp)

    The temporary is `.<name>.tmp-XXXX` in `dest`'s parent (the same filesystem, so the rename is
    atomic); an exception removes it. An existing empty `dest` is replaced. An existing non-empty
    `dest` is refused (FileExistsError) unless `replace`: then the old one is moved aside only
    after the new one is complete, and deleted once the new one is in place, so a failure at any
    point keeps a whole directory under `dest`."""
    dest = os.path.abspath(dest)
    parent, name = os.path.dirname(dest), os.path.basename(dest)
    os.makedirs(parent, exist_ok=True)
    tmp = tempfile.mkdtemp(prefix=prefix or f".{name}.tmp-", dir=parent)
    old = None
    try:
        yield tmp
        if os.path.isdir(dest) and os.listdir(dest):
            if not replace:
                raise FileExistsError(f"{dest}: already exists")
            old = tempfile.mkdtemp(prefix=f".{name}.old-", dir=parent)
            os.rmdir(old)
            os.replace(dest, old)
        elif os.path.isdir(dest):
            os.rmdir(dest)
        try:
            os.replace(tmp, dest)
        except BaseException:
            if old is not None and not os.path.exists(dest):
                os.replace(old, dest)  # the new one could not take its place: the old one goes back
                old = None
            raise
        tmp = None
    finally:
        for leftover in (tmp, old):
            if leftover is not None:
                shutil.rmtree(leftover, ignore_errors=True)
