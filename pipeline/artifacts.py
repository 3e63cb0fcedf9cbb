"""Atomic writing of outputs, so an interrupted stage never leaves a half-written file for DVC.

Files are written to a temporary name beside their destination and renamed into place; a stage
whose output is a whole folder builds it under a temporary name with `staged_dir` and swaps it in at
the end. Also the provenance every model folder and report carries (git commit, library versions).
"""

from __future__ import annotations

import contextlib
import csv
import glob
import hashlib
import json
import os
import re
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Any, Iterator, Sequence

from pipeline.errors import DataError
from pipeline.faults import kill_point


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _remove_leftovers(path: Path) -> None:
    """Remove what an earlier, killed run left beside `path`: its temporary files or folders
    (`.<name>.XXXXXXXX.tmp`, as `tempfile` names them) and a folder moved aside by `staged_dir`."""
    pattern = re.compile(rf"\.{re.escape(path.name)}\.[a-z0-9_]{{8}}\.tmp")
    for leftover in path.parent.glob(f".{glob.escape(path.name)}.*"):
        if pattern.fullmatch(leftover.name) or leftover.name == f".{path.name}.old":
            if leftover.is_dir() and not leftover.is_symlink():
                shutil.rmtree(leftover, ignore_errors=True)
            else:
                leftover.unlink(missing_ok=True)


def _temp_beside(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    fd, name = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    os.close(fd)
    os.chmod(name, 0o666 & ~_umask())  # mkstemp makes owner-only files; outputs get normal modes
    return Path(name)


@contextlib.contextmanager
def atomic_path(path: str | Path) -> Iterator[Path]:
    """Yield a temporary path to write to; it replaces `path` only if the block succeeds."""
    path = Path(path)
    temp = _temp_beside(path)
    try:
        yield temp
        os.replace(temp, path)
        kill_point("write")
    finally:
        temp.unlink(missing_ok=True)


def write_json(obj: Any, path: str | Path) -> None:
    """Write `obj` as indented, key-sorted JSON (stable bytes for the same content)."""
    with atomic_path(path) as temp:
        temp.write_text(json.dumps(obj, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")


def write_csv(rows: list[dict], columns: Sequence[str], path: str | Path) -> None:
    """Write rows as a UTF-8 CSV with a header of `columns`, atomically."""
    with atomic_path(path) as temp:
        with open(temp, "w", encoding="utf-8", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(columns))
            writer.writeheader()
            writer.writerows(rows)


def write_parquet(table, path: str | Path) -> None:
    """Write a pyarrow Table atomically, without pandas metadata, so equal data gives equal bytes."""
    import pyarrow.parquet as pq

    table = table.replace_schema_metadata(None)
    with atomic_path(path) as temp:
        pq.write_table(table, temp, compression="zstd")


@contextlib.contextmanager
def staged_dir(path: str | Path) -> Iterator[Path]:
    """Yield an empty temporary folder that replaces the folder `path` only if the block succeeds."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    _remove_leftovers(path)
    temp = Path(tempfile.mkdtemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent))
    os.chmod(temp, 0o777 & ~_umask())
    try:
        yield temp
        if path.exists():
            old = path.with_name(f".{path.name}.old")
            shutil.rmtree(old, ignore_errors=True)
            os.replace(path, old)
            kill_point("swap")
            os.replace(temp, path)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(temp, path)
    finally:
        shutil.rmtree(temp, ignore_errors=True)


def ensure_writable(path: str | Path) -> None:
    """Fail early, before long work, when the folder that will hold `path` cannot be written."""
    parent = Path(path).parent
    try:
        parent.mkdir(parents=True, exist_ok=True)
        with tempfile.TemporaryFile(dir=parent):
            pass
    except OSError as error:
        raise DataError(f"{parent}: output folder is not writable ({error.strerror})") from None


def sha256(path: str | Path) -> str:
    """Hex SHA-256 of a file's bytes."""
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def git_commit() -> str:
    """The repository's HEAD commit, with `-dirty` when tracked files other than dvc.lock and
    .gitignore files have changes; '' outside git (or before the first commit)."""
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, check=True).stdout.strip()
        # What DVC itself rewrites during a run (dvc.lock, .gitignore files) does not make the tree
        # dirty, so a rerun of the same checkout records the same commit.
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ":(top)",
                                ":(top,exclude,glob)**/dvc.lock", ":(top,exclude,glob)**/.gitignore"],
                               capture_output=True, text=True, check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return ""
    return commit + ("-dirty" if dirty else "")


def library_versions() -> dict[str, str]:
    """Versions of the libraries that shape results, for provenance records."""
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in ("torch", "transformers", "tokenizers", "datasets", "pandas", "pyarrow", "scikit-learn", "dvc"):
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            continue
    return versions
