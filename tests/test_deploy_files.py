"""The deployment files agree with the code: setting names, CLI options, queue lists, ports.

No Docker engine or cluster is needed: the files are parsed and checked against
the settings module, the click commands and the Celery app they configure, and
the Kubernetes objects against the API's own schemas (kubernetes-validate ships
them), as a cluster's API server would check them.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import click
import pytest
import yaml

from jobs.settings import HELP
from producer.api_cli import api_command
from worker.cli import flower_command, worker_command

DEPLOY = Path(__file__).resolve().parent.parent / "deploy"


def load_all(path: Path) -> list[dict[str, Any]]:
    return [doc for doc in yaml.safe_load_all(path.read_text()) if doc]


def compose() -> dict[str, Any]:
    return load_all(DEPLOY / "docker-compose.yml")[0]


def k8s_objects() -> list[dict[str, Any]]:
    return [doc for path in sorted((DEPLOY / "k8s").glob("*.yaml")) for doc in load_all(path)]


def known_env_vars() -> set[str]:
    names = {info.env for info in HELP.values()} | {"DEBLUR_HOME"}
    for command in (worker_command, flower_command, api_command):
        names |= {p.envvar for p in command.params if isinstance(p, click.Option) and isinstance(p.envvar, str)}
    return names


def containers() -> list[tuple[str, dict[str, Any]]]:
    found = []
    for obj in k8s_objects():
        spec = obj.get("spec", {}).get("template", {}).get("spec", {})
        found += [(obj["metadata"]["name"], c) for c in spec.get("containers", [])]
    return found


def test_every_deblur_variable_in_compose_and_k8s_is_a_real_setting() -> None:
    known = known_env_vars()
    used: set[str] = set()
    for service in compose()["services"].values():
        used |= set(service.get("environment") or {})
    for obj in k8s_objects():
        if obj["kind"] in {"ConfigMap", "Secret"}:
            used |= set(obj.get("data") or {}) | set(obj.get("stringData") or {})
    for _, container in containers():
        used |= {e["name"] for e in container.get("env", [])}
    unknown = sorted(name for name in used if name.startswith("DEBLUR_") and name not in known)
    assert unknown == []
    assert {"DEBLUR_BROKER_URL", "DEBLUR_DATABASE_URL", "DEBLUR_S3_ENDPOINT_URL"} <= used


@pytest.mark.parametrize("where", ["compose", "k8s"])
def test_worker_flower_and_api_command_lines_parse(where: str) -> None:
    if where == "compose":
        lines = [s["command"] for s in compose()["services"].values() if "command" in s and s.get("image", "").startswith("deblur")]
    else:
        lines = [c["args"] for _, c in containers()]
    commands = {"worker": worker_command, "flower": flower_command, "api": api_command}
    checked = set()
    for argv in lines:
        if argv and argv[0] in commands:
            # make_context parses and validates the options without running anything
            commands[argv[0]].make_context(argv[0], list(argv[1:]))
            checked.add(argv[0])
    assert checked == {"worker", "flower", "api"}


def test_network_facing_flower_always_gets_basic_auth() -> None:
    flower = compose()["services"]["flower"]
    assert "0.0.0.0" in flower["command"] and "DEBLUR_FLOWER_BASIC_AUTH" in flower["environment"]
    secrets = [o for o in k8s_objects() if o["kind"] == "Secret"]
    assert any("DEBLUR_FLOWER_BASIC_AUTH" in s.get("stringData", {}) for s in secrets)


def test_network_facing_api_always_gets_a_token() -> None:
    """The API listens on every interface in both deployments, so the token must come with it (``deblur api``
    refuses to start otherwise), and Prometheus must send it to scrape /metrics."""
    api = compose()["services"]["api"]
    assert "0.0.0.0" in api["command"] and "DEBLUR_API_TOKEN" in api["environment"]
    (deployment_container,) = [c for name, c in containers() if name == "deblur-api"]
    assert "0.0.0.0" in deployment_container["args"]
    assert {"configMapRef", "secretRef"} <= {key for ref in deployment_container["envFrom"] for key in ref}
    secrets = [o for o in k8s_objects() if o["kind"] == "Secret"]
    assert any("DEBLUR_API_TOKEN" in s.get("stringData", {}) for s in secrets)
    assert deployment_container["readinessProbe"]["httpGet"]["path"] == "/healthz"
    prometheus_service = compose()["services"]["prometheus"]
    assert prometheus_service["secrets"] == ["deblur_api_token"]
    assert compose()["secrets"]["deblur_api_token"] == {"environment": "DEBLUR_API_TOKEN"}
    assert any(v.endswith(":/etc/prometheus/alerts.yml:ro") for v in prometheus_service["volumes"])


def test_keda_watches_every_list_the_celery_redis_transport_fills() -> None:
    from kombu.transport.redis import Channel

    from jobs.celery_app import app

    config = next(o for o in k8s_objects() if o["kind"] == "ConfigMap")
    queue = config["data"]["DEBLUR_QUEUE"]
    steps = app.conf.broker_transport_options["priority_steps"]
    expected = {queue if step == 0 else f"{queue}{Channel.sep}{step}" for step in steps}
    scaled = next(o for o in k8s_objects() if o["kind"] == "ScaledObject")
    watched = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
    assert watched == expected
    worker = next(o for o in k8s_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == scaled["spec"]["scaleTargetRef"]["name"])
    (container,) = worker["spec"]["template"]["spec"]["containers"]
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_prometheus_scrapes_the_ports_flower_and_the_api_listen_on() -> None:
    prometheus = yaml.safe_load((DEPLOY / "prometheus.yml").read_text())
    for service, job_name in (("flower", "deblur-flower"), ("api", "deblur-api")):
        command = compose()["services"][service]["command"]
        port = command[command.index("--port") + 1]
        job = next(j for j in prometheus["scrape_configs"] if j["job_name"] == job_name)
        assert job["metrics_path"] == "/metrics"
        assert job["static_configs"][0]["targets"] == [f"{service}:{port}"]
    secret_file = next(j for j in prometheus["scrape_configs"] if j["job_name"] == "deblur-api")["authorization"]
    assert secret_file["credentials_file"] == "/run/secrets/deblur_api_token"  # where Compose mounts the secret


def test_monitoring_services_mount_files_that_exist() -> None:
    """Prometheus and Grafana (the monitoring profile) mount their configuration from deploy/; Grafana's dashboard
    provider reads the folder the dashboard is mounted into."""
    services = compose()["services"]
    for name in ("prometheus", "grafana"):
        assert services[name]["profiles"] == ["monitoring"]
        for volume in services[name]["volumes"]:
            source = volume.split(":")[0]
            assert (DEPLOY / source).exists(), f"{name} mounts {source}, which deploy/ does not hold"
    provider = yaml.safe_load((DEPLOY / "grafana" / "provisioning" / "dashboards" / "deblur.yml").read_text())
    folder = provider["providers"][0]["options"]["path"]
    assert any(v.split(":")[1].startswith(folder + "/") for v in services["grafana"]["volumes"])
    assert services["grafana"]["ports"] == ["127.0.0.1:3000:3000"]  # loopback only, like the other UIs


def test_worker_probes_run_the_workers_check_with_options_it_takes() -> None:
    """The worker's liveness probe (Kubernetes) and health check (Compose) call 'deblur workers --check', whose
    options must parse; the Kubernetes one names this pod's node as the worker's --hostname makes it."""
    import shlex

    from producer.cli import main

    workers = main.get_command(click.Context(main), "workers")
    assert workers is not None
    compose_test = compose()["services"]["worker"]["healthcheck"]["test"]
    assert compose_test[:4] == ["CMD", "deblur", "workers", "--check"]
    workers.make_context("workers", compose_test[3:])
    (_, container), = [(n, c) for n, c in containers() if n == "deblur-worker"]
    shell = container["livenessProbe"]["exec"]["command"]
    assert shell[:2] == ["sh", "-c"]
    argv = shlex.split(shell[2].replace("$(hostname)", "pod-name"))
    assert argv[:4] == ["exec", "deblur", "workers", "--check"]
    workers.make_context("workers", argv[3:])
    hostname = container["args"][container["args"].index("--hostname") + 1]
    assert argv[-1] == hostname.replace("%h", "pod-name")


def pod_specs() -> list[tuple[str, dict[str, Any]]]:
    """(object name, pod spec) of every k8s object that makes pods: Deployments, Jobs, CronJobs, ..."""
    found = []
    for obj in k8s_objects():
        spec = obj.get("spec") or {}
        template = spec.get("template") or (spec.get("jobTemplate") or {}).get("spec", {}).get("template")
        if template:
            found.append((obj["metadata"]["name"], template["spec"]))
    return found


def scaled_object() -> dict[str, Any]:
    return next(o for o in k8s_objects() if o["kind"] == "ScaledObject")


def config_map() -> dict[str, str]:
    return next(o for o in k8s_objects() if o["kind"] == "ConfigMap")["data"]


def test_every_pod_turns_service_links_off(monkeypatch: pytest.MonkeyPatch) -> None:
    """Service links would give every pod DEBLUR_API_PORT=tcp://... (Service deblur-api), which the settings read."""
    from jobs.errors import ConfigurationError
    from jobs.settings import load_settings

    specs = pod_specs()
    assert {"deblur-api", "deblur-flower", "deblur-worker", "deblur-migrate"} <= {name for name, _ in specs}
    assert [name for name, spec in specs if spec.get("enableServiceLinks") is not False] == []
    # what a pod would see with them on
    monkeypatch.setenv("DEBLUR_FLOWER_PORT", "tcp://10.0.0.1:5555")
    with pytest.raises(ConfigurationError, match="DEBLUR_FLOWER_PORT"):
        load_settings()


