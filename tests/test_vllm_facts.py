"""The facts table (launch/vllm_facts.json) is what the wheels say, and the launcher plans from it.

- The releases CI installs (EP_VLLM_PARSERS: vllm-0.10.1.1, vllm-0.26.0, vllm-0.33.0 from
  tests/vllm/install-parsers.sh) are read again and must give the committed rows exactly.
- The reader itself runs on small source files shaped like each generation of vLLM's code.
- vllm_versions answers from the table: what a release accepts, what it rewrites, between and past rows.
"""

from __future__ import annotations

import os
import shutil
import textwrap
import zipfile
from pathlib import Path

import pytest
from packaging.version import Version

from launch import vllm_facts
from launch.config import ConfigError
from launch.layout import NodeLayout, api_server_note
from launch.vllm_versions import BACKENDS, Target
from tests.conftest import ROOT, run_module

PARSERS = Path(os.environ.get("EP_VLLM_PARSERS", ROOT / ".cache" / "vllm-parsers"))
CI_RELEASES = ["0.10.1.1", "0.26.0", "0.33.0"]


def committed(version: str) -> dict:
    (row,) = [r for r in vllm_facts.load() if r["version"] == version]
    return row


# ---- the committed table against the real releases ---------------------------------------------------


@pytest.mark.vllm
@pytest.mark.parametrize("version", CI_RELEASES)
def test_committed_row_is_what_the_installed_release_says(version):
    folder = PARSERS / f"vllm-{version}"
    if not (folder / ".installed").exists():
        if os.environ.get("EP_REQUIRE_VLLM") == "1":
            pytest.fail(f"vLLM {version} is not installed in {PARSERS} (bash tests/vllm/install-parsers.sh)")
        pytest.skip(f"vLLM {version} is not installed (bash tests/vllm/install-parsers.sh)")
    assert vllm_facts.comparable(vllm_facts.derive(folder)) == vllm_facts.comparable(committed(version))


def test_the_table_covers_every_minor_release_and_the_pinned_ones():
    from env.pins import PROFILES

    versions = [Version(r["version"]) for r in vllm_facts.load()]
    assert {str(p.vllm) for p in PROFILES.values()} <= {str(v) for v in versions}
    minors = {(v.major, v.minor) for v in versions}
    assert minors >= {(0, m) for m in range(10, versions[-1].minor + 1)}
    assert all(r["source"].endswith(".whl") for r in vllm_facts.load())  # read from the published wheels


def test_the_doc_is_the_rendering_of_the_table():
    assert vllm_facts.DOC.read_text() == vllm_facts.markdown(vllm_facts.load()), (
        "run: python -m launch.vllm_facts --markdown"
    )


# ---- the reader, on sources shaped like each generation ---------------------------------------------

OLD_COMMUNICATOR = """
    class CudaCommunicator:
        def __init__(self):
            if self.use_all2all:
                all2all_backend = envs.VLLM_ALL2ALL_BACKEND
                if all2all_backend == "naive":
                    self.all2all_manager = NaiveAll2AllManager(self.cpu_group)
                    logger.info("Using naive all2all manager.")
                elif all2all_backend == "pplx":
                    self.all2all_manager = PPLXAll2AllManager(self.cpu_group)
                    logger.info("Using PPLX all2all manager.")
                else:
                    raise ValueError(f"Unknown all2all backend: {all2all_backend}")
"""
NEW_COMMUNICATOR = """
    class CudaCommunicator:
        def __init__(self):
            if self.use_all2all:
                if self.all2all_backend in ("naive", "allgather_reducescatter"):
                    self.all2all_manager = AgRsAll2AllManager(self.cpu_group)
                elif self.all2all_backend == "mori" and self._v2():
                    self.all2all_manager = MoriEPv2All2AllManager(self.cpu_group)
                elif self.all2all_backend == "old_name" or self.all2all_backend == "new_name":
                    if self.all2all_backend == "old_name":
                        logger.warning_once("'old_name' is deprecated")
                    self.all2all_manager = NewManager(self.cpu_group)
                else:
                    raise ValueError(f"Unknown all2all backend: {self.all2all_backend}")
                logger.info_once("Using %s all2all manager.", self.all2all_manager.__class__.__name__)
"""
MINIMAL = {
    vllm_facts.ENVS: """environment_variables = {"VLLM_HOST_IP": lambda: os.getenv("VLLM_HOST_IP", "")}""",
    vllm_facts.PARALLEL: """class ParallelConfig:\n    all2all_backend: Literal["allgather_reducescatter"] = "allgather_reducescatter"\n""",
    vllm_facts.ARG_UTILS: "",
    vllm_facts.SERVE: "",
    "vllm/entrypoints/openai/cli_args.py": """parser.add_argument("--api-server-count", "-asc", type=int, default=1)""",
    vllm_facts.MANAGERS: "class AgRsAll2AllManager(Base):\n    pass\n",
}


