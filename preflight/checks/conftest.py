"""Facts several check modules read, once per session."""

from __future__ import annotations

import pytest

from preflight import gpu, imports

NVML_TIMEOUT_S = 30.0  # reading NVML takes well under a second; longer means a GPU or the driver hangs
LIBRARY_TIMEOUT_S = 120.0  # `import torch` on a network file system, then two dlopen()s


@pytest.fixture(scope="session")
def gpus() -> gpu.NodeGpus | str:
    """NVML's view of this node's GPUs, or why it cannot be had."""
    return gpu.read_bounded(gpu.Pynvml, NVML_TIMEOUT_S)


@pytest.fixture(scope="session")
def libraries(node) -> dict[str, imports.Library] | str:
    """The NCCL and NVSHMEM libraries a process with the plan's environment loads after `import torch`."""
    return imports.libraries(node.env(), LIBRARY_TIMEOUT_S)
