"""Static checks of deploy/: the Dockerfile, the compose file and the Kubernetes manifests against the code.

Nothing here needs Docker or a cluster. What is checked: every YAML parses; every environment variable the
files set is one of the settings (``orchestrator_kafka.settings``), and the ConfigMap provides them all; the
commands the containers run parse with the real click group (commands, options, their values) and their
``MODULE:ATTR`` targets import and fit together; the probes and the healthcheck use the health port and its
paths; the Dockerfile's entrypoint is the project's console script; Redis in compose runs with AOF on.
"""

from __future__ import annotations

import http.server
import importlib
import json
import re
import shlex
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import click
import pytest
import yaml

from orchestrator_kafka.settings import ENV_HEALTH_PORT, ENV_SASL_PASSWORD, ENV_VARS, OTEL_ENV_VARS, Settings

REPO = Path(__file__).resolve().parents[2]
DEPLOY = REPO / "deploy"
COMPOSE_FILE = DEPLOY / "compose.yaml"
K8S = DEPLOY / "k8s"
DOCKERFILE = DEPLOY / "Dockerfile"

APP_VARS = frozenset(ENV_VARS.values()) | frozenset(OTEL_ENV_VARS)
# The images' own settings, allowed on their services only.
CONTAINER_VARS: dict[str, frozenset[str]] = {
    "kafka": frozenset(
        {
            "CLUSTER_ID",
            "KAFKA_NODE_ID",
            "KAFKA_PROCESS_ROLES",
            "KAFKA_CONTROLLER_QUORUM_VOTERS",
            "KAFKA_CONTROLLER_LISTENER_NAMES",
            "KAFKA_LISTENERS",
            "KAFKA_ADVERTISED_LISTENERS",
            "KAFKA_LISTENER_SECURITY_PROTOCOL_MAP",
            "KAFKA_INTER_BROKER_LISTENER_NAME",
            "KAFKA_LOG_DIRS",
            "KAFKA_NUM_PARTITIONS",
            "KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR",
            "KAFKA_TRANSACTION_STATE_LOG_REPLICATION_FACTOR",
            "KAFKA_TRANSACTION_STATE_LOG_MIN_ISR",
            "KAFKA_GROUP_INITIAL_REBALANCE_DELAY_MS",
            "KAFKA_HEAP_OPTS",
        }
    ),
    "redis": frozenset(),
}
APP_SERVICES = ("topics", "orchestrator", "workers", "starter")
DEPLOYMENTS = ("orchestrator.yaml", "workers.yaml")
CONSOLE_SCRIPT = "orchestrator-kafka"


# ---- loading -----------------------------------------------------------------------------------------


def load_yaml(path: Path) -> list[Any]:
    with path.open(encoding="utf-8") as f:
        return [doc for doc in yaml.safe_load_all(f) if doc is not None]


def compose() -> dict[str, Any]:
    (doc,) = load_yaml(COMPOSE_FILE)
    assert isinstance(doc, dict)
    return doc


def service(name: str) -> dict[str, Any]:
    services = compose()["services"]
    assert name in services, f"compose.yaml has no service {name!r}"
    svc = services[name]
    assert isinstance(svc, dict)
    return svc


def compose_env(svc: Mapping[str, Any]) -> dict[str, str]:
    env = svc.get("environment") or {}
    if isinstance(env, list):
        return dict(item.split("=", 1) if "=" in item else (item, "") for item in env)
    return {str(k): "" if v is None else str(v) for k, v in env.items()}


def configmap() -> dict[str, Any]:
    (doc,) = load_yaml(K8S / "configmap.yaml")
    assert doc["kind"] == "ConfigMap"
    assert isinstance(doc, dict)
    return doc


def deployment(file: str) -> dict[str, Any]:
    (doc,) = load_yaml(K8S / file)
    assert doc["kind"] == "Deployment", file
    assert isinstance(doc, dict)
    return doc


def container(file: str) -> dict[str, Any]:
    (only,) = deployment(file)["spec"]["template"]["spec"]["containers"]
    assert isinstance(only, dict)
    return only


