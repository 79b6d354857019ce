"""Collective benchmark in nccl-tests' layout, through the same workers as the preflight checks.

    python -m preflight bench [--backend gloo|nccl] [--nprocs N] [--sizes 1M 16M 1G] [--iters N]
                              [--warmup N] [--timeout S] [--collectives all_reduce all_to_all]
                              [--deploy FILE [--node-rank N]] [--json FILE]

Runs all-reduce and all-to-all between this machine's GPUs (nccl, one process per GPU) or CPU processes
(gloo), first checking every element, then timing each size, and prints:

- a ``#`` header echoing the versions and the configuration, one identity line per rank;
- per collective, a fixed-width table: size (B), count (elements), type, redop, time (us), algbw (GB/s),
  busbw (GB/s), #wrong; then ``# Out of bounds values`` and ``# Avg bus bandwidth`` as nccl-tests does;
- footer lines ``# name : value OK|FAILED|UNCHECKED`` (UNCHECKED: no minimum known for this hardware),
  and exits 1 when one FAILED.

Minimums: the deploy file's ``preflight: intra_*_busbw_min_gbps`` (with --deploy), else the GPU model's
(H100/H200/B200 NVLink), else none. With --deploy the workers get the environment that node's plan sets.
``--json FILE`` writes the same figures and verdicts (true, false or "unchecked") as versioned JSON.
"""

from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from launch.argtypes import seconds
from preflight import collectives
from preflight.collectives import Result, Row, size_label

JSON_VERSION = 1
COLUMNS = ("size", "count", "type", "redop", "time", "algbw", "busbw", "#wrong")
UNITS = ("(B)", "(elements)", "", "", "(us)", "(GB/s)", "(GB/s)", "")
WIDTHS = (12, 12, 8, 6, 10, 8, 8, 7)
ECHOED_ENV = ("NCCL_", "GLOO_", "TORCH_NCCL_", "CUDA_VISIBLE_DEVICES", "TORCH_SYMM_MEM_", "NVSHMEM_DISABLE_NVLS")
"""Variables that change what a collective does; echoed in the header, as nccl-tests echoes its flags."""


@dataclass(frozen=True)
class Verdict:
    name: str
    value: str
    ok: bool | None  # None: unchecked (no minimum)

    @property
    def word(self) -> str:
        return "UNCHECKED" if self.ok is None else "OK" if self.ok else "FAILED"


def _cell(values: Sequence[str]) -> str:
    return " ".join(f"{v:>{w}}" for v, w in zip(values, WIDTHS, strict=True))


def table_lines(rows: Sequence[Row]) -> list[str]:
    """The fixed-width table of one collective, with the units row; parse with :func:`parse_table`."""
    out = ["#" + _cell(COLUMNS)[1:], ("#" + _cell(UNITS)[1:]).rstrip()]
    for r in rows:
        redop = "sum" if r.collective == "all_reduce" else "none"
        out.append(
            _cell(
                (
                    str(r.size),
                    str(r.count),
                    r.dtype,
                    redop,
                    f"{r.time_us:.1f}",
                    f"{r.algbw:.3f}",
                    f"{r.busbw:.3f}",
                    str(r.wrong),
                )
            )
        )
    return out


def parse_table(lines: Sequence[str]) -> list[dict]:
    """Rows of every table in bench output (lines not starting with ``#``), as dicts of numbers."""
    rows = []
    for line in lines:
        if line.startswith("#") or not line.strip():
            continue
        size, count, dtype, redop, time_us, algbw, busbw, wrong = line.split()
        rows.append(
            {
                "size": int(size),
                "count": int(count),
                "type": dtype,
                "redop": redop,
                "time_us": float(time_us),
                "algbw": float(algbw),
                "busbw": float(busbw),
                "wrong": int(wrong),
            }
        )
    return rows


def identity_lines(result: Result) -> list[str]:
    return [
        f"#  Rank {i.rank:2d} Pid {i.pid:7d} on {i.host:>12} device {i.device:>7} [{i.pci}] {i.name}"
        for i in result.ranks
    ]


