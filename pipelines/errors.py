"""The mistakes an entry point reports in one line, and how it reports them. Imports nothing of the
project's, so the shard writer can use it without torch or pydantic."""
from __future__ import annotations

import contextlib
import sys


class ConfigError(ValueError):
    """A user's mistake in a config file, an override or a command-line option: it names the key
    or option, the value and what is accepted; printed without a traceback."""


class SetupError(RuntimeError):
    """What the job needs around it is not there (a Ray cluster that does not answer, a tracking
    server that did not start): says what was tried and what would work; printed without a traceback."""


@contextlib.contextmanager
def cli_errors(*more: type[Exception]):
    """An entry point's ending: a ConfigError or SetupError (or one of `more`) becomes one line on
    stderr and exit status 2."""
    try:
        yield
    except (ConfigError, SetupError, *more) as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(2) from None
