"""Option types shared by the command lines (launch, preflight, env): argparse names the option when one refuses."""

from __future__ import annotations

import argparse


def seconds(text: str) -> float:
    """A bound in seconds: a finite number >= 0 (argparse names the option when this refuses)."""
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"expected seconds (a number >= 0), got {text!r}")
    return value
