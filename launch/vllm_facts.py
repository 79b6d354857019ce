"""What a vLLM release accepts, read from the Python sources of its wheel: no install, no GPU.

    python -m launch.vllm_facts WHEEL_OR_DIR...                 # print the rows as JSON
    python -m launch.vllm_facts WHEEL_OR_DIR... --update        # merge them into launch/vllm_facts.json
                                                                # and regenerate docs/vllm-versions.md
    python -m launch.vllm_facts --markdown                      # regenerate the doc from the table only

WHEEL_OR_DIR is a wheel (`pip download vllm==X --no-deps --only-binary=:all: -d DIR`), or a folder
holding the same relative paths (`pip install --no-deps --target DIR vllm==X`, or an unpacked wheel).

Each row says, for one release, with the file and line it was read at:
- `backends`: the names vLLM's CUDA communicator dispatches (vllm/distributed/device_communicators/
  cuda_communicator.py), each with the manager class it builds and the line it logs ("Using X all2all
  manager."), and where an unknown name raises;
- `accepted`: the names its configuration validates (the All2AllBackend Literal of vllm/config/parallel.py,
  or the choices of VLLM_ALL2ALL_BACKEND in vllm/envs.py; null when any string passes);
- `rewrites`: names the configuration silently replaces before the communicator sees them;
- `default`: the backend used when none is named;
- `env`: whether VLLM_ALL2ALL_BACKEND is read, and when it applies; `flag`: whether `--all2all-backend`
  exists (vllm/engine/arg_utils.py) and which choices it leaves out;
- `api_server_count`: the flag's default and the rule `vllm serve` applies when it is not given
  (vllm/entrypoints/cli/serve.py);
- `eplb`: `--enable-eplb`, and how EPLB's settings are given: one `--eplb-config` JSON (the fields of
  EPLBConfig in vllm/config/) or flags of their own; `dbo`: `--enable-dbo`, its token-threshold flags, and
  the all2all backends the configuration requires for it (vllm/config/vllm.py).

The sources are parsed with :mod:`ast`; a shape the reader does not recognise is an error naming the file,
never a guess.
"""

from __future__ import annotations

import argparse
import ast
import json
import re
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

TABLE = Path(__file__).with_name("vllm_facts.json")
DOC = Path(__file__).resolve().parent.parent / "docs" / "vllm-versions.md"

COMMUNICATOR = "vllm/distributed/device_communicators/cuda_communicator.py"
MANAGERS = "vllm/distributed/device_communicators/all2all.py"
PARALLEL = "vllm/config/parallel.py"
ENVS = "vllm/envs.py"
ARG_UTILS = "vllm/engine/arg_utils.py"
SERVE = "vllm/entrypoints/cli/serve.py"
ENV_NAME = "VLLM_ALL2ALL_BACKEND"
FLAG = "--all2all-backend"
API_FLAG = "--api-server-count"


class FactsError(Exception):
    """A source the reader cannot read or does not recognise; the message names file and expectation."""


# ---- where the sources come from -----------------------------------------------------------------


class Release:
    """One release's files, from a wheel (a zip) or a folder with the same relative paths."""

    def __init__(self, path: Path):
        self.path = path
        self.name = path.name
        if path.is_file():
            if not zipfile.is_zipfile(path):
                raise FactsError(f"{path}: not a wheel (expected a vllm-X.Y.Z-*.whl zip or a folder)")
            self._zip: zipfile.ZipFile | None = zipfile.ZipFile(path)
            self._names = set(self._zip.namelist())
        elif (path / "vllm").is_dir():
            self._zip = None
            self._names = set()
        else:
            raise FactsError(f"{path}: no vllm/ package inside (expected a wheel or a folder holding vllm/)")
        self._parsed: dict[str, ast.Module] = {}

    def text(self, rel: str) -> str | None:
        if self._zip is not None:
            return self._zip.read(rel).decode() if rel in self._names else None
        file = self.path / rel
        return file.read_text() if file.is_file() else None

    def files(self, folder: str, *, deep: bool = False) -> list[str]:
        """The .py files in a folder of the package (and its subfolders with deep), sorted."""
        if self._zip is not None:
            return sorted(
                n
                for n in self._names
                if n.startswith(folder + "/") and n.endswith(".py") and (deep or "/" not in n[len(folder) + 1 :])
            )
        found = (self.path / folder).rglob("*.py") if deep else (self.path / folder).glob("*.py")
        return sorted(str(p.relative_to(self.path)) for p in found)

    def tree(self, rel: str) -> ast.Module | None:
        if rel not in self._parsed:
            text = self.text(rel)
            if text is None:
                return None
            try:
                self._parsed[rel] = ast.parse(text, rel)
            except SyntaxError as exc:
                raise FactsError(f"{self.name}: {rel}:{exc.lineno}: does not parse ({exc.msg})") from None
        return self._parsed[rel]

    def need(self, rel: str) -> ast.Module:
        tree = self.tree(rel)
        if tree is None:
            raise FactsError(f"{self.name}: {rel}: missing (expected in every vLLM release since 0.10)")
        return tree

    def version(self) -> str:
        """From the dist-info's METADATA (wheels and --target folders both carry it)."""
        if self._zip is not None:
            metas = [n for n in self._names if re.fullmatch(r"vllm-[^/]+\.dist-info/METADATA", n)]
        else:
            metas = [str(p.relative_to(self.path)) for p in self.path.glob("vllm-*.dist-info/METADATA")]
        if len(metas) != 1:
            raise FactsError(f"{self.name}: expected one vllm-*.dist-info/METADATA, found {len(metas)}")
        m = re.search(r"^Version: (\S+)$", self.text(metas[0]) or "", re.MULTILINE)
        if not m:
            raise FactsError(f"{self.name}: {metas[0]}: no 'Version:' line")
        return m.group(1)