def verdicts(result: Result, minimums: Mapping[str, tuple[float | None, str]]) -> list[Verdict]:
    """What the footer says: per collective, exact results, then busbw at the largest size vs its minimum."""
    if not result.ok:
        return [Verdict(result.collective or "run", result.problem, False)]
    out = []
    for collective in dict.fromkeys(r.collective for r in result.rows):
        out.append(
            Verdict(f"{collective} wrong elements", str(result.wrong(collective)), result.wrong(collective) == 0)
        )
        row = result.largest(collective)
        minimum, why = minimums.get(collective, (None, "no minimum"))
        shown = f"{row.busbw:.3f} GB/s" + (f" (>= {minimum:g}, {why})" if minimum is not None else f" ({why})")
        out.append(
            Verdict(
                f"{collective} busbw at {size_label(row.size)}",
                shown,
                None if minimum is None else row.busbw >= minimum,
            )
        )
    return out


def header_lines(config: Mapping[str, object]) -> list[str]:
    width = max(len(k) for k in config)
    return [
        "# preflight bench: collectives through torch.distributed, in nccl-tests' layout",
        "#",
        *(f"# {k:<{width}} : {v}" for k, v in config.items()),
    ]


def body_lines(result: Result, checks: Sequence[Verdict]) -> list[str]:
    out = ["#", "# Using devices", *identity_lines(result)]
    for collective in dict.fromkeys(r.collective for r in result.rows):
        rows = result.of(collective)
        out += [
            "#",
            f"# Collective: {collective}" + (" (redop sum)" if collective == "all_reduce" else ""),
            "#",
            *table_lines(rows),
        ]
        wrong = result.wrong(collective)
        out.append(f"# Out of bounds values : {wrong} {'OK' if wrong == 0 else 'FAILED'}")
        out.append(f"# Avg bus bandwidth    : {sum(r.busbw for r in rows) / len(rows):.3f}")
    width = max([len(v.name) for v in checks] + [4])
    out += ["#", *(f"# {v.name:<{width}} : {v.value} {v.word}" for v in checks)]
    return out


def to_json(config: Mapping[str, object], result: Result, checks: Sequence[Verdict]) -> str:
    return json.dumps(
        {
            "version": JSON_VERSION,
            "kind": "preflight-bench",
            "config": dict(config),
            "result": result.to_dict(),
            "checks": [
                {"name": v.name, "value": v.value, "verdict": "unchecked" if v.ok is None else v.ok} for v in checks
            ],
        },
        indent=2,
    )


# --- command line -----------------------------------------------------------------------------------


def get_args_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m preflight bench", description=__doc__.split("\n\n")[1].strip())
    # what runs
    parser.add_argument(
        "--backend",
        choices=collectives.BACKENDS,
        default=None,
        help="default: nccl when CUDA GPUs are visible, else gloo",
    )
    parser.add_argument("--nprocs", type=int, default=None, help="processes (default: every visible GPU; gloo: 2)")
    parser.add_argument(
        "--collectives", nargs="+", choices=collectives.COLLECTIVES, default=list(collectives.COLLECTIVES)
    )
    # how
    parser.add_argument(
        "--sizes",
        nargs="+",
        type=_size,
        default=None,
        help="buffer sizes per rank, e.g. 64K 1M 1G (default: 1M..1G x4 on nccl, 64K..16M x4 on gloo)",
    )
    parser.add_argument("--iters", type=int, default=20, help="timed iterations per size (default 20)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed iterations per size before timing (default 5)")
    parser.add_argument(
        "--timeout", type=seconds, default=None, help="seconds for the whole run (default: collective_timeout_s, 60)"
    )
    # where the limits and the environment come from
    parser.add_argument(
        "--deploy", default=None, help="deploy file: thresholds (preflight:) and this node's environment"
    )
    parser.add_argument(
        "--node-rank", type=int, default=None, help="this node's rank in --deploy (default: from its addresses)"
    )
    parser.add_argument("--json", default=None, help="also write the figures and verdicts here, as JSON")
    return parser


