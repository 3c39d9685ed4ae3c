"""What operators copy: the dashboard, the alert rules and their runbooks, the Dockerfile,
the docker-compose and Kubernetes examples. Each is parsed and held against what gitcache
really has: its routes, its port, its config keys, its environment variables."""

from __future__ import annotations

import json
import re
import tomllib
from pathlib import Path

import pytest
import yaml

from gitcache.app import create_app
from gitcache.config import Config
from gitcache.settings import load_config

ROOT = Path(__file__).resolve().parent.parent
DASHBOARD = ROOT / "config" / "grafana" / "gitcache.json"
ALERTS = ROOT / "config" / "prometheus" / "alerts.yml"
README = ROOT / "README.md"
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "deploy" / "compose"
KUBERNETES = ROOT / "deploy" / "kubernetes" / "gitcache.yaml"
UNITS = {"percentunit", "short", "reqps", "ops", "Bps", "bytes", "s"}


def routes(config: Config) -> set[str]:
    app = create_app(config)
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


def load(path: Path) -> Config:
    return load_config(path, environ={})


def toml_config(text: str, tmp_path: Path) -> Config:
    path = tmp_path / "gitcache.toml"
    path.write_text(text)
    return load(path)


def readme_anchors() -> set[str]:
    """GitHub's anchors of the README's headings."""
    headings = re.findall(r"^#+ (.+)$", README.read_text(), re.M)
    return {re.sub(r"[^\w\- ]", "", h).strip().lower().replace(" ", "-") for h in headings}


# --- dashboard and alerts -------------------------------------------------------------------


def test_dashboard_has_instance_and_job_and_one_unit_per_panel() -> None:
    dashboard = json.loads(DASHBOARD.read_text())
    variables = {v["name"]: v for v in dashboard["templating"]["list"]}
    assert {"datasource", "job", "instance"} <= variables.keys()
    assert variables["instance"]["multi"] and variables["instance"]["includeAll"]
    for panel in dashboard["panels"]:
        unit = panel["fieldConfig"]["defaults"]["unit"]
        assert unit in UNITS, panel["title"]
        assert not panel["fieldConfig"]["overrides"], f"{panel['title']}: one unit per axis"
        for target in panel["targets"]:
            for selector in re.findall(r"gitcache_[a-z0-9_]+(\{[^}]*\})?", target["expr"]):
                assert 'instance=~"$instance"' in selector, (panel["title"], target["expr"])
                assert 'job=~"$job"' in selector, (panel["title"], target["expr"])
            grouped = re.findall(r"\bby \(([^)]*)\)", target["expr"])
            if any("instance" in labels for labels in grouped):  # one series per instance
                assert "{{instance}}" in target["legendFormat"], panel["title"]
    (lag,) = [p for p in dashboard["panels"] if "last successful refresh" in p["title"]]
    assert "> 0" in lag["targets"][0]["expr"]  # never refreshed is not "56 years ago"


def test_every_alert_has_a_runbook_in_the_readme() -> None:
    rules = yaml.safe_load(ALERTS.read_text())["groups"][0]["rules"]
    names = {rule["alert"] for rule in rules}
    assert {"GitcacheServerErrors", "GitcacheGenerationsFailing", "GitcacheTargetDown"} <= names
    anchors = readme_anchors()
    for rule in rules:
        url = rule["annotations"]["runbook_url"]
        assert url.endswith("#" + rule["alert"].lower()), url
        assert rule["alert"].lower() in anchors, f"no README section for {rule['alert']}"


# --- Dockerfile -----------------------------------------------------------------------------


def dockerfile() -> list[tuple[str, str]]:
    text = DOCKERFILE.read_text().replace("\\\n", " ")
    lines = [line.strip() for line in text.splitlines()]
    return [
        (line.split(None, 1)[0].upper(), line.split(None, 1)[1])
        for line in lines
        if line and not line.startswith("#")
    ]


def test_dockerfile_layers_init_and_config(tmp_path: Path) -> None:
    steps = dockerfile()
    (base,) = [arg for op, arg in steps if op == "FROM"]
    assert re.fullmatch(r"python:3\.\d+\.\d+-slim-\w+(@sha256:[0-9a-f]{64})?", base), base
    order = [f"{op} {arg}" for op, arg in steps]
    deps = next(i for i, s in enumerate(order) if s.startswith("RUN") and "requirements" in s)
    source = next(i for i, s in enumerate(order) if s.startswith("COPY gitcache"))
    manifest = next(i for i, s in enumerate(order) if s.startswith("COPY pyproject.toml"))
    assert manifest < deps < source  # dependencies install before the source is copied
    (entrypoint,) = [json.loads(arg) for op, arg in steps if op == "ENTRYPOINT"]
    assert entrypoint[:2] == ["/usr/bin/tini", "--"] and "tini" in order[1]
    env = " ".join(arg for op, arg in steps if op == "ENV")
    assert re.findall(r"GITCACHE_\w+", env) == ["GITCACHE_CONFIG"]  # no key silently forced
    (user,) = [arg for op, arg in steps if op == "USER"]
    assert user != "root"
    # The config the image ships listens on the exposed port and keeps state in the volume.
    (copied,) = [arg.split() for op, arg in steps if op == "COPY" and "container.toml" in arg]
    config_path = env.split("GITCACHE_CONFIG=")[1].split()[0]
    assert copied[1] == config_path
    config = load(ROOT / copied[0])
    (exposed,) = [arg for op, arg in steps if op == "EXPOSE"]
    assert config.server.port == int(exposed) and config.server.host == "0.0.0.0"
    (volume,) = [json.loads(arg) for op, arg in steps if op == "VOLUME"]
    assert [str(config.server.state_dir)] == volume
    uid = re.search(r"--uid (\d+)", DOCKERFILE.read_text())
    assert uid is not None


