"""The pytest plugin behind `python -m preflight` (pixi: `pixi run preflight`).

Options (one group, the OPTIONS table): --deploy FILE, --node-rank N, --group, --cross-node, --socket-ifname,
--transport, --preflight-json FILE. On a node of a multi-node deploy file, preflight checks that node alone
unless --cross-node (every node runs preflight now) or -m multinode asks for the cross-node checks. Fixtures for checks: ``node`` (a :class:`NodeContext`: the deploy file, this node's
plan, thresholds) and ``check`` (records the measured value, threshold and fix, and fails or skips the
test with them). At the end, one line per check and a verdict; the same as JSON for machines.
"""

from __future__ import annotations

import re
import socket
import sys
import time
from dataclasses import asdict
from pathlib import Path

import pytest

from launch.errors import LaunchError
from preflight import context, report, thresholds
from preflight.options import GROUP, OPTIONS
from preflight.report import Record
from preflight.thresholds import BadThreshold

RECORD_KEY = pytest.StashKey[Record]()
CONTEXT_KEY = pytest.StashKey[context.NodeContext]()


class CheckFailed(AssertionError):
    pass


class Check:
    """What a check hands to the report: ``require`` (fail with value / threshold / fix) and ``skip``."""

    def __init__(self, record: Record):
        self.record = record

    def measured(self, value, threshold: str = "", fix: str = "") -> None:
        self.record.value = str(value)
        self.record.threshold = threshold or self.record.threshold
        self.record.fix = fix or self.record.fix

    def require(self, ok: bool, value, threshold: str = "", fix: str = "", why: str = "") -> None:
        self.measured(value, threshold, fix)
        if not ok:
            self.record.detail = why
            expected = f" (expected {threshold})" if threshold else ""
            because = f": {why}" if why else ""
            hint = f"; fix: {fix}" if fix else ""
            pytest.fail(f"{self.record.name}: {value}{expected}{because}{hint}", pytrace=False)

    def skip(self, reason: str) -> None:
        self.record.detail = reason
        pytest.skip(reason)


def pytest_addoption(parser: pytest.Parser) -> None:
    group = parser.getgroup(*GROUP)
    for flag, kwargs in OPTIONS:
        group.addoption(flag, **kwargs)
    parser.addini("preflight_deploy", "deploy file, as --deploy", default=None)
    parser.addini("preflight_json", "JSON report path, as --preflight-json", default=None)


def asks_cross_node(flag: bool, markexpr: str) -> bool:
    """--cross-node, or a -m expression that names a group needing every node (multinode, ep) without `not`."""
    return flag or re.search(r"(?<!not )\b(multinode|ep)\b", markexpr or "") is not None


def cross_node_asked(config: pytest.Config) -> bool:
    return asks_cross_node(bool(config.option.cross_node), getattr(config.option, "markexpr", "") or "")


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    ctx = config.stash.get(CONTEXT_KEY, None)
    if ctx is None or ctx.nodes < 2 or cross_node_asked(config):
        return
    skip = pytest.mark.skip(
        reason=f"this node alone: the other {ctx.nodes - 1} node(s) are not expected now "
        f"(--cross-node on every node, or -m multinode, runs the cross-node checks)"
    )
    for item in items:
        if item.get_closest_marker("multinode"):
            item.add_marker(skip)


@pytest.fixture(scope="session")
def progress(pytestconfig: pytest.Config):
    """Writes a progress line to the terminal while a check waits (pytest's capture would hold it back)."""
    capture = pytestconfig.pluginmanager.getplugin("capturemanager")

    def say(line: str) -> None:
        if capture is not None:
            with capture.global_and_fixture_disabled():
                print(f"[preflight] {line}", file=sys.stderr, flush=True)
        else:
            print(f"[preflight] {line}", file=sys.stderr, flush=True)

    return say


@pytest.hookimpl(tryfirst=True)
def pytest_cmdline_main(config: pytest.Config) -> None:
    # With -n N, checks that share GPUs or a rendezvous port carry xdist_group marks and must stay
    # on one worker: pytest-xdist's default "load" mode would split them.
    if getattr(config.option, "numprocesses", None) and getattr(config.option, "dist", "no") in ("load", "no"):
        config.option.dist = "loadgroup"


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config: pytest.Config) -> None:
    config.addinivalue_line("markers", "collective: runs collectives across GPUs or nodes (slower)")
    config.addinivalue_line(
        "markers", "multinode: needs every node of the deploy file to run preflight at the same time"
    )
    if config.option.collectonly or getattr(config.option, "help", False):
        return
    deploy = config.option.deploy or config.getini("preflight_deploy")  # else EP_DEPLOY, read by launch/request.py
    try:
        ctx = context.build(
            deploy, config.option.node_rank, config.option.socket_ifname, config.option.transport, config.option.group
        )
    except LaunchError as exc:  # one line: the deploy file, an option or the environment
        raise pytest.UsageError(str(exc)) from None
    if ctx.nodes > 1:
        ctx = ctx.alone(not cross_node_asked(config))
    config.stash[CONTEXT_KEY] = ctx
    config.pluginmanager.register(Reporter(config, ctx), "preflight-reporter")


