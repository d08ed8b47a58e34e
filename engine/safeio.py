"""Reading the engine's files safely: one loader per format, one error that names the file.
(Writing: engine/writes.py.)

Every file the engine reads from disk (a recipe, a JSONL data file, a checkpoint's JSON and
safetensors, an adapter, a model directory) goes through these functions. A damaged file
(truncated by a kill, bytes flipped on disk, emptied, not UTF-8) raises `CorruptFile`, a
ValueError whose one-line message starts with the file's path, so each command line prints
`error: <path>: ...` and exits 2 instead of a traceback from the parser underneath.

Input that parses but would cost what its author chooses is refused the same way (`UnsafeInput`,
a CorruptFile): YAML aliases (a 3 KB "billion laughs" file expands to 10^9 nodes) and nesting
deeper than MAX_DEPTH (parsers recurse per level: ~1,000 levels is a RecursionError). Every YAML
the engine reads, files and `key=value` overrides alike, goes through `parse_yaml`. A UTF-8
byte-order mark at the start of a file is dropped (Windows editors write one; left in, it would
spoil the first line).

Integrity beyond what a parser can see: a flipped byte in a tensor's data still parses.
Checkpoints therefore record a SHA-256 digest of every file they hold (`file_digests`) and
of their own JSON (`checksum`, over the canonical JSON of everything else), and
`engine.checkpoint.verify_checkpoint` compares them before a run resumes.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
from typing import Any, Iterator

import yaml


class CorruptFile(ValueError):
    """A file exists but cannot be read as what it should be; the message names the file."""


class UnsafeInput(CorruptFile):
    """Input that a parser would accept, but only at a cost its author chooses (parser denial of service):

    * a YAML alias (`*name`) repeats a whole subtree, and aliases of aliases multiply: a 3 KB
      "billion laughs" file expands to ~10^9 nodes and hangs the reader for minutes or exhausts memory;
    * nesting deeper than MAX_DEPTH: Python's parsers (json, PyYAML's composer) and every walk over
      the result recurse once per level, so ~1,000 levels is a RecursionError far from the file.

    No file the engine reads needs either (a recipe nests ~4 levels, a chat row ~3), so both are
    refused as a damaged file naming it, or counted as a malformed row in a JSONL data file."""


MAX_DEPTH = 100  # nesting levels a JSON/YAML document may have; ~25x what any real one needs
BOM = "\ufeff"   # a UTF-8 byte-order mark, which Windows editors put at the start of a file


def short_reason(err: BaseException) -> str:
    return " ".join(str(err).split())[:200] or type(err).__name__


def read_text(path: str) -> str:
    """The file as UTF-8 text (a file that is not UTF-8 is CorruptFile, not a UnicodeDecodeError).

    A leading byte-order mark is dropped: it is not part of the text, and left in it becomes part of
    the first line, which then is no longer valid JSON (a JSONL file would lose its first row)."""
    with open(path, "rb") as f:
        data = f.read()
    try:
        return data.decode("utf-8").removeprefix(BOM)
    except UnicodeDecodeError as e:
        line = data[: e.start].count(b"\n") + 1
        raise CorruptFile(f"{path}:{line}: not UTF-8 text (byte {data[e.start]:#04x} at offset {e.start})") from None


def _walk(obj: Any) -> Iterator[tuple[Any, int]]:
    """Every value inside `obj` (dict keys included) with its depth, obj itself at depth 1.

    Iterative, with a stack of its own: a walk that recursed would itself fail on deep data."""
    stack = [(obj, 1)]
    while stack:
        value, depth = stack.pop()
        yield value, depth
        if isinstance(value, dict):
            stack.extend((v, depth + 1) for item in value.items() for v in item)
        elif isinstance(value, list):
            stack.extend((v, depth + 1) for v in value)


def _is_text(s: str) -> bool:
    try:
        s.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def check_data(obj: Any, name: str) -> Any:
    """`obj` (parsed from the file or text `name`) if it is plain data the engine can walk safely:
    nested at most MAX_DEPTH levels (else UnsafeInput) and free of lone surrogates (else CorruptFile)."""
    for value, depth in _walk(obj):
        if depth > MAX_DEPTH:
            raise UnsafeInput(f"{name}: nested more than {MAX_DEPTH} levels deep (refused: deeper data is a "
                              f"damaged or hostile file)")
        if isinstance(value, str) and not _is_text(value):
            raise CorruptFile(f"{name}: holds a lone surrogate (\\ud800-\\udfff), not text")
    return obj


def parse_json(text: str, name: str) -> Any:
    """JSON text -> data, checked by check_data; every failure is CorruptFile naming `name`
    (a file path, or 'path line N' for a JSONL row)."""
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise CorruptFile(f"{name}:{e.lineno}: not valid JSON ({e.msg})") from None
    except RecursionError:  # json's C parser counts its nesting against the recursion limit
        raise UnsafeInput(f"{name}: nested more than {MAX_DEPTH} levels deep (refused: deeper data is a "
                          f"damaged or hostile file)") from None
    except ValueError as e:  # e.g. an integer of more than 4,300 digits (Python's int() limit)
        raise CorruptFile(f"{name}: not valid JSON ({short_reason(e)})") from None
    return check_data(obj, name)


def read_json(path: str) -> Any:
    return parse_json(read_text(path), path)


class _Refused(Exception):
    """Raised inside the YAML loader; parse_yaml turns it into UnsafeInput naming the file and line."""

    def __init__(self, problem: str, mark):
        super().__init__(problem)
        self.problem, self.mark = problem, mark


class SafeLoader(yaml.SafeLoader):
    """yaml.SafeLoader (no `!!python` tags) that also refuses what could make reading a small file
    unbounded, and reads numbers as YAML 1.2 does:

    * an alias (`*name`) is refused: anchors alone are harmless, but each alias repeats a subtree,
      and nine levels of ten aliases each make a 3 KB file of 10^9 nodes;
    * nesting deeper than MAX_DEPTH is refused before the composer (which recurses per level) gets there;
    * `1e-3` is the number 0.001: YAML 1.1, which PyYAML follows, wants a dot (`1.0e-3`) and
      otherwise reads the string "1e-3", so a merge weight or learning rate typed the common way
      became a string."""

    def compose_node(self, parent, index):
        if self.check_event(yaml.AliasEvent):
            event = self.peek_event()
            raise _Refused(f"YAML aliases are not accepted (*{event.anchor}): each one repeats a whole "
                           f"subtree, so a few kilobytes of them can expand without bound; write the value out",
                           event.start_mark)
        self._depth = getattr(self, "_depth", 0) + 1
        try:
            if self._depth > MAX_DEPTH:
                raise _Refused(f"nested more than {MAX_DEPTH} levels deep (refused: deeper data is a damaged "
                               f"or hostile file)", self.peek_event().start_mark)
            return super().compose_node(parent, index)
        finally:
            self._depth -= 1


# YAML 1.2's exponent floats, for reading (SafeLoader) and for writing: yaml.safe_dump must quote a
# string such as "1e-3", or what the engine writes (recipe.yaml) would read back as a number.
for _cls in (SafeLoader, yaml.SafeDumper):
    _cls.add_implicit_resolver("tag:yaml.org,2002:float",
                               re.compile(r"^[-+]?(?:[0-9][0-9_]*)(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"),
                               list("-+0123456789"))
del _cls


def parse_yaml(text: str, name: str) -> Any:
    """YAML text parsed with SafeLoader; every failure is CorruptFile naming `name` and the line
    (UnsafeInput for an alias or deep nesting)."""
    try:
        obj = yaml.load(text, Loader=SafeLoader)  # noqa: S506 - SafeLoader is yaml.SafeLoader, stricter
    except _Refused as e:
        raise UnsafeInput(f"{name}:{e.mark.line + 1}: {e.problem}") from None
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise CorruptFile(f"{name}{where}: not valid YAML ({getattr(e, 'problem', None) or short_reason(e)})") from None
    except (ValueError, RecursionError) as e:  # an int past 4,300 digits; a recursion this loader missed
        raise CorruptFile(f"{name}: not valid YAML ({short_reason(e)})") from None
    return check_data(obj, name)  # YAML's \ud800 escapes give lone surrogates too


def read_yaml(path: str) -> Any:
    """A YAML file parsed safely (parse_yaml); errors name the file and line."""
    return parse_yaml(read_text(path), path)


def read_jsonl_rows(path: str) -> list[Any]:
    """The rows of a JSONL data file, line by line: row i is line i + 1.

    A line that is not UTF-8, not JSON, holds a lone surrogate or nests deeper than MAX_DEPTH is
    None (a malformed row, which the data loaders count against data.max_bad_fraction and report
    by line number): one bad row in scraped data should cost that row, not the run. A leading
    byte-order mark is not part of the first row. Blank lines at the end are not rows.
    """
    with open(path, "rb") as f:
        lines = f.read().removeprefix(BOM.encode("utf-8")).split(b"\n")
    while lines and not lines[-1].strip():
        lines.pop()
    rows = []
    for n, raw in enumerate(lines, 1):
        try:
            rows.append(parse_json(raw.decode("utf-8"), f"{path} line {n}"))
        except (UnicodeDecodeError, CorruptFile):
            rows.append(None)
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
        raise CorruptFile(f"{path}: not a readable safetensors file ({short_reason(e)})") from None


def load_safetensors(path: str, device: str = "cpu") -> dict:
    """safetensors.torch.load_file, with a damaged file reported as CorruptFile naming it."""
    from safetensors.torch import load_file
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: file not found")
    try:
        return load_file(path, device=device)
    except Exception as e:  # noqa: BLE001
        raise CorruptFile(f"{path}: not a readable safetensors file ({short_reason(e)})") from None


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
