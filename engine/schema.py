"""Typed YAML: dataclasses as the schema of a YAML file, checked key by key.

The engine's recipes (engine/recipe.py) and pipeline recipes (engine/pipeline/config.py) are
nested YAML mappings whose shape is given by dataclasses: every field has a type, a default (or
is required), a help text and optionally a check, in its metadata (`help_field`). `build` walks
the YAML and the dataclass together, so that

* an unknown key names itself and the closest known key ("did you mean ..."), including a key
  written in the wrong section (`lr` under lora: 'train.lr'),
* a wrong type or a bad value names the dotted key path,

and every problem is a `RecipeError`, one line that the command line prints as `error: ...`
with exit status 2. `parse_overrides` + `set_dotted` apply `key.path=value` overrides (the value
parsed as YAML); `to_dict` and `schema_help` go back to YAML and to --help text.
"""
from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from typing import Any, Literal, Union

from engine.outputs import OutputError, check_writable
from engine.safeio import CorruptFile, UnsafeInput, parse_yaml


class RecipeError(ValueError):
    """A problem with a recipe; its message is one line that names the key or file."""


FLOAT32_MAX = 3.4028234663852886e38  # torch.finfo(torch.float32).max


def check_output_dir(path: str, key: str) -> None:
    """An output directory must be a directory we may write in, or one we may create (checked before any
    work): engine.outputs.check_writable's checks, as a RecipeError naming the key."""
    if path == "":
        raise RecipeError(f"{key}: must not be empty")
    try:
        check_writable(path, key, "dir")
    except OutputError as e:
        raise RecipeError(str(e)) from None
    here = os.path.abspath(os.path.expanduser(path))
    if os.path.isdir(here) and not os.access(here, os.W_OK | os.X_OK):  # a run writes inside it, too
        raise RecipeError(f"{key}: {path}: {here} is not writable")


def help_field(text: str, **extra) -> dict:
    return {"help": text, **extra}



def type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return "one of " + ", ".join(repr(a) for a in typing.get_args(tp))
    if origin in (Union, types.UnionType):
        return " or ".join(type_name(a) for a in typing.get_args(tp))
    if origin is list:
        return f"a list of {type_name(typing.get_args(tp)[0])}"
    if origin is dict:
        return "a mapping"
    if tp is type(None):
        return "null"
    return {int: "an integer", float: "a number", str: "a string", bool: "true/false"}.get(tp, getattr(tp, "__name__", str(tp)))


