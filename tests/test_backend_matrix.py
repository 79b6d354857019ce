"""The backend x transport x version matrix (launch/matrix.py) as users meet it: `python -m launch plan FILE`
refuses what cannot run with one line naming what works instead (exit 2), plans what can, and warns where
vLLM's defaults would surprise."""

from __future__ import annotations

import pytest

from env.pins import PROFILES
from launch.matrix import DEEPEP_V2_MIN_NCCL, GIN_ON_EFA_MIN_NCCL, nccl_reaches
from tests.support import wheel_text

TWO_NODES = "nodes: [{address: 10.0.0.1, gpus: 8}, {address: 10.0.0.2, gpus: 8}]\n"
ONE_NODE = "nodes: [{address: 10.0.0.1, gpus: 8}]\n"


def deploy(backend: str, transport: str, version: str, nodes: str = TWO_NODES, extra: str = "") -> str:
    return (
        f"model: deepseek-ai/DeepSeek-V3-0324\nvllm_version: {version}\n{nodes}all2all_backend: {backend}\n"
        f"network: {{transport: {transport}}}\n{extra}"
    )


REFUSED = {
    "DeepEP low-latency across nodes on EFA": (
        deploy("deepep_low_latency", "efa", "0.26.0"),
        "all2all_backend: deepep_low_latency cannot run across nodes on efa: DeepEP v1 drives InfiniBand / RoCE NICs "
        "from the GPU (NVSHMEM IBGDA) (expected allgather_reducescatter or deepep_v2 (NCCL GIN through aws-ofi-nccl "
        ">= 1.21) on efa; DeepEP needs transport ib or roce)",
    ),
    "DeepEP high-throughput across nodes on TCP": (
        deploy("deepep_high_throughput", "tcp", "0.33.0"),
        "deepep_high_throughput cannot run across nodes on tcp: DeepEP v1 drives InfiniBand / RoCE NICs from the GPU "
        "(NVSHMEM IBGDA) (expected allgather_reducescatter on tcp",
    ),
    "DeepEP v2 across nodes on TCP": (
        deploy("deepep_v2", "tcp", "0.33.0"),
        "all2all_backend: deepep_v2 cannot run across nodes on tcp: NCCL GIN needs NVIDIA InfiniBand / RoCE NICs or "
        "EFA's net plugin (expected allgather_reducescatter on tcp; deepep_v2 needs transport ib, roce or efa)",
    ),
    "DeepEP v2 with NVSHMEM IBGDA settings": (
        deploy("deepep_v2", "ib", "0.33.0", extra="env: {NVSHMEM_IB_ENABLE_IBGDA: '1'}\n"),
        "env.NVSHMEM_IB_ENABLE_IBGDA: deepep_v2 runs on NCCL GIN, not NVSHMEM (expected no NVSHMEM IBGDA settings with deepep_v2",
    ),
    "pplx across nodes on TCP": (
        deploy("pplx", "tcp", "0.10.1.1"),
        "all2all_backend: pplx cannot run across nodes on tcp: pplx-kernels reach other nodes over IBGDA, IBRC or EFA only",
    ),
}


@pytest.mark.parametrize("text, message", REFUSED.values(), ids=REFUSED.keys())
def test_what_cannot_run_is_refused_in_one_line_naming_what_works(launch, write_yaml, text, message):
    res = launch("plan", str(write_yaml(text)))
    assert res.code == 2 and res.out == ""
    assert res.err.count("\n") == 1 and res.err.startswith("error: ") and message in res.err, res.err


def test_the_named_alternative_is_one_the_target_version_has(launch, write_yaml):
    """For the guide's vLLM the alternative comes from that version's own backends (launch.vllm_versions)."""
    from packaging.version import Version

    from launch.vllm_versions import Target

    res = launch("plan", str(write_yaml(deploy("deepep_low_latency", "efa", "0.10.1.1"))))
    assert res.code == 2
    named = res.err.split("(expected ", 1)[1].split(" on efa")[0]
    have = Target(Version("0.10.1.1"), "given").backends()
    assert all(part.split(" ")[0] in have for part in named.split(" or ")), (named, have)


ALLOWED = {
    "DeepEP within one node on EFA (NVLink)": deploy("deepep_low_latency", "efa", "0.33.0", ONE_NODE),
    "DeepEP within one node on TCP (NVLink)": deploy("deepep_high_throughput", "tcp", "0.26.0", ONE_NODE),
    "DeepEP across nodes on RoCE": deploy("deepep_high_throughput", "roce", "0.33.0"),
    "DeepEP v2 across nodes on InfiniBand": deploy("deepep_v2", "ib", "0.33.0"),
    "pplx across nodes on EFA": deploy("pplx", "efa", "0.10.1.1"),
    "allgather_reducescatter across nodes on TCP": deploy("allgather_reducescatter", "tcp", "0.26.0"),
}


