"""Generate a bare repository of a chosen size with ``git fast-import``: source-like text
files in nested directories, a history in which each commit changes a few of them, a
couple of binary files, tags.

    python -m bench.make_repo OUT.git --files 3000 --commits 200
"""

from __future__ import annotations

import argparse
import random
import subprocess
from pathlib import Path

WORDS = [
    *"def return self import class async await yield for in if else elif try except".split(),
    *"with as lambda None True False data value result config client server request".split(),
    *"snapshot mirror cache spool stream chunk offset length commit tree blob ref tag".split(),
]


def _text(rng: random.Random, size: int) -> bytes:
    lines = []
    total = 0
    while total < size:
        indent = "    " * rng.randint(0, 3)
        line = indent + " ".join(rng.choices(WORDS, k=rng.randint(3, 12)))
        lines.append(line)
        total += len(line) + 1
    return ("\n".join(lines) + "\n").encode()


def make_repo(out: Path, *, files: int, commits: int, seed: int = 1) -> Path:
    rng = random.Random(seed)
    subprocess.run(["git", "init", "--bare", "-q", "-b", "main", str(out)], check=True)
    # About ten files a directory, as in real source trees.
    paths = [f"src/pkg{i % 40}/mod{(i // 40) % 8}/file{i}.py" for i in range(files)]
    stream: list[bytes] = []
    for n in range(commits):
        changed = paths if n == 0 else rng.sample(paths, max(1, files // 50))
        ops = []
        for path in changed:
            data = _text(rng, rng.randint(2_000, 20_000))
            ops.append(b"M 100644 inline %s\ndata %d\n%s\n" % (path.encode(), len(data), data))
        if n == 0:
            blob = rng.randbytes(2 * 1024 * 1024)
            ops.append(b"M 100644 inline assets/blob.bin\ndata %d\n%s\n" % (len(blob), blob))
        mark = n + 1
        message = f"commit {n}".encode()
        stream.append(
            b"commit refs/heads/main\nmark :%d\ncommitter Bench <bench@example.invalid> %d +0000\n"
            b"data %d\n%s\n" % (mark, 1_700_000_000 + n * 3600, len(message), message)
        )
        stream.extend(ops)
        stream.append(b"\n")
        if n % 5 == 4:
            stream.append(b"reset refs/tags/v%d\nfrom :%d\n\n" % (n, mark))
    subprocess.run(
        ["git", "--git-dir", str(out), "fast-import", "--quiet"], input=b"".join(stream), check=True
    )
    subprocess.run(["git", "--git-dir", str(out), "gc", "-q"], check=True)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("out", type=Path)
    parser.add_argument("--files", type=int, default=3000)
    parser.add_argument("--commits", type=int, default=200)
    args = parser.parse_args()
    make_repo(args.out, files=args.files, commits=args.commits)


if __name__ == "__main__":
    main()
