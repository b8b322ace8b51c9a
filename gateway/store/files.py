"""The buffer's files are the daemon user's alone, whatever the umask (issue 16).

The buffer holds raw payloads (dead letters keep an excerpt of each refused message), so
the file, its WAL and SHM, the reserve and any directory created for them are 0600 and
0700. SQLite gives a new WAL or SHM the mode of the main file, so creating the main file
0600 before SQLite opens it is enough for new files; files an older version left group-
or world-readable are tightened when the daemon opens them.
"""

from __future__ import annotations

import contextlib
import os
import stat
from collections.abc import Iterable
from pathlib import Path

from gateway.log import get_logger

log = get_logger("store")

PRIVATE_FILE_MODE = 0o600
PRIVATE_DIR_MODE = 0o700


def make_private_dirs(directory: Path) -> list[Path]:
    """Create `directory` and its missing parents as 0700; return those created.

    Directories that already exist are not ours to change (`/var/lib` is shared). The
    mode passed to mkdir is masked by the umask, so each new one is set explicitly.
    """
    missing: list[Path] = []
    current = directory
    while not os.path.lexists(current) and current != current.parent:
        missing.append(current)
        current = current.parent
    created: list[Path] = []
    for path in reversed(missing):
        try:
            path.mkdir(mode=PRIVATE_DIR_MODE)
        except FileExistsError:
            continue  # made meanwhile by someone else: not ours to change
        os.chmod(path, PRIVATE_DIR_MODE)
        created.append(path)
    return created


def create_private_file(path: Path) -> bool:
    """Create `path` empty and 0600 if nothing is there; never through a symlink.

    Returns whether it was created. An existing file is left to `tighten`.
    """
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        fd = os.open(path, flags, PRIVATE_FILE_MODE)
    except FileExistsError:
        return False
    try:
        os.fchmod(fd, PRIVATE_FILE_MODE)
    finally:
        os.close(fd)
    return True


def buffer_files(path: Path) -> list[Path]:
    """The buffer and the companions SQLite keeps next to it."""
    return [path, Path(f"{path}-wal"), Path(f"{path}-shm"), Path(f"{path}-journal")]


def tighten(paths: Iterable[Path]) -> list[str]:
    """Take group and other permissions off existing regular files; return their names.

    Symlinks and files of other users are left alone (chmod would follow or fail).
    """
    changed: list[str] = []
    for path in paths:
        try:
            info = os.lstat(path)
        except FileNotFoundError:
            continue
        mode = stat.S_IMODE(info.st_mode)
        if not stat.S_ISREG(info.st_mode) or not mode & 0o077 or info.st_uid != os.geteuid():
            continue
        with contextlib.suppress(OSError):
            os.chmod(path, mode & 0o700)
            changed.append(path.name)
    return changed


def prepare_buffer_path(path: Path, *, owner: bool) -> None:
    """Before SQLite opens the buffer: private directories and a private file; the owner
    (the daemon) also tightens files an older version left readable to others."""
    make_private_dirs(path.parent)
    create_private_file(path)
    if not owner:
        return
    loose = tighten(buffer_files(path))
    if loose:
        log.warning(
            "buffer_permissions_tightened",
            files=loose,
            mode=oct(PRIVATE_FILE_MODE),
            reason="the buffer holds raw payloads; only the daemon's user may read it",
        )
