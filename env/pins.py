"""The stack's pins, by profile: the one place versions and commits are written down.

`seed` is exactly the stack of the multi-node EP guide this toolkit grew out of; `current` is the newest
vLLM release with the EP kernels it is tested with. pixi.toml repeats some of these (pixi cannot read
Python); a test keeps the two in agreement.
"""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Profile:
    name: str
    vllm: str
    torch: str
    python: str
    description: str


PROFILES: dict[str, Profile] = {
    "seed": Profile(
        name="seed",
        vllm="0.10.1.1",
        torch="2.7.1",
        python="3.12",
        description="the guide's stack: vLLM 0.10.1.1, NVSHMEM 3.3.9, DeepEP c18eabd, pplx-kernels 12cecfd, DeepGEMM ea9c5d9",
    ),
    "current": Profile(
        name="current",
        vllm="0.33.0",
        torch="2.14.0",
        python="3.12",
        description="the newest vLLM release and the EP kernels it is tested with",
    ),
}

DEFAULT_PROFILE = "current"
PINNED_VLLM = PROFILES[DEFAULT_PROFILE].vllm