def make_release(tmp_path: Path, files: dict[str, str], version: str = "9.9.9") -> vllm_facts.Release:
    """A folder laid out like an installed release, holding only the given sources."""
    root = tmp_path / f"vllm-{version}"
    for rel, text in {**MINIMAL, **files}.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_text(textwrap.dedent(text).lstrip("\n"))
    meta = root / f"vllm-{version}.dist-info" / "METADATA"
    meta.parent.mkdir(parents=True, exist_ok=True)
    meta.write_text(f"Metadata-Version: 2.1\nName: vllm\nVersion: {version}\n")
    return vllm_facts.Release(root)


def test_old_communicator_logs_its_own_words_per_backend(tmp_path):
    found = vllm_facts.dispatch(make_release(tmp_path, {vllm_facts.COMMUNICATOR: OLD_COMMUNICATOR}))
    assert {name: [e["log"] for e in entries] for name, entries in found["backends"].items()} == {
        "naive": ["Using naive all2all manager."],
        "pplx": ["Using PPLX all2all manager."],
    }
    assert found["unknown_raises_at"] == f"{vllm_facts.COMMUNICATOR}:12"


def test_new_communicator_logs_the_class_and_shares_branches(tmp_path):
    found = vllm_facts.dispatch(make_release(tmp_path, {vllm_facts.COMMUNICATOR: NEW_COMMUNICATOR}))["backends"]
    assert (
        found["naive"]
        == found["allgather_reducescatter"]
        == [
            {
                "manager": "AgRsAll2AllManager",
                "log": "Using AgRsAll2AllManager all2all manager.",
                "at": f"{vllm_facts.COMMUNICATOR}:4",
                "defined_at": f"{vllm_facts.MANAGERS}:1",
            }
        ]
    )
    assert found["mori"][0]["when"] == "self._v2()"
    assert found["old_name"][0]["deprecated"] is True and "deprecated" not in found["new_name"][0]


@pytest.mark.parametrize(
    "source, expected",
    [
        ("if self.all2all_backend == 'x':\n    self.m = M()\n", "found 0"),  # no 'Unknown all2all backend' else
        (
            "if self.all2all_backend == 'x':\n    pass\nelse:\n    raise ValueError('Unknown all2all backend')\n",
            "expected one all2all_manager assignment for ['x'], found 0",
        ),
    ],
)
def test_an_unrecognised_communicator_is_an_error_not_a_guess(tmp_path, source, expected):
    with pytest.raises(vllm_facts.FactsError, match=expected.replace("[", r"\[").replace("]", r"\]")):
        vllm_facts.dispatch(make_release(tmp_path, {vllm_facts.COMMUNICATOR: source}))


@pytest.mark.parametrize(
    "parallel, envs, expected",
    [
        # 0.10: any string goes to the communicator; the variable's default
        (
            "",
            """environment_variables = {"VLLM_ALL2ALL_BACKEND": lambda: os.getenv("VLLM_ALL2ALL_BACKEND", "naive")}""",
            (None, "naive"),
        ),
        # 0.11: the variable validates its choices
        (
            "",
            """environment_variables = {"VLLM_ALL2ALL_BACKEND": env_with_choices("VLLM_ALL2ALL_BACKEND", "agrs", ["agrs", "pplx"])}""",
            (["agrs", "pplx"], "agrs"),
        ),
        # 0.11.1 - 0.13: the config's field, typed inline, defaults to None: the variable's default applies
        (
            """class ParallelConfig:\n    all2all_backend: Literal["pplx", "agrs"] | None = None\n""",
            """environment_variables = {"VLLM_ALL2ALL_BACKEND": env_with_choices("VLLM_ALL2ALL_BACKEND", "agrs", ["agrs"])}""",
            (["pplx", "agrs"], "agrs"),
        ),
        # 0.14 on: the config's Literal and its field's default
        (
            """All2AllBackend = Literal["pplx", "agrs"]\nclass ParallelConfig:\n    all2all_backend: All2AllBackend = "agrs"\n""",
            MINIMAL[vllm_facts.ENVS],
            (["pplx", "agrs"], "agrs"),
        ),
    ],
)
def test_accepted_names_and_default(tmp_path, parallel, envs, expected):
    release = make_release(tmp_path, {vllm_facts.PARALLEL: parallel, vllm_facts.ENVS: envs})
    accepted = vllm_facts.accepted(release)
    assert ((accepted or {}).get("names"), vllm_facts.default(release)["name"]) == expected


