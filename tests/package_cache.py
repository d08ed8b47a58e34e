"""A package cache built from tests/fixtures/packages: the real loaders read it as they read the
files fetched from PyPI (same layout, same sha256 check: the recorded hashes are swapped for the
fixtures' own)."""
import os
import shutil

from engine.data import packages
from engine.safeio import file_digest

FIXTURES = os.path.join(os.path.dirname(__file__), "fixtures", "packages")


def fixture_cache(tmp_path, monkeypatch) -> str:
    """Point $PAFT_CACHE at a fresh cache holding the fixtures; returns the cache root."""
    root = str(tmp_path / "cache")
    monkeypatch.setenv("PAFT_CACHE", root)
    for package, spec in packages.PACKAGES.items():
        src = os.path.join(FIXTURES, package)
        files = {}
        for dirpath, _, names in os.walk(src):
            for name in names:
                member = os.path.relpath(os.path.join(dirpath, name), src).replace(os.sep, "/")
                dest = os.path.join(root, "packages", f"{package}-{spec['version']}", member)
                os.makedirs(os.path.dirname(dest), exist_ok=True)
                shutil.copyfile(os.path.join(dirpath, name), dest)
                files[member] = file_digest(dest)
        monkeypatch.setitem(spec, "files", files)
    return root
