"""The one exception type the CLI turns into a single line on stderr, and what maps library faults to it."""

from __future__ import annotations

import errno
import re

# set by distributed.launch for the processes it starts: each leaves its error line in <file>.<rank>
LAUNCH_ERROR_FILE = "FINETUNE_ERROR_FILE"
MAX_LINE = 400  # an error line longer than this is cut: a message echoing its input must not flood the terminal


class FinetuneError(Exception):
    """A user-facing error: the message names the file/key/row and what would fix it."""


def one_line(text: str, limit: int = MAX_LINE) -> str:
    """``text`` on one line, at most ``limit`` characters."""
    text = " ".join(text.split())
    return text if len(text) <= limit else text[: limit - 15] + " ... (cut here)"


def errno_of(err: BaseException) -> int | None:
    """The OS error number of ``err``: an OSError's, or the ``(os error N)`` that Rust libraries
    (tokenizers, safetensors) put in the message of a plain Exception."""
    if isinstance(err, OSError) and err.errno is not None:
        return err.errno
    match = re.search(r"\(os error (\d+)\)", str(err))
    return int(match.group(1)) if match else None


def is_out_of_memory(err: BaseException) -> bool:
    """A failed allocation: CUDA's OutOfMemoryError, Python's MemoryError (numpy's too), or torch's CPU
    allocator (a RuntimeError "DefaultCPUAllocator: can't allocate memory")."""
    if isinstance(err, MemoryError) or type(err).__name__ == "OutOfMemoryError":
        return True
    return isinstance(err, RuntimeError) and ("can't allocate memory" in str(err) or "out of memory" in str(err))


_OS_HINTS = {
    errno.ENOSPC: "no space left on device; free disk space and rerun (finished outputs are kept)",
    errno.EDQUOT: "disk quota exceeded; free space and rerun (finished outputs are kept)",
    errno.EACCES: "permission denied; check its owner and mode (ls -ld) or write somewhere else",
    errno.EPERM: "operation not permitted; check its owner and mode (ls -ld) or write somewhere else",
    errno.EROFS: "read-only file system; write somewhere writable",
    errno.ENOENT: "no such file or folder",
    errno.EISDIR: "is a folder, not a file",
    errno.ENOTDIR: "a part of this path is a file, not a folder",
}


def os_error_line(err: BaseException, where: str) -> str:
    """One line for an OS-level fault: the path (else ``where``) and what to do."""
    number = errno_of(err)
    path = getattr(err, "filename", None) or where
    other = getattr(err, "filename2", None)
    hint = _OS_HINTS.get(number) or (getattr(err, "strerror", None) or str(err) or type(err).__name__)
    return f"{path}{f' -> {other}' if other else ''}: {hint}"