def at(rel: str, node: ast.AST) -> str:
    return f"{rel}:{node.lineno}"


# ---- small AST helpers ---------------------------------------------------------------------------


def _is_backend(node: ast.AST, local: str | None = None) -> bool:
    """`self.all2all_backend`, `parallel_config.all2all_backend`, or the local variable holding it."""
    if isinstance(node, ast.Attribute):
        return node.attr == "all2all_backend"
    return isinstance(node, ast.Name) and node.id in {"all2all_backend", local}


def _strings(node: ast.AST) -> list[str] | None:
    if isinstance(node, ast.Constant) and isinstance(node.value, str):
        return [node.value]
    if isinstance(node, ast.Tuple | ast.List | ast.Set):
        values = [e.value for e in node.elts if isinstance(e, ast.Constant) and isinstance(e.value, str)]
        return values if len(values) == len(node.elts) else None
    return None


def _compared(test: ast.AST, local: str | None = None) -> tuple[list[str], list[ast.AST]] | None:
    """The backend names a branch test selects (== / in / or of those), and the other conditions and-ed
    to it; None when the test is not about the backend."""
    if isinstance(test, ast.Compare) and len(test.ops) == 1 and _is_backend(test.left, local):
        names = _strings(test.comparators[0])
        if names is not None and isinstance(test.ops[0], ast.Eq | ast.In):
            return names, []
        return None
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.Or):
        parts = [_compared(v, local) for v in test.values]
        if all(p is not None and not p[1] for p in parts):
            return [n for p in parts for n in p[0]], []  # type: ignore[index]
        return None
    if isinstance(test, ast.BoolOp) and isinstance(test.op, ast.And):
        found = [(i, _compared(v, local)) for i, v in enumerate(test.values)]
        hits = [(i, c) for i, c in found if c is not None]
        if len(hits) == 1:
            i, (names, extra) = hits[0]
            return names, extra + [v for j, v in enumerate(test.values) if j != i]
    return None


def _if_chain(node: ast.If) -> list[tuple[ast.AST | None, list[ast.stmt], ast.If | None]]:
    """if / elif / else as (test, body, the If node); the final else has test None."""
    out: list[tuple[ast.AST | None, list[ast.stmt], ast.If | None]] = []
    cur: ast.If | None = node
    while cur is not None:
        out.append((cur.test, cur.body, cur))
        if len(cur.orelse) == 1 and isinstance(cur.orelse[0], ast.If):
            cur = cur.orelse[0]
        else:
            if cur.orelse:
                out.append((None, cur.orelse, None))
            cur = None
    return out


def _parents(tree: ast.AST) -> dict[ast.AST, ast.AST]:
    return {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}


def _logger_calls(body: list[ast.stmt]) -> list[ast.Call]:
    """logger.info / info_once / warning... calls in these statements, outermost first."""
    calls = [n for stmt in body for n in ast.walk(stmt) if isinstance(n, ast.Call)]
    return [
        c
        for c in calls
        if isinstance(c.func, ast.Attribute) and isinstance(c.func.value, ast.Name) and c.func.value.id == "logger"
    ]


def _message(call: ast.Call) -> str | None:
    """The constant format string a logger call starts with (None for f-strings and the like)."""
    first = call.args[0] if call.args else None
    return first.value if isinstance(first, ast.Constant) and isinstance(first.value, str) else None


def _raises_unknown(body: list[ast.stmt]) -> ast.Raise | None:
    for stmt in body:
        for n in ast.walk(stmt):
            if isinstance(n, ast.Raise) and "Unknown all2all backend" in ast.unparse(n):
                return n
    return None


# ---- the communicator: what is really dispatched ---------------------------------------------------


@dataclass
class _Branch:
    names: list[str]
    when: list[str]
    manager: str
    log: str | None
    line: ast.AST
    deprecated: list[str]


