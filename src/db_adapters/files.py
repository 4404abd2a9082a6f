"""Atomic file writing: a crash never leaves a half-written file in place of a good one.

Every file db-adapters writes (adapters, checkpoints, class images, previews) goes through
`write_atomically`: written to a temporary name beside the target, flushed, renamed into place.
"""

from __future__ import annotations

import errno
import glob
import os
import re
import tempfile
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


def write_atomically(path: str | os.PathLike, write: Callable[[Path], None]) -> Path:
    """Run `write(tmp)` on a temporary name beside `path`, then rename it into place.

    A rename within one folder is atomic, so readers see either the old file or the new one, never
    a partial file; if `write` fails the temporary file is removed and the old file stays intact.
    The data is flushed to disk before the rename, so a power cut cannot leave an empty file
    in place of the old one either.

    A process killed outright (SIGKILL, out of memory, power cut) runs no cleanup and leaves its
    temporary file behind; so each write first removes the temporary files of `path` left by
    writers that are no longer running (the writer's process id is part of the temporary name).

    Args:
        path (`str | PathLike`): the file to write; its folder is created if needed.
        write (`Callable[[Path], None]`): writes the whole file to the path it is given.

    Example:
        >>> import tempfile
        >>> target = Path(tempfile.mkdtemp()) / "note.txt"
        >>> write_atomically(target, lambda tmp: tmp.write_text("hello")).read_text()
        'hello'
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    sweep_stale_temporaries(path)
    handle, tmp_name = tempfile.mkstemp(prefix=f".{path.name}.{os.getpid()}.", suffix=".tmp", dir=path.parent)
    os.close(handle)
    tmp = Path(tmp_name)
    try:
        with named_write_errors(path):
            write(tmp)
        # mkstemp makes owner-only files; give the result the permissions a plain open() would.
        os.chmod(tmp, 0o666 & ~_umask())
        _flush_to_disk(tmp)
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise
    _flush_to_disk(path.parent)
    return path


# safetensors reports a failed write (disk full, quota, file too large) as a SafetensorError whose text
# holds Rust's io::Error: "I/O error: No space left on device (os error 28)" (0.8), or in older versions
# "IoError(Os { code: 28, kind: StorageFull, ... })".
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)|\bOs \{ code: (\d+)")
# Errors a user fixes by making room; the message says so.
_SPACE_ERRORS = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG}


@contextmanager
def named_write_errors(path: str | os.PathLike) -> Iterator[None]:
    """Make a failed write an `OSError` that names `path`, the file the user asked for.

    A full disk reaches us as an `OSError` naming a temporary file, or none, or (from safetensors'
    Rust writer) as a `SafetensorError`; each becomes `OSError(errno, reason, path)`, so the caller
    and `db-adapt` report "No space left on device ... : 'my_dog.safetensors'".

    Args:
        path (`str | PathLike`): the file being written.

    Example:
        >>> with named_write_errors("a.safetensors"):  # doctest: +ELLIPSIS
        ...     raise OSError(28, "No space left on device")
        Traceback (most recent call last):
        ...
        OSError: [Errno 28] No space left on device; free some space or write elsewhere: 'a.safetensors'
    """
    from safetensors import SafetensorError

    try:
        yield
    except (OSError, SafetensorError) as error:
        code = error.errno if isinstance(error, OSError) else _rust_os_error_code(error)
        if code is None:
            raise
        reason = f"{os.strerror(code)}; free some space or write elsewhere" if code in _SPACE_ERRORS else None
        raise OSError(code, reason or os.strerror(code), str(path)) from error


def _rust_os_error_code(error: Exception) -> int | None:
    match = _RUST_OS_ERROR.search(str(error))
    return int(match.group(1) or match.group(2)) if match else None


def sweep_stale_temporaries(path: str | os.PathLike) -> list[Path]:
    """Delete the temporary files `write_atomically` left beside `path` in processes that died.

    Temporary names are `.NAME.PID.RANDOM.tmp`; a file whose writer process is still alive (another
    process writing the same file right now) is left alone.

    Args:
        path (`str | PathLike`): the file whose stale temporaries to remove.

    Returns:
        The temporary files removed.

    Example:
        >>> import tempfile
        >>> folder = Path(tempfile.mkdtemp())
        >>> _ = (folder / ".a.txt.999999999.x1y2.tmp").write_text("half")
        >>> [p.name for p in sweep_stale_temporaries(folder / "a.txt")]
        ['.a.txt.999999999.x1y2.tmp']
    """
    path = Path(path)
    prefix = f".{path.name}."
    removed = []
    for candidate in path.parent.glob(f"{glob.escape(prefix)}*.tmp"):
        owner = candidate.name[len(prefix) :].split(".", 1)[0]
        if owner.isdigit() and _process_alive(int(owner)):
            continue
        candidate.unlink(missing_ok=True)
        removed.append(candidate)
    return removed


def _process_alive(pid: int) -> bool:
    if pid == os.getpid():
        return True
    try:
        os.kill(pid, 0)  # signal 0: only asks whether the process exists
    except ProcessLookupError:
        return False
    except (PermissionError, OSError, OverflowError):
        return True  # it exists but is someone else's, or we cannot tell: leave its file alone
    return True


def _flush_to_disk(path: Path) -> None:
    # A rename is atomic, but without fsync a power cut can persist the rename before the data.
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return  # e.g. folders cannot be opened on Windows; the rename is still atomic there
    try:
        os.fsync(fd)
    except OSError:
        pass  # some file systems do not support fsync on this kind of file
    finally:
        os.close(fd)


def _umask() -> int:
    current = os.umask(0)
    os.umask(current)
    return current


def save_tensors(path: str | os.PathLike, tensors: dict[str, torch.Tensor], metadata: dict[str, str]) -> Path:
    """Write `tensors` and text `metadata` to the safetensors file `path`, atomically."""
    from safetensors.torch import save_file

    contiguous = {name: tensor.detach().contiguous() for name, tensor in tensors.items()}
    return write_atomically(path, lambda tmp: save_file(contiguous, str(tmp), metadata=metadata))
