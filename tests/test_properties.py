"""Random deploy files never crash the launcher: each is either planned for every node or refused with
a ConfigError (which the command line prints as one line)."""

from __future__ import annotations

from hypothesis import HealthCheck, given, settings, strategies as st

from env.paths import StackPaths
from launch import plan as planning
from launch.config import ConfigError, parse_deploy
from launch.layout import layouts
from launch.vllm_versions import BACKENDS, resolve_target
from tests.conftest import ROOT

scalars = st.one_of(st.none(), st.booleans(), st.integers(-5, 70000), st.text(max_size=12), st.floats(allow_nan=True))
values = st.recursive(
    scalars,
    lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(max_size=8), inner, max_size=3),
    max_leaves=6,
)
addresses = st.sampled_from(["10.0.0.1", "10.0.0.2", "10.0.0.3", "node-a", "", "fe80::1", "a b"])
nodes = st.lists(
    st.fixed_dictionaries(
        {"address": addresses},
        optional={
            "gpus": st.one_of(st.integers(-1, 17), values),
            "data_parallel_size_local": st.integers(0, 9),
            "socket_ifname": st.sampled_from(["eth0", "auto"]),
            "env": st.dictionaries(st.sampled_from(["A", "B-C", "HF_TOKEN"]), st.text(max_size=4)),
        },
    ),
    max_size=4,
)
deploys = st.fixed_dictionaries(
    {},
    optional={
        "model": st.one_of(st.just("org/model"), values),
        "nodes": st.one_of(nodes, values),
        "tensor_parallel_size": st.integers(0, 4),
        "data_parallel_size": st.integers(0, 40),
        "api_server_count": st.integers(0, 9),
        "rpc_port": st.integers(0, 70000),
        "port": st.integers(0, 70000),
        "all2all_backend": st.sampled_from([b.name for b in BACKENDS] + ["bogus"]),
        "vllm_version": st.sampled_from(["0.10.1.1", "0.26.0", "0.33.0", "x.y"]),
        "network": st.fixed_dictionaries(
            {},
            optional={
                "transport": st.sampled_from(["ib", "roce", "efa", "tcp", "ethernet"]),
                "nccl": st.dictionaries(st.sampled_from(["NCCL_A", "B"]), st.text(max_size=3)),
                "efa": st.dictionaries(st.sampled_from(["FI_A"]), st.text(max_size=3)),
            },
        ),
        "bogus_key": values,
    },
)


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(deploys)
def test_any_deploy_file_is_planned_or_refused_in_one_line(data):
    try:
        config = parse_deploy(data, "deploy.yaml")
        target = resolve_target(None, config.vllm_version)
        if config.all2all_backend:
            target.check_backend(config.all2all_backend)
        plans = [planning.build(config, lay, target, StackPaths(prefix=ROOT)) for lay in layouts(config)]
    except ConfigError as exc:  # the file, or the backend x transport matrix (launch/matrix.py)
        assert "\n" not in str(exc)
        return
    assert sum(p.layout.data_parallel_size_local for p in plans) == plans[0].layout.data_parallel_size
    assert [p.layout.role for p in plans] == ["primary"] + ["secondary"] * (len(plans) - 1)