def dispatch(release: Release) -> dict[str, Any]:
    """The communicator's if/elif chain on the backend name: per name, the manager class and its log line."""
    tree = release.need(COMMUNICATOR)
    local = None
    for n in ast.walk(tree):  # 0.10 / 0.11: `all2all_backend = envs.VLLM_ALL2ALL_BACKEND`, then the chain
        if (
            isinstance(n, ast.Assign)
            and ast.unparse(n.value) == f"envs.{ENV_NAME}"
            and isinstance(n.targets[0], ast.Name)
        ):
            local = n.targets[0].id
    parents = _parents(tree)
    heads = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.If)
        and _compared(n.test, local)
        and not (isinstance(parents.get(n), ast.If) and parents[n].orelse == [n])
    ]  # type: ignore[attr-defined]
    heads = [h for h in heads if _raises_unknown(_if_chain(h)[-1][1]) is not None]
    if len(heads) != 1:
        raise FactsError(
            f"{release.name}: {COMMUNICATOR}: expected one if/elif chain on the all2all backend ending in "
            f"'Unknown all2all backend', found {len(heads)}"
        )
    chain = _if_chain(heads[0])
    raise_node = _raises_unknown(chain[-1][1])
    # 0.12+: one log line after the chain, naming the manager's class
    after = _statements_after(parents, heads[0])
    generic = next(
        (m for c in _logger_calls(after) if (m := _message(c)) and "all2all manager" in m and "%s" in m), None
    )
    branches = []
    for test, body, node in chain[:-1]:
        compared = _compared(test, local)  # type: ignore[arg-type]
        assert compared is not None and node is not None
        names, extra = compared
        managers = [
            n
            for stmt in body
            for n in ast.walk(stmt)
            if isinstance(n, ast.Assign)
            and any(isinstance(t, ast.Attribute) and t.attr == "all2all_manager" for t in n.targets)
            and isinstance(n.value, ast.Call)
        ]
        if len(managers) != 1:
            raise FactsError(
                f"{release.name}: {COMMUNICATOR}:{node.lineno}: expected one all2all_manager assignment "
                f"for {names}, found {len(managers)}"
            )
        func = managers[0].value.func  # type: ignore[attr-defined]
        cls = func.id if isinstance(func, ast.Name) else func.attr
        own = next(
            (m for c in _logger_calls(body) if (m := _message(c)) and m.startswith("Using") and "%s" not in m), None
        )
        log = own or (generic.replace("%s", cls) if generic else None)
        branches.append(_Branch(names, [ast.unparse(e) for e in extra], cls, log, node, _deprecated(body, names)))
    defined = _manager_classes(release)
    backends: dict[str, list[dict[str, Any]]] = {}
    for b in branches:
        for name in b.names:
            entry: dict[str, Any] = {"manager": b.manager, "log": b.log, "at": at(COMMUNICATOR, b.line)}
            if b.when:
                entry["when"] = " and ".join(b.when)
            if name in b.deprecated:
                entry["deprecated"] = True
            if b.manager in defined:
                entry["defined_at"] = defined[b.manager]
            backends.setdefault(name, []).append(entry)
    return {"backends": backends, "unknown_raises_at": at(COMMUNICATOR, raise_node)}  # type: ignore[arg-type]


def _statements_after(parents: dict[ast.AST, ast.AST], node: ast.stmt) -> list[ast.stmt]:
    parent = parents.get(node)
    for field in ("body", "orelse", "finalbody"):
        stmts = getattr(parent, field, None)
        if isinstance(stmts, list) and node in stmts:
            return stmts[stmts.index(node) + 1 :]
    return []


def _deprecated(body: list[ast.stmt], names: list[str]) -> list[str]:
    """Names of a shared branch that warn when used: `if backend == "old": logger.warning(...)` or
    `if backend != "new": logger.warning(...)`."""
    if len(names) < 2:
        return []
    out: list[str] = []
    for stmt in body:
        if not (isinstance(stmt, ast.If) and isinstance(stmt.test, ast.Compare) and _is_backend(stmt.test.left)):
            continue
        warns = any(c.func.attr.startswith("warning") for c in _logger_calls(stmt.body))  # type: ignore[attr-defined]
        value = _strings(stmt.test.comparators[0])
        if not warns or value is None:
            continue
        if isinstance(stmt.test.ops[0], ast.Eq | ast.In):
            out += [n for n in names if n in value]
        elif isinstance(stmt.test.ops[0], ast.NotEq | ast.NotIn):
            out += [n for n in names if n not in value]
    return out


def _manager_classes(release: Release) -> dict[str, str]:
    tree = release.tree(MANAGERS)
    if tree is None:
        return {}
    return {n.name: at(MANAGERS, n) for n in tree.body if isinstance(n, ast.ClassDef)}


# ---- the configuration: accepted names, rewrites, default, environment, flag -------------------------


def accepted(release: Release) -> dict[str, Any] | None:
    """The names the config validates: the Literal annotating ParallelConfig.all2all_backend (inline, or the
    All2AllBackend alias), else the choices of VLLM_ALL2ALL_BACKEND; None where any string passes."""
    tree = release.tree(PARALLEL)
    if tree is not None:
        aliases = {ast.unparse(n.targets[0]): n for n in tree.body if isinstance(n, ast.Assign) and len(n.targets) == 1}
        for n in ast.walk(tree):
            if isinstance(n, ast.AnnAssign) and isinstance(n.target, ast.Name) and n.target.id == "all2all_backend":
                annotation: ast.AST = n.annotation
                if isinstance(annotation, ast.Name) and annotation.id in aliases:
                    annotation = aliases[annotation.id].value
                literal = next((x for x in ast.walk(annotation) if _literal(x) is not None), None)
                if literal is None:
                    raise FactsError(
                        f"{release.name}: {PARALLEL}:{n.lineno}: all2all_backend is not typed by a Literal of strings"
                    )
                return {"names": _literal(literal), "at": at(PARALLEL, literal)}
    entry = _env_entry(release)
    if entry is not None:
        call = _env_call(entry)
        if call is not None and len(call.args) >= 3 and (names := _strings(call.args[2])) is not None:
            return {"names": names, "at": at(ENVS, call)}
    return None


