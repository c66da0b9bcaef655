"""User-facing errors.

Every problem a user can fix is raised as a :class:`FusionError` whose message is one sentence:
what is wrong, where (file, config path, tensor), and how to fix it. The CLI prints the message
and exits 1; anything else is a bug and keeps its traceback behind ``--debug``.
"""

from __future__ import annotations


class FusionError(Exception):
    """A problem with the user's input: printed as one sentence, exit code 1."""


class ConfigError(FusionError):
    """A problem in the merge config, located by its path (``models[1].parameters.density``)."""

    def __init__(self, path: str, message: str, line: int | None = None):
        self.path = path
        self.line = line
        where = f"{path}" + (f" (line {line})" if line else "") if path else ""
        super().__init__(f"{where}: {message}" if where else message)


class CheckpointError(FusionError):
    """A checkpoint that cannot be read: missing, not a model folder, corrupt, inconsistent."""


class MergeError(FusionError):
    """A problem found while planning or running a merge (shapes, missing tensors, non-finite)."""


class ConfigErrors(ConfigError):
    """Every problem found in one config, reported together (one line each)."""

    def __init__(self, errors: "list[ConfigError]"):
        self.errors = list(errors)
        first = self.errors[0]
        self.path, self.line = first.path, first.line
        FusionError.__init__(self, "\n".join(str(e) for e in self.errors))


#: OS errors a user can do something about, by errno name: what to do (the caller may add an
#: alternative, such as "or choose another -o").
_OS_HINTS = {
    "ENOSPC": "free some space there", "EDQUOT": "free some space there (the disk quota is full)",
    "EROFS": "mount it read-write", "EACCES": "check the permissions", "EPERM": "check the permissions",
    "EFBIG": "raise the file-size limit (ulimit -f)", "EMFILE": "raise the open-file limit (ulimit -n)",
    "ENFILE": "close other programs' files", "EIO": "check the disk",
    "ENOTDIR": "check the path (a part of it is a file)", "ENAMETOOLONG": "shorten the path",
}


def os_error(exc: BaseException, what: str, alternative: str = "") -> FusionError | None:
    """The one sentence for an OS error a user can fix (disk full, read-only, no permission):
    ``what`` failed, why, and what to do (``alternative``, e.g. "or choose another -o"). None when
    ``exc`` is not such an error."""
    import errno
    import os

    if not isinstance(exc, OSError) or exc.errno is None:
        return None
    hint = _OS_HINTS.get(errno.errorcode.get(exc.errno, ""))
    if hint is None:
        return None
    where = f" ({exc.filename})" if exc.filename else ""
    return FusionError(f"{what}: {os.strerror(exc.errno).lower()}{where}; {hint}"
                       + (f" {alternative}" if alternative else ""))
