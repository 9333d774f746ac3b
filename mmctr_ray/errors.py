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
