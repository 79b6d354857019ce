"""The `vllm serve` flags the launcher sets itself, and the one parse of extra vLLM arguments.

Extra arguments reach vLLM from two places: after ``--`` on the command line and the deploy file's
``vllm_args``. Both go through :func:`split` once, so a flag the launcher owns is never doubled (vLLM
would take the last one while the launcher polls, plans and checks the first):

- a flag that has a deploy-file field is *taken* (after ``--``: into the plan, as the named option would
  be; in ``vllm_args``: refused, naming the field to use instead);
- a flag the launcher derives (ranks, sizes, coordinator, headless, KV transfer) is *refused*, naming
  where its value comes from.

Flag names and short forms are vLLM's own: vllm/engine/arg_utils.py (0.33.0: -tp line 1209, -dp 1241,
-dpn 1245, -dpr 1254, -dpl 1260, -dpa 1266, -dpp 1272, -dpb 1279, -ep 1306, --all2all-backend 1318,
--kv-transfer-config 1881) and vllm/entrypoints/common/cli_args.py (0.33.0: --headless line 445,
--api-server-count / -asc 452). vLLM's FlexibleArgumentParser accepts ``_`` for ``-`` in long names
(vllm/utils/argparse_utils.py:375), so ``--tensor_parallel_size`` is the same flag.
"""

from __future__ import annotations

from dataclasses import dataclass

from launch.errors import ConfigError


@dataclass(frozen=True)
class Owned:
    field: str
    """The deploy-file field (for taken flags), or where the value comes from (for refused ones)."""
    takes_value: bool = True
    taken: bool = True


# Flags with a deploy-file field: after `--` they become that field's value.
TAKEN: dict[str, Owned] = {
    "--port": Owned("port"),
    "--host": Owned("host"),
    "--tensor-parallel-size": Owned("tensor_parallel_size"),
    "--all2all-backend": Owned("all2all_backend"),
    "--api-server-count": Owned("api_server_count"),
    "--trust-remote-code": Owned("trust_remote_code", takes_value=False),
    "--enable-expert-parallel": Owned("enable_expert_parallel", takes_value=False),
}
# Flags the launcher derives from the node list, roles and groups: never given by hand.
REFUSED: dict[str, Owned] = {
    "--data-parallel-size": Owned("the nodes' gpus / data_parallel_size_local", taken=False),
    "--data-parallel-size-local": Owned("nodes[N].data_parallel_size_local", taken=False),
    "--data-parallel-start-rank": Owned("the node order (start ranks are the running sum of local sizes)", taken=False),
    "--data-parallel-rank": Owned("the node order (the launcher runs internal load balancing)", taken=False),
    "--data-parallel-address": Owned("nodes[0].address", taken=False),
    "--data-parallel-rpc-port": Owned("rpc_port", taken=False),
    "--data-parallel-backend": Owned("data_parallel_backend", taken=False),
    "--headless": Owned("the node's role (every node but the primary runs headless)", takes_value=False, taken=False),
    "--kv-transfer-config": Owned("disaggregation.connector", taken=False),
    # EPLB and dual-batch overlap have deploy-file sections, planned into each release's own flags
    # (launch/eplb_dbo.py): given here as well, vLLM would see them twice or in the wrong release's form.
    **{
        flag: Owned("the deploy file's eplb: section", takes_value=flag != "--enable-eplb", taken=False)
        for flag in (
            "--enable-eplb",
            "--eplb-config",
            "--num-redundant-experts",
            "--eplb-window-size",
            "--eplb-step-interval",
            "--eplb-log-balancedness",
        )
    },  # fmt: skip
    **{
        flag: Owned("the deploy file's dbo: section", takes_value=flag != "--enable-dbo", taken=False)
        for flag in ("--enable-dbo", "--dbo-decode-token-threshold", "--dbo-prefill-token-threshold")
    },
}
SHORT = {"-tp": "--tensor-parallel-size", "-dp": "--data-parallel-size", "-dpn": "--data-parallel-rank",
         "-dpr": "--data-parallel-start-rank", "-dpl": "--data-parallel-size-local", "-dpa": "--data-parallel-address",
         "-dpp": "--data-parallel-rpc-port", "-dpb": "--data-parallel-backend", "-ep": "--enable-expert-parallel",
         "-asc": "--api-server-count"}  # fmt: skip


