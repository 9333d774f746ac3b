"""Errors a user can fix. The CLI prints them as one line and exits 2; anything else is a bug and keeps
its traceback."""

from __future__ import annotations


class UserError(Exception):
    """Base of every error caused by the user's input (data, config, arguments, existing outputs)."""


class ConfigError(UserError, ValueError):
    """A config file, override or argument that does not describe a valid run."""


class DataError(UserError, ValueError):
    """Data that cannot become model inputs; the message names the file, column and value."""


class OutputExistsError(UserError, FileExistsError):
    """The output already holds results and ``--overwrite`` was not given."""


def find_user_error(err: BaseException) -> UserError | None:
    """The user error behind ``err``, if there is one: bad data met in a Ray task or a training worker reaches
    the driver wrapped (``RayTaskError.cause``, Ray Train's ``WorkerGroupError.worker_failures``, chained
    causes), and its message is the one line the user needs."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        cause = getattr(e, "cause", None)
        if isinstance(e, UserError) and not isinstance(cause, BaseException):
            return e  # a plain user error (a wrapper that subclasses it has a ``cause``: look there)
        todo += [*getattr(e, "worker_failures", {}).values(), cause, getattr(e, "controller_failure", None),
                 e.__cause__, e.__context__]
    return None