def dockerfile() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) pairs, continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in DOCKERFILE.read_text(encoding="utf-8").splitlines():
        line = raw.strip()
        if not pending and (not line or line.startswith("#")):
            continue
        if line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        word, _, rest = (pending + line).partition(" ")
        instructions.append((word.upper(), rest.strip()))
        pending = ""
    assert not pending, "the Dockerfile ends in a continuation"
    return instructions


def docker_args(name: str) -> list[str]:
    return [args for word, args in dockerfile() if word == name]


def docker_env() -> dict[str, str]:
    env: dict[str, str] = {}
    for args in docker_args("ENV"):
        for item in shlex.split(args):
            key, _, value = item.partition("=")
            env[key] = value
    return env


def health_port() -> int:
    return int(configmap()["data"][ENV_HEALTH_PORT])


# ---- the commands containers run --------------------------------------------------------------------


def starter_lines() -> list[list[str]]:
    svc = service("starter")
    assert svc["entrypoint"][:2] == ["/bin/sh", "-c"]
    (script,) = svc["command"]
    lines = [shlex.split(line) for line in script.splitlines()]
    commands = [words[1:] for words in lines if words and words[0] == CONSOLE_SCRIPT]
    assert commands, "the starter runs no orchestrator-kafka command"
    return commands


def container_commands() -> dict[str, list[str]]:
    """Every argument list given to the ``orchestrator-kafka`` entrypoint, by where it is."""
    found: dict[str, list[str]] = {}
    for name in ("topics", "orchestrator", "workers"):
        command = service(name)["command"]
        assert isinstance(command, list), f"compose {name}: give the command as a list (exec form)"
        found[f"compose:{name}"] = [str(word) for word in command]
    for i, words in enumerate(starter_lines()):
        found[f"compose:starter[{i}]"] = words
    for file in DEPLOYMENTS:
        found[f"k8s:{file}"] = [str(word) for word in container(file)["args"]]
    found["Dockerfile:CMD"] = json.loads(docker_args("CMD")[-1])
    return found


def cli_group() -> click.Group:
    from orchestrator_kafka.cli import cli

    assert isinstance(cli, click.Group)
    return cli


def parse_command(args: list[str]) -> tuple[list[str], dict[str, Any]]:
    """Resolve ``args`` in the click group and parse them as click would, without running anything."""
    command: click.Command = cli_group()
    words = list(args)
    path: list[str] = []
    while isinstance(command, click.Group):
        assert words, f"{args}: no command after {' '.join(path) or 'orchestrator-kafka'}"
        name = words.pop(0)
        assert name in command.commands, f"{args}: no command {name!r}; there are {sorted(command.commands)}"
        command = command.commands[name]
        path.append(name)
    try:
        ctx = command.make_context(" ".join([CONSOLE_SCRIPT, *path]), words)
    except click.UsageError as e:
        pytest.fail(f"{args}: {e.format_message()}")
    with ctx:
        return path, dict(ctx.params)


def option_value(args: list[str], option: str) -> str | None:
    for i, word in enumerate(args):
        if word == option and i + 1 < len(args):
            return args[i + 1]
        if word.startswith(option + "="):
            return word.split("=", 1)[1]
    return None


def load_target(spec: str, default_attr: str) -> Any:
    module_name, _, attr = spec.partition(":")
    module = importlib.import_module(module_name)
    return getattr(module, attr or default_attr)


def workflow_list(workflows: Any) -> list[Any]:
    if isinstance(workflows, Mapping):
        workflows = list(workflows.values())
    elif hasattr(workflows, "get_id"):
        workflows = [workflows]
    return list(workflows)


# ---- every file parses ----------------------------------------------------------------------------


@pytest.mark.parametrize("path", sorted(DEPLOY.rglob("*.y*ml")), ids=lambda p: str(p.relative_to(DEPLOY)))
def test_yaml_parses(path: Path) -> None:
    assert load_yaml(path), f"{path} is empty"


def test_kustomization_lists_every_manifest() -> None:
    (kustomization,) = load_yaml(K8S / "kustomization.yaml")
    assert kustomization["kind"] == "Kustomization"
    listed = kustomization["resources"]
    present = sorted(p.name for p in K8S.glob("*.yaml") if p.name != "kustomization.yaml")
    assert sorted(listed) == present