def coerce(value: Any, tp, key: str, root=None) -> Any:
    """Return `value` as type `tp`, or raise RecipeError naming `key`. `root` is (schema, prefix)
    of the whole recipe, for suggestions of keys written in the wrong section."""
    origin = typing.get_origin(tp)
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        return build(tp, value, key + ".", root)
    if origin in (Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return coerce(value, arg, key, root)
            except RecipeError:
                pass
        raise RecipeError(f"{key}: expected {type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value not in typing.get_args(tp):
            close = difflib.get_close_matches(str(value), [str(a) for a in typing.get_args(tp)], n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise RecipeError(f"{key}: expected {type_name(tp)}, got {value!r}{hint}")
        return value
    if origin is list:
        if not isinstance(value, list):
            raise RecipeError(f"{key}: expected {type_name(tp)}, got {value!r}")
        (item,) = typing.get_args(tp)
        return [coerce(v, item, f"{key}[{i}]", root) for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise RecipeError(f"{key}: expected a mapping, got {value!r}")
        kt, vt = typing.get_args(tp)
        return {coerce(k, kt, key): coerce(v, vt, f"{key}.{k}", root) for k, v in value.items()}
    if tp is bool:
        if not isinstance(value, bool):
            raise RecipeError(f"{key}: expected true/false, got {value!r}")
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            raise RecipeError(f"{key}: expected an integer, got {value!r}")
        if not -2**63 <= value < 2**63:  # counts and seeds go to int64 tensors and numpy
            raise RecipeError(f"{key}: {value} is outside the int64 range")
        return value
    if tp is float:
        # YAML reads 1e-4 (no dot) as a string; accept numeric strings for floats.
        if isinstance(value, str):
            try:
                value = float(value)
            except ValueError:
                raise RecipeError(f"{key}: expected a number, got {value!r}") from None
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise RecipeError(f"{key}: expected a number, got {value!r}")
        # Every number of a recipe ends up in fp32 tensors (lr, betas, scales): inf, nan or a value
        # past fp32's range (|x| > 3.4e38) would overflow there, far from the key that caused it.
        if isinstance(value, int) and abs(value) > FLOAT32_MAX:
            raise RecipeError(f"{key}: {value!r} is outside the float32 range (|x| <= {FLOAT32_MAX:.4g})")
        value = float(value)
        if not math.isfinite(value) or abs(value) > FLOAT32_MAX:
            raise RecipeError(f"{key}: must be a finite number within the float32 range "
                              f"(|x| <= {FLOAT32_MAX:.4g}), got {value!r}")
        return value
    if tp is str:
        if not isinstance(value, str):
            raise RecipeError(f"{key}: expected a string, got {value!r}")
        return value
    raise TypeError(f"unsupported recipe type {tp} at {key}")  # a bug in the schema, not the recipe


def closest(word: str, options: list[str]) -> str | None:
    """The known key a typo most likely meant: a shared stem first, then edit similarity."""
    stems = [o for o in options if word.startswith(o) or o.startswith(word)]
    if stems:
        return max(stems, key=len)
    close = difflib.get_close_matches(word, options, n=1, cutoff=0.5)
    return close[0] if close else None


def schema_paths(cls, prefix: str = "") -> list[str]:
    """Every dotted key of a schema, sections and leaves: ["model", "model.name", ...]."""
    paths = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        path = prefix + yaml_key(f)
        paths.append(path)
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            paths += schema_paths(tp, path + ".")
        elif typing.get_origin(tp) is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            paths += schema_paths(typing.get_args(tp)[1], path + ".<name>.")  # e.g. pipeline.stages.<name>.
    return paths


def unknown_key_error(key: str, prefix: str, known: list[str], root=None, sections=()) -> RecipeError:
    """`unknown key 'lora.lr' (did you mean 'lora.r' or 'train.lr'?)`.

    Two kinds of slip are caught, over the whole schema rather than key by key: a typo of a key of
    this section (the closest of `known`), and a key written in the wrong section: a path anywhere
    in the recipe (`root` = (schema, prefix)) whose last part is `key` (`distributed` at the top is
    'train.distributed', `lr` under lora is 'train.lr'), or failing that, is a near spelling of it
    (`train.lamda` -> 'l1.lambda'). A section name (`sections`) is a weak guess for a misplaced
    leaf, and so is a weak local typo guess, when a real path elsewhere matches."""
    elsewhere = []
    if root is not None:
        others = [p for p in schema_paths(*root) if p != prefix + key]
        elsewhere = [p for p in others if p.rsplit(".", 1)[-1] == key]
        if not elsewhere:
            near = difflib.get_close_matches(key, sorted({p.rsplit(".", 1)[-1] for p in others}), n=1, cutoff=0.8)
            elsewhere = [p for p in others if near and p.rsplit(".", 1)[-1] == near[0]]
    hints = []
    close = closest(key, known)
    if close is not None and elsewhere:  # a real key elsewhere: keep only a strong local guess
        strong = close.startswith(key) or key.startswith(close) or _one_edit(key, close) or \
            difflib.SequenceMatcher(None, key, close).ratio() >= 0.75
        close = close if strong and close not in sections else None
    if close is not None:
        hints.append(prefix + close)
    hints += [p for p in elsewhere if p not in hints][:3]
    hint = f" (did you mean {' or '.join(repr(h) for h in hints)}?)" if hints else ""
    return RecipeError(f"unknown key '{prefix}{key}'{hint}")


def _one_edit(a: str, b: str) -> bool:
    """a and b differ by one inserted, deleted or replaced character (lr / r, dtyp / dtype)."""
    if abs(len(a) - len(b)) > 1:
        return False
    if len(a) == len(b):
        return sum(x != y for x, y in zip(a, b)) == 1
    short, long_ = sorted((a, b), key=len)
    return any(long_[:i] + long_[i + 1:] == short for i in range(len(long_)))


def yaml_key(f: dataclasses.Field) -> str:
    """A field's key in YAML: its name, or `key` from its metadata where the name is a Python keyword."""
    return f.metadata.get("key", f.name)


def build(cls, raw: dict, prefix: str = "", root=None):
    root = root or (cls, prefix)  # the whole schema, for keys written in the wrong section
    hints = typing.get_type_hints(cls)
    fields = {yaml_key(f): f for f in dataclasses.fields(cls)}
    # YAML 1.1 reads a bare `on:` key as the boolean true; give it back its name where a field has it.
    raw = {("on" if key is True and "on" in fields else key): v for key, v in raw.items()}
    for key in raw:
        if key not in fields:
            sections = [k for k, f in fields.items() if dataclasses.is_dataclass(hints[f.name])]
            raise unknown_key_error(str(key), prefix, list(fields), root, sections)
    kwargs = {}
    for name, f in fields.items():
        key = prefix + name
        if name not in raw:
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            if required:
                raise RecipeError(f"missing required key '{key}'")
            continue
        value = coerce(raw[name], hints[f.name], key, root)
        check = f.metadata.get("check")
        if check is not None and value is not None and not check[0](value):
            raise RecipeError(f"{key}: {check[1]}, got {raw[name]!r}")
        kwargs[f.name] = value
    return cls(**kwargs)


def set_dotted(raw: dict, dotted: str, value: Any) -> None:
    node = raw
    parts = dotted.split(".")
    for part in parts[:-1]:
        child = node.get(part)
        if child is None:
            child = node[part] = {}
        if not isinstance(child, dict):
            raise RecipeError(f"override {dotted}: '{part}' is not a mapping")
        node = child
    node[parts[-1]] = value


def parse_overrides(items: list[str]) -> list[tuple[str, Any]]:
    """`key.path=value` -> (key.path, value parsed as YAML, by the loader recipe files use).

    A value that is not valid YAML stays the text as written (`model.name=a: b`); one that parses but is
    refused for what it would cost (an alias, nesting past safeio.MAX_DEPTH) is an error, not text."""
    pairs = []
    for item in items:
        if "=" not in item:
            raise RecipeError(f"override {item!r}: expected key.path=value")
        key, text = item.split("=", 1)
        try:
            value = parse_yaml(text, f"override {key.strip()}") if text != "" else ""
        except UnsafeInput as e:
            raise RecipeError(str(e)) from None
        except CorruptFile:
            value = text
        pairs.append((key.strip(), value))
    return pairs


def to_dict(config) -> dict:
    """A config dataclass as plain YAML-ready data, under the keys its file uses."""
    out = {}
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        out[yaml_key(f)] = to_dict(value) if dataclasses.is_dataclass(value) else value
    return out


def schema_help(cls, prefix: str = "") -> str:
    """Every key with its type, default and meaning, for --help."""
    lines = []
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if dataclasses.is_dataclass(tp):
            lines.append(f"{prefix}{yaml_key(f)}:  {f.metadata.get('help', '')}")
            lines.append(schema_help(tp, prefix + yaml_key(f) + "."))
            continue
        if f.default is not dataclasses.MISSING:
            default = f" [default: {f.default!r}]"
        elif f.default_factory is not dataclasses.MISSING:
            default = f" [default: {f.default_factory()!r}]"
        else:
            default = " [required]"
        lines.append(f"  {prefix}{yaml_key(f)} ({type_name(tp)}){default}\n      {f.metadata.get('help', '')}")
    return "\n".join(lines)