@pytest.fixture(scope="session")
def node(pytestconfig: pytest.Config) -> context.NodeContext:
    return pytestconfig.stash[CONTEXT_KEY]


def _check_name(item: pytest.Item) -> tuple[str, str]:
    group = item.module.__name__.rsplit(".", 1)[-1].removeprefix("test_") if hasattr(item, "module") else "preflight"
    doc = (getattr(item, "obj", None).__doc__ or "").strip().splitlines() if getattr(item, "obj", None) else []
    name = doc[0].rstrip(".") if doc else item.name.removeprefix("test_").replace("_", " ")
    if hasattr(item, "callspec"):
        name += f" [{item.callspec.id}]"
    return group, name


@pytest.fixture
def check(request: pytest.FixtureRequest) -> Check:
    return Check(request.node.stash[RECORD_KEY])


@pytest.hookimpl(tryfirst=True)  # before the skip marks act: a skipped check still gets its line
def pytest_runtest_setup(item: pytest.Item) -> None:
    group, name = _check_name(item)
    item.stash[RECORD_KEY] = Record(
        group=group, name=name, outcome="PASS", nodeid=item.nodeid, extra={"line": item.location[1] or 0}
    )


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(item: pytest.Item, call: pytest.CallInfo):
    rep = yield
    record = item.stash.get(RECORD_KEY, None)
    if record is None:
        return rep
    if rep.when == "call" or (rep.when == "setup" and not rep.passed):
        record.seconds = round(rep.duration, 3)
        if rep.skipped:
            record.outcome = "SKIP"
            if not record.detail and isinstance(rep.longrepr, tuple):
                record.detail = str(rep.longrepr[2]).removeprefix("Skipped: ")
        elif rep.failed and call.excinfo is not None and call.excinfo.errisinstance(BadThreshold):
            record.outcome, record.value, record.fix = "FAIL", str(call.excinfo.value), thresholds.FIX
            rep.longrepr = f"{record.name}: {record.value}; fix: {record.fix}"
        elif rep.failed:
            record.outcome = "FAIL" if rep.when == "call" else "ERROR"
            if not record.detail and not record.value:
                record.detail = _short(rep.longreprtext)
        # Travels with the report, so pytest-xdist workers' results reach the controller's summary.
        rep.user_properties.append(("preflight", asdict(record)))
    return rep


def _short(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    errors = [ln for ln in lines if ln.startswith("E ")]
    return (errors[-1][2:].strip() if errors else lines[-1] if lines else "")[:300]


class Reporter:
    """Collects every check's record (also from pytest-xdist workers) and prints the verdict."""

    def __init__(self, config: pytest.Config, ctx: context.NodeContext):
        self.config = config
        self.ctx = ctx
        self.records: list[Record] = []
        self.start = time.monotonic()

    def pytest_runtest_logreport(self, report: pytest.TestReport) -> None:
        for key, value in report.user_properties:
            if key == "preflight":
                self.records.append(Record(**value))

    def pytest_terminal_summary(self, terminalreporter) -> None:
        seconds = time.monotonic() - self.start
        title = f"{socket.gethostname()}, {self.ctx.describe()}"
        terminalreporter.write_line("")
        # Source order (file, line), whatever order pytest-xdist workers finished in.
        self.records.sort(key=lambda r: (r.nodeid.split("::")[0], r.extra.get("line", 0), r.nodeid))
        for text in report.summary(self.records, seconds, title):
            terminalreporter.write_line(
                text,
                red=text.startswith(("FAIL", "ERROR")),
                green=text.startswith("PASS"),
                bold=text.startswith("# verdict"),
            )
        path = self.config.option.preflight_json or self.config.getini("preflight_json")
        if path:
            node = {
                "host": socket.gethostname(),
                "rank": self.ctx.rank,
                "nodes": self.ctx.nodes,
                "describe": self.ctx.describe(),
            }
            Path(path).write_text(report.to_json(self.records, seconds, node) + "\n")
            terminalreporter.write_line(f"# JSON report: {path}")
