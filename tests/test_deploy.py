"""The deploy kit parses and says what the README promises."""
from __future__ import annotations

import configparser
import importlib.metadata
import runpy
import shlex
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from helpers import ROOT

DEPLOY = ROOT / "deploy"


def test_image_copies_production_files_only():
    copied = set()
    for line in (ROOT / "Dockerfile").read_text().splitlines():
        if line.startswith("COPY "):
            for pattern in line.split()[1:-1]:
                copied.update(path.relative_to(ROOT).as_posix() for path in ROOT.glob(pattern))
    assert {"killmail_worker.py", "queue_killmails.py", "status_app.py", "schema.sql"} <= copied
    assert not {name for name in copied if name.startswith(("devtools", "tests", "bench"))}
    assert not {"esi_simulator.py", "demo.py"} & copied
    assert "devtools" in (ROOT / ".dockerignore").read_text().split()


def test_image_installs_the_runtime_lock_with_hashes():
    lines = (ROOT / "Dockerfile").read_text().splitlines()
    installs = [line for line in lines if line.startswith("RUN pip install")]
    assert installs == ["RUN pip install --no-cache-dir --require-hashes -r requirements.lock"]
    assert "COPY requirements.lock ." in lines


def pins(path: Path) -> dict[str, str]:
    """The name == version pins of a requirements file, -r included, names normalised (extras dropped)."""
    found = {}
    for line in path.read_text().splitlines():
        line = line.split("#")[0].strip().rstrip("\\").strip()
        if line.startswith("-r "):
            found.update(pins(path.parent / line.split()[1]))
        elif "==" in line:
            requirement = Requirement(line)
            found[canonicalize_name(requirement.name)] = str(requirement.specifier).removeprefix("==")
    return found


def hashed(path: Path) -> dict[str, int]:
    """Each pinned package of a lock and how many hashes it carries."""
    counts, name = {}, None
    for line in path.read_text().splitlines():
        if "==" in line and not line.startswith((" ", "#")):
            name = canonicalize_name(line.split("==")[0])
            counts[name] = 0
        elif line.strip().startswith("--hash=sha256:"):
            counts[name] += 1
    return counts


@pytest.mark.parametrize("lock, listed", [("requirements.lock", "requirements.txt"),
                                          ("requirements-dev.lock", "requirements-dev.txt")])
def test_a_lock_pins_what_its_list_names_every_package_with_hashes(lock, listed):
    locked, wanted = pins(ROOT / lock), pins(ROOT / listed)
    assert {name: locked.get(name) for name in wanted} == wanted, "run `make lock`"
    assert set(hashed(ROOT / lock)) == set(locked) and min(hashed(ROOT / lock).values()) >= 1


def test_the_development_lock_holds_the_runtime_lock():
    runtime, development = pins(ROOT / "requirements.lock"), pins(ROOT / "requirements-dev.lock")
    assert {name: development.get(name) for name in runtime} == runtime


def test_the_development_lock_is_what_is_installed_and_all_it_needs():
    """Every package the listed ones need, at any depth, is locked, at the version installed here (make installs
    the lock)."""
    locked = pins(ROOT / "requirements-dev.lock")
    wanted = [Requirement(line.split("#")[0]) for path in ("requirements.txt", "requirements-dev.txt")
              for line in (ROOT / path).read_text().splitlines() if "==" in line]
    seen: set[str] = set()
    while wanted:
        requirement = wanted.pop()
        name = canonicalize_name(requirement.name)
        assert importlib.metadata.version(name) == locked.get(name), name
        extras = {"", *requirement.extras}
        for text in importlib.metadata.requires(name) or []:
            needed = Requirement(text)
            if needed.marker is None or any(needed.marker.evaluate({"extra": extra}) for extra in extras):
                if (canonicalize_name(needed.name), frozenset(needed.extras)) not in seen:
                    seen.add((canonicalize_name(needed.name), frozenset(needed.extras)))
                    wanted.append(needed)
    assert {name for name, _ in seen} <= set(locked)


