"""How a command line ends: its exit status and, when it does not finish, one line on stderr.

    def main(argv=None) -> int:
        args = parser.parse_args(argv)
        status, plan = run_command(lambda: run(args), f"the merge stopped; {args.out} is as it was",
                                   refused=(MergeError, OutputError))
        if status:
            return status
        ... print what was done ...

`python -m merge`, `python -m engine.export` and `python -m paft_evals` end the same way:

    0        the work is done
    2        refused (`refused`: bad input, an --out that cannot be written) or an OSError (a
             full disk, a read-only filesystem): `error: ...`, one line that names the file
    130/143  Ctrl-C / SIGTERM (engine/interrupts.py): `interrupted (SIGINT): <stopped>`

Never a traceback for any of these: what the user did, or what the machine did, is not a bug.
Any other exception is one, and keeps its traceback.
"""
from __future__ import annotations

import sys
from typing import Any, Callable

from engine.interrupts import as_interrupted, interruptible
from engine.writes import os_error_line


def run_command(work: Callable[[], Any], stopped: str, refused: tuple[type, ...] = (ValueError,)) -> tuple[int, Any]:
    """(exit status, what `work()` returned, or None when it did not finish); see above."""
    with interruptible():  # SIGTERM as Ctrl-C: `finally:` blocks remove temporaries, release locks
        try:
            return 0, work()
        except KeyboardInterrupt as e:
            e = as_interrupted(e)
            print(f"interrupted ({e.name}): {stopped}", file=sys.stderr)
            return e.exit_code, None
        except refused as e:
            print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
            return 2, None
        except OSError as e:
            print(f"error: {os_error_line(e)}", file=sys.stderr)
            return 2, None
