"""The stack's error: bad input or a failed step, said in one line with the fix. A LaunchError (launch/errors.py),
so that every entry point of the toolkit catches one type and exits with its code."""

from __future__ import annotations

from launch.errors import LaunchError


class StackError(LaunchError):
    """`WHERE: WHAT; FIX` in one line. `code` is the exit status: 2 for bad input (a pin, a checksum,
    a missing tool, an unreachable source), 1 for a build that ran and failed."""

    def __init__(self, where: str, what: str, fix: str = "", code: int = 2) -> None:
        self.where, self.what, self.fix, self.code = where, what, fix, code
        super().__init__(str(self))

    @property
    def exit_code(self) -> int:  # LaunchError's name for it
        return self.code

    def __str__(self) -> str:
        line = f"{self.where}: {self.what}" + (f"; {self.fix}" if self.fix else "")
        return " ".join(line.split())  # one line, whatever a tool printed into it
