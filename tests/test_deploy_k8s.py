"""The Kubernetes deployment files (deploy/k8s/, .dockerignore) against what reads them.

No cluster, no Helm and no Docker here: the Helm values are checked against the key names
of Dagster's chart (1.13.x) and against the instance the chart writes from them, the
instance file through Dagster's own config schema, the Dockerfile against the project
(pins, module, paths) and every FEED_DAGSTER_* variable against the code that reads it."""

from __future__ import annotations

import copy
import importlib
import json
import re
import shutil
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from pathlib import Path
from typing import Any

import pytest
import yaml
from dagster._config import validate_config
from dagster._core.instance.config import dagster_instance_config
from dagster._core.run_coordinator import QueuedRunCoordinator, RunCoordinator
from dagster._serdes.config_class import ConfigurableClassData
from packaging.specifiers import SpecifierSet
from packaging.version import Version

from feed_dagster.cli import POSTGRES_URL_FORM, POSTGRES_URL_VARIABLE

ROOT = Path(__file__).resolve().parents[1]
K8S = ROOT / "deploy" / "k8s"
DOCKERFILE = K8S / "Dockerfile"
VALUES = K8S / "values.yaml"
K8S_INSTANCE = K8S / "dagster.yaml"
POSTGRES_INSTANCE = ROOT / "deploy" / "postgres" / "dagster.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())

# Where Dagster's chart mounts the instance and points DAGSTER_HOME (global.dagsterHome,
# which values.yaml leaves at the chart's default).
CHART_DAGSTER_HOME = "/opt/dagster/dagster_home"

# Peaks measured at 100k users (synthetic:m), docs/SCALING.md, "The whole run at `m`": one
# user_feeds shard's step, and the training step's process with the two-tower's own
# process beside it in the same pod (the two-tower's from "Since the whole run").
SHARD_PEAK_GIB = 4.49
TRAINING_PEAKS_GIB = (6.54, 2.0)