def _size(text: str) -> int:
    try:
        return collectives.parse_size(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


@dataclass(frozen=True)
class BenchConfig:
    spec: collectives.Spec
    env: dict[str, str]
    overrides: dict[str, float]  # deploy-file minimums, by collective


def config_from_args(args: argparse.Namespace, visible: int) -> BenchConfig:
    """Arguments to what runs; ValueError (one line) for what cannot."""
    env, overrides, timeout = dict(os.environ), {}, 60.0
    if args.deploy:
        from launch.config import ConfigError
        from preflight import context

        try:
            node = context.build(args.deploy, args.node_rank, None, None)
        except ConfigError as exc:
            raise ValueError(str(exc)) from None
        env, timeout = node.env(), node.thresholds.get("collective_timeout_s")
        for collective, name in (
            ("all_reduce", "intra_allreduce_busbw_min_gbps"),
            ("all_to_all", "intra_alltoall_busbw_min_gbps"),
        ):
            if name in node.thresholds.overridden:
                overrides[collective] = node.thresholds.get(name)
    backend = args.backend or ("nccl" if visible else "gloo")
    nprocs = args.nprocs or (visible if backend == "nccl" else 2)
    if backend == "nccl" and visible == 0:
        raise ValueError("--backend nccl: no CUDA GPUs here (use --backend gloo to run on CPU)")
    if backend == "nccl" and nprocs > visible:
        raise ValueError(f"--nprocs {nprocs}: only {visible} CUDA GPUs visible")
    if nprocs < 2:
        raise ValueError(f"--nprocs {nprocs}: a collective needs at least 2 processes")
    if args.iters < 1 or args.warmup < 0:
        raise ValueError(f"--iters {args.iters} / --warmup {args.warmup}: expected iters >= 1 and warmup >= 0")
    sizes = tuple(args.sizes) if args.sizes else (collectives.GPU_SIZES if backend == "nccl" else collectives.CPU_SIZES)
    spec = collectives.Spec(
        backend,
        nprocs,
        sizes,
        tuple(args.collectives),
        warmup=args.warmup,
        iters=args.iters,  # type: ignore[arg-type]
        timeout_s=args.timeout or timeout,
    )
    return BenchConfig(spec, env, overrides)


def _versions() -> dict[str, str]:
    import torch

    nccl = "-"
    if torch.version.cuda:
        try:
            v = torch.cuda.nccl.version()
            nccl = ".".join(map(str, v)) if isinstance(v, tuple) else str(v)
        except Exception:  # CUDA build without a loadable NCCL
            nccl = "not loadable"
    return {"torch": torch.__version__, "cuda": torch.version.cuda or "-", "nccl": nccl}


def main(argv: list[str] | None = None) -> int:
    parser = get_args_parser()
    args = parser.parse_args(argv)
    try:
        bench = config_from_args(args, collectives.cuda_devices())
    except ValueError as exc:
        parser.error(str(exc))
    spec = bench.spec
    env = bench.env
    # NCCL_VERSION is a container image's label, not the NCCL that loads (that one is in the header).
    shown_env = (
        " ".join(f"{k}={v}" for k, v in sorted(env.items()) if k.startswith(ECHOED_ENV) and k != "NCCL_VERSION") or "-"
    )
    config: dict[str, object] = {
        "host": socket.gethostname(),
        **_versions(),
        "backend": spec.backend,
        "processes": spec.nprocs,
        "collectives": " ".join(spec.collectives),
        "sizes": f"{size_label(min(spec.sizes))} .. {size_label(max(spec.sizes))} ({len(spec.sizes)} sizes)",
        "iterations": f"warmup {spec.warmup}, timed {spec.iters} per size",
        "timeout": f"{spec.timeout_s:g} s",
        "interface": collectives.interface_in_use(
            spec.backend,
            env if spec.backend == "nccl" or env.get("GLOO_SOCKET_IFNAME") else {"GLOO_SOCKET_IFNAME": "lo"},
        ),
        "environment": shown_env,
        "deploy": args.deploy or "-",
    }
    for line in header_lines(config):
        print(line, flush=True)
    result = collectives.run(spec, env)
    minimums: dict[str, tuple[float | None, str]] = {}
    for collective in spec.collectives:
        if collective in bench.overrides:
            minimums[collective] = (bench.overrides[collective], "deploy file")
        else:
            minimums[collective] = collectives.nvlink_minimum(collective, result.gpu_names())
    checks = verdicts(result, minimums)
    for line in body_lines(result, checks):
        print(line)
    if args.json:
        Path(args.json).write_text(to_json(config, result, checks) + "\n")
        print(f"# JSON: {args.json}")
    return 0 if all(v.ok is not False for v in checks) else 1


if __name__ == "__main__":
    sys.exit(main())
