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


def _context_problem(argv: list[str]):
    """The LaunchError (one line, its exit code) that the deploy file, our options or the environment give
    before any check runs, else None. The same options table and context the plugin uses."""
    import argparse

    from launch.errors import LaunchError
    from preflight import context
    from preflight.options import OPTIONS

    parser = argparse.ArgumentParser(add_help=False)
    for flag, kwargs in OPTIONS:
        parser.add_argument(flag, **kwargs)
    try:
        known, _ = parser.parse_known_args(argv)
    except SystemExit:  # a bad option value: pytest's own parser says it, naming the option
        return None
    try:
        context.build(known.deploy, known.node_rank, known.socket_ifname, known.transport, known.group)
    except LaunchError as exc:
        return exc
    return None


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["bench"]:
        from preflight.bench import main as bench

        return bench(argv[1:])
    if "-h" in argv or "--help" in argv:
        from preflight.options import usage

        print(usage())  # ours first; pytest's full help (ours again, in its group) follows
        sys.stdout.flush()
    elif problem := _context_problem(argv):
        print(f"error: {problem}", file=sys.stderr)  # as `python -m launch` says it, with its exit code
        return problem.exit_code
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
