"""Durable writes: what a save leaves on disk is the old content or the new content, whole, through a crash, a
`kill -9`, a power cut or a full disk, never a half-written file.

Every write goes to a temporary name beside its target (same directory, so the rename cannot cross filesystems),
is flushed to the disk (fsync), renamed into place, and the rename itself made durable (fsync of the directory).
Temporary names start with TEMP_PREFIX, so whatever a killed process leaves is recognised and removed by the next
run or export (`sweep`).
"""

import ctypes
import errno
import os
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Optional

from utils.cli import log

TEMP_PREFIX = ".partial-"  # every temporary file or directory of a save; nothing else is ever named so


def temp_path(target: Path, tag: str = "") -> Path:
    """A temporary name for target, in its directory: unique to this process, recognisable by `sweep`, and ending
    as target does (libraries that pick a format by the suffix pick the same one)."""
    return target.with_name(f"{TEMP_PREFIX}{os.getpid()}-{tag}{target.name}")


def fsync_path(path: Path) -> None:
    """Flush a file's (or a directory's entries') data to the disk."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def fsync_tree(path: Path) -> None:
    """fsync every file and directory under path (the directories last, so their entries name flushed files)."""
    if path.is_dir():
        for root, dirs, files in os.walk(path, topdown=False):
            for name in files:
                fsync_path(Path(root) / name)
            fsync_path(Path(root))
    else:
        fsync_path(path)


@contextmanager
def durable_file(target: Path) -> Iterator[Path]:
    """Yields a temporary path to write target's new content to; on leaving the block it is flushed and renamed
    over target (an old target is replaced only then). On any error (or Ctrl-C) the temporary file is removed."""
    target = Path(target)
    tmp = temp_path(target)
    try:
        yield tmp
        fsync_path(tmp)
        os.replace(tmp, target)
        fsync_path(target.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(target: Path, text: str) -> None:
    """target's content replaced by text, durably."""
    with durable_file(target) as tmp:
        tmp.write_text(text)


@contextmanager
def durable_dir(target: Path, keep_existing: bool = False) -> Iterator[Path]:
    """Yields a fresh temporary directory to fill; on leaving the block it is flushed and swapped with target in
    one step (an old target is deleted only afterwards), so a reader sees the old directory or the new one, whole.
    `keep_existing`: a target that exists by then (a cache another process filled first) is kept, ours dropped.
    On any error (or Ctrl-C) the temporary directory is removed."""
    target = Path(target)
    tmp = temp_path(target)
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    try:
        yield tmp
        fsync_tree(tmp)
        if target.exists() and keep_existing:
            return
        if target.exists() and not exchange(tmp, target):
            os.rename(target, temp_path(target, "old-"))  # no atomic exchange here: a short window without target
            os.rename(tmp, target)
        elif not target.exists():
            try:
                os.rename(tmp, target)
            except OSError:
                if not (keep_existing and target.exists()):  # else another process filled it first: theirs is kept
                    raise
        fsync_path(target.parent)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # after a swap: the old target
        shutil.rmtree(temp_path(target, "old-"), ignore_errors=True)


@contextmanager
def durable_files(target: Path, last: str) -> Iterator[Path]:
    """Yields a temporary directory inside `target` to fill; on leaving the block its files are published into
    target (publish_files). On any error (or Ctrl-C) the temporary directory is removed."""
    staging = temp_path(Path(target) / "files")
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        yield staging
        publish_files(staging, Path(target), last)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def make_readable(path: Path) -> None:
    """safetensors creates private files: what is published is for others to read, as the umask allows."""
    umask = os.umask(0)
    os.umask(umask)
    for item in [path, *(path.rglob("*") if path.is_dir() else [])]:
        os.chmod(item, (0o777 if item.is_dir() else 0o666) & ~umask)


def publish_files(staging: Path, target: Path, last: str) -> None:
    """Move every file of `staging` into the existing directory `target`, durably, `last` after all the others.
    `last` is the file that makes the set usable (an adapter's adapter_config.json): unless the new one is the same
    (a resumed run's), it is removed from target first, so a reader finds the old set whole, no set (no `last`), or
    the new set whole, never a mixture."""
    make_readable(staging)
    fsync_tree(staging)
    old, new = target / last, staging / last
    if old.exists() and not (new.is_file() and old.read_bytes() == new.read_bytes()):
        old.unlink()
        fsync_path(target)
    for item in sorted(staging.iterdir(), key=lambda p: p.name == last):
        if (target / item.name).is_dir():
            shutil.rmtree(target / item.name)
        os.replace(item, target / item.name)
        fsync_path(target)


def exchange(a: Path, b: Path) -> bool:
    """Swap two paths in one atomic step (Linux renameat2 RENAME_EXCHANGE); False where the system cannot."""
    try:
        renameat2 = ctypes.CDLL(None, use_errno=True).renameat2
    except (AttributeError, OSError):
        return False
    at_fdcwd, rename_exchange = -100, 2
    if renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), rename_exchange) == 0:
        return True
    if ctypes.get_errno() in (errno.EINVAL, errno.ENOSYS, errno.EOPNOTSUPP):
        return False
    raise OSError(ctypes.get_errno(), os.strerror(ctypes.get_errno()), str(b))


def sweep(directory: Path, target: Optional[str] = None) -> list[Path]:
    """Remove the temporary files a killed save left in directory (of `target` only, when named), saying so in one
    line. A process still writing one (its pid in the name, alive) is left alone."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    found = [p for p in directory.glob(f"{TEMP_PREFIX}*") if (target is None or target in p.name) and not alive(p)]
    for path in found:
        shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink(missing_ok=True)
    if found:
        log(f"Removed {len(found)} unfinished file(s) a killed save left in {directory}: "
            + ", ".join(p.name for p in found))
    return found


def alive(path: Path) -> bool:
    """Whether the process that named this temporary file (its pid, after TEMP_PREFIX) still runs."""
    pid = path.name[len(TEMP_PREFIX):].split("-", 1)[0]
    if not pid.isdigit() or int(pid) == os.getpid():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True