@pytest.mark.parametrize("text", ALLOWED.values(), ids=ALLOWED.keys())
def test_what_can_run_is_planned(launch, write_yaml, text):
    res = launch("plan", str(write_yaml(text)))
    assert res.code == 0, res.err


def warnings(launch, path, *passthrough):
    """The plan's warnings; arguments after `--` go to vLLM, so they are planned through `serve --dry-run`."""
    res = (
        launch("serve", "--deploy", str(path), "--node-rank", "0", "--socket-ifname", "lo", "--dry-run", *passthrough)
        if passthrough
        else launch("plan", str(path))
    )
    assert res.code == 0, res.err
    return [line for line in res.out.splitlines() if line.startswith("# warning:")]


def test_low_latency_without_a_prefill_decode_split_warns_about_256_token_chunks(launch, write_yaml):
    path = write_yaml(deploy("deepep_low_latency", "ib", "0.33.0"))
    found = warnings(launch, path)
    assert len(found) == 2  # once per node
    assert found[0] == (
        "# warning: deepep_low_latency without a prefill/decode split: vLLM 0.33.0 then defaults max_num_batched_tokens "
        "to 256, so long prompts prefill in 256-token chunks (for prefill and decode on the same engines use deepep_v2; "
        "or split them with disaggregation; or pass --max-num-batched-tokens)"
    )


@pytest.mark.parametrize(
    "why_not, text, extra",
    [
        (
            "the user chose the token budget",
            deploy("deepep_low_latency", "ib", "0.33.0", extra="vllm_args: [--max-num-batched-tokens, '8192']\n"),
            (),
        ),
        ("given after --", deploy("deepep_low_latency", "ib", "0.33.0"), ("--", "--max-num-batched-tokens=8192")),
        ("vLLM 0.19.1 and older have no such default", deploy("deepep_low_latency", "ib", "0.10.1.1"), ()),
        ("a high-throughput backend", deploy("deepep_high_throughput", "ib", "0.33.0"), ()),
    ],
)
def test_no_warning_where_the_256_default_does_not_apply(launch, write_yaml, why_not, text, extra):
    assert warnings(launch, write_yaml(text), *extra) == [], why_not


def test_decode_group_of_a_split_deployment_plans_low_latency_without_warning(launch):
    assert warnings(launch, "docs/examples/pd-2p2d.yaml") == []


def test_every_example_follows_the_matrix(launch):
    from tests.conftest import EXAMPLES

    for path in sorted(EXAMPLES.glob("*.yaml")):
        fmt = ("--format", "k8s") if "k8s" in path.name else ("--format", "slurm") if "slurm" in path.name else ()
        res = launch("plan", str(path), *fmt)
        assert res.code == 0, (path.name, res.err)
        warned = {line for line in res.out.splitlines() if line.startswith("# warning:")}
        # the guide's own file keeps the guide's NCCL_BUFFSIZE, which aws-ofi-nccl's cheatsheet advises against
        expected = {GUIDE_BUFFSIZE} if path.name == "guide-2node.yaml" else set()
        assert warned == expected, path.name


GUIDE_BUFFSIZE = (
    "# warning: network.nccl.NCCL_BUFFSIZE on EFA: best left out: the default is recommended "
    "(aws-ofi-nccl doc/efa-env-var.md)"
)


def test_preflight_refuses_the_same_deployment(write_yaml, tmp_path):
    from tests.conftest import run_module

    res = run_module(
        "preflight",
        "--deploy",
        str(write_yaml(deploy("deepep_low_latency", "tcp", "0.26.0"))),
        "--node-rank",
        "0",
        "-p",
        "no:cacheprovider",
        cwd=tmp_path,
    )
    assert res.code != 0
    assert "deepep_low_latency cannot run across nodes on tcp" in res.out + res.err


def test_deepep_v2_across_efa_nodes_is_planned_with_what_nccl_gin_needs_there(launch, write_yaml):
    """aws-ofi-nccl 1.21 brings NCCL GIN to EFA (doc/gin-getting-started.md); vLLM only refuses GIN type 0."""
    res = launch("plan", str(write_yaml(deploy("deepep_v2", "efa", "0.33.0"))))
    assert res.code == 0, res.err
    assert (
        "deepep_v2 across EFA nodes runs on NCCL GIN through the net plugin: needs NCCL >= 2.31.2, "
        "aws-ofi-nccl >= 1.21.0 and GDRCopy >= 2.5 (libgdrapi and gdrdrv) on every node"
    ) in res.out
    assert "NVSHMEM_REMOTE_TRANSPORT" not in res.out  # GIN, not NVSHMEM over libfabric (pplx's way on EFA)


