"""`python -m preflight [pytest options]` runs the node checks; `python -m preflight bench` the
collective benchmark. Everything pytest accepts works: -k, -m "not collective", -n 4, --junitxml."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

CHECKS = Path(__file__).resolve().parent / "checks"


def _inside(path: str, folder: Path) -> bool:
    try:
        return Path(path).resolve().is_relative_to(folder) and Path(path).exists()
    except OSError:
        return False


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from preflight.bench import main as bench

        return bench(argv[1:])
    if "-h" in argv or "--help" in argv:
        from preflight.plugin import usage

        print(usage())  # ours first; pytest's full help (ours again, in its group) follows
        sys.stdout.flush()
    # Our own plugin, our checks folder, none of the project's test configuration.
    args = [
        "-p",
        "preflight.plugin",
        "-p",
        "no:cacheprovider",
        "--rootdir",
        str(CHECKS),
        "-c",
        str(CHECKS / "pytest.ini"),
        *argv,
    ]
    # Run the whole checks folder unless the user named checks in it (a deploy file is no check).
    named = [a for a in argv if not a.startswith("-") and _inside(a.split("::")[0], CHECKS)]
    if not named:
        args.append(str(CHECKS))
    return int(pytest.main(args))


if __name__ == "__main__":
    sys.exit(main())