def test_compose_file_has_services_and_workers():
    compose = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())
    services = compose["services"]
    assert {"postgres", "rabbitmq", "worker", "producer", "status", "notify"} <= set(services)
    assert services["notify"]["command"][:2] == ["python", "send_notifications.py"]
    assert services["worker"]["command"][:2] == ["python", "killmail_worker.py"]
    assert services["status"]["command"][-1] == "status_app:app"
    assert services["worker"]["environment"]["RABBITMQ_URL"].startswith("amqp://")


def compose_command() -> list[str] | None:
    """Docker's compose plugin where the client has it, else the standalone docker-compose (Debian's package,
    which .ci/run installs): either validates the file without a Docker daemon."""
    if shutil.which("docker") and subprocess.run(["docker", "compose", "version"], capture_output=True).returncode == 0:
        return ["docker", "compose"]
    return ["docker-compose"] if shutil.which("docker-compose") else None


def test_compose_config_is_valid_for_compose_itself():
    command = compose_command()
    if command is None:
        pytest.skip("neither docker compose nor docker-compose is installed")
    env = {"EVE_CLIENT_ID": "x", "EVE_CLIENT_SECRET": "y", "ESI_USER_AGENT": "z", "STATUS_BASIC_AUTH": "ops:pw",
           "PATH": "/usr/bin:/bin"}
    result = subprocess.run([*command, "-f", str(DEPLOY / "docker-compose.yml"), "config"],
                            capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr
    assert "killmail_worker.py" in result.stdout


KUBERNETES = DEPLOY / "kubernetes"


def kubernetes_documents() -> dict[tuple[str, str], dict]:
    """Every document that `kubectl apply -f deploy/kubernetes/` (-R too) would apply, by kind and name."""
    paths = [p for p in sorted(KUBERNETES.rglob("*")) if p.suffix in (".yaml", ".yml", ".json")]
    return {(d["kind"], d["metadata"]["name"]): d for path in paths for d in yaml.safe_load_all(path.read_text())
            if d}


def pod_specs() -> dict[str, dict]:
    documents = kubernetes_documents()
    specs = {name: d["spec"]["template"]["spec"] for (kind, name), d in documents.items() if kind == "Deployment"}
    specs.update({name: d["spec"]["jobTemplate"]["spec"]["template"]["spec"] for (kind, name), d in documents.items()
                  if kind == "CronJob"})
    return specs


def test_applying_the_kubernetes_manifests_never_writes_a_secret():
    assert [key for key in kubernetes_documents() if key[0] == "Secret"] == []


def test_the_kubernetes_secret_example_holds_what_the_pods_read():
    (example,) = yaml.safe_load_all((KUBERNETES / "secret.yaml.example").read_text())
    assert (example["kind"], example["metadata"]["name"]) == ("Secret", "killmail-worker-secrets")
    assert set(example["stringData"]) == {"DATABASE_URL", "RABBITMQ_URL", "EVE_CLIENT_ID", "EVE_CLIENT_SECRET",
                                          "STATUS_BASIC_AUTH", "TOKEN_KEY"}
    assert all("CHANGE-ME" in value for value in example["stringData"].values())
    for spec in pod_specs().values():
        assert {"secretRef": {"name": "killmail-worker-secrets"}} in spec["containers"][0]["envFrom"]


def dockerfile_user() -> int:
    (user,) = [line.split()[1] for line in (ROOT / "Dockerfile").read_text().splitlines() if line.startswith("USER ")]
    return int(user.split(":")[0])


@pytest.mark.parametrize("name", ["killmail-worker", "killmail-status", "killmail-queue", "killmail-notify"])
def test_kubernetes_pods_run_unprivileged_on_a_read_only_root(name):
    spec = pod_specs()[name]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == dockerfile_user() != 0
    assert spec["automountServiceAccountToken"] is False
    scratch = {v["name"] for v in spec["volumes"] if "emptyDir" in v}
    for container in spec["containers"]:
        context = container["securityContext"]
        assert (context["allowPrivilegeEscalation"], context["readOnlyRootFilesystem"]) == (False, True)
        assert context["capabilities"] == {"drop": ["ALL"]}
        assert {m["name"] for m in container["volumeMounts"] if m["mountPath"] == "/tmp"} <= scratch
        assert [m["mountPath"] for m in container["volumeMounts"]] == ["/tmp"]


def test_kubernetes_images_are_pinned_to_a_version():
    images = [c["image"] for spec in pod_specs().values() for c in spec["containers"]]
    assert len(images) == 4
    for image in images:
        name, _, tag = image.rpartition(":")
        assert "@sha256:" in image or (name and "/" not in tag and tag not in ("", "latest")), image


def test_kubernetes_manifest_runs_three_workers_with_a_readiness_probe():
    documents = kubernetes_documents()
    worker = documents[("Deployment", "killmail-worker")]
    assert worker["spec"]["replicas"] == 3
    assert worker["spec"]["template"]["spec"]["terminationGracePeriodSeconds"] >= 60
    status = documents[("Deployment", "killmail-status")]["spec"]["template"]["spec"]["containers"][0]
    assert status["readinessProbe"]["httpGet"]["path"] == "/health"
    assert documents[("CronJob", "killmail-queue")]["spec"]["jobTemplate"]["spec"]["template"]["spec"][
        "containers"][0]["command"] == ["python", "queue_killmails.py"]
    notify = documents[("Deployment", "killmail-notify")]["spec"]["template"]["spec"]["containers"][0]
    assert notify["command"][:2] == ["python", "send_notifications.py"]


@pytest.mark.parametrize("unit", ["killmail-worker@.service", "killmail-status.service", "killmail-queue.service",
                                  "killmail-queue.timer", "killmail-notify.service"])
def test_systemd_units_parse(unit):
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / unit)
    assert "Unit" in parser
    if unit.endswith(".service"):
        assert (ROOT / parser["Service"]["ExecStart"].split()[1].split("/")[-1]).exists() \
            or "gunicorn" in parser["Service"]["ExecStart"]