# ---- environment variables ----------------------------------------------------------------------------


def test_compose_sets_only_known_variables() -> None:
    for name, svc in compose()["services"].items():
        allowed = APP_VARS | CONTAINER_VARS.get(name, frozenset())
        unknown = set(compose_env(svc)) - allowed
        assert not unknown, f"compose service {name} sets {sorted(unknown)}, not settings of the code"


def test_k8s_sets_only_known_variables() -> None:
    unknown = set(configmap()["data"]) - APP_VARS
    assert not unknown, f"the ConfigMap sets {sorted(unknown)}, not settings of the code"
    for file in DEPLOYMENTS:
        names = {item["name"] for item in container(file).get("env", [])}
        assert not names - APP_VARS, f"{file} sets {sorted(names - APP_VARS)}, not settings of the code"


def test_configmap_provides_every_setting_and_they_parse() -> None:
    data = configmap()["data"]
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings (quote numbers)"
    missing = set(ENV_VARS.values()) - {ENV_SASL_PASSWORD} - set(data)
    assert not missing, f"the ConfigMap lacks {sorted(missing)}"
    assert ENV_SASL_PASSWORD not in data, "the SASL password belongs in a Secret, not the ConfigMap"
    settings = Settings.from_env(data)
    assert settings.health_port == health_port()


def test_deployments_read_the_configmap_and_the_optional_sasl_secret() -> None:
    name = configmap()["metadata"]["name"]
    for file in DEPLOYMENTS:
        spec = container(file)
        assert {"configMapRef": {"name": name}} in spec["envFrom"], f"{file} does not read the ConfigMap"
        env = {item["name"]: item for item in spec.get("env", [])}
        assert ENV_HEALTH_PORT not in env, f"{file} overrides the ConfigMap's health port"
        ref = env[ENV_SASL_PASSWORD]["valueFrom"]["secretKeyRef"]
        assert ref["optional"] is True, f"{file}: the SASL Secret must be optional"


def test_compose_app_services_reach_kafka_and_redis() -> None:
    kafka_env = compose_env(service("kafka"))
    advertised = {url.split("://", 1)[1] for url in kafka_env["KAFKA_ADVERTISED_LISTENERS"].split(",")}
    for name in APP_SERVICES:
        env = compose_env(service(name))
        servers = env["KAFKA_BOOTSTRAP_SERVERS"].split(",")
        assert set(servers) <= advertised, (
            f"{name}: {servers} is not a listener Kafka advertises ({advertised})"
        )
        assert re.fullmatch(r"redis://redis:6379(/\d+)?", env["REDIS_URL"]), f"{name}: {env['REDIS_URL']}"
        assert env[ENV_HEALTH_PORT] == str(health_port()), f"{name}: health port differs from the ConfigMap's"
        Settings.from_env(env)


def test_compose_kafka_is_a_kraft_node_with_consistent_listeners() -> None:
    env = compose_env(service("kafka"))
    assert set(env["KAFKA_PROCESS_ROLES"].split(",")) == {"broker", "controller"}
    protocols = dict(item.split(":") for item in env["KAFKA_LISTENER_SECURITY_PROTOCOL_MAP"].split(","))
    listeners = {url.split("://")[0]: url.split(":")[-1] for url in env["KAFKA_LISTENERS"].split(",")}
    assert set(listeners) <= set(protocols)
    assert env["KAFKA_CONTROLLER_LISTENER_NAMES"] in listeners
    assert env["KAFKA_INTER_BROKER_LISTENER_NAME"] in listeners
    node, _, voter = env["KAFKA_CONTROLLER_QUORUM_VOTERS"].partition("@")
    assert node == str(env["KAFKA_NODE_ID"])
    assert voter.rpartition(":")[2] == listeners[env["KAFKA_CONTROLLER_LISTENER_NAMES"]]
    for url in env["KAFKA_ADVERTISED_LISTENERS"].split(","):
        assert url.split("://")[0] in listeners, f"advertised {url} is no listener"


# ---- commands ---------------------------------------------------------------------------------------


