"""The one error type of the toolkit's command lines: a one-line message and the exit code it ends with.

Raised anywhere between the command line and the running process; caught once, in each entry point
(`python -m launch`, preflight's context), which prints ``error: MESSAGE`` and exits with ``exit_code``.
"""

from __future__ import annotations


class LaunchError(Exception):
    """A failure the user can act on; the message is one line and says what was expected."""

    exit_code = 1


class ConfigError(LaunchError, ValueError):
    """Bad input (deploy file, option, environment variable): names the source, the field and what was
    expected. Exit code 2, as argparse uses for bad arguments."""

    exit_code = 2


class NodeDown(LaunchError):
    """A node this one depends on never came up within its bound. Exit code 3."""

    exit_code = 3


class Interrupted(LaunchError):
    """Ctrl-C or SIGTERM before anything was started. Exit code 130 (128 + SIGINT), as a shell reports it."""

    exit_code = 130