def _literal(node: ast.AST) -> list[str] | None:
    if isinstance(node, ast.Subscript) and ast.unparse(node.value).endswith("Literal"):
        inner = node.slice
        return _strings(inner if isinstance(inner, ast.Tuple) else ast.Tuple(elts=[inner]))
    return None


def _env_entry(release: Release) -> ast.AST | None:
    """The value of "VLLM_ALL2ALL_BACKEND" in envs.py's table of variables, if it has one."""
    tree = release.need(ENVS)
    for n in ast.walk(tree):
        if isinstance(n, ast.Dict):
            for k, v in zip(n.keys, n.values, strict=True):
                if isinstance(k, ast.Constant) and k.value == ENV_NAME:
                    return v
    return None


def _env_call(entry: ast.AST) -> ast.Call | None:
    """os.getenv("VLLM_ALL2ALL_BACKEND", default) or env_with_choices("VLLM_ALL2ALL_BACKEND", default, [...])."""
    for n in ast.walk(entry):
        if isinstance(n, ast.Call) and n.args and isinstance(n.args[0], ast.Constant) and n.args[0].value == ENV_NAME:
            return n
    return None


def rewrites(release: Release) -> dict[str, dict[str, str]]:
    """`if self.all2all_backend in [...]: ... self.all2all_backend = "other"` in the config package."""
    out: dict[str, dict[str, str]] = {}
    for rel in release.files("vllm/config"):
        tree = release.need(rel)
        for n in ast.walk(tree):
            if not isinstance(n, ast.If):
                continue
            compared = _compared(n.test)
            if compared is None or compared[1]:
                continue
            targets = [
                s
                for stmt in n.body
                for s in ast.walk(stmt)
                if isinstance(s, ast.Assign)
                and any(_is_backend(t) for t in s.targets)
                and isinstance(s.value, ast.Constant)
            ]
            for assign in targets:
                for name in compared[0]:
                    if name != assign.value.value:  # type: ignore[attr-defined]
                        out[name] = {"to": assign.value.value, "at": at(rel, assign)}  # type: ignore[attr-defined]
    return out


def default(release: Release) -> dict[str, str]:
    """The ParallelConfig field's default, or (field None / absent) the env variable's default."""
    tree = release.tree(PARALLEL)
    if tree is not None:
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.AnnAssign)
                and isinstance(n.target, ast.Name)
                and n.target.id == "all2all_backend"
                and isinstance(n.value, ast.Constant)
                and isinstance(n.value.value, str)
            ):
                return {"name": n.value.value, "at": at(PARALLEL, n)}
    entry = _env_entry(release)
    call = _env_call(entry) if entry is not None else None
    if call is None or len(call.args) < 2 or not isinstance(call.args[1], ast.Constant):
        raise FactsError(
            f"{release.name}: no default all2all backend (expected a constant default in {PARALLEL} "
            f"or for {ENV_NAME} in {ENVS})"
        )
    return {"name": call.args[1].value, "at": at(ENVS, call)}


def env(release: Release) -> dict[str, Any]:
    """Whether VLLM_ALL2ALL_BACKEND decides the backend: where it is assigned to the backend, and under
    which condition (none: it is the only way; `... is None`: when the flag is unset; is_set: over the flag)."""
    entry = _env_entry(release)
    if entry is None:
        return {"read": False}
    uses = []
    for rel in [COMMUNICATOR, *release.files("vllm/config")]:
        tree = release.tree(rel)
        if tree is None:
            continue
        parents = _parents(tree)
        for n in ast.walk(tree):
            if (
                isinstance(n, ast.Assign)
                and ast.unparse(n.value) == f"envs.{ENV_NAME}"
                and any(_is_backend(t) for t in n.targets)
            ):  # decides the backend (not a hash or an assert)
                if_node = parents.get(n)
                test = ast.unparse(if_node.test) if isinstance(if_node, ast.If) else ""
                when = test if "all2all_backend" in test or ENV_NAME in test else None  # a condition on the choice
                uses.append({"at": at(rel, n), **({"when": when} if when else {})})
    return {"read": bool(uses), "defined_at": at(ENVS, entry), "uses": uses}