@pytest.mark.parametrize(
    "parallel, expected",
    [
        (
            """if self.all2all_backend in ["pplx", "naive"]:\n    logger.warning("removed")\n    self.all2all_backend = "agrs"\n""",
            {"pplx": "agrs", "naive": "agrs"},
        ),
        ("""if self.all2all_backend == "pplx":\n    self.all2all_backend = "agrs"\n""", {"pplx": "agrs"}),
        # a rewrite under another condition is not a silent rewrite of the name
        ("""if self.all2all_backend == "pplx" and flag:\n    self.all2all_backend = "agrs"\n""", {}),
        ("""if moe in SELF_COMMUNICATING:\n    parallel_config.all2all_backend = PASSTHROUGH\n""", {}),
    ],
)
def test_rewrites(tmp_path, parallel, expected):
    found = vllm_facts.rewrites(make_release(tmp_path, {vllm_facts.PARALLEL: parallel}))
    assert {k: v["to"] for k, v in found.items()} == expected


@pytest.mark.parametrize(
    "where, source, expected",
    [
        (vllm_facts.COMMUNICATOR, "all2all_backend = envs.VLLM_ALL2ALL_BACKEND\n", [None]),  # the only way
        (
            vllm_facts.PARALLEL,
            "if self.all2all_backend is None:\n    self.all2all_backend = envs.VLLM_ALL2ALL_BACKEND\n",
            ["self.all2all_backend is None"],
        ),  # when the flag is unset
        (
            vllm_facts.PARALLEL,
            "if envs.is_set('VLLM_ALL2ALL_BACKEND'):\n    self.all2all_backend = envs.VLLM_ALL2ALL_BACKEND\n",
            ["envs.is_set('VLLM_ALL2ALL_BACKEND')"],
        ),  # over the flag
        (vllm_facts.PARALLEL, "factors.append(envs.VLLM_ALL2ALL_BACKEND)\n", []),  # a hash factor decides nothing
    ],
)
def test_when_the_environment_variable_decides(tmp_path, where, source, expected):
    envs = """environment_variables = {"VLLM_ALL2ALL_BACKEND": lambda: os.getenv("VLLM_ALL2ALL_BACKEND", "naive")}"""
    found = vllm_facts.env(make_release(tmp_path, {vllm_facts.ENVS: envs, where: source}))
    assert found["read"] == bool(expected)
    assert [u.get("when") for u in found["uses"]] == expected


def test_flag_and_the_choices_it_leaves_out(tmp_path):
    release = make_release(
        tmp_path,
        {
            "vllm/config/kernel.py": "PASSTHROUGH: Final = 'passthrough'\n",
            vllm_facts.ARG_UTILS: """kw["all2all_backend"]["choices"].remove(PASSTHROUGH)\ngroup.add_argument("--all2all-backend", **kw["all2all_backend"])\n""",
        },
    )
    assert vllm_facts.flag(release) == {
        "exists": True,
        "at": f"{vllm_facts.ARG_UTILS}:2",
        "removed_choices": [{"name": "passthrough", "at": f"{vllm_facts.ARG_UTILS}:1"}],
    }
    assert vllm_facts.flag(make_release(tmp_path / "old", {})) == {"exists": False}


SERVE_DEFAULTS = """
    def cmd(args):
        if args.api_server_count is None:
            if is_external_lb:
                args.api_server_count = 1
            elif is_hybrid_lb:
                args.api_server_count = args.data_parallel_size_local or 1
            else:
                args.api_server_count = args.data_parallel_size
"""