EXPECTED_COMMANDS = {
    "compose:topics": ["topics", "create"],
    "compose:orchestrator": ["run"],
    "compose:workers": ["worker"],
    "k8s:orchestrator.yaml": ["run"],
    "k8s:workers.yaml": ["worker"],
    "Dockerfile:CMD": ["run"],
}


@pytest.mark.parametrize("where", [*EXPECTED_COMMANDS, "compose:starter"])
def test_container_commands_parse_with_the_cli(where: str) -> None:
    commands = container_commands()
    chosen = {k: v for k, v in commands.items() if k == where or k.startswith(where + "[")}
    assert chosen, where
    for key, args in chosen.items():
        path, _ = parse_command(args)
        if key in EXPECTED_COMMANDS:
            assert path == EXPECTED_COMMANDS[key], f"{key} runs {path}"


def test_targets_import_and_the_workers_serve_every_step_of_the_workflows() -> None:
    commands = container_commands()
    workflow_specs = {option_value(args, "--workflows") for args in commands.values()} - {None}
    handler_specs = {option_value(args, "--handlers") for args in commands.values()} - {None}
    assert workflow_specs and handler_specs
    for spec in workflow_specs | handler_specs:
        assert spec is not None and re.fullmatch(r"[\w.]+(:\w+)?", spec), spec
    needed: set[str] = set()
    for spec in workflow_specs:
        assert spec is not None
        workflows = workflow_list(load_target(spec, "workflows"))
        assert workflows, f"{spec} holds no workflow"
        for wf in workflows:
            for step in wf.get_steps():
                needed |= {step.worker_name} | ({step.compensation} if step.compensation else set())
    for spec in handler_specs:
        assert spec is not None
        handlers = load_target(spec, "handlers")
        assert isinstance(handlers, Mapping) and all(callable(h) for h in handlers.values()), spec
        assert not needed - set(handlers), f"{spec} has no handler for {sorted(needed - set(handlers))}"


def test_compose_topics_creates_the_topics_of_the_orchestrators_workflows() -> None:
    topics = option_value(service("topics")["command"], "--workflows")
    assert topics == option_value(service("orchestrator")["command"], "--workflows"), (
        "the topics service creates the command topics of other workflows than the orchestrator runs"
    )


def test_starter_starts_workflows_the_orchestrator_serves() -> None:
    spec = option_value(service("orchestrator")["command"], "--workflows")
    assert spec is not None
    ids = {wf.get_id() for wf in workflow_list(load_target(spec, "workflows"))}
    starts = [words for words in starter_lines() if words[0] == "start"]
    assert starts
    for words in starts:
        assert words[1] in ids, f"the starter starts {words[1]!r}; the orchestrator serves {sorted(ids)}"
        context = option_value(words, "--context")
        assert context is not None and isinstance(json.loads(context), dict), words
        assert option_value(words, "--id"), words
    assert len({option_value(w, "--id") for w in starts}) == len(starts), "transaction ids repeat"


# ---- probes, ports, termination -------------------------------------------------------------------


def resolve_port(spec: dict[str, Any], port: int | str) -> int:
    if isinstance(port, int):
        return port
    (number,) = [p["containerPort"] for p in spec["ports"] if p.get("name") == port]
    return int(number)


@pytest.mark.parametrize("file", DEPLOYMENTS)
def test_probes_use_the_health_port_and_paths(file: str) -> None:
    spec = container(file)
    probes = {
        "livenessProbe": "/healthz",
        "readinessProbe": "/readyz",
        "startupProbe": "/healthz",
    }
    assert "livenessProbe" in spec and "readinessProbe" in spec
    for probe, path in probes.items():
        if probe not in spec:
            continue
        get = spec[probe]["httpGet"]
        assert get["path"] == path, f"{file} {probe} hits {get['path']}"
        assert resolve_port(spec, get["port"]) == health_port(), f"{file} {probe} is not on the health port"