def flag(release: Release) -> dict[str, Any]:
    """`add_argument("--all2all-backend", ...)` in arg_utils.py, and choices it removes from the Literal."""
    tree = release.need(ARG_UTILS)
    calls = [
        n
        for n in ast.walk(tree)
        if isinstance(n, ast.Call) and any(isinstance(a, ast.Constant) and a.value == FLAG for a in n.args)
    ]
    if not calls:
        return {"exists": False}
    removed = []
    constants = _module_constants(release)
    for n in ast.walk(tree):
        if (
            isinstance(n, ast.Call)
            and isinstance(n.func, ast.Attribute)
            and n.func.attr == "remove"
            and "all2all_backend" in ast.unparse(n.func.value)
            and n.args
        ):
            arg = n.args[0]
            value = arg.value if isinstance(arg, ast.Constant) else constants.get(ast.unparse(arg))
            if not isinstance(value, str):
                raise FactsError(
                    f"{release.name}: {ARG_UTILS}:{n.lineno}: removes {ast.unparse(arg)} from the choices, "
                    f"which is not a string constant of vllm/config"
                )
            removed.append({"name": value, "at": at(ARG_UTILS, n)})
    return {"exists": True, "at": at(ARG_UTILS, calls[0]), **({"removed_choices": removed} if removed else {})}


def _module_constants(release: Release) -> dict[str, Any]:
    out = {}
    for rel in release.files("vllm/config"):
        for n in release.need(rel).body:
            target = (
                n.target
                if isinstance(n, ast.AnnAssign)
                else (n.targets[0] if isinstance(n, ast.Assign) and len(n.targets) == 1 else None)
            )
            if isinstance(target, ast.Name) and isinstance(getattr(n, "value", None), ast.Constant):
                out[target.id] = n.value.value  # type: ignore[union-attr]
    return out


# ---- api_server_count ------------------------------------------------------------------------------


def api_servers(release: Release) -> dict[str, Any]:
    """The flag's default (where `--api-server-count` is added), and serve.py's rule when it is None."""
    found = []
    for rel in [ARG_UTILS, *release.files("vllm/entrypoints", deep=True)]:
        if API_FLAG not in (release.text(rel) or ""):  # the flag moved between modules; parse only the ones naming it
            continue
        for n in ast.walk(release.need(rel)):
            if isinstance(n, ast.Call) and any(isinstance(a, ast.Constant) and a.value == API_FLAG for a in n.args):
                found.append((rel, n))
    if len(found) != 1:
        raise FactsError(f"{release.name}: expected one add_argument('{API_FLAG}', ...), found {len(found)}")
    rel, call = found[0]
    kw = {k.arg: k.value for k in call.keywords}
    if "default" not in kw or not isinstance(kw["default"], ast.Constant):
        raise FactsError(f"{release.name}: {rel}:{call.lineno}: {API_FLAG} has no constant default")
    out: dict[str, Any] = {"flag_default": kw["default"].value, "flag_at": at(rel, call)}
    tree = release.need(SERVE)
    heads = [
        n for n in ast.walk(tree) if isinstance(n, ast.If) and ast.unparse(n.test) == "args.api_server_count is None"
    ]
    if not heads:
        out["internal_lb"] = {"value": str(kw["default"].value), "at": at(rel, call)}
        return out
    if len(heads) != 1:
        raise FactsError(
            f"{release.name}: {SERVE}: expected one 'if args.api_server_count is None', found {len(heads)}"
        )
    rules = []
    inner = [s for s in heads[0].body if isinstance(s, ast.If)]
    if len(inner) != 1:
        raise FactsError(f"{release.name}: {SERVE}:{heads[0].lineno}: expected one if/elif chain choosing the default")
    for test, body, _ in _if_chain(inner[0]):
        assigns = [
            s for s in body if isinstance(s, ast.Assign) and ast.unparse(s.targets[0]) == "args.api_server_count"
        ]
        if len(assigns) != 1:
            raise FactsError(
                f"{release.name}: {SERVE}: a branch of the api_server_count default assigns it {len(assigns)} times"
            )
        rules.append(
            {
                "when": ast.unparse(test) if test is not None else "otherwise",
                "value": ast.unparse(assigns[0].value).removeprefix("args."),
                "at": at(SERVE, assigns[0]),
            }
        )
    out["when_unset"] = rules
    last = rules[-1]
    if last["when"] != "otherwise":
        raise FactsError(f"{release.name}: {SERVE}: the api_server_count default has no final else (internal LB)")
    out["internal_lb"] = {"value": last["value"], "at": last["at"]}
    return out


# ---- EPLB and dual-batch overlap ---------------------------------------------------------------------


def _arguments(release: Release) -> dict[str, dict[str, Any]]:
    """Every `add_argument("--flag", **kwargs["field"])` of arg_utils.py: flag -> the config field and line."""
    out: dict[str, dict[str, Any]] = {}
    for n in ast.walk(release.need(ARG_UTILS)):
        if not (isinstance(n, ast.Call) and isinstance(n.func, ast.Attribute) and n.func.attr == "add_argument"):
            continue
        flags = [a.value for a in n.args if isinstance(a, ast.Constant) and str(a.value).startswith("--")]
        fields = [
            k.value.slice.value
            for k in n.keywords
            if k.arg is None and isinstance(k.value, ast.Subscript) and isinstance(k.value.slice, ast.Constant)
        ]
        if flags:
            out[flags[0]] = {"field": fields[0] if fields else None, "at": at(ARG_UTILS, n)}
    return out


