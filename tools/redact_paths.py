"""Replace this machine's absolute paths in committed records with portable names.

A record under ``results/`` (a run's config, a log, a report) is read on other machines, where
``/work/...`` or ``/tmp/...`` mean nothing and only tell where one computer kept its files. The
corpus is identified by its MD5 sums in every run's record, so the path adds nothing a reader
needs. The rules, in order: the checkout itself becomes the repository root, the data beside it
``../shared/``, site-packages ``<site-packages>``, temporary folders ``$TMPDIR``, home folders
``~``, and any other folder of the work area its name below it.

    python tools/redact_paths.py results            # rewrite in place, list what changed
    python tools/redact_paths.py results --check    # exit 1 if any file still has one
"""

from __future__ import annotations

import argparse
import re
import sys
from pathlib import Path

TEXT_SUFFIXES = {".json", ".jsonl", ".md", ".log", ".txt", ".html", ".py", ".sh", ".csv",
                 ".xml", ".tsv", ".yaml", ".yml", ".toml"}

RULES: list[tuple[re.Pattern[str], str]] = [(re.compile(pattern), replacement) for
                                            pattern, replacement in [
    (r"/root/\.pyenv/versions/[^/\s\"']+/lib/python[0-9.]+/site-packages/", "<site-packages>/"),
    (r"/work/shared/", "../shared/"),
    (r"/work/(?:main|wt-[\w-]+)/", ""),
    (r"/work/(?:main|wt-[\w-]+)(?![\w-])", "."),
    (r"/tmp/", "$TMPDIR/"),
    (r"/(?:root|home/[\w.-]+)/", "~/"),
    (r"/work/", ""),
]]

# An absolute path into one of this machine's own folders (not, say, torch's build path /__w/).
MACHINE_PATH = re.compile(r"(?<![\w.~<$])/(?:work|root|home|tmp)/")


def redact(text: str) -> str:
    """``text`` with every machine path rewritten by :data:`RULES`."""
    for pattern, replacement in RULES:
        text = pattern.sub(replacement, text)
    return text


def text_files(root: Path):
    """The files under ``root`` whose suffix marks them as text records."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix in TEXT_SUFFIXES)


def offending(root: Path) -> list[tuple[Path, int, str]]:
    """Each ``(file, line number, line)`` under ``root`` that still names a machine path."""
    found = []
    for path in text_files(root):
        for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            if MACHINE_PATH.search(line):
                found.append((path, number, line.strip()))
    return found


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("root", type=Path, help="the folder of records, e.g. results")
    parser.add_argument("--check", action="store_true", help="report, change nothing")
    args = parser.parse_args(argv)
    if args.check:
        found = offending(args.root)
        for path, number, line in found:
            print(f"{path}:{number}: {line[:160]}")
        return 1 if found else 0
    for path in text_files(args.root):
        before = path.read_text(encoding="utf-8")
        after = redact(before)
        if after != before:
            path.write_text(after, encoding="utf-8")
            print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