@pytest.mark.parametrize("file", DEPLOYMENTS)
def test_deployment_shape(file: str) -> None:
    doc = deployment(file)
    pod = doc["spec"]["template"]["spec"]
    spec = container(file)
    assert doc["spec"]["replicas"] == 2
    labels = doc["spec"]["template"]["metadata"]["labels"]
    assert doc["spec"]["selector"]["matchLabels"].items() <= labels.items(), "the selector misses the pods"
    pre_stop = spec["lifecycle"]["preStop"]["exec"]["command"]
    assert pre_stop[0] == "sleep", pre_stop
    assert pod["terminationGracePeriodSeconds"] > float(pre_stop[1]) + 10, (
        "no time left to drain after preStop"
    )
    assert spec["resources"]["requests"] and spec["resources"]["limits"]
    uid = pod["securityContext"]["runAsUser"]
    assert pod["securityContext"]["runAsNonRoot"] is True and uid != 0
    assert docker_args("USER")[-1].split(":")[0] == str(uid), "runAsUser differs from the image's USER"
    assert spec["securityContext"]["allowPrivilegeEscalation"] is False


def test_compose_dependencies_and_termination() -> None:
    services = compose()["services"]
    wanted = {
        "topics": {"kafka": "service_healthy"},
        "orchestrator": {
            "kafka": "service_healthy",
            "redis": "service_healthy",
            "topics": "service_completed_successfully",
        },
        "workers": {"kafka": "service_healthy", "topics": "service_completed_successfully"},
    }
    for name, deps in wanted.items():
        got = {dep: cond["condition"] for dep, cond in services[name]["depends_on"].items()}
        assert got.items() >= deps.items(), f"{name} depends on {got}"
    for name, svc in services.items():
        for dep, cond in (svc.get("depends_on") or {}).items():
            if cond["condition"] == "service_healthy":
                target = services[dep]
                checked = "healthcheck" in target or "build" in target  # the image's HEALTHCHECK
                assert checked and not (target.get("healthcheck") or {}).get("disable"), (
                    f"{name} waits for {dep} to be healthy, which has no healthcheck"
                )
    for name in ("orchestrator", "workers"):
        assert re.fullmatch(r"\d+s", services[name]["stop_grace_period"]), name
        assert services[name].get("stop_signal", "SIGTERM") == "SIGTERM"
    for name in APP_SERVICES:
        build = services[name]["build"]
        assert (COMPOSE_FILE.parent / build["context"] / build["dockerfile"]).resolve() == DOCKERFILE


def redis_effective_config() -> dict[str, list[str]]:
    """deploy/redis/redis.conf as compose mounts it, with the command line's overrides on top."""
    svc = service("redis")
    command = [str(word) for word in svc["command"]]
    assert command[0] == "redis-server"
    conf_path = command[1]
    mounts = {m.split(":")[1]: m.split(":")[0] for m in svc["volumes"]}
    source = (COMPOSE_FILE.parent / mounts[conf_path]).resolve()
    assert source == DEPLOY / "redis" / "redis.conf", f"compose's redis reads {source}"
    config: dict[str, list[str]] = {}
    for line in source.read_text(encoding="utf-8").splitlines():
        words = shlex.split(line, comments=True)
        if words:
            config[words[0].lower()] = words[1:]
    key = None
    for word in command[2:]:
        if word.startswith("--"):
            key = word[2:].lower()
            config[key] = []
        else:
            assert key is not None, command
            config[key].append(word)
    return config


def test_compose_redis_runs_with_aof_in_the_foreground_on_the_network() -> None:
    config = redis_effective_config()
    assert config["appendonly"] == ["yes"]
    assert config["appendfsync"] == ["always"], "an acknowledged transition must survive a Redis crash"
    assert config["maxmemory-policy"] == ["noeviction"]
    assert config["daemonize"] == ["no"], "a daemonised redis-server exits the container"
    assert set(config["bind"]) - {"127.0.0.1", "-::1", "::1"}, "Redis listens on loopback only"
    assert config["protected-mode"] == ["no"] or "requirepass" in config
    mounted = {m.split(":")[1] for m in service("redis")["volumes"]}
    assert config.get("dir", ["/data"])[0] in mounted, "the AOF directory is not on a volume"
    assert "healthcheck" in service("redis")


# ---- the Dockerfile -----------------------------------------------------------------------------------


