"""Errors a user can fix. The CLI prints them as one line and exits 2; anything else is a bug and keeps
its traceback."""

from __future__ import annotations

import re
from typing import Callable


class UserError(Exception):
    """Base of every error caused by the user's input (data, config, arguments, existing outputs)."""


class ConfigError(UserError, ValueError):
    """A config file, override or argument that does not describe a valid run."""


class DataError(UserError, ValueError):
    """Data that cannot become model inputs; the message names the file, column and value."""


class OutputExistsError(UserError, FileExistsError):
    """The output already holds results and ``--overwrite`` was not given."""


class StorageError(UserError, OSError):
    """A storage URI that could not be read or written (no credentials, access denied, no such bucket, network
    down): one line for the user. A training run still retries it from its last checkpoint (a network blip heals);
    every other user error ends a run at once."""


class WorkersFailed(UserError):
    """A training run Ray Train ended because its workers' processes kept dying (killed for memory, a node lost)
    until its restarts were spent: not bad input, but nothing Ray's traceback says better than one line naming
    what died and what the run keeps."""


class NotStarted(Exception):
    """A search's trial whose training workers were up only after the search's time budget had ended: it did not
    train (no trial starts after the budget, as with Optuna's ``timeout``). Not an error: the trial ends without a
    result, and ``results.csv`` says "not started"."""

    FILE = "not_started.txt"  # in RUN: why, written by rank 0 for the driver, the search's table and its study


class Interrupted(Exception):
    """The user stopped the command (Ctrl-C: ``signum`` SIGINT; a scheduler's SIGTERM) and what it wrote so far can
    be continued; the message says what is kept. Not a :class:`UserError`: the CLI prints it as one line and exits
    128 + ``signum``, as a shell reports a command ended by that signal."""

    def __init__(self, message: str, signum: int = 2) -> None:  # 2: SIGINT
        super().__init__(message)
        self.signum = signum


def first_line(err: BaseException) -> str:
    """The first line of an exception's message (its type's name when it has none): for one-line errors that quote
    what a library said."""
    return str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__


def dead_worker(err: BaseException) -> BaseException | None:
    """The ``RayActorError`` behind a Ray Train worker's failure when the worker's process died (Ray Train wraps it
    in its health-check error), else None: the worker raised, or failed beside a dead peer (a collective cut off)."""
    from ray.exceptions import RayActorError

    inner = getattr(err, "health_check_failure", err)
    return inner if isinstance(inner, RayActorError) else None


def worker_failure_reason(err: BaseException) -> str:
    """One line for a Ray Train worker's failure: what Ray says of a dead worker's process (its exit type and
    detail, up to Ray's list of possible causes) where it says so, else the error's first line."""
    died = next((line.strip() for line in str(err).splitlines() if line.strip().startswith("The actor is dead")), None)
    return died.split(". End of file")[0] if died else first_line(err)


def find_cause(err: BaseException, match: Callable[[BaseException], bool]) -> BaseException | None:
    """The first exception behind ``err`` (itself included) that ``match`` accepts: errors met in a Ray task or a
    training worker reach the driver wrapped (``RayTaskError.cause``, Ray Train's
    ``WorkerGroupError.worker_failures``, chained causes)."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [err]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if match(e):
            return e
        todo += [*getattr(e, "worker_failures", {}).values(), getattr(e, "cause", None),
                 getattr(e, "controller_failure", None), e.__cause__, e.__context__]
    return None


def find_user_error(err: BaseException) -> UserError | None:
    """The user error behind ``err``, if there is one; its message is the one line the user needs.

    A Ray wrapper that subclasses the user error's class carries the remote traceback in its text and the error
    in ``cause``: the search goes on to that. Where the error object itself did not survive the trip (an
    exception raised inside a Ray Data task that fed a training worker arrives as text: pickling drops
    ``__cause__``), the remote traceback's last line for one of these classes is read back.
    """
    found = find_cause(err, lambda e: isinstance(e, UserError) and not isinstance(getattr(e, "cause", None),
                                                                                   BaseException))
    if found is not None:
        return found  # type: ignore[return-value]
    texts: list[str] = []
    find_cause(err, lambda e: bool(texts.append(str(e))))  # every exception's text, outermost first
    for text in texts:
        lines = REMOTE_LINE.findall(text)
        if lines:
            kind, message = lines[-1]
            return USER_ERRORS[kind](message.strip())
    return None


USER_ERRORS: dict[str, type[UserError]] = {c.__name__: c
                                           for c in (UserError, ConfigError, DataError, OutputExistsError,
                                                     StorageError)}
REMOTE_LINE = re.compile(r"^mmctr_ray\.errors\.(" + "|".join(USER_ERRORS) + r"): (.+)$", re.MULTILINE)