@pytest.mark.parametrize(
    "files, internal_lb",
    [
        ({}, "1"),  # the flag's own default
        (
            {
                "vllm/entrypoints/openai/cli_args.py": """parser.add_argument("--api-server-count", type=int, default=None)""",
                vllm_facts.SERVE: SERVE_DEFAULTS,
            },
            "data_parallel_size",
        ),
    ],
)
def test_api_server_default(tmp_path, files, internal_lb):
    assert vllm_facts.api_servers(make_release(tmp_path, files))["internal_lb"]["value"] == internal_lb


def test_a_wheel_reads_like_its_folder(tmp_path):
    folder = make_release(tmp_path, {vllm_facts.COMMUNICATOR: NEW_COMMUNICATOR}).path
    wheel = tmp_path / "vllm-9.9.9-cp38-abi3-manylinux_2_28_x86_64.whl"
    with zipfile.ZipFile(wheel, "w") as z:
        for file in folder.rglob("*"):
            if file.is_file():
                z.write(file, file.relative_to(folder).as_posix())
    from_wheel, from_folder = vllm_facts.derive(wheel), vllm_facts.derive(folder)
    assert from_wheel["source"] == wheel.name and from_wheel["version"] == "9.9.9"
    assert vllm_facts.comparable(from_wheel) == vllm_facts.comparable(from_folder)


def test_the_command_line_names_what_it_cannot_read(tmp_path):
    (tmp_path / "empty").mkdir()
    res = run_module("launch.vllm_facts", str(tmp_path / "empty"))
    assert (
        res.code == 2
        and res.err.strip()
        == f"error: {tmp_path / 'empty'}: no vllm/ package inside (expected a wheel or a folder holding vllm/)"
    )


def test_update_merges_a_row_into_a_table(tmp_path):
    release = make_release(tmp_path, {vllm_facts.COMMUNICATOR: NEW_COMMUNICATOR}, version="99.0.0")
    table = tmp_path / "facts.json"
    shutil.copy(vllm_facts.TABLE, table)
    doc = tmp_path / "versions.md"
    assert vllm_facts.main([str(release.path), "--update", "--table", str(table), "--doc", str(doc)]) == 0
    rows = vllm_facts.load(table)
    assert rows[-1]["version"] == "99.0.0" and rows[:-1] == vllm_facts.load()
    assert "| 99.0.0 | allgather_reducescatter, " in doc.read_text()


# ---- vllm_versions plans from the table ---------------------------------------------------------------


def target(version: str) -> Target:
    return Target(Version(version), "given")


@pytest.mark.parametrize(
    "version, backend, used",
    [
        ("0.10.1.1", "pplx", "pplx"),
        ("0.16.0", "pplx", "pplx"),  # the last release whose communicator still builds the PPLX manager
        ("0.17.0", "pplx", "allgather_reducescatter"),  # from here its config replaces it
        ("0.33.0", "naive", "allgather_reducescatter"),
        ("0.33.0", "moonep", "moonep"),
        ("0.18.0", "nixl_ep", "nixl_ep"),
        ("0.18.0", "flashinfer_nvlink_two_sided", "flashinfer_nvlink_two_sided"),
        ("0.18.0", "flashinfer_nvlink_one_sided", "flashinfer_nvlink_one_sided"),
        ("0.24.0", "deepep_v2", "deepep_v2"),
        ("0.17.0", "flashinfer_all2allv", "flashinfer_all2allv"),
        ("0.26.0", "flashinfer_all2allv", "flashinfer_nvlink_two_sided"),  # a deprecated alias of the same manager
    ],
)
def test_accepted_backends_plan_as_what_vllm_builds(version, backend, used):
    assert target(version).check_backend(backend) == used
    choice = target(version).choose_backend(backend)
    assert (choice.note is None) == (used == backend)


@pytest.mark.parametrize(
    "version, backend, message",
    [
        (
            "0.10.1.1",
            "allgather_reducescatter",
            "'allgather_reducescatter' needs vLLM >= 0.11.0, the target is 0.10.1.1",
        ),
        ("0.17.0", "nixl_ep", "'nixl_ep' needs vLLM >= 0.18.0"),
        ("0.17.0", "flashinfer_nvlink_one_sided", "'flashinfer_nvlink_one_sided' needs vLLM >= 0.18.0"),
        ("0.26.0", "moonep", "'moonep' needs vLLM >= 0.31.0"),
        ("0.33.0", "mori_low_latency", "'mori_low_latency' is ROCm's"),
        ("0.33.0", "passthrough", "'passthrough' is not a choice of --all2all-backend in vLLM 0.33.0"),
        ("0.33.0", "deepep_fast", "unknown backend 'deepep_fast'"),
    ],
)
def test_refused_backends_name_the_reason(version, backend, message):
    with pytest.raises(ConfigError, match="all2all_backend: ") as err:
        target(version).check_backend(backend)
    assert message in str(err.value) and "expected one of:" in str(err.value)


