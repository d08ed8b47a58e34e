"""Small helpers shared by the benchmark scripts: result files, device names, peak memory."""
from __future__ import annotations

import json
import os
import platform
import re
import resource
import time

from engine.writes import atomic_write


def cpu_device(threads: int) -> str:
    return f"cpu: {platform.processor() or platform.machine()}, {threads} threads"


def cpu_model_name() -> str:
    """The processor's marketing name from /proc/cpuinfo (Linux), else what platform knows."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug(name: str) -> str:
    """A file-name-safe device name: 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")


def write_result(res: dict, path: str) -> None:
    """Print the result and write it as JSON, atomically."""
    print(json.dumps(res, indent=1))
    write_json(res, path)


def write_json(obj: dict, path: str) -> None:
    """Write JSON through a temporary file and a rename, so a reader never sees half a file."""
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    with atomic_write(path) as f:
        json.dump(obj, f, indent=1)
        f.write("\n")


def merge_run(path: str, header: dict, name: str, run: dict) -> dict:
    """Put `run` under runs[name] of the JSON file at `path` (created if missing), keep the other runs,
    refresh the top-level `header` fields, and write the file back. Returns the whole document."""
    doc = {}
    if os.path.exists(path):
        with open(path) as f:
            doc = json.load(f)
    doc.update(header)
    doc.setdefault("runs", {})[name] = run
    doc["runs"] = dict(sorted(doc["runs"].items()))  # a stable order keeps diffs of the committed file small
    write_json(doc, path)
    return doc


# --------------------------------------------------------------------------- peak resident memory (CPU)
# ru_maxrss is the peak of the whole process and never goes down, so it would charge the model load to
# the training steps. Linux can reset the peak: writing "5" to /proc/self/clear_refs sets VmHWM (the
# "high-water mark" of resident memory) back to the current RSS. Where that is refused, fall back to
# ru_maxrss and say so in the result.

def reset_peak_rss() -> str:
    """Reset the process's peak RSS if the kernel lets us; returns the method `peak_rss_mib` will use."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        _vm_hwm_kib()
        return "VmHWM reset after setup"
    except (OSError, ValueError):
        return "ru_maxrss (whole process, load included)"


def peak_rss_mib(method: str) -> float:
    if method.startswith("VmHWM"):
        return _vm_hwm_kib() / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux reports KiB


def _vm_hwm_kib() -> int:
    with open("/proc/self/status") as f:
        match = re.search(r"^VmHWM:\s+(\d+) kB", f.read(), re.M)
    if match is None:
        raise ValueError("no VmHWM in /proc/self/status")
    return int(match.group(1))


def gpu_driver() -> str | None:
    """The NVIDIA driver version nvidia-smi reports, or None where there is none (recorded with every GPU result)."""
    import subprocess
    try:
        return subprocess.run(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"],
                              capture_output=True, text=True, timeout=20).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        return None


# --------------------------------------------------------------------------- deadlines (run_gpu.sh's time budgets)
# A section's budget is counted from when its process started, imports included (a clock started after
# `import torch` hides 10-20 s of a cold start), or from run_gpu.sh's PAFT_BENCH_DEADLINE (seconds since
# the epoch, set when the section was launched), whichever comes first.

_IMPORTED = time.time()


def process_start() -> float:
    """When this process started, in seconds since the epoch (Linux /proc; else the time of this import)."""
    try:
        with open("/proc/self/stat") as f:
            ticks = int(f.read().rpartition(")")[2].split()[19])  # field 22, starttime, in clock ticks after boot
        with open("/proc/stat") as f:
            boot = next(int(line.split()[1]) for line in f if line.startswith("btime "))
        start = boot + ticks / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError, StopIteration):
        return _IMPORTED
    # a sandbox's /proc may be approximate (gVisor): trust it only between an hour ago and this import
    return start if _IMPORTED - 3600 < start <= _IMPORTED + 1 else _IMPORTED


def deadline(budget_s: float | None) -> float:
    """The epoch second by which the caller must be done: its budget from process start, capped by
    PAFT_BENCH_DEADLINE; infinity when there is neither."""
    import math
    ends = [float(os.environ["PAFT_BENCH_DEADLINE"])] if os.environ.get("PAFT_BENCH_DEADLINE") else []
    if budget_s is not None:
        ends.append(process_start() + budget_s)
    return min(ends, default=math.inf)


def seconds_left(end: float) -> float:
    return end - time.time()
