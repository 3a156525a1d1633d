"""The errors dataflex answers with one line and exit 2 (`train: error: ...`), never a traceback."""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or gave (config, inputs, run folder): one line, exit 2."""


class ConfigError(UserError, ValueError):
    pass


class ShardError(UserError, ValueError):
    pass


class RunError(UserError):
    """A problem with how a run was asked for (config keys, run folder, port): one line, no traceback, exit 2."""


class DataConfigError(ValueError):
    pass
