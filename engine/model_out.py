"""The model folder a command writes (`python -m merge`, `python -m engine.export`): which files are
its own, and how --out is claimed before the work.

    with claim_model_out(args.out, "python -m merge", overwrite, inputs, ("scratch", "tmp", "old")) as dest:
        with atomic_dir(dest, replace=overwrite, own=is_model_file) as tmp:
            ... write the model into tmp ...

Both commands build the folder beside --out and rename it into place (engine.writes.atomic_dir),
so --overwrite replaces a whole folder. That is safe only for a folder this kind of command wrote:
`--out . --overwrite` in a project folder must not take `src/` and `.git` with it. So a folder is
replaced only when everything in it is a file a model folder holds (`is_model_file`); otherwise the
command is refused, naming the first other entry, before any work.

A symlinked --out stays a link: the folder it points to is the output (built beside the target,
renamed onto the target's name), so the link then points at the new model. A dangling link is
refused (engine.outputs.check_writable), as is an --out inside one of the command's inputs.
"""
from __future__ import annotations

import os
import re
import sys
from contextlib import contextmanager
from typing import Iterator

from engine.outputs import OutputError, check_writable, claim_output
from engine.writes import foreign_entry, input_holding, remove_own_temporaries

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "tokenizer.model",
                   "vocab.json", "merges.txt", "added_tokens.json", "chat_template.jinja", "chat_template.json")
MODEL_FILES = ("config.json", "generation_config.json", "model.safetensors.index.json",
               "adapter_model.safetensors", "adapter_config.json") + TOKENIZER_FILES
_WEIGHTS = re.compile(r"model(-\d{5}-of-\d{5})?\.safetensors")  # one file, or transformers' shard names


def is_model_file(name: str) -> bool:
    """A file name a model or adapter folder written by merge or export holds: what --overwrite replaces."""
    return name in MODEL_FILES or bool(_WEIGHTS.fullmatch(name))


def _check_replaceable(out: str, dest: str, overwrite: bool) -> None:
    """An existing non-empty --out: refused without --overwrite, and with it unless every entry is
    a model file (OutputError naming the first that is not)."""
    if not (os.path.isdir(dest) and os.listdir(dest)):
        return
    if not overwrite:
        raise OutputError(f"--out: {out} already exists; remove it, choose another directory, or pass --overwrite")
    foreign = foreign_entry(dest, is_model_file)
    if foreign is not None:
        raise OutputError(f"--out: {out} holds {foreign!r}, which is not a file of a model folder; --overwrite "
                          f"replaces only a folder that merge or export wrote (choose another --out)")


@contextmanager
def claim_model_out(out: str, command: str, overwrite: bool, inputs: list, temporaries: tuple[str, ...]) \
        -> Iterator[str]:
    """Hold --out for the whole command and yield the folder to write (the target of a symlink).

    Before the work: --out must be writable (engine.outputs), not inside any of `inputs` (the
    models read), and, if it exists, replaceable (see above). Then, holding its lock, the
    `temporaries` a killed run of this command left beside it (`.<name>.<kind>-XXXXXXXX`, exactly)
    are removed, each with one line on stderr."""
    check_writable(out, "--out")
    dest = os.path.realpath(os.path.expanduser(out))
    held = input_holding(dest, inputs)
    if held is not None:
        raise OutputError(f"--out: {out} is inside the input {held}; writing there would change what the "
                          f"command reads (choose a folder outside it)")
    with claim_output(dest, command, key="--out"):
        for path in remove_own_temporaries(dest, temporaries):
            print(f"{command}: removed {path} (left by an interrupted run)", file=sys.stderr)
        _check_replaceable(out, dest, overwrite)
        yield dest