def test_dockerfile_entrypoint_is_the_console_script() -> None:
    with (REPO / "pyproject.toml").open("rb") as f:
        scripts = tomllib.load(f)["project"]["scripts"]
    assert json.loads(docker_args("ENTRYPOINT")[-1]) == [CONSOLE_SCRIPT]
    assert CONSOLE_SCRIPT in scripts
    module, _, attr = scripts[CONSOLE_SCRIPT].partition(":")
    assert callable(getattr(importlib.import_module(module), attr))


def test_dockerfile_builds_in_stages_and_runs_unprivileged() -> None:
    args = dict(item.split("=", 1) for item in docker_args("ARG") if "=" in item)
    bases = [words.split()[0] for words in docker_args("FROM")]
    assert len(bases) >= 2, "not multi-stage"
    resolved = {args[b[2:-1]] if b.startswith("${") else b for b in bases}
    assert resolved == {"python:3.11-slim"}, resolved
    user = docker_args("USER")[-1].split(":")[0]
    assert user.isdigit() and user != "0", "run as a numeric non-root uid"
    runs = " ".join(docker_args("RUN"))
    assert "pip install" in runs and not re.search(r"pip install[^&]*(-e|--editable)\b", runs)
    assert str(docker_env()[ENV_HEALTH_PORT]) in docker_args("EXPOSE")[-1].split()
    assert docker_env()[ENV_HEALTH_PORT] == str(health_port())


def test_dockerignore_keeps_what_the_build_copies() -> None:
    lines = [
        line.strip()
        for line in (REPO / ".dockerignore").read_text(encoding="utf-8").splitlines()
        if line.strip() and not line.startswith("#")
    ]
    for args in docker_args("COPY"):
        words = args.split()
        if any(w.startswith("--from") for w in words):
            continue
        for source in words[:-1]:
            if "*" in lines:
                assert f"!{source}" in lines or f"!{source}/" in lines, f".dockerignore drops {source}"
            assert (REPO / source).exists(), source