# The keys Dagster's chart (dagster/dagster 1.13.x) has at each level the values set: its
# values.yaml and the pydantic models its values.schema.json is generated from. A key
# missing from the chart would be ignored by Helm without a word. "[]" is an item of a list.
CHART_KEYS: dict[str, set[str]] = {
    "": {
        "global",
        "nameOverride",
        "fullnameOverride",
        "rbacEnabled",
        "imagePullSecrets",
        "dagsterWebserver",
        "computeLogManager",
        "pythonLogs",
        "dagster-user-deployments",
        "pipelineRun",
        "scheduler",
        "runLauncher",
        "postgresql",
        "generatePostgresqlPasswordSecret",
        "generateCeleryConfigSecret",
        "rabbitmq",
        "redis",
        "flower",
        "ingress",
        "dagsterDaemon",
        "busybox",
        "extraManifests",
        "migrate",
        "telemetry",
        "serviceAccount",
        "retention",
        "concurrency",
        "additionalInstanceConfig",
    },
    "dagster-user-deployments": {"enabled", "enableSubchart", "imagePullSecrets", "deployments"},
    "dagster-user-deployments.deployments[]": {
        "name",
        "image",
        "dagsterApiGrpcArgs",
        "codeServerArgs",
        "port",
        "includeConfigInLaunchedRuns",
        "env",
        "envConfigMaps",
        "envSecrets",
        "labels",
        "volumes",
        "volumeMounts",
        "initContainers",
        "sidecarContainers",
        "annotations",
        "nodeSelector",
        "affinity",
        "tolerations",
        "podSecurityContext",
        "securityContext",
        "resources",
        "schedulerName",
        "readinessProbe",
        "livenessProbe",
        "startupProbe",
        "service",
    },
    "dagster-user-deployments.deployments[].image": {"repository", "tag", "pullPolicy"},
    "dagster-user-deployments.deployments[].includeConfigInLaunchedRuns": {"enabled"},
    "dagster-user-deployments.deployments[].envSecrets[]": {"name", "optional"},
    "runLauncher": {"type", "config"},
    "runLauncher.config": {"k8sRunLauncher", "celeryK8sRunLauncher", "customRunLauncher"},
    "runLauncher.config.k8sRunLauncher": {
        "image",
        "imagePullPolicy",
        "jobNamespace",
        "loadInclusterConfig",
        "kubeconfigFile",
        "envConfigMaps",
        "envSecrets",
        "envVars",
        "volumeMounts",
        "volumes",
        "labels",
        "failPodOnRunFailure",
        "resources",
        "schedulerName",
        "securityContext",
        "runK8sConfig",
    },
    "postgresql": {
        "image",
        "enabled",
        "postgresqlHost",
        "postgresqlUsername",
        "postgresqlPassword",
        "postgresqlDatabase",
        "postgresqlParams",
        "postgresqlScheme",
        "service",
    },
    "postgresql.service": {"port"},
    "dagsterDaemon": {
        "enabled",
        "image",
        "runCoordinator",
        "heartbeatTolerance",
        "env",
        "envConfigMaps",
        "envSecrets",
        "deploymentLabels",
        "labels",
        "nodeSelector",
        "affinity",
        "tolerations",
        "podSecurityContext",
        "securityContext",
        "resources",
        "initContainerResources",
        "checkDbReadyInitContainer",
        "livenessProbe",
        "readinessProbe",
        "startupProbe",
        "annotations",
        "runMonitoring",
        "runRetries",
        "sensors",
        "schedules",
        "schedulerName",
        "volumeMounts",
        "volumes",
    },
    "dagsterDaemon.runCoordinator": {"enabled", "type", "config"},
    "dagsterDaemon.runCoordinator.config": {"queuedRunCoordinator", "customRunCoordinator"},
    "dagsterDaemon.runCoordinator.config.queuedRunCoordinator": {
        "maxConcurrentRuns",
        "tagConcurrencyLimits",
        "dequeueIntervalSeconds",
        "dequeueUseThreads",
        "dequeueNumWorkers",
        "blockOpConcurrencyLimitedRuns",
    },
    "dagsterDaemon.runMonitoring": {
        "enabled",
        "startTimeoutSeconds",
        "cancelTimeoutSeconds",
        "pollIntervalSeconds",
        "maxResumeRunAttempts",
        "freeSlotsAfterRunEndSeconds",
    },
    "dagsterDaemon.runRetries": {"enabled", "maxRetries"},
    "concurrency": {"enabled", "pools", "runs"},
    "concurrency.pools": {"defaultLimit", "granularity", "opGranularityRunBuffer"},
    "concurrency.runs": {"maxConcurrentRuns", "tagConcurrencyLimits"},
    "telemetry": {"enabled"},
}

# Instance settings that only say how runs are launched and queued; everything else the
# Kubernetes instance shares with deploy/postgres/dagster.yaml.
LAUNCH_KEYS = ("run_launcher", "run_coordinator")


def load_yaml(path: Path) -> dict[str, Any]:
    return yaml.safe_load(path.read_text())


@pytest.fixture(scope="module")
def values() -> dict[str, Any]:
    return load_yaml(VALUES)


@pytest.fixture(scope="module")
def k8s_instance() -> dict[str, Any]:
    return load_yaml(K8S_INSTANCE)


def user_deployment(values: dict[str, Any]) -> dict[str, Any]:
    (deployment,) = values["dagster-user-deployments"]["deployments"]
    return deployment


def unknown_chart_keys(node: Any, path: str = "") -> Iterator[str]:
    """Every key of `node` at a level of CHART_KEYS that the chart does not have."""
    if isinstance(node, list):
        for item in node:
            yield from unknown_chart_keys(item, f"{path}[]")
        return
    if not isinstance(node, dict) or path not in CHART_KEYS:
        return  # free-form below here: Kubernetes objects, Dagster instance settings
    for key, child in node.items():
        if key not in CHART_KEYS[path]:
            yield f"{path}.{key}" if path else key
        yield from unknown_chart_keys(child, f"{path}.{key}" if path else key)


