"""A judge's answer, in the shape a check reports it: pure judges return one, checks hand it to ``check.require``,
and tests read it from tables of recorded values."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Verdict:
    ok: bool
    value: str
    """What was found, in words (a passing verdict may carry a note here: it is printed, not failed)."""
    expected: str = ""
    fix: str = ""
    why: str = ""

    def report(self, check) -> None:
        """Passes or fails ``check`` (preflight's Check) with this verdict."""
        check.require(self.ok, self.value, self.expected, fix=self.fix, why=self.why)
