"""vllm-router in front of a disaggregated deployment: its command line from the deploy file."""

from __future__ import annotations

from launch.config import DeployConfig


def api_url(group: DeployConfig) -> str:
    host = group.host if group.host not in (None, "", "0.0.0.0", "::") else group.nodes[0].address
    return f"http://{host}:{group.port}"


def address(config: DeployConfig) -> str:
    d = config.disaggregation
    assert d is not None
    return d.router.address or d.prefill.nodes[0].address


def argv(config: DeployConfig) -> list[str]:
    """vllm-router in its prefill/decode mode: prefill's and decode's API, the policy, where it listens (its API
    and its Prometheus endpoint: vllm-router --help, --prometheus-host / --prometheus-port, 0.1.17)."""
    d = config.disaggregation
    assert d is not None
    prefill, decode = config.group("prefill"), config.group("decode")
    metrics = ["--prometheus-host", d.router.host, "--prometheus-port", str(d.router.metrics_port)]
    return [
        "vllm-router",
        "--vllm-pd-disaggregation",
        "--prefill",
        api_url(prefill),
        "--decode",
        api_url(decode),
        "--host",
        d.router.host,
        "--port",
        str(d.router.port),
        "--policy",
        d.router.policy,
        *(metrics if d.router.metrics_port is not None else []),
    ]


def health_urls(config: DeployConfig) -> dict[str, str]:
    return {name: api_url(config.group(name)) + "/health" for name in ("prefill", "decode")}