def test_deepep_v2_on_efa_needs_the_newer_nccl_a_profile_may_not_bring(launch, write_yaml, monkeypatch):
    monkeypatch.setenv("EP_STACK_PROFILE", "vllm026")
    res = launch("plan", str(write_yaml(deploy("deepep_v2", "efa", "0.26.0"))))
    assert res.code == 2 and res.err.startswith(
        "error: all2all_backend: deepep_v2 needs NCCL >= 2.31.2 where torch loads it, the stack profile vllm026 for "
        "vLLM 0.26.0 pins NCCL ==2.28.9"
    )


def test_stack_profiles_pin_the_nccl_they_bring():
    """The plan-time half of deepep_v2's NCCL requirement reads the profile's pin (env/pins.py)."""
    assert not nccl_reaches(PROFILES["seed"], DEEPEP_V2_MIN_NCCL)  # conda's nccl 2.27.7.*
    assert not nccl_reaches(PROFILES["vllm026"], DEEPEP_V2_MIN_NCCL)  # torch 2.11.0's 2.28.9
    assert nccl_reaches(PROFILES["current"], DEEPEP_V2_MIN_NCCL)  # >=2.30.4
    assert nccl_reaches(PROFILES["current"], GIN_ON_EFA_MIN_NCCL)  # and the newer NCCL GIN on EFA needs


def test_the_guides_positional_arguments_count_as_several_nodes():
    """`serve-secondary NODE1_IP RPC_PORT MODEL 16 8 8` describes this node only; DP 16 > 8 local means other nodes."""
    from launch.cli import get_args_parser
    from launch.config import ConfigError
    from launch.request import from_args
    from launch.resolve import resolve

    args = get_args_parser().parse_args(
        [
            "secondary",
            "10.1.59.30",
            "13345",
            "m",
            "16",
            "8",
            "8",
            "--vllm-version",
            "0.26.0",
            "--transport",
            "efa",
            "--all2all-backend",
            "deepep_low_latency",
        ]
    )
    with pytest.raises(ConfigError, match="cannot run across nodes on efa"):
        resolve(from_args(args, []))
    args = get_args_parser().parse_args(
        [
            "primary",
            "10.1.59.30",
            "13345",
            "m",
            "8",
            "8",
            "8",
            "--vllm-version",
            "0.26.0",
            "--transport",
            "efa",
            "--all2all-backend",
            "deepep_low_latency",
        ]
    )
    (plan,) = resolve(from_args(args, [])).plans  # all 8 ranks on this node: NVLink
    assert plan.argv[plan.argv.index("--all2all-backend") + 1] == "deepep_low_latency"


# ---- the version facts the matrix uses, re-read in the installed wheels (tests/vllm/install-parsers.sh)


@pytest.mark.parametrize("version", ["0.26.0", "0.33.0"])
def test_low_latency_backends_and_the_256_default_are_the_wheels(version):
    import re

    from launch.matrix import LOW_LATENCY

    parallel = wheel_text(version, "vllm/config/parallel.py")
    body = parallel.split("def use_batched_dp_moe", 1)[1].split("def ", 1)[0]
    assert set(re.findall(r'"(\w+)"', body)) == set(LOW_LATENCY)
    assert "DEFAULT_MAX_NUM_BATCHED_TOKENS_FOR_BATCHED_DP: ClassVar[int] = 256" in wheel_text(
        version, "vllm/config/scheduler.py"
    )
    assert "use_batched_dp_moe" in wheel_text(version, "vllm/engine/arg_utils.py")


def test_the_guides_vllm_has_no_256_default():
    assert "use_batched_dp_moe" not in wheel_text("0.10.1.1", "vllm/engine/arg_utils.py")


@pytest.mark.parametrize("version", ["0.26.0", "0.33.0"])
def test_deepep_v2_nccl_floor_is_the_wheels(version):
    text = wheel_text(version, "vllm/utils/import_utils.py")
    raw = DEEPEP_V2_MIN_NCCL.major * 10000 + DEEPEP_V2_MIN_NCCL.minor * 100 + DEEPEP_V2_MIN_NCCL.micro
    assert f"DEEPEP_V2_MIN_NCCL_VERSION_RAW = {raw}" in text
