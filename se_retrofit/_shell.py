"""The one shell of both commands (``se-retrofit`` and ``se-retrofit finetune``).

It owns the argument parser class and the mapping from what went wrong to what the user sees:

* a :class:`~se_retrofit.errors.RetrofitError` (bad model, option, file, recipe; :class:`UsageError`
  for bad arguments) or running out of memory: one line on stderr, exit code 2;
* Ctrl-C: one line, exit code 130;
* anything else is a bug: one line naming it, exit code 1; ``SE_RETROFIT_DEBUG=1`` shows the traceback.

Example:
    >>> from se_retrofit.errors import RetrofitError
    >>> def body():
    ...     raise RetrofitError("no such thing")
    >>> run_command("se-retrofit", body)  # and "se-retrofit: error: no such thing" on stderr
    2
    >>> one_line(ValueError("first line\\n  second line"))
    'first line / second line'
"""
from __future__ import annotations

import argparse
import errno
import os
import re
from typing import Callable

from .errors import RetrofitError

EXIT_OK, EXIT_INTERNAL, EXIT_USER_ERROR, EXIT_INTERRUPTED = 0, 1, 2, 130
DEBUG_VARIABLE = "SE_RETROFIT_DEBUG"


class UsageError(RetrofitError):
    """Bad command-line arguments (reported in one line, exit code 2)."""


class Parser(argparse.ArgumentParser):
    """An argument parser whose errors are one line (no usage block) and a :class:`UsageError`."""

    def error(self, message: str):
        raise UsageError(f"{message} (see {self.prog} --help)")


#: what an OS error while writing means to the user (a full disk is not a bug)
WRITE_ERRORS = {errno.ENOSPC: "no space left on device", errno.EDQUOT: "disk quota exceeded",
                errno.EROFS: "read-only file system", errno.EACCES: "permission denied",
                errno.EPERM: "operation not permitted", errno.ENAMETOOLONG: "file name too long",
                errno.EFBIG: "file too large", errno.EMLINK: "too many links", errno.ELOOP: "too many symbolic links"}
_NATIVE_TRACE = re.compile(r"^(Exception raised from |frame #\d+|C\+\+ CapturedTraceback)")


def positive_int(high: int):
    """A parser of a whole number from 1 to ``high`` (every option has a ceiling: a typo such as 1e20
    must not reach a constructor)."""
    def parse(text: str) -> int:
        if not re.fullmatch(r"\d{1,12}", text.strip()) or not 1 <= int(text) <= high:
            raise argparse.ArgumentTypeError(f"must be a positive integer up to {high}, got {text[:40]!r}")
        return int(text)
    return parse


def path_argument(text: str):
    """An argparse type for a path: refuses what no file system takes (empty, a NUL character)."""
    from pathlib import Path

    if not text or "\x00" in text:
        raise argparse.ArgumentTypeError(f"must be a path (not empty, no NUL character), got {text[:60]!r}")
    return Path(text)


def one_line(text: str) -> str:
    """``text`` on one line: its lines joined with ' / ' (a message never spreads over lines), without
    the C++ stack frames torch appends to some errors."""
    lines = []
    for line in str(text).strip().splitlines():
        if _NATIVE_TRACE.match(line.strip()):
            break
        if line.strip():
            lines.append(line.strip())
    return " / ".join(lines)


def os_error_message(error: OSError) -> str | None:
    """One line for an OS error the user can act on (full disk, read-only or forbidden place, name too
    long), naming the file; None for any other OS error."""
    reason = WRITE_ERRORS.get(error.errno)
    if reason is None:
        return None
    where = error.filename if error.filename is not None else "a file"
    return f"cannot write {where}: {reason} ({error.strerror or error})"


def is_out_of_memory(error: BaseException) -> bool:
    """Whether ``error`` is an allocation failure (Python's, or torch's CPU or CUDA allocator)."""
    if isinstance(error, MemoryError):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and ("can't allocate memory" in text or "out of memory" in text)


def run_command(prog: str, body: Callable[[], int], *, interrupted: str = "interrupted; nothing was written",
                speak: bool = True) -> int:
    """Run ``body`` and turn what it raises into one line on stderr and an exit code.

    ``speak`` False (torchrun ranks other than 0) keeps the exit codes but prints nothing for user
    errors and interrupts.
    """
    try:
        return body()
    except RetrofitError as error:
        _say(speak, f"{prog}: error: {one_line(error)}")
        return EXIT_USER_ERROR
    except OSError as error:
        message = os_error_message(error)
        if message is None:
            return _internal(prog, error)
        _say(True, f"{prog}: error: {one_line(message)}")
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        _say(speak, f"{prog}: {interrupted}")
        return EXIT_INTERRUPTED
    except Exception as error:  # noqa: BLE001 - a bug, or memory: one line, traceback only on request
        return _internal(prog, error, speak)


def _internal(prog: str, error: Exception, speak: bool = True) -> int:
    if os.environ.get(DEBUG_VARIABLE):
        raise error
    if is_out_of_memory(error):
        _say(speak, f"{prog}: error: out of memory ({one_line(error)[:160]}); use a smaller --input-size, "
                    "model or batch")
        return EXIT_USER_ERROR
    _say(True, f"{prog}: internal error: {type(error).__name__}: {one_line(error)} "
               f"(set {DEBUG_VARIABLE}=1 for the traceback)")
    return EXIT_INTERNAL


def _say(speak: bool, line: str) -> None:
    if speak:
        from rich.console import Console

        Console(stderr=True, soft_wrap=True, highlight=False).print(line, markup=False)
