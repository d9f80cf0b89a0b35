"""The LocalmixError family: what a user can act on, each family with its own exit code.

Library code raises these; only the CLI turns them into `error:` / `hint:` lines and an exit code.
Exit codes (one per family):

    1  LocalmixError (anything else we anticipated)
    2  UsageError (a bad option value)
    3  ModelNotFound
    4  CatalogError
    5  CheckpointError (unsupported, missing or malformed checkpoint)
    6  InvalidGGUF
    7  NetworkError (GatedRepo, OfflineMiss, WorkerError)
    8  ChecksumMismatch
    9  DiskSpaceError
   10  DoesNotFit
   11  ContextTooLong
   12  OutputError (cannot write where asked)
   13  EngineError (llama.cpp refused to load or run)
  130  interrupted (Ctrl-C)
"""

from __future__ import annotations


class LocalmixError(Exception):
    """An error with a one-line user-facing message and an optional hint."""

    exit_code = 1

    def __init__(self, message: str, hint: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.hint = hint

    def __reduce__(self) -> tuple[object, ...]:
        # whole across a process boundary (serve's model workers), whatever the subclass's
        # __init__ takes: the message, the hint and any field it adds (a BadField's param)
        return (_restore, (type(self), self.message), dict(self.__dict__))


def _restore(kind: type[LocalmixError], message: str) -> LocalmixError:
    error = kind.__new__(kind)
    LocalmixError.__init__(error, message)
    return error


class UsageError(LocalmixError):
    exit_code = 2


class VocabularyMismatch(UsageError):
    """eval: the model and the reference read a text as different tokens."""


class TextTooShort(UsageError):
    """eval: the text does not fill one chunk."""


class ModelNotFound(LocalmixError):
    exit_code = 3


class ReferenceNotFound(ModelNotFound):
    """eval: no reference to compare a model with (none given, none of the store's fits)."""


class CatalogError(LocalmixError):
    exit_code = 4


class CheckpointError(LocalmixError):
    exit_code = 5


class InvalidGGUF(LocalmixError):
    exit_code = 6


class NetworkError(LocalmixError):
    exit_code = 7


class GatedRepo(NetworkError):
    pass


class OfflineMiss(NetworkError):
    pass


class WorkerError(NetworkError):
    """An RPC worker (`localmix worker`) that cannot be used: unreachable, not a worker, of
    another llama.cpp, busy with another client."""


class ChecksumMismatch(LocalmixError):
    exit_code = 8


class DiskSpaceError(LocalmixError):
    exit_code = 9


class DoesNotFit(LocalmixError):
    exit_code = 10


class ContextTooLong(LocalmixError):
    exit_code = 11


class OutputError(LocalmixError):
    exit_code = 12


class EngineError(LocalmixError):
    exit_code = 13


INTERRUPTED_EXIT_CODE = 130


def from_os_error(exc: OSError, doing: str | None = None) -> LocalmixError:
    """An OSError as the user's error it is: a full disk, a read-only or unwritable place, a
    missing path. `doing` says what was under way ("writing the model")."""
    import errno

    where = f" {exc.filename}" if exc.filename else ""
    at = f":{where}" if where else ""
    what = f"{doing}: " if doing else ""
    reason = exc.strerror or str(exc) or type(exc).__name__
    if exc.errno in (errno.ENOSPC, errno.EDQUOT):
        return DiskSpaceError(
            f"{what}no space left on the device of{where or ' the output'}",
            hint="free some space (`localmix du`, `localmix rm`) or point LOCALMIX_HOME elsewhere",
        )
    if exc.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return OutputError(
            f"{what}cannot write{where}: {reason}",
            hint="choose a writable place (LOCALMIX_HOME, HF_HOME or -o)",
        )
    if exc.errno in (errno.ENOENT, errno.ENOTDIR, errno.EISDIR, errno.ENAMETOOLONG):
        return OutputError(f"{what}{reason}{at}", hint="check the path")
    return LocalmixError(f"{what}{reason}{at}", hint="check the path and the disk")