SERVICES = ["killmail-worker@.service", "killmail-status.service", "killmail-queue.service",
            "killmail-notify.service"]


@pytest.mark.parametrize("unit", SERVICES)
def test_systemd_services_are_sandboxed(unit):
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "systemd" / unit)
    service = parser["Service"]
    assert (service["NoNewPrivileges"], service["ProtectSystem"], service["PrivateTmp"], service["ProtectHome"],
            service["CapabilityBoundingSet"], service["UMask"]) == ("yes", "strict", "yes", "yes", "", "0077")
    rated = subprocess.run(["systemd-analyze", "security", "--offline=true", str(DEPLOY / "systemd" / unit)],
                           capture_output=True, text=True, timeout=60)
    exposure = float(rated.stdout.rpartition("Overall exposure level for ")[2].split(":")[1].split()[0])
    assert exposure <= 2.0, rated.stdout  # systemd's own scale: 10 is a unit with no sandboxing at all


def test_kubernetes_network_policy_denies_all_but_what_the_pods_need():
    documents = kubernetes_documents()
    deny = documents[("NetworkPolicy", "killmail-default-deny")]["spec"]
    (selected,) = deny["podSelector"]["matchExpressions"]
    assert set(selected["values"]) == set(pod_specs()) and deny["policyTypes"] == ["Ingress", "Egress"]
    assert "ingress" not in deny  # no ingress rule: nothing reaches a pod but what another policy lets in
    ports = {rule_port["port"] for rule in deny["egress"] for rule_port in rule["ports"]}
    assert ports == {53, 5432, 5672, 5671, 443}
    (https,) = [rule for rule in deny["egress"] if rule.get("to")]
    blocked = https["to"][0]["ipBlock"]["except"]
    assert "169.254.0.0/16" in blocked and "10.0.0.0/8" in blocked  # the metadata service, cluster addresses
    status = documents[("NetworkPolicy", "killmail-status-ingress")]["spec"]
    assert status["podSelector"] == {"matchLabels": {"app": "killmail-status"}}
    assert [p["port"] for rule in status["ingress"] for p in rule["ports"]] == [8000]
    templates = {name: d["spec"]["template"] if kind == "Deployment" else d["spec"]["jobTemplate"]["spec"]["template"]
                 for (kind, name), d in documents.items() if kind in ("Deployment", "CronJob")}
    assert {name: t["metadata"]["labels"]["app"] for name, t in templates.items()} == {n: n for n in templates}