def snake(name: str) -> str:
    return re.sub(r"(?<!^)(?=[A-Z])", "_", name).lower()


def helm_instance_settings(values: dict[str, Any]) -> dict[str, Any]:
    """The instance settings, other than storage and the launcher, that the chart writes
    into dagster.yaml from the keys `values` sets (its configmap-instance template): run
    monitoring and the concurrency block from their camelCase keys, additionalInstanceConfig
    as it is. The chart adds its defaults for keys left out (run monitoring's
    free_slots_after_run_end_seconds: 0, Dagster's own default)."""
    daemon, concurrency = values["dagsterDaemon"], values["concurrency"]
    assert concurrency["enabled"], "the chart writes no concurrency block when disabled"
    settings: dict[str, Any] = {
        "telemetry": {"enabled": values["telemetry"]["enabled"]},
        "concurrency": {
            "pools": {snake(k): v for k, v in concurrency["pools"].items()},
            "runs": {snake(k): v for k, v in concurrency["runs"].items()},
        },
        "run_monitoring": {snake(k): v for k, v in daemon["runMonitoring"].items()},
    }
    for key, setting in values["additionalInstanceConfig"].items():
        assert key not in settings, f"{key} would be written twice"
        settings[key] = setting
    return settings


def helm_run_coordinator(values: dict[str, Any]) -> dict[str, Any]:
    """The run_coordinator block the chart writes from the keys `values` sets (its
    dagsterYaml.runCoordinator.queued template)."""
    coordinator = values["dagsterDaemon"]["runCoordinator"]
    queued = coordinator["config"]["queuedRunCoordinator"]
    config = {snake(k): v for k, v in queued.items() if v is not None}
    block: dict[str, Any] = {"module": "dagster.core.run_coordinator", "class": coordinator["type"]}
    return {**block, "config": config} if config else block


def code_variables() -> set[str]:
    """Every FEED_DAGSTER_* name the package's code spells out (os.environ reads and the
    constants they go through)."""
    names: set[str] = set()
    for source in (ROOT / "feed_dagster").rglob("*.py"):
        names |= set(re.findall(r"\bFEED_DAGSTER_[A-Z0-9_]*[A-Z0-9]\b", source.read_text()))
    return names


