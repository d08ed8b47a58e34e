"""Small helpers shared by the benchmark scripts."""
from __future__ import annotations

import json
import os
import platform


def cpu_device(threads: int) -> str:
    return f"cpu: {platform.processor() or platform.machine()}, {threads} threads"


def write_result(res: dict, path: str) -> None:
    """Print the result and write it as JSON, atomically."""
    print(json.dumps(res, indent=1))
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump(res, f, indent=1)
    os.replace(tmp, path)