def test_a_rewrite_is_noted_with_its_source_line():
    note = target("0.26.0").choose_backend("pplx").note
    assert note == (
        "all2all backend 'pplx': vLLM 0.26.0 replaces it with 'allgather_reducescatter' "
        f"({committed('0.26.0')['rewrites']['pplx']['at']}); planned as allgather_reducescatter"
    )


@pytest.mark.parametrize(
    "version, flag, env",
    [
        ("0.10.1.1", False, True),
        ("0.11.0", False, True),
        ("0.11.1", True, True),
        ("0.15.1", True, True),
        ("0.16.0", True, False),
        ("0.34.0", True, False),
    ],
)
def test_flag_and_environment_variable_by_version(version, flag, env):
    assert (target(version).all2all_as_flag, target(version).reads_all2all_env) == (flag, env)


def test_versions_between_and_past_the_rows():
    assert target("0.20.1").row["version"] == "0.20.0"
    assert (
        target("0.20.1").describe()
        == "vLLM 0.20.1 (given; planned with the facts of 0.20.0, the nearest older release read)"
    )
    newest = vllm_facts.load()[-1]["version"]
    assert target("9.0.0").row["version"] == newest
    assert f"newer than the newest release read ({newest})" in target("9.0.0").describe()
    with pytest.raises(
        ConfigError, match=r"--vllm-version: 0.9.2 is older than the oldest release the toolkit has read \(0.10.1.1"
    ):
        target("0.9.2").backends()


def test_backends_list_spans_from_the_table():
    spans = {b.name: (str(b.since), b.removed) for b in BACKENDS}
    assert spans["nixl_ep"] == ("0.18.0", None) and spans["moonep"] == ("0.31.0", None)
    assert spans["allgather_reducescatter"] == ("0.11.0", None) and spans["pplx"] == ("0.10.1.1", None)
    assert not any(name.startswith("mori") for name in spans)


# ---- API servers ------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "version, rule, expected",
    [
        (
            "0.10.1.1",
            "the primary's local data parallel size",
            "api servers: 8, the primary's local data parallel size (the toolkit's rule, docs/vllm-versions.md); "
            "vLLM 0.10.1.1 alone would start 1 (1 when --api-server-count is unset, {at})",
        ),
        (
            "0.26.0",
            "the primary's local data parallel size",
            "api servers: 8, the primary's local data parallel size (the toolkit's rule, docs/vllm-versions.md); "
            "vLLM 0.26.0 alone would start 16 (data_parallel_size when --api-server-count is unset, {at})",
        ),
        (
            "0.33.0",
            "given",
            "api servers: 8, as given; vLLM 0.33.0 alone would start 16 "
            "(data_parallel_size when --api-server-count is unset, {at})",
        ),
    ],
)
def test_the_plan_says_which_api_server_rule_it_used(version, rule, expected):
    primary = NodeLayout("primary", 0, "10.0.0.1", 13345, 16, 8, 0, 8, "10.0.0.1", api_server_rule=rule)
    at = committed(version)["api_server_count"]["internal_lb"]["at"]
    assert api_server_note(primary, target(version)) == expected.format(at=at)
    secondary = NodeLayout("secondary", 1, "10.0.0.1", 13345, 16, 8, 8, None, "10.0.0.2")
    assert api_server_note(secondary, target(version)) is None


def test_vllm_015_defaults_to_the_whole_dp_size_in_internal_lb_mode():
    rules = {r["version"]: r["api_server_count"]["internal_lb"]["value"] for r in vllm_facts.load()}
    assert {v for v, value in rules.items() if value == "1"} == {v for v in rules if Version(v) < Version("0.15.0")}
    assert {value for v, value in rules.items() if Version(v) >= Version("0.15.0")} == {"data_parallel_size"}
