"""Facts several check modules read, once per session."""

from __future__ import annotations

import pytest

from preflight import gpu

NVML_TIMEOUT_S = 30.0  # reading NVML takes well under a second; longer means a GPU or the driver hangs


@pytest.fixture(scope="session")
def gpus() -> gpu.NodeGpus | str:
    """NVML's view of this node's GPUs, or why it cannot be had."""
    return gpu.read_bounded(gpu.Pynvml, NVML_TIMEOUT_S)