def _eplb_settings(release: Release) -> dict[str, Any] | None:
    """The fields of `class EPLBConfig` (vllm/config/*.py) with their defaults as written, or None."""
    for rel in release.files("vllm/config"):
        for n in release.need(rel).body:
            if isinstance(n, ast.ClassDef) and n.name == "EPLBConfig":
                fields = {}
                for item in n.body:
                    if isinstance(item, ast.AnnAssign) and isinstance(item.target, ast.Name):
                        value = item.value
                        if isinstance(value, ast.Call) and ast.unparse(value.func) == "Field":
                            value = next((k.value for k in value.keywords if k.arg == "default"), None)
                        fields[item.target.id] = {"default": ast.unparse(value) if value is not None else None}
                return {"at": at(rel, n), "fields": fields}
    return None


def eplb(release: Release) -> dict[str, Any]:
    """EPLB's flags: `--enable-eplb`; its settings either as one JSON (`--eplb-config`, the fields of
    EPLBConfig) or as flags of their own (0.10: `--num-redundant-experts`, `--eplb-window-size`, ...; the
    ParallelConfig fields they set are EPLBConfig's names with an `eplb_` prefix)."""
    args = _arguments(release)
    if "--enable-eplb" not in args:
        return {"exists": False}
    row: dict[str, Any] = {"exists": True, "at": args["--enable-eplb"]["at"]}
    if "--eplb-config" in args:
        settings = _eplb_settings(release)
        if settings is None:
            raise FactsError(f"{release.name}: {args['--eplb-config']['at']}: --eplb-config without a class EPLBConfig")
        row["config"] = {"flag_at": args["--eplb-config"]["at"], **settings}
    flags = {}
    for name, arg in args.items():
        field = arg["field"] or ""
        own_flag = name.startswith("--eplb-") or "redundant_experts" in field
        if own_flag and name not in ("--enable-eplb", "--eplb-config"):
            flags[field.removeprefix("eplb_")] = {"flag": name, "at": arg["at"]}
    if flags:
        row["flags"] = flags
    return row


def _string_lists(stmts: list[ast.stmt]) -> list[ast.AST]:
    """Lists / tuples of string constants under ``stmts``, skipping the ROCm side of platform branches."""
    found = []
    for stmt in stmts:
        if isinstance(stmt, ast.If) and "rocm" in ast.unparse(stmt.test).lower():
            found += _string_lists(stmt.orelse)
            continue
        for n in ast.walk(stmt):
            if (
                isinstance(n, (ast.List, ast.Tuple))
                and n.elts
                and all(isinstance(e, ast.Constant) and isinstance(e.value, str) for e in n.elts)
            ):
                found.append(n)
    return found


def dbo(release: Release, backends: set[str]) -> dict[str, Any]:
    """`--enable-dbo`, its threshold flags, and the all2all backends vLLM's config requires for it (the list
    checked under `if ... use_ubatching` / `enable_dbo` in vllm/config/*.py; CUDA's side of a platform branch)."""
    args = _arguments(release)
    if "--enable-dbo" not in args:
        return {"exists": False}
    row: dict[str, Any] = {"exists": True, "at": args["--enable-dbo"]["at"]}
    row["thresholds"] = {
        (a["field"] or "").removeprefix("dbo_"): {"flag": name, "at": a["at"]}
        for name, a in args.items()
        if name.startswith("--dbo-") and name.endswith("-token-threshold")
    }
    for rel in release.files("vllm/config", deep=True):
        for n in ast.walk(release.need(rel)):
            if isinstance(n, ast.If) and re.search(r"use_ubatching|enable_dbo", ast.unparse(n.test)):
                lists = [lst for lst in _string_lists(n.body) if {e.value for e in lst.elts} <= backends]
                if lists:
                    row["backends"] = {"names": [e.value for e in lists[0].elts], "at": at(rel, lists[0])}
                    return row
    raise FactsError(
        f"{release.name}: vllm/config: --enable-dbo exists but no list of the all2all backends it needs was found "
        "(expected one under `if ... use_ubatching` or `enable_dbo`)"
    )


# ---- one row, the table, the doc -----------------------------------------------------------------


def derive(path: Path) -> dict[str, Any]:
    release = Release(path)
    row: dict[str, Any] = {"version": release.version(), "source": release.name}
    row.update(dispatch(release))
    row["accepted"] = accepted(release)
    row["rewrites"] = rewrites(release)
    row["default"] = default(release)
    row["env"] = env(release)
    row["flag"] = flag(release)
    row["api_server_count"] = api_servers(release)
    row["eplb"] = eplb(release)
    row["dbo"] = dbo(release, set(row["backends"]))
    return row


def _vkey(version: str) -> tuple[int, ...]:
    return tuple(int(p) for p in re.findall(r"\d+", version))


def load(path: Path = TABLE) -> list[dict[str, Any]]:
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise FactsError(f"{path}: cannot read the facts table ({exc})") from None
    rows = data.get("releases") if isinstance(data, dict) else None
    if not isinstance(rows, list) or not all(isinstance(r, dict) and "version" in r for r in rows):
        raise FactsError(f"{path}: releases: expected a list of rows with a version each")
    return sorted(rows, key=lambda r: _vkey(r["version"]))