def test_keda_alone_sets_the_worker_replica_count() -> None:
    """A replica count in the Deployment would reset the workers to it on every kubectl apply."""
    target = scaled_object()["spec"]["scaleTargetRef"]["name"]
    worker = next(o for o in k8s_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == target)
    assert "replicas" not in worker["spec"]


def compose_seconds(duration: str) -> float:
    """A Compose duration (1h2m3s, 90s, 25m, 1.5s) in seconds."""
    import re

    units = {"h": 3600, "m": 60, "s": 1, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(h|ms|us|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def _longest_batch(environment: dict[str, str]) -> int:
    """Seconds a batch may run under ``environment``'s settings: its time limit, and then the image it is on, up
    to the image limit (as the workers resolve it: by default the room the visibility timeout leaves)."""
    from dataclasses import replace

    from jobs.settings import Settings

    defaults = Settings()
    settings = replace(defaults, **{name: int(environment[env]) for name, env in (
        ("batch_time_limit", "DEBLUR_BATCH_TIME_LIMIT"), ("image_time_limit", "DEBLUR_IMAGE_TIME_LIMIT"),
        ("visibility_timeout", "DEBLUR_VISIBILITY_TIMEOUT")) if env in environment})
    return settings.batch_time_limit + settings.resolved_image_time_limit()


def test_compose_durations_are_read_as_compose_reads_them() -> None:
    """The parser the grace-period check below relies on (Compose writes durations as '25m', '1m30s'): a unit
    conversion of configuration text, nothing timed."""
    assert compose_seconds("25m") == 1500 and compose_seconds("1m30s") == 90


def test_a_stopping_worker_has_time_to_finish_its_batch() -> None:
    """SIGTERM is Celery's warm shutdown: the batch in progress, up to DEBLUR_BATCH_TIME_LIMIT and the image it
    is on (up to DEBLUR_IMAGE_TIME_LIMIT), must finish before the grace period ends in SIGKILL (which wastes the
    work: the images are restored again elsewhere). The grace periods covered the batch limit plus four minutes,
    while the default image limit allowed forty."""
    (worker_pod,) = [spec for name, spec in pod_specs() if name == "deblur-worker"]
    assert worker_pod["terminationGracePeriodSeconds"] >= _longest_batch(config_map())
    worker = compose()["services"]["worker"]
    assert compose_seconds(worker["stop_grace_period"]) >= _longest_batch(worker["environment"])


def test_keda_sums_every_priority_list_of_the_broker_redis() -> None:
    """KEDA takes the largest trigger, so the formula adds every list up; KEDA resolves the address from its own
    namespace, so it is the broker's Service by its full name in the namespace the kustomization deploys to."""
    import re
    import urllib.parse

    spec = scaled_object()["spec"]
    triggers = spec["triggers"]
    names = [t["name"] for t in triggers]
    modifiers = spec["advanced"]["scalingModifiers"]
    terms = [term.strip() for term in modifiers["formula"].split("+")]
    assert sorted(terms) == sorted(names) and len(set(names)) == len(names)
    assert all(re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", name) for name in names)  # expr identifiers: no '-'
    assert {t["metadata"]["listLength"] for t in triggers} == {modifiers["target"]}
    assert modifiers.get("metricType", "AverageValue") == "AverageValue"

    namespace = load_all(DEPLOY / "k8s" / "kustomization.yaml")[0]["namespace"]
    broker = urllib.parse.urlsplit(config_map()["DEBLUR_BROKER_URL"])
    expected = f"{broker.hostname}.{namespace}.svc.cluster.local:{broker.port or 6379}"
    assert {t["metadata"]["address"] for t in triggers} == {expected}
    assert {t["metadata"]["databaseIndex"] for t in triggers} == {broker.path.strip("/") or "0"}


# a release of two years before these files were written (clusters upgrade slowly), and the newest the schemas know
KUBERNETES_VERSIONS = ("1.31.0", "1.37.0")
CUSTOM_RESOURCES = {"ScaledObject", "Kustomization"}  # KEDA's and kustomize's own kinds: no schema ships for them


@pytest.mark.parametrize("version", KUBERNETES_VERSIONS)
def test_every_kubernetes_object_is_valid_for_the_api_server(version: str) -> None:
    """Strict: an unknown field (a typo the API server would refuse, or a field a newer release renamed) fails."""
    import kubernetes_validate

    checked = []
    for obj in k8s_objects():
        if obj["kind"] in CUSTOM_RESOURCES:
            continue
        try:
            kubernetes_validate.validate(obj, version, strict=True)
        except kubernetes_validate.ValidationError as exc:
            raise AssertionError(f"{obj['kind']} {obj['metadata']['name']} is invalid for Kubernetes {version}: "
                                 f"{exc.message} at {'/'.join(map(str, exc.path))}") from None
        checked.append(obj["kind"])
    assert {"Deployment", "Service", "ConfigMap", "Secret", "Job", "Namespace"} <= set(checked)
    worker = next(o for o in k8s_objects() if o["kind"] == "Deployment" and o["metadata"]["name"] == "deblur-worker")
    misspelt = {**worker, "spec": {**worker["spec"], "template": {**worker["spec"]["template"], "spec": {
        **worker["spec"]["template"]["spec"], "terminationGracePeriodSecond": 1500}}}}
    with pytest.raises(kubernetes_validate.ValidationError, match="terminationGracePeriodSecond"):
        kubernetes_validate.validate(misspelt, version, strict=True)