def test_every_kubernetes_container_has_a_memory_limit():
    for name, spec in pod_specs().items():
        for container in spec["containers"]:
            assert container["resources"]["limits"]["memory"] and container["resources"]["requests"]["cpu"], name


def test_the_tls_ingress_example_serves_the_status_app_over_https():
    (ingress,) = yaml.safe_load_all((KUBERNETES / "ingress.yaml.example").read_text())
    service = kubernetes_documents()[("Service", "killmail-status")]
    (tls,), (rule,) = ingress["spec"]["tls"], ingress["spec"]["rules"]
    assert tls["secretName"] and tls["hosts"] == [rule["host"]]
    backend = rule["http"]["paths"][0]["backend"]["service"]
    assert backend["name"] == "killmail-status" and backend["port"]["name"] in {p["name"] for p in
                                                                                 service["spec"]["ports"]}
    assert f"EVE_CALLBACK_URL must then be https://{rule['host']}/callback" in \
        (KUBERNETES / "ingress.yaml.example").read_text().replace("\n# ", " ")


def test_the_env_example_says_who_may_read_the_file():
    assert "chown root:killmail .env && chmod 640 .env" in (ROOT / ".env.example").read_text()


def test_compose_status_app_needs_basic_auth_and_is_published_on_loopback_only():
    status = yaml.safe_load((DEPLOY / "docker-compose.yml").read_text())["services"]["status"]
    assert status["environment"]["STATUS_BASIC_AUTH"].startswith("${STATUS_BASIC_AUTH:?")
    assert status["ports"] == ["127.0.0.1:8000:8000"]


def status_unit() -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=True, interpolation=None)
    parser.optionxform = str
    parser.read(DEPLOY / "systemd/killmail-status.service")
    return parser


def test_systemd_status_app_listens_on_loopback_and_needs_basic_auth():
    service = status_unit()["Service"]
    assert "STATUS_BIND" not in service.get("Environment", "")  # gunicorn.conf.py's 127.0.0.1:8000
    check = service["ExecStartPre"].replace("$$", "$")  # systemd's escape of a literal $
    for env, code in (({}, 1), ({"STATUS_BASIC_AUTH": ""}, 1), ({"STATUS_BASIC_AUTH": "ops:pw"}, 0)):
        result = subprocess.run(shlex.split(check), env={"PATH": "/usr/bin:/bin", **env}, capture_output=True,
                                text=True)
        assert result.returncode == code, result.stderr
        assert ("STATUS_BASIC_AUTH" in result.stderr) is bool(code)


@pytest.mark.parametrize("env, bind", [
    ({}, "127.0.0.1:8000"), ({"PORT": "9000"}, "0.0.0.0:9000"), ({"STATUS_BIND": "10.0.0.5:80"}, "10.0.0.5:80"),
    ({"STATUS_BIND": "127.0.0.1:8001", "PORT": "9000"}, "127.0.0.1:8001"),
])
def test_gunicorn_binds_loopback_unless_told_otherwise(monkeypatch, env, bind):
    for name in ("STATUS_BIND", "PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    assert runpy.run_path(str(ROOT / "gunicorn.conf.py"))["bind"] == bind


def test_crontab_line_runs_the_producer():
    lines = [line for line in (DEPLOY / "crontab").read_text().splitlines() if line and not line.startswith("#")]
    assert len(lines) == 1 and lines[0].split()[:5] == ["*/5", "*", "*", "*", "*"]
    assert "queue_killmails.py" in lines[0]