def dump(rows: list[dict[str, Any]], path: Path = TABLE) -> None:
    doc = {
        "about": "What each vLLM release accepts, read from its wheel by `python -m launch.vllm_facts` "
        "(see docs/vllm-versions.md). Do not edit by hand: re-run the tool.",
        "releases": sorted(rows, key=lambda r: _vkey(r["version"])),
    }
    path.write_text(_format(doc) + "\n")


def _format(value: Any, depth: int = 0) -> str:
    """JSON with one line per fact: objects and lists are opened up to the depth of a backend's entries."""
    pad = " " * (depth + 1)
    if isinstance(value, dict) and value and (depth < 3 or (depth < 4 and len(json.dumps(value)) > 110)):
        items = [f"{pad}{json.dumps(k)}: {_format(v, depth + 1)}" for k, v in value.items()]
        return "{\n" + ",\n".join(items) + "\n" + " " * depth + "}"
    if depth < 2 and isinstance(value, list) and value:
        return "[\n" + ",\n".join(pad + _format(v, depth + 1) for v in value) + "\n" + " " * depth + "]"
    return json.dumps(value, ensure_ascii=False)


def comparable(row: dict[str, Any]) -> dict[str, Any]:
    """A row without the name of the wheel or folder it was read from (a --target tree names itself)."""
    return {k: v for k, v in row.items() if k != "source"}


