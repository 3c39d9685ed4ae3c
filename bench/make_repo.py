"""Generate a bare repository of a chosen shape with ``git fast-import``.

- ``tree`` (the default): source-like text files in nested directories, a short history
  in which each commit changes a few of them, a binary file, tags. Its snapshot is mostly
  working tree.
- ``pack``: a few thousand files and tens of thousands of commits that each rewrite part
  of one file, so that the history (real delta chains, up to 50 deep) dwarfs the tree, as
  in most real repositories: 50,000 commits give a pack of about 320 MB.

    python -m bench.make_repo OUT.git --files 3000 --commits 200
    python -m bench.make_repo OUT.git --shape pack --files 3000 --commits 50000
"""

from __future__ import annotations

import argparse
import base64
import random
import subprocess
from pathlib import Path
from typing import IO

WORDS = [
    *"def return self import class async await yield for in if else elif try except".split(),
    *"with as lambda None True False data value result config client server request".split(),
    *"snapshot mirror cache spool stream chunk offset length commit tree blob ref tag".split(),
]
SHAPES = ("tree", "pack")


def _text(rng: random.Random, size: int) -> bytes:
    lines = []
    total = 0
    while total < size:
        indent = "    " * rng.randint(0, 3)
        line = indent + " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def _paths(files: int, suffix: str) -> list[str]:
    # About ten files a directory, as in real source trees.
    return [f"src/pkg{i % 40}/mod{(i // 40) % 8}/file{i}.{suffix}" for i in range(files)]


def _commit(mark: int | None, when: int, message: bytes) -> bytes:
    marked = b"mark :%d\n" % mark if mark is not None else b""
    return b"commit refs/heads/main\n%scommitter Bench <bench@example.invalid> %d +0000\n" % (
        marked,
        when,
    ) + b"data %d\n%s\n" % (len(message), message)


def _tree_stream(rng: random.Random, files: int, commits: int, out: IO[bytes]) -> None:
    paths = _paths(files, "py")
    for n in range(commits):
        changed = paths if n == 0 else rng.sample(paths, max(1, files // 50))
        out.write(_commit(n + 1, 1_700_000_000 + n * 3600, f"commit {n}".encode()))
        for path in changed:
            data = _text(rng, rng.randint(2_000, 20_000))
            out.write(b"M 100644 inline %s\ndata %d\n%s\n" % (path.encode(), len(data), data))
        if n == 0:
            blob = rng.randbytes(2 * 1024 * 1024)
            out.write(b"M 100644 inline assets/blob.bin\ndata %d\n%s\n" % (len(blob), blob))
        out.write(b"\n")
        if n % 5 == 4:
            out.write(b"reset refs/tags/v%d\nfrom :%d\n\n" % (n, n + 1))


def _lines(rng: random.Random, count: int) -> list[bytes]:
    # 60 characters of base64 a line: text that, like most of a real pack, compresses
    # little once git has deflated it.
    return [base64.b64encode(rng.randbytes(45)) for _ in range(count)]


def _pack_stream(rng: random.Random, files: int, commits: int, out: IO[bytes]) -> None:
    paths = _paths(files, "c")
    changes: list[list[int]] = [[] for _ in range(files)]
    schedule = [rng.randrange(files) for _ in range(commits)]
    for n, f in enumerate(schedule):
        changes[f].append(n)
    # Every version of a file is written right after the next newer one: fast-import
    # deltifies each blob against the one before it in the stream, so the chains are real
    # and run from the newest version back, as after ``git repack``.
    marks: dict[tuple[int, int], int] = {}
    for f in range(files):
        content = _lines(rng, rng.randint(100, 500))
        versions = [(-1, b"\n".join(content) + b"\n")]
        for n in changes[f]:  # rewrite a run of lines: the file keeps its size
            count = rng.randint(40, 200)
            start = rng.randrange(max(1, len(content) - count))
            content[start : start + count] = _lines(rng, count)
            versions.append((n, b"\n".join(content) + b"\n"))
        for n, data in reversed(versions):
            marks[f, n] = len(marks) + 1
            out.write(b"blob\nmark :%d\ndata %d\n%s\n" % (marks[f, n], len(data), data))
    out.write(_commit(None, 1_700_000_000, b"import"))
    for f in range(files):
        out.write(b"M 100644 :%d %s\n" % (marks[f, -1], paths[f].encode()))
    out.write(b"\n")
    for n, f in enumerate(schedule):
        out.write(_commit(None, 1_700_000_060 + n * 60, f"change {n}".encode()))
        out.write(b"M 100644 :%d %s\n\n" % (marks[f, n], paths[f].encode()))
        if n % 1000 == 999:
            out.write(b"reset refs/tags/v%d\nfrom refs/heads/main\n\n" % n)


def make_repo(out: Path, *, files: int, commits: int, shape: str = "tree", seed: int = 1) -> Path:
    rng = random.Random(seed)
    subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(out)], check=True)
    importer = subprocess.Popen(
        ["git", "--git-dir", str(out), "fast-import", "--quiet", "--depth=50"],
        stdin=subprocess.PIPE,
    )
    assert importer.stdin is not None
    with importer.stdin:
        (_pack_stream if shape == "pack" else _tree_stream)(rng, files, commits, importer.stdin)
    if importer.wait() != 0:
        raise RuntimeError("git fast-import failed")
    if shape == "tree":
        subprocess.run(["git", "--git-dir", str(out), "gc", "-q"], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", type=Path)
    parser.add_argument("--shape", choices=SHAPES, default="tree")
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--commits", type=int, default=200)
    args = parser.parse_args()
    make_repo(args.out, files=args.files, commits=args.commits, shape=args.shape)


if __name__ == "__main__":
    main()
