"""README.md and docs/: every link and every file path they name exists, and the measured tables live in docs/.

The README is a guide (set-up, the commands, a map of the code); measurements, machine notes and
investigations are in docs/ (BENCHMARKS.md, RELIABILITY.md, MULTI_GPU.md, DATA.md, laptop/), linked from it.
`make bench` rewrites the train_step block of docs/BENCHMARKS.md (benchmarks/report.py --doc).
"""
from __future__ import annotations

import glob
import os
import re

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PAGES = ["README.md"] + sorted(os.path.relpath(p, REPO) for p in glob.glob(os.path.join(REPO, "docs", "**", "*.md"),
                                                                              recursive=True))
LINK = re.compile(r"\]\(([^)\s]+)\)")
# a repository path in backticks or bare: starts at a top-level folder, ends in a file or folder name
PATH = re.compile(r"(?<![\w/.<-])((?:engine|merge|paft_evals|paft_kernels|recipes|benchmarks|docs|tests)/[\w./-]*\w/?)")


def _read(page: str) -> str:
    with open(os.path.join(REPO, page), encoding="utf-8") as f:
        return f.read()


def _slug(heading: str) -> str:
    """GitHub's anchor for a heading: lower case, punctuation dropped, spaces to hyphens."""
    text = heading.strip().lower().replace("`", "")
    return re.sub(r"[^\w\- ]", "", text).replace(" ", "-")


def _anchors(page: str) -> set[str]:
    return {_slug(m.group(1)) for m in re.finditer(r"^#+ (.+)$", _read(page), re.M)}


def test_every_link_in_the_readme_and_docs_exists():
    missing = []
    for page in PAGES:
        for target in LINK.findall(_read(page)):
            if re.match(r"[a-z]+:", target):  # http(s):, mailto:
                continue
            path, _, anchor = target.partition("#")
            resolved = os.path.normpath(os.path.join(os.path.dirname(page), path)) if path else page
            if not os.path.exists(os.path.join(REPO, resolved)):
                missing.append(f"{page}: {target}")
            elif anchor and resolved.endswith(".md") and anchor not in _anchors(resolved):
                missing.append(f"{page}: {target} (no such heading)")
    assert not missing, missing


def test_every_repository_path_the_readme_and_docs_name_exists():
    # Paths that name a pattern or a file a run writes are not files of the repository.
    def real(path: str) -> bool:
        return not (path.startswith("paft_kernels/routes") or path.startswith("benchmarks/results/kernels_")
                    or "<" in path or "*" in path)

    missing = []
    for page in PAGES:
        text = re.sub(r"\]\([^)]*\)", "]", _read(page))  # links are checked above, relative to their page
        for path in set(PATH.findall(text)):
            path = path.rstrip("/.")
            if real(path) and not os.path.exists(os.path.join(REPO, path)):
                missing.append(f"{page}: {path}")
    assert not sorted(missing), sorted(missing)


def test_the_readme_is_a_guide_and_the_measurements_live_in_docs():
    from benchmarks import report

    readme = _read("README.md")
    assert len(readme.splitlines()) <= 300  # nanoGPT's is 234; the lab notes belong in docs/
    assert report.BEGIN not in readme and report.END not in readme
    bench = _read("docs/BENCHMARKS.md")
    assert bench.count(report.BEGIN) == 1 and bench.count(report.END) == 1
    for page in ("docs/BENCHMARKS.md", "docs/RELIABILITY.md", "docs/MULTI_GPU.md", "docs/DATA.md", "docs/TOUR.md"):
        assert f"({page})" in readme, page  # each is linked from the README
    # make bench rewrites the page that holds the markers
    with open(os.path.join(REPO, "Makefile")) as f:
        makefile = f.read()
    assert "-m benchmarks.report --doc docs/BENCHMARKS.md" in makefile