def markdown(rows: list[dict[str, Any]]) -> str:
    lines = [
        "# vLLM versions: what each release accepts",
        "",
        "Generated by `python -m launch.vllm_facts --markdown` from `launch/vllm_facts.json`; do not edit by hand.",
        "Every fact below was read in the release's own wheel (its Python sources, parsed, nothing installed);",
        "the table holds the file and line of each. The launcher plans with the row of the target version",
        "(a version between rows takes the nearest older row; one newer than the newest takes the newest, with a note).",
        "",
        "## How to add or re-read a release",
        "",
        "```sh",
        "pip download vllm==0.34.0 --no-deps --only-binary=:all: -d wheels   # several hundred MB",
        "python -m launch.vllm_facts wheels/vllm-0.34.0-*.whl --update          # merges the row, rewrites this page",
        "rm wheels/vllm-0.34.0-*.whl",
        "```",
        "",
        "A folder works as well as a wheel (`pip install --no-deps --target DIR vllm==X`). CI re-derives the rows",
        "of the releases whose parsers it installs (tests/test_vllm_facts.py) and fails on any difference.",
        "",
        "## Backends, flag and environment",
        "",
        "Dispatched: the names the CUDA communicator builds a manager for (any other raises `Unknown all2all",
        "backend`). Rewritten: names the configuration replaces by another before the communicator sees them.",
        "",
        "| vLLM | dispatched | rewritten | default | `--all2all-backend` | `VLLM_ALL2ALL_BACKEND` | API servers (internal LB, unset) |",
        "|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        names = sorted(r["backends"])
        if r["accepted"] is not None:
            names = [n for n in names if n in r["accepted"]["names"]] + [
                f"~~{n}~~" for n in names if n not in r["accepted"]["names"]
            ]
        removed = {c["name"] for c in r["flag"].get("removed_choices", [])}
        flag_text = "yes" + (f" (not {', '.join(sorted(removed))})" if removed else "") if r["flag"]["exists"] else "no"
        env_text = "no"
        if r["env"]["read"]:
            whens = [u.get("when") for u in r["env"]["uses"]]
            env_text = (
                "over the flag"
                if any(w and "is_set" in w for w in whens)
                else ("if the flag is unset" if any(w and "is None" in w for w in whens) else "yes (the only way)")
            )
        rw = ", ".join(f"{k} → {v['to']}" for k, v in sorted(r["rewrites"].items())) or "-"
        lines.append(
            f"| {r['version']} | {', '.join(names)} | {rw} | {r['default']['name']} | {flag_text} | {env_text} "
            f"| {r['api_server_count']['internal_lb']['value']} |"
        )
    if any("~~" in line for line in lines):
        lines += ["", "~~struck~~: dispatched by the communicator but not accepted by that release's configuration."]
    lines += [
        "",
        "## Manager names `launch verify` matches",
        "",
        "The line vLLM logs once the backend is built, per backend, and the releases that log it.",
        "",
        "| backend | logged | releases |",
        "|---|---|---|",
    ]
    seen: dict[tuple[str, str], list[int]] = {}
    for i, r in enumerate(rows):
        for name, entries in r["backends"].items():
            for e in entries:
                seen.setdefault((name, e["log"] or e["manager"]), []).append(i)
    for (name, log), indexes in sorted(seen.items()):
        lines.append(f"| {name} | `{log}` | {_spans([rows[i]['version'] for i in indexes], indexes)} |")
    lines += [
        "",
        "## How the launcher uses this table",
        "",
        "- `all2all_backend` is checked against the target's row: a name the release does not dispatch, or its",
        "  configuration does not accept, is refused in one line naming the releases that have it. ROCm's `mori*`",
        "  backends are left out (the toolkit plans for NVIDIA GPUs).",
        "- A name the release's configuration silently replaces (the rewritten column), or one its communicator",
        "  marks deprecated beside a current name for the same manager (`flashinfer_all2allv` from 0.18), is",
        "  planned as what it becomes, and the plan prints a note with the line.",
        "- Releases with `--all2all-backend` get the flag; older ones get `VLLM_ALL2ALL_BACKEND`. Where the",
        '  variable\'s column says "over the flag", an exported `VLLM_ALL2ALL_BACKEND` wins over the flag.',
        "- `launch verify` recognises every manager line above; with the version found in the logs it expects the",
        "  manager that release builds for the backend asked for (or for its default when none was asked).",
        "",
        "## API servers: the toolkit's rule",
        "",
        "All API servers of a data parallel deployment run on the primary. When `--api-server-count` is not given,",
        "vLLM before 0.15 starts one; from 0.15 on, in internal load balancing (the primary of this toolkit's layout:",
        "no `--data-parallel-start-rank`, secondaries `--headless`), it starts `data_parallel_size`, one per engine of",
        "the whole cluster (the column above; the rule is in vllm/entrypoints/cli/serve.py).",
        "",
        "The toolkit passes `--api-server-count` always, so the plan shows the number. Unless the deploy file sets",
        "`api_server_count` (or the guide's `API_SERVERS` argument gives it), the number is the primary's local data",
        "parallel size: one front-end process per engine on the node that runs them all. vLLM's own default since",
        "0.15 grows the primary's front-end processes with the number of nodes (64 on 8 nodes of 8 GPUs), on a host",
        "whose CPUs also drive its own engines; the default of 1 before 0.15 funnels a multi-node group through one",
        "front end. Local DP is the guide's choice and gives every version the same argv. The plan says which rule",
        "it used and what the target vLLM would start on its own, for example:",
        "",
        "```",
        "# note: api servers: 8, the primary's local data parallel size (the toolkit's rule, docs/vllm-versions.md);",
        "#       vLLM 0.26.0 alone would start 16 (data_parallel_size when --api-server-count is unset,",
        "#       vllm/entrypoints/cli/serve.py:117)",
        "```",
        "",
        "Set `api_server_count` in the deploy file to follow vLLM's default or any other number.",
    ]
    lines += [
        "",
        "## EPLB and dual-batch overlap",
        "",
        "How each release takes the deploy file's `eplb:` settings (one `--eplb-config` JSON holding the fields of",
        "its EPLBConfig, or flags of their own) and `dbo:` (`--enable-dbo`, its token thresholds, and the all2all",
        "backends its configuration requires).",
        "",
        "| vLLM | EPLB settings | DBO | DBO needs |",
        "|---|---|---|---|",
    ]
    for r in rows:
        e, d = r.get("eplb", {"exists": False}), r.get("dbo", {"exists": False})
        if not e["exists"]:
            eplb_text = "no"
        elif "config" in e:
            eplb_text = "`--eplb-config`: " + ", ".join(e["config"]["fields"])
        else:
            eplb_text = ", ".join(f"`{f['flag']}`" for f in e.get("flags", {}).values())
        dbo_text = ("yes, " + ", ".join(f"`{t['flag']}`" for t in d["thresholds"].values())) if d["exists"] else "no"
        needs = ", ".join(d["backends"]["names"]) if d["exists"] else "-"
        lines.append(f"| {r['version']} | {eplb_text} | {dbo_text} | {needs} |")
    lines += ["", "## Sources", "", "| vLLM | read from |", "|---|---|"]
    lines += [f"| {r['version']} | {r['source']} |" for r in rows]
    return "\n".join(lines) + "\n"


def _spans(versions: list[str], indexes: list[int]) -> str:
    """Consecutive rows as 'first .. last', gaps as separate spans."""
    runs: list[list[str]] = []
    for k, (v, i) in enumerate(zip(versions, indexes, strict=True)):
        if k and i == indexes[k - 1] + 1:
            runs[-1].append(v)
        else:
            runs.append([v])
    return ", ".join(run[0] if len(run) == 1 else f"{run[0]} .. {run[-1]}" for run in runs)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m launch.vllm_facts", description=__doc__.split("\n\n")[0])
    parser.add_argument("paths", nargs="*", type=Path, help="vLLM wheels or folders holding vllm/")
    parser.add_argument("--update", action="store_true", help="merge the rows into the table and regenerate the doc")
    parser.add_argument("--markdown", action="store_true", help="regenerate the doc from the table")
    parser.add_argument("--table", type=Path, default=TABLE, help="the facts table (default: %(default)s)")
    parser.add_argument("--doc", type=Path, default=DOC, help="its markdown rendering (default: %(default)s)")
    args = parser.parse_args(argv)
    try:
        rows = [derive(p) for p in args.paths]
        if args.update:
            known = {r["version"]: r for r in (load(args.table) if args.table.exists() else [])}
            known.update({r["version"]: r for r in rows})
            dump(list(known.values()), args.table)
        if args.update or args.markdown:
            args.doc.write_text(markdown(load(args.table)))
        elif rows:
            print(json.dumps(rows, indent=1))
        else:
            parser.error("nothing to do: give wheels or folders, or --markdown")
    except FactsError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