def test_make_run_installs_only_what_running_needs() -> None:
    makefile = (ROOT / "Makefile").read_text()
    run_deps = re.search(r"^run: (.+)$", makefile, re.M)
    assert run_deps is not None and "DEV" not in run_deps[1]
    stamp = run_deps[1].strip()
    recipe = makefile.split(f"{stamp}:", 1)[1].split("\n\n", 1)[0]
    assert "pip install --quiet -e ." in recipe and "[dev]" not in recipe


def test_license() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert project["license"] == "Apache-2.0"  # an SPDX expression, not a table
    assert (ROOT / "LICENSE").read_text().lstrip().startswith("Apache License")


# --- deployment examples ----------------------------------------------------------------------


def test_compose_example_matches_gitcache() -> None:
    compose = yaml.safe_load((COMPOSE / "docker-compose.yml").read_text())
    service = compose["services"]["gitcache"]
    mounts = {v.split(":")[1]: COMPOSE / v.split(":")[0] for v in service["volumes"]}
    config_file = mounts["/etc/gitcache/gitcache.toml"]  # over the image's config
    config = load(config_file)
    assert {int(p.split(":")[1]) for p in service["ports"]} == {config.server.port}
    assert str(config.server.state_dir) in mounts
    assert not [k for k in service.get("environment", {}) if k.startswith("GITCACHE_")]
    assert config.cache.backend == "tiered"
    # The bucket gitcache uses is the one the setup job creates, on the MinIO service.
    assert config.cache.s3.endpoint_url.startswith("http://minio:")
    assert config.cache.s3.bucket in " ".join(compose["services"]["bucket"]["entrypoint"])
    # Prometheus scrapes gitcache where it listens, and loads the alert rules.
    prometheus = yaml.safe_load((COMPOSE / "prometheus.yml").read_text())
    (job,) = prometheus["scrape_configs"]
    assert job["metrics_path"] in routes(config)
    assert job["static_configs"][0]["targets"] == [f"gitcache:{config.server.port}"]
    prom_mounts = {
        v.split(":")[1]: COMPOSE / v.split(":")[0]
        for v in compose["services"]["prometheus"]["volumes"]
    }
    for rule_file in prometheus["rule_files"]:
        assert prom_mounts[rule_file].resolve() == ALERTS
    drain = config.server.drain_delay + config.server.shutdown_timeout
    assert int(service["stop_grace_period"].removesuffix("s")) > drain


def test_kubernetes_example_matches_gitcache(tmp_path: Path) -> None:
    docs = {d["kind"]: d for d in yaml.safe_load_all(KUBERNETES.read_text())}
    assert {"ConfigMap", "Deployment", "Service", "PodDisruptionBudget"} <= docs.keys()
    config = toml_config(docs["ConfigMap"]["data"]["gitcache.toml"], tmp_path)
    known = routes(config)
    pod = docs["Deployment"]["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": config.server.port}
    assert container["readinessProbe"]["httpGet"]["path"] == "/readyz" in known
    assert container["livenessProbe"]["httpGet"]["path"] == "/healthz" in known
    prestop = container["lifecycle"]["preStop"]["exec"]["command"]
    assert prestop[0] == "sleep" and float(prestop[1]) == config.server.drain_delay
    grace = pod["terminationGracePeriodSeconds"]
    assert grace > float(prestop[1]) + config.server.drain_delay + config.server.shutdown_timeout
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    image_config = re.search(r"GITCACHE_CONFIG=(\S+)", DOCKERFILE.read_text())
    assert image_config is not None
    assert str(Path(mounts["config"]) / "gitcache.toml") == image_config[1]
    assert mounts["state"] == str(config.server.state_dir)
    uid = re.search(r"--uid (\d+)", DOCKERFILE.read_text())
    assert uid is not None and pod["securityContext"]["runAsUser"] == int(uid[1])
    # The Service and the budget select the Deployment's pods, on the named port.
    labels = docs["Deployment"]["spec"]["template"]["metadata"]["labels"]
    assert docs["Service"]["spec"]["selector"].items() <= labels.items()
    assert docs["Service"]["spec"]["ports"][0]["targetPort"] in ports
    budget = docs["PodDisruptionBudget"]["spec"]
    assert budget["selector"]["matchLabels"].items() <= labels.items()
    assert budget["minAvailable"] < docs["Deployment"]["spec"]["replicas"]
    annotations = docs["Deployment"]["spec"]["template"]["metadata"]["annotations"]
    assert annotations["prometheus.io/path"] in known
    assert int(annotations["prometheus.io/port"]) == config.server.port


@pytest.mark.parametrize("path", sorted((ROOT / "deploy").rglob("*.toml")))
def test_every_shipped_config_loads(path: Path) -> None:
    load(path)
