"""The preflight verdict as text and JSON. Pure functions of the records, so they are tested with tables."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field

REPORT_VERSION = 1
OUTCOMES = ("PASS", "FAIL", "SKIP", "ERROR")


@dataclass
class Record:
    """One check's outcome."""

    group: str  # module of the check: gpu, interconnect, nccl, ...
    name: str  # what was checked, in words
    outcome: str  # PASS / FAIL / SKIP / ERROR
    value: str = ""  # what was measured
    threshold: str = ""  # what it had to be
    fix: str = ""  # what to do when it is not
    detail: str = ""  # why it failed / was skipped
    seconds: float = 0.0
    nodeid: str = ""
    extra: dict = field(default_factory=dict)


def line(rec: Record, name_width: int = 34) -> str:
    """`PASS  gpu           driver loaded        580.159.04 (>= 535)`; failures add the fix."""
    measured = rec.value
    if rec.threshold:
        measured = f"{measured} (expected {rec.threshold})" if measured else f"expected {rec.threshold}"
    if rec.outcome == "SKIP":
        measured = rec.detail or measured
    text = f"{rec.outcome:<5} {rec.group:<12} {rec.name:<{name_width}} {measured}".rstrip()
    if rec.outcome in ("FAIL", "ERROR"):
        if rec.detail and rec.detail not in text:
            text += f"  [{rec.detail}]"
        if rec.fix:
            text += f"  fix: {rec.fix}"
    return text


def counts(records: list[Record]) -> dict[str, int]:
    return {o: sum(r.outcome == o for r in records) for o in OUTCOMES}


def verdict(records: list[Record]) -> str:
    c = counts(records)
    return "NOT READY" if c["FAIL"] or c["ERROR"] else "READY"


def summary(records: list[Record], seconds: float, title: str) -> list[str]:
    width = min(48, max([len(r.name) for r in records] + [20]))
    out = [f"# preflight: {title}"]
    out += [line(r, width) for r in records]
    c = counts(records)
    named = (("FAIL", "failed"), ("ERROR", "errors"), ("PASS", "passed"), ("SKIP", "skipped"))
    parts = ", ".join(f"{c[o]} {word}" for o, word in named if c[o] or o == "PASS")
    out.append(f"# verdict: {verdict(records)} ({parts}) in {seconds:.1f} s")
    return out


def to_json(records: list[Record], seconds: float, node: dict) -> str:
    return json.dumps(
        {
            "version": REPORT_VERSION,
            "node": node,
            "verdict": verdict(records),
            "seconds": round(seconds, 3),
            "counts": counts(records),
            "checks": [asdict(r) for r in records],
        },
        indent=2,
    )