def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the Dockerfile, continuation lines joined."""
    text = re.sub(r"\\\n", " ", DOCKERFILE.read_text())
    instructions = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, arguments = line.partition(" ")
            instructions.append((keyword.upper(), arguments.strip()))
    return instructions


def dockerfile_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for keyword, arguments in dockerfile_instructions():
        if keyword == "ENV":
            env.update(re.findall(r"(\w+)=(\S+)", arguments))
    return env


def pip_installs() -> list[str]:
    return [a for k, a in dockerfile_instructions() if k == "RUN" and "pip install" in a]


def pinned(requirement_list: list[str], name: str) -> str:
    (pin,) = [r.split("==")[1] for r in requirement_list if r.split("==")[0] == name]
    return pin


def gib(quantity: str) -> float:
    """A Kubernetes memory quantity (8Gi, 512Mi, ...) in GiB."""
    number, unit = re.fullmatch(r"([0-9.]+)([KMGT]i)?", quantity).groups()  # type: ignore[union-attr]
    return float(number) * {"Ki": 2**-20, "Mi": 2**-10, "Gi": 1, "Ti": 2**10, None: 2**-30}[unit]


# ----------------------------------------------------------------------------- Helm values


def test_values_use_only_keys_the_chart_has(values) -> None:
    assert list(unknown_chart_keys(values)) == []


def test_the_key_check_finds_a_misspelt_key(values) -> None:
    broken = copy.deepcopy(values)
    launcher = broken["runLauncher"]["config"]["k8sRunLauncher"]
    launcher["resource"] = launcher.pop("resources")
    assert list(unknown_chart_keys(broken)) == ["runLauncher.config.k8sRunLauncher.resource"]


def test_values_launch_each_run_in_a_pod_queued_by_the_daemon(values) -> None:
    assert values["runLauncher"]["type"] == "K8sRunLauncher"
    daemon = values["dagsterDaemon"]
    assert daemon["enabled"] and daemon["runCoordinator"]["enabled"]
    assert daemon["runCoordinator"]["type"] == "QueuedRunCoordinator"
    # The cap is concurrency.runs; the chart fails a release that also sets the queue's own.
    assert daemon["runCoordinator"]["config"]["queuedRunCoordinator"]["maxConcurrentRuns"] is None
    assert values["concurrency"]["runs"]["maxConcurrentRuns"] >= 1


def test_the_user_deployment_serves_the_project_module(values) -> None:
    deployment = user_deployment(values)
    module = PYPROJECT["tool"]["dagster"]["module_name"]
    assert deployment["dagsterApiGrpcArgs"] == ["-m", module]
    assert deployment["includeConfigInLaunchedRuns"] == {"enabled": True}
    assert deployment["image"]["tag"] not in ("", "latest")
    # Its resources would also be every run pod's, over the run launcher's.
    assert "resources" not in deployment


def test_values_mount_the_storage_root_where_feed_dagster_data_points(values) -> None:
    deployment = user_deployment(values)
    env = {e["name"]: e["value"] for e in deployment["env"]}
    volumes = {v["name"] for v in deployment["volumes"]}
    mounts = {m["mountPath"]: m["name"] for m in deployment["volumeMounts"]}
    assert env["FEED_DAGSTER_DATA"] in mounts
    assert mounts[env["FEED_DAGSTER_DATA"]] in volumes
    for name in ("FEED_DAGSTER_SOURCE", "FEED_DAGSTER_SHARDS", "FEED_DAGSTER_MODELS_URI"):
        assert env[name]
    assert env["FEED_DAGSTER_MODELS_URI"].startswith("s3://")
    assert int(env["FEED_DAGSTER_SHARDS"]) >= 1


def test_values_reach_postgres_through_psycopg2(values) -> None:
    postgres = values["postgresql"]
    assert postgres["enabled"] is False
    assert postgres["postgresqlHost"] and postgres["postgresqlUsername"]
    assert postgres["postgresqlDatabase"]
    # The password comes from a secret made outside the chart, never from the values.
    assert values["generatePostgresqlPasswordSecret"] is False
    assert "postgresqlPassword" not in postgres
    assert postgres["postgresqlScheme"] == POSTGRES_URL_FORM.split("://")[0]


def test_run_pods_are_sized_from_the_measured_peaks(values) -> None:
    resources = values["runLauncher"]["config"]["k8sRunLauncher"]["resources"]
    assert gib(resources["requests"]["memory"]) >= SHARD_PEAK_GIB
    assert gib(resources["limits"]["memory"]) >= sum(TRAINING_PEAKS_GIB)


def test_the_chart_writes_the_instance_settings_of_the_k8s_instance(values, k8s_instance) -> None:
    # The chart writes run_retries itself when runRetries is on, and only enabled and
    # max_retries: on, it would write the key twice next to additionalInstanceConfig's.
    assert values["dagsterDaemon"]["runRetries"]["enabled"] is False
    shared = {k: v for k, v in k8s_instance.items() if k not in (*LAUNCH_KEYS, "storage")}
    assert helm_instance_settings(values) == shared
    assert helm_run_coordinator(values) == k8s_instance["run_coordinator"]
    helm_launcher = values["runLauncher"]["config"]["k8sRunLauncher"]
    launcher = k8s_instance["run_launcher"]["config"]
    assert helm_launcher["resources"] == launcher["resources"]
    assert helm_launcher["failPodOnRunFailure"] == launcher["fail_pod_on_run_failure"]


def test_the_instance_the_chart_writes_passes_dagsters_schema(values, tmp_path) -> None:
    postgres = values["postgresql"]
    instance = {
        **helm_instance_settings(values),
        "run_coordinator": helm_run_coordinator(values),
        # As the chart's dagsterYaml.postgresql.config writes each of the three storages.
        "run_storage": {
            "module": "dagster_postgres.run_storage",
            "class": "PostgresRunStorage",
            "config": {
                "postgres_db": {
                    "username": postgres["postgresqlUsername"],
                    "password": {"env": "DAGSTER_PG_PASSWORD"},
                    "hostname": postgres["postgresqlHost"],
                    "db_name": postgres["postgresqlDatabase"],
                    "port": postgres["service"]["port"],
                    "scheme": postgres["postgresqlScheme"],
                }
            },
        },
    }
    (tmp_path / "dagster.yaml").write_text(yaml.safe_dump(instance))
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["concurrency"]["pools"]["default_limit"] == 1


# ------------------------------------------------------------------ the non-Helm instance


def test_the_k8s_instance_loads_through_dagsters_schema(tmp_path, monkeypatch) -> None:
    monkeypatch.setenv(POSTGRES_URL_VARIABLE, "postgresql+psycopg2://u:p@db:5432/dagster")
    shutil.copy(K8S_INSTANCE, tmp_path / "dagster.yaml")
    config, _ = dagster_instance_config(str(tmp_path))
    assert config["run_launcher"]["class"] == "K8sRunLauncher"


def test_the_k8s_instance_is_the_postgres_instance_with_runs_in_pods(k8s_instance) -> None:
    postgres = load_yaml(POSTGRES_INSTANCE)
    shared = {k: v for k, v in k8s_instance.items() if k not in LAUNCH_KEYS}
    # Only the cap on concurrent runs may differ: a cluster holds more runs than a machine.
    k8s_runs = shared["concurrency"].pop("runs")
    postgres_runs = postgres["concurrency"].pop("runs")
    assert shared == postgres
    assert k8s_runs["max_concurrent_runs"] >= postgres_runs["max_concurrent_runs"]


def test_the_k8s_instance_names_dagsters_own_classes(k8s_instance, values) -> None:
    # Loaded the way the instance loads it (which reads the chart's dagster.core spelling as
    # dagster._core), config checked against the class's own schema.
    coordinator = k8s_instance["run_coordinator"]
    data = ConfigurableClassData(
        coordinator["module"], coordinator["class"], yaml.safe_dump(coordinator.get("config", {}))
    )
    assert isinstance(data.rehydrate(as_type=RunCoordinator), QueuedRunCoordinator)
    launcher = k8s_instance["run_launcher"]
    # dagster-k8s is in the image, not in this environment: the names are the ones the
    # chart writes for runLauncher.type K8sRunLauncher.
    assert (launcher["module"], launcher["class"]) == ("dagster_k8s", values["runLauncher"]["type"])
    config = launcher["config"]
    assert config["dagster_home"] == CHART_DAGSTER_HOME == dockerfile_env()["DAGSTER_HOME"]
    mounts = {m["mountPath"]: m["name"] for m in config["volume_mounts"]}
    assert mounts[dockerfile_env()["FEED_DAGSTER_DATA"]] in {v["name"] for v in config["volumes"]}


def test_the_launcher_config_is_what_dagster_k8s_accepts(k8s_instance) -> None:
    pytest.importorskip("dagster_k8s")
    launcher = k8s_instance["run_launcher"]
    cls = getattr(importlib.import_module(launcher["module"]), launcher["class"])
    result = validate_config(cls.config_type(), launcher["config"])
    assert result.success, [error.message for error in result.errors]


# ----------------------------------------------------------------------- the environment


def test_every_feed_dagster_variable_of_the_deploy_files_is_read_by_the_code() -> None:
    read = code_variables()
    assert {"FEED_DAGSTER_DATA", "FEED_DAGSTER_MODELS_URI", POSTGRES_URL_VARIABLE} <= read
    for path in (DOCKERFILE, VALUES, K8S_INSTANCE):
        named = set(re.findall(r"\bFEED_DAGSTER_[A-Z0-9_]*[A-Z0-9]\b", path.read_text()))
        assert named, path
        assert named <= read, f"{path.name} names {sorted(named - read)}, which no code reads"


def test_the_image_and_the_values_agree_on_the_storage_root(values) -> None:
    env = {e["name"]: e["value"] for e in user_deployment(values)["env"]}
    assert dockerfile_env()["FEED_DAGSTER_DATA"] == env["FEED_DAGSTER_DATA"]


# ---------------------------------------------------------------------------- Dockerfile


def test_the_dockerfile_copies_only_what_exists_and_is_not_ignored() -> None:
    ignored = [
        line.strip()
        for line in DOCKERIGNORE.read_text().splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for required in (".venv", "data", ".dagster_home"):
        assert required in ignored
    copies = [a.split() for k, a in dockerfile_instructions() if k == "COPY"]
    assert copies
    for *sources, _destination in copies:
        for source in sources:
            assert (ROOT / source).exists(), source
            assert not any(fnmatch(source, pattern) for pattern in ignored), source


def test_the_dockerfile_installs_torch_at_the_makefiles_cpu_pin() -> None:
    (make_pin,) = re.findall(r"torch==([0-9.]+)", (ROOT / "Makefile").read_text())
    (torch_install,) = [a for a in pip_installs() if "torch==" in a]
    (image_pin,) = re.findall(r"torch==([0-9.]+)", torch_install)
    assert image_pin == make_pin
    assert "--index-url" in torch_install and torch_install.rstrip().endswith("/whl/cpu")
    dependencies = PYPROJECT["project"]["dependencies"]
    (torch_range,) = [d[len("torch") :] for d in dependencies if d.startswith("torch")]
    assert Version(image_pin) in SpecifierSet(torch_range)
    # Before the project, so pip finds torch already satisfied.
    installs = pip_installs()
    (project_install,) = [a for a in installs if " . " in f"{a} "]
    assert installs.index(torch_install) < installs.index(project_install)


def test_the_dockerfile_installs_the_project_and_dagster_k8s_at_its_release() -> None:
    (project_install,) = [a.split() for a in pip_installs() if " . " in f"{a} "]
    dependencies = PYPROJECT["project"]["dependencies"]
    assert pinned(project_install, "dagster-k8s") == pinned(dependencies, "dagster-postgres")
    base = next(a for k, a in dockerfile_instructions() if k == "FROM")
    python = re.fullmatch(r"python:(3\.\d+)-slim", base).group(1)  # type: ignore[union-attr]
    assert Version(python) in SpecifierSet(PYPROJECT["project"]["requires-python"])


def test_the_image_runs_the_code_server_as_a_user_without_an_entrypoint(values) -> None:
    instructions = dockerfile_instructions()
    (user,) = [a for k, a in instructions if k == "USER"]
    assert user not in ("root", "0")
    # The chart and the run launcher pass the whole command line as arguments.
    assert not [a for k, a in instructions if k == "ENTRYPOINT"]
    (cmd,) = [json.loads(a) for k, a in instructions if k == "CMD"]
    deployment = user_deployment(values)
    assert cmd == [
        "dagster",
        "api",
        "grpc",
        *deployment["dagsterApiGrpcArgs"],
        "-h",
        "0.0.0.0",
        "-p",
        str(deployment["port"]),
    ]
    assert dockerfile_env()["DAGSTER_HOME"] == CHART_DAGSTER_HOME