class _Health(http.server.BaseHTTPRequestHandler):
    status = 200
    paths: list[str] = []

    def do_GET(self) -> None:
        self.paths.append(self.path)
        self.send_response(self.status if self.path == "/healthz" else 404)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[tuple[int, type[_Health]]]:
    handler = type("Health", (_Health,), {"paths": [], "status": 200})
    server = http.server.HTTPServer(("127.0.0.1", 0), handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield server.server_address[1], handler
    finally:
        server.shutdown()
        server.server_close()
        thread.join()


def test_dockerfile_healthcheck_gets_healthz_on_the_health_port(
    health_server: tuple[int, type[_Health]],
) -> None:
    port, handler = health_server
    (check,) = docker_args("HEALTHCHECK")
    command = json.loads(check[check.index("CMD") + 3 :].strip())
    assert command[0] == "python", "the slim image has python, not curl"

    def run() -> int:
        env = {ENV_HEALTH_PORT: str(port)}
        return subprocess.run(
            [sys.executable, *command[1:]], env=env, capture_output=True, timeout=30
        ).returncode

    assert run() == 0
    assert handler.paths == ["/healthz"]
    handler.status = 503
    assert run() != 0, "the healthcheck passes on a 503"


# ---- the cluster variant: k8s/cluster, a kustomize overlay of k8s/ -------------------------------------

CLUSTER = K8S / "cluster"
# min_replicas (Redis WAIT before publishing) comes with the Redis Cluster store. Until Settings has it,
# the overlay's variable is the name it is expected under; from then on it must be the setting's own.
MIN_REPLICAS_VAR = ENV_VARS.get("min_replicas", "ORCHESTRATOR_MIN_REPLICAS")


def overlay() -> dict[str, Any]:
    (doc,) = load_yaml(CLUSTER / "kustomization.yaml")
    assert doc["kind"] == "Kustomization"
    assert isinstance(doc, dict)
    return doc


def overlay_patch(kind: str) -> dict[str, Any]:
    (found,) = [
        doc
        for item in overlay()["patches"]
        for doc in load_yaml(CLUSTER / item["path"])
        if doc["kind"] == kind
    ]
    assert isinstance(found, dict)
    return found


def merged(base: Any, patch: Any) -> Any:
    """A strategic-merge patch as far as these files use it: maps merge, everything else is replaced."""
    if isinstance(base, dict) and isinstance(patch, dict):
        return {k: merged(base[k], v) if k in base else v for k, v in patch.items()} | {
            k: v for k, v in base.items() if k not in patch
        }
    return patch


def cluster_configmap() -> dict[str, str]:
    data = merged(configmap()["data"], overlay_patch("ConfigMap")["data"])
    assert isinstance(data, dict)
    return data


def test_cluster_overlay_builds_on_the_base_and_patches_what_it_has() -> None:
    doc = overlay()
    assert (CLUSTER / doc["resources"][0]).resolve() == K8S, "the overlay does not start from deploy/k8s"
    used = {*doc["resources"][1:], *(item["path"] for item in doc["patches"])}
    present = {p.name for p in CLUSTER.glob("*.yaml") if p.name != "kustomization.yaml"}
    assert used == present, f"listed {sorted(used)}, present {sorted(present)}"
    base = {
        (d["kind"], d["metadata"]["name"])
        for p in K8S.glob("*.yaml")
        if p.name != "kustomization.yaml"
        for d in load_yaml(p)
    }
    for item in doc["patches"]:
        for patch in load_yaml(CLUSTER / item["path"]):
            assert (patch["kind"], patch["metadata"]["name"]) in base, f"{item['path']} patches nothing"


def test_cluster_configmap_points_at_several_brokers_and_a_redis_cluster_with_replication() -> None:
    data = cluster_configmap()
    assert all(isinstance(v, str) for v in data.values()), "ConfigMap values must be strings (quote numbers)"
    unknown = set(data) - APP_VARS - {MIN_REPLICAS_VAR}
    assert not unknown, f"the cluster ConfigMap sets {sorted(unknown)}, not settings of the code"
    settings = Settings.from_env(data)
    brokers = settings.bootstrap_servers.split(",")
    assert len(set(brokers)) >= 3, "list every broker: a client must start while one is down"
    assert settings.replication_factor == 3
    assert int(data[MIN_REPLICAS_VAR]) >= 1, "no Redis replica must hold a write before it counts"
    url = urlparse(settings.redis_url)
    assert url.scheme in ("redis", "rediss") and url.path in ("", "/", "/0"), "a Redis Cluster has db 0 only"
    orchestrators = merged(deployment("orchestrator.yaml"), overlay_patch("Deployment"))["spec"]["replicas"]
    assert settings.partitions >= 2 * orchestrators, "give each orchestrator several partitions"


def test_cluster_orchestrators_spread_over_nodes_and_leave_one_at_a_time() -> None:
    base = deployment("orchestrator.yaml")
    doc = merged(base, overlay_patch("Deployment"))
    assert doc["spec"]["replicas"] >= 3
    labels = base["spec"]["template"]["metadata"]["labels"]
    (spread,) = doc["spec"]["template"]["spec"]["topologySpreadConstraints"]
    assert spread["topologyKey"] == "kubernetes.io/hostname"
    assert spread["labelSelector"]["matchLabels"].items() <= labels.items()
    assert doc["spec"]["template"]["spec"]["containers"] == base["spec"]["template"]["spec"]["containers"]
    (pdb,) = load_yaml(CLUSTER / "pdb.yaml")
    assert pdb["kind"] == "PodDisruptionBudget"
    assert pdb["spec"]["selector"]["matchLabels"] == base["spec"]["selector"]["matchLabels"]
    assert pdb["spec"]["maxUnavailable"] == 1 < doc["spec"]["replicas"]


def test_redis_cluster_conf_adds_cluster_mode_to_the_single_nodes_durability() -> None:
    config = {
        words[0].lower(): words[1:]
        for name in ("redis.conf", "cluster.conf")
        for line in (DEPLOY / "redis" / name).read_text(encoding="utf-8").splitlines()
        if (words := shlex.split(line, comments=True))
    }
    assert config["cluster-enabled"] == ["yes"]
    assert config["cluster-require-full-coverage"] == ["yes"]
    assert (config["appendonly"], config["appendfsync"]) == (["yes"], ["always"])
    assert config["maxmemory-policy"] == ["noeviction"]
