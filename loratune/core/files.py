"""Files written whole or not at all: a temporary name, flushed to disk, then renamed into place."""

from __future__ import annotations

import contextlib
import errno
import hashlib
import os
import shutil
from pathlib import Path

from .errors import UserError


def _fsync_tree(path: Path) -> None:
    for p in sorted(path.rglob("*")):
        if p.is_file():
            with open(p, "rb") as f:
                os.fsync(f.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextlib.contextmanager
def atomic_dir(final: Path):
    """Yield a temporary folder; on success it replaces `final` in one rename. On failure nothing changes."""
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.with_name(f".{final.name}.tmp-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        tmp.mkdir()
        yield tmp
        _fsync_tree(tmp)
        if final.exists():  # replace: move the old one aside first, so a crash leaves one of the two whole
            old = final.with_name(f".{final.name}.old-{os.getpid()}")
            os.replace(final, old)
            os.replace(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, final)
        _fsync_dir(final.parent)
    except OSError as e:
        raise UserError(io_message(final, e)) from None
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def copy_dir(source: Path, final: Path) -> None:
    """A copy of the folder `source` at `final`, written whole or not at all (as `atomic_dir`)."""
    with atomic_dir(final) as tmp:
        shutil.copytree(source, tmp, dirs_exist_ok=True)


def atomic_write(path: Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except OSError as e:
        with contextlib.suppress(OSError):
            tmp.unlink()
        raise UserError(io_message(path, e)) from None


def io_message(path: Path, e: OSError) -> str:
    if e.errno == errno.ENOSPC:
        return f"disk full while writing {path}; nothing half-written was kept. Free space and resume with --resume"
    if e.errno in (errno.EACCES, errno.EPERM, errno.EROFS):
        return f"cannot write {path}: permission denied (choose another output_dir)"
    return f"cannot write {path}: {e.strerror or e}"


# --- The run folder -----------------------------------------------------------------------------------------


def check_replaceable(path: Path, option: str, ours) -> None:
    """`--overwrite` deletes `path`: only when everything in it is something loratune wrote (`ours(entry)`), and
    never the working folder or one above it. A wrong --output-dir must not cost the user their data."""
    here = Path.cwd().resolve()
    if path.resolve() in (here, *here.parents):
        raise UserError(
            f"{option} {path}: is the working folder or contains it; --overwrite would delete it. Choose a new folder"
        )
    foreign = sorted(entry.name for entry in path.iterdir() if not ours(entry))
    if foreign:
        shown = ", ".join(foreign[:3]) + (f" and {len(foreign) - 3} more" if len(foreign) > 3 else "")
        raise UserError(
            f"{option} {path}: holds files loratune did not write ({shown}); --overwrite only replaces "
            "loratune's own output. Choose a new folder"
        )


def file_digest(path: str | Path) -> str:
    """sha256 of a file, or of a folder's files in name order."""
    path = Path(path)
    h = hashlib.sha256()
    files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
    for p in files:
        h.update(p.name.encode())
        with open(p, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                h.update(block)
    return h.hexdigest()
