"""Every file the project reads is checked before it is read: a regular file within a size cap,
or a directory, and otherwise one line naming the path.

Why: a FIFO where a file belongs makes ``open()`` (or the read after it) wait for a writer that
never comes; a link to ``/dev/zero`` or to a file that keeps growing makes a whole-file read take
all the memory there is; a directory where a file belongs (or the reverse) ends in a traceback.
So a path is looked at (``os.stat``: a link is followed, as a reader would) before anything
opens it; a file is then opened with ``O_NONBLOCK`` (a FIFO swapped in meanwhile still cannot
block the open), checked again on the open descriptor, and read to at most its cap plus one byte,
so a file that grows while it is read is refused rather than followed.

    from tasks.lib.files import read_regular_file, open_regular_file, require_directory
    data = read_regular_file(Path("models/registry.json"), 16 << 20)

Not a command: imported by the stages and commands.
"""

from __future__ import annotations

import contextlib
import errno
import os
import stat
from collections.abc import Iterator
from pathlib import Path
from typing import BinaryIO

DEFAULT_MAX_BYTES = 1 << 20


class FileProblem(ValueError):
    """A path the project reads is missing, of the wrong kind or too large; the message names it."""


def _kind(mode: int) -> str:
    for test, name in ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO (named pipe)"),
                       (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"),
                       (stat.S_ISSOCK, "a socket"), (stat.S_ISREG, "a regular file")):
        if test(mode):
            return name
    return "not a regular file"


def _status(path: Path) -> os.stat_result:
    try:
        return os.stat(path)
    except FileNotFoundError:
        raise FileProblem(f"{path}: no such file") from None
    except OSError as error:  # a link loop, a name too long, a directory we may not enter
        raise FileProblem(f"{path}: cannot be read ({error.strerror})") from None


def check_regular_file(path: Path, max_bytes: int) -> int:
    """The size of ``path`` when it is (or links to) a regular file of at most ``max_bytes``."""
    status = _status(path)
    if not stat.S_ISREG(status.st_mode):
        raise FileProblem(f"{path}: is {_kind(status.st_mode)}, not a regular file")
    if status.st_size > max_bytes:
        raise FileProblem(f"{path}: {status.st_size} bytes is larger than the {max_bytes} bytes allowed for it")
    return status.st_size


def require_directory(path: Path) -> None:
    """``path`` is (or links to) a directory; otherwise one line naming it."""
    status = _status(path)
    if not stat.S_ISDIR(status.st_mode):
        raise FileProblem(f"{path}: is {_kind(status.st_mode)} where a directory belongs")


def directory_or_absent(path: Path) -> bool:
    """True when ``path`` is a directory, False when nothing is there; anything else is refused."""
    if not os.path.lexists(path):
        return False
    if os.path.islink(path) and not os.path.exists(path):
        raise FileProblem(f"{path}: is a link to nothing where a directory belongs")
    require_directory(path)
    return True


@contextlib.contextmanager
def open_regular_file(path: Path, max_bytes: int) -> Iterator[BinaryIO]:
    """A binary stream of ``path``, checked to be a regular file of at most ``max_bytes`` both
    before the open and on the open descriptor (no FIFO can block it, no swap slips through)."""
    check_regular_file(path, max_bytes)
    try:
        descriptor = os.open(path, os.O_RDONLY | os.O_NONBLOCK | getattr(os, "O_NOCTTY", 0))
    except OSError as error:
        raise FileProblem(f"{path}: cannot be read ({error.strerror})") from None
    status = os.fstat(descriptor)
    if not stat.S_ISREG(status.st_mode) or status.st_size > max_bytes:
        os.close(descriptor)
        raise FileProblem(f"{path}: changed into {_kind(status.st_mode)} of {status.st_size} bytes while opened")
    os.set_blocking(descriptor, True)
    with os.fdopen(descriptor, "rb") as stream:
        yield stream


def read_regular_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> bytes:
    """The bytes of ``path``, a regular file of at most ``max_bytes``. Its size is taken when it is
    opened and one byte more is read (``read(n)`` sets ``n`` bytes aside first, so never the cap):
    a file that grows while it is read is refused, never followed."""
    with open_regular_file(path, max_bytes) as stream:
        size = os.fstat(stream.fileno()).st_size
        data = stream.read(size + 1)
    if len(data) > size:
        raise FileProblem(f"{path}: grew while being read (a file still being written?)")
    return data


def read_text_file(path: Path, max_bytes: int = DEFAULT_MAX_BYTES) -> str:
    """``read_regular_file`` decoded as UTF-8, one line naming the path when it is not."""
    data = read_regular_file(path, max_bytes)
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as error:
        raise FileProblem(f"{path}: not UTF-8 text (byte 0x{data[error.start]:02x} at offset {error.start})") from None


# How libraries that do their own file IO (TensorFlow) word the errors of a full disk, a read-only
# directory or a size limit; mapped back to the OSError the same failure raises in Python.
_ENVIRONMENT_TEXTS = {"No space left on device": errno.ENOSPC, "Disk quota exceeded": errno.EDQUOT,
                      "Read-only file system": errno.EROFS, "Permission denied": errno.EACCES,
                      "File too large": errno.EFBIG}


def environment_error(text: str, path: Path) -> OSError | None:
    """The OSError (naming ``path``) that a library's error message ``text`` stands for, if any."""
    for words, number in _ENVIRONMENT_TEXTS.items():
        if words in text:
            return OSError(number, os.strerror(number), str(path))
    return None


def check_tree(directory: Path, max_bytes: int, max_entries: int = 10_000) -> None:
    """Everything below ``directory`` is a directory or a regular file, within ``max_entries``
    entries and ``max_bytes`` bytes in all: checked before a library (TensorFlow) reads it."""
    require_directory(directory)
    total, count = 0, 0
    for root, directories, files in os.walk(directory):
        for name in directories:
            require_directory(Path(root) / name)
        for name in files:
            total += check_regular_file(Path(root) / name, max_bytes)
        count += len(directories) + len(files)
        if count > max_entries or total > max_bytes:
            raise FileProblem(f"{directory}: holds more than {max_entries} entries or {max_bytes} bytes")