def _canonical(word: str) -> tuple[str, str | None]:
    """(long flag name, inline value) for a word that is a flag; ('', None) otherwise."""
    if not word.startswith("-") or word == "-" or word[1:2].isdigit():
        return "", None
    name, eq, value = word.partition("=")
    name = SHORT.get(name, name)
    if name.startswith("--"):
        name = "--" + name[2:].replace("_", "-")
    return name, (value if eq else None)


def _owner(name: str) -> tuple[Owned | None, bool]:
    """Who owns a flag, and whether it is the ``--no-`` form of an on/off flag (vLLM's boolean fields take
    both: argparse.BooleanOptionalAction in vllm/engine/arg_utils.py, 0.33.0)."""
    owned = TAKEN.get(name) or REFUSED.get(name)
    if owned is None and name.startswith("--no-"):
        positive = TAKEN.get("--" + name[5:]) or REFUSED.get("--" + name[5:])
        if positive is not None and not positive.takes_value:
            return positive, True
    return owned, False


def split(words: list[str], where: str) -> tuple[dict[str, str | bool], list[str]]:
    """Splits extra vLLM arguments into (deploy-file field -> value, the rest in order).

    Raises ConfigError naming ``where`` (``--`` or ``FILE: vllm_args``) for a flag the launcher derives,
    a taken flag given twice, or a taken flag without its value."""
    taken: dict[str, str | bool] = {}
    rest: list[str] = []
    i = 0
    while i < len(words):
        word = words[i]
        name, inline = _canonical(word)
        owned, negated = _owner(name)
        if owned is None:
            rest.append(word)
            i += 1
            continue
        if not owned.taken:
            raise ConfigError(
                f"{where}: {word.split('=')[0]}: set by the launcher (expected it from {owned.field}; leave it out)"
            )
        if owned.takes_value:
            value = inline
            if value is None:
                if i + 1 >= len(words) or _canonical(words[i + 1])[0]:
                    raise ConfigError(f"{where}: {word}: missing its value (expected {word} VALUE)")
                value = words[i + 1]
                i += 1
        else:
            value = not negated
        if owned.field in taken and taken[owned.field] != value:
            raise ConfigError(f"{where}: {name}: given twice ({taken[owned.field]} and {value}; expected once)")
        taken[owned.field] = value
        i += 1
    return taken, rest


# Secret-bearing flags and the variable vLLM reads the same value from: given there, a secret stays out of
# process listings, printed plans and rendered commands (the variable's name marks it secret everywhere).
# --api-key: `args.api_key or [envs.VLLM_API_KEY]` (vllm/entrypoints/openai/api_server.py, 0.10.1.1 line
# 1531, 0.26.0 line 307; 0.33.0: vllm/entrypoints/serve/middleware/register.py line 33).
# --hf-token: vLLM passes hf_token=None on to huggingface_hub, which then reads HF_TOKEN.
SECRET_FLAGS = {"--api-key": "VLLM_API_KEY", "--hf-token": "HF_TOKEN"}


def secrets_to_env(words: list[str], where: str) -> tuple[dict[str, str], list[str]]:
    """Takes each secret flag's value out of ``words`` into its variable: (variables, the rest in order).
    ``--hf-token`` alone (use the stored token) stays. Errors name the flag, never the value."""
    env: dict[str, str] = {}
    rest: list[str] = []
    i = 0
    while i < len(words):
        name, inline = _canonical(words[i])
        variable = SECRET_FLAGS.get(name)
        if variable is None:
            rest.append(words[i])
            i += 1
            continue
        values = [inline] if inline is not None else []
        j = i + 1
        while inline is None and j < len(words) and not _canonical(words[j])[0]:
            values.append(words[j])  # vLLM's --api-key takes one or more keys
            j += 1
        if not values and name == "--hf-token":
            rest.append(words[i])
        elif len(values) != 1 or variable in env:
            raise ConfigError(
                f"{where}: {name}: expected one value (the launcher gives it to vLLM as {variable}, "
                "out of process listings; one key only)"
            )
        else:
            env[variable] = values[0]
        i = j
    return env, rest
