"""Ctrl-C and `kill`: one line and the shell's exit status, never a traceback, never an orphan.

    def main(argv=None) -> int:
        with interruptible():
            try:
                ...
            except Interrupted as e:
                print(f"interrupted ({e.name}): ...", file=sys.stderr)
                return e.exit_code          # 130 for SIGINT, 143 for SIGTERM (128 + the signal)

`interruptible` turns SIGTERM into an exception as Python already does SIGINT (KeyboardInterrupt),
so `finally:` blocks and context managers run on both: temporaries are removed, locks released,
and nothing half-written is left under a real name (writes are atomic: engine/writes.py).

A command that starts subprocesses (the pipeline's training stages) passes `preexec_fn=die_with_parent`:
the kernel sends the child SIGTERM when its parent dies, even by SIGKILL, so no training stage runs on
as an orphan that would race a rerun.
"""
from __future__ import annotations

import ctypes
import signal
import sys
from contextlib import contextmanager
from typing import Iterator


class Interrupted(KeyboardInterrupt):
    """SIGINT (Ctrl-C) or SIGTERM arrived; `exit_code` is 128 + the signal's number."""

    def __init__(self, signum: int = signal.SIGINT):
        super().__init__(signal.Signals(signum).name)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_code(self) -> int:
        return 128 + self.signum


def as_interrupted(e: KeyboardInterrupt) -> Interrupted:
    """A plain KeyboardInterrupt (Python's own SIGINT) as an Interrupted."""
    return e if isinstance(e, Interrupted) else Interrupted(signal.SIGINT)


# Signals received inside interruptible(), for raise_pending: Python runs a handler between any two
# bytecodes, also inside a __del__ or a weakref callback, where it drops the handler's exception
# ("Exception ignored in ...") and carries on as if no signal had come.
_received: list[int] = []
_depth = [0]


def _raise(signum, frame):
    _received.append(signum)
    raise Interrupted(signum)


def raise_pending() -> None:
    """Raise the Interrupted of a signal whose exception Python dropped (see _received); a loop calls
    this at each safe point (engine.train: every step), so such a signal still stops it there."""
    if _received:
        raise Interrupted(_received[-1])


def _unraisable(hook):
    def quiet(info):  # the dropped Interrupted is not lost (raise_pending), so no "Exception ignored" on stderr
        if not isinstance(info.exc_value, Interrupted):
            hook(info)
    return quiet


@contextmanager
def interruptible() -> Iterator[None]:
    """SIGINT and SIGTERM raise Interrupted inside the block (in the main thread; elsewhere a no-op)."""
    try:
        old = {s: signal.signal(s, _raise) for s in (signal.SIGINT, signal.SIGTERM)}
    except ValueError:  # not the main thread: signals are the main thread's to handle
        yield
        return
    if _depth[0] == 0:
        _received.clear()
    _depth[0] += 1
    old_hook, sys.unraisablehook = sys.unraisablehook, _unraisable(sys.unraisablehook)
    try:
        yield
    finally:
        sys.unraisablehook = old_hook
        _depth[0] -= 1
        for s, handler in old.items():
            signal.signal(s, handler)


_PR_SET_PDEATHSIG = 1


def die_with_parent() -> None:
    """In a child, before exec: receive SIGTERM when the parent dies (Linux prctl; elsewhere nothing)."""
    try:
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        pass
