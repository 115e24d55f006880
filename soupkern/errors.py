"""Exceptions raised by soupkern. Every input error names the file and, where there is one, the tensor."""

from __future__ import annotations

import os


class SoupkernError(Exception):
    """Base class of all soupkern errors."""


class InputError(SoupkernError, ValueError):
    """Bad input (a malformed file, a mismatch between ingredients, a bad argument).

    Raised before any output is written.
    """

    def __init__(self, message: str, *, path: str | os.PathLike[str] | None = None, tensor: str | None = None):
        self.path = None if path is None else os.fspath(path)
        self.tensor = tensor
        where = []
        if self.path is not None:
            where.append(self.path)
        if tensor is not None:
            shown = tensor if tensor.isprintable() else tensor.encode("unicode_escape").decode("ascii")
            where.append(f"tensor '{shown}'")
        super().__init__(f"{': '.join(where)}: {message}" if where else message)


class HeaderError(InputError):
    """A safetensors file whose header or layout is invalid."""


class MismatchError(InputError):
    """Ingredients that cannot be souped together (names, shapes or dtypes differ)."""


class OutputError(SoupkernError, OSError):
    """The output cannot be written (it is an input, exists, or the disk is too small)."""


class BackendUnavailableError(SoupkernError, RuntimeError):
    """A backend asked for by name cannot run here; the message says why."""


class Interrupted(KeyboardInterrupt):
    """SIGINT, SIGTERM or SIGHUP arrived while soupkern was writing. `committed` lists the output
    paths that were already complete when it arrived (empty: nothing was written or replaced)."""

    def __init__(self, signum: int, committed: tuple[os.PathLike[str] | str, ...] = ()):
        import signal

        self.signum = signum
        self.committed = tuple(committed)
        self.signame = signal.Signals(signum).name
        super().__init__(self.signame)
