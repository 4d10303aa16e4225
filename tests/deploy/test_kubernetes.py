"""deploy/k8s, checked without a cluster: every manifest is valid against the Kubernetes
API's schema (kubernetes-validate, strict: an unknown field fails); every container runs
a real entry point and gets the settings it needs (its env, ConfigMaps and Secret files
laid out in a temporary directory, loaded by mailingest's own settings loader); the pods
run restricted."""

from __future__ import annotations

import base64
import os
import re
import secrets
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml

from mailingest.config.settings import load_settings
from mailingest.config.table import SETTINGS
from mailingest.core.console_users import parse_users, user_line
from mailingest.core.errors import ConfigError

from .commands import check_invocation, needs
from .helpers import (
    DEFAULT_TASK_TIME_LIMIT,
    K8S,
    SECRET_EXAMPLE,
    configmaps,
    containers,
    host_of,
    image_default,
    k8s_documents,
    k8s_kind,
    k8s_our_containers,
    k8s_workloads,
    option_value,
    pod_spec,
    secret_example,
    secret_name,
)

# -- Kubernetes -------------------------------------------------------------------------


def object_id(doc: dict[str, Any]) -> str:
    return f"{doc['kind']}/{doc['metadata']['name']}"


def manifest_cases() -> list[tuple[str, str]]:
    """(file, kind/name) of every Kubernetes object (kustomization.yaml is kustomize's own
    file, not an object of the API: its test is the next one)."""
    return [
        (path.name, object_id(doc))
        for path, doc in k8s_documents()
        if doc.get("kind") != "Kustomization"
    ]


@pytest.mark.parametrize(("file", "what"), manifest_cases())
def test_k8s_manifest_is_a_valid_object_of_the_api(file: str, what: str) -> None:
    """kubernetes-validate checks each object against the Kubernetes API's OpenAPI schema
    that it ships (no cluster, nothing downloaded), strictly: a field the API does not know
    (a misspelt ``readinessProbe``) fails, where ``kubectl apply`` would drop or refuse it."""
    (doc,) = [d for p, d in k8s_documents() if p.name == file and object_id(d) == what]
    problem = ""
    try:
        kubernetes_validate.validate(doc, kubernetes_validate.latest_version(), strict=True)
    except jsonschema.ValidationError as exc:  # kubernetes-validate raises jsonschema's
        problem = f"{exc.message} at {'/'.join(map(str, exc.path))}"
    assert not problem, f"{file}: {what}: {problem}"


def test_kustomization_lists_every_manifest_but_the_secret_example() -> None:
    kustomization = yaml.safe_load((K8S / "kustomization.yaml").read_text(encoding="utf-8"))
    listed = kustomization["resources"]
    for resource in listed:
        assert (K8S / resource).is_file(), f"kustomization lists missing {resource}"
    manifests = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert set(listed) == manifests - {SECRET_EXAMPLE.name}, (
        "every manifest is listed, except the Secret example (applying it would overwrite "
        "the real credentials with placeholders)"
    )
    images = {image["name"] for image in kustomization.get("images", [])}
    assert "mailingest" in images, "kustomization sets the mailingest image's registry and tag"


def k8s_argv(container: dict[str, Any]) -> list[str]:
    command = container.get("command")
    args = container.get("args")
    if command is None:
        return image_default("ENTRYPOINT") + (args if args is not None else image_default("CMD"))
    return list(command) + list(args or [])


def probe_argvs(container: dict[str, Any]) -> list[list[str]]:
    return [
        container[probe]["exec"]["command"]
        for probe in ("startupProbe", "livenessProbe", "readinessProbe")
        if "exec" in container.get(probe, {})
    ]


@pytest.mark.parametrize("where", [where for where, _, _ in k8s_our_containers()])
def test_k8s_commands_are_real_entry_points(where: str) -> None:
    (container,) = [c for w, _, c in k8s_our_containers() if w == where]
    assert check_invocation(k8s_argv(container), where), f"{where} runs nothing of ours"
    for argv in probe_argvs(container):
        check_invocation(argv, f"{where} probe")


def volume_files(
    workload: dict[str, Any], container: dict[str, Any]
) -> dict[str, dict[str, str] | None]:
    """mount path -> {file name: content} of each mounted Secret/ConfigMap (None: emptyDir)."""
    volumes = {v["name"]: v for v in pod_spec(workload).get("volumes", [])}
    mounted: dict[str, dict[str, str] | None] = {}
    for mount in container.get("volumeMounts", []):
        volume = volumes[mount["name"]]
        assert "subPath" not in mount, "subPath mounts do not follow Secret/ConfigMap updates"
        if "secret" in volume:
            assert volume["secret"]["secretName"] == secret_name(), volume
            source = secret_example()
            items = volume["secret"].get("items")
        elif "configMap" in volume:
            name = volume["configMap"]["name"]
            assert name in configmaps(), f"no ConfigMap {name}"
            source = configmaps()[name]
            items = volume["configMap"].get("items")
        else:
            assert "emptyDir" in volume or "persistentVolumeClaim" in volume, volume
            mounted[mount["mountPath"]] = None
            continue
        if items is None:
            files = dict(source)
        else:
            for item in items:
                assert item["key"] in source, f"volume {volume['name']}: no key {item['key']}"
            files = {item["path"]: source[item["key"]] for item in items}
        mounted[mount["mountPath"]] = files
    return mounted


def container_env(container: dict[str, Any]) -> dict[str, str]:
    env: dict[str, str] = {}
    for source in container.get("envFrom", []):
        name = source["configMapRef"]["name"]
        assert name in configmaps(), f"envFrom: no ConfigMap {name}"
        env |= configmaps()[name]
    for var in container.get("env", []):
        if "value" in var:
            env[var["name"]] = str(var["value"])
            continue
        ref = var["valueFrom"]
        if "secretKeyRef" in ref:
            key = ref["secretKeyRef"]
            assert key["name"] == secret_name() and key["key"] in secret_example(), key
            env[var["name"]] = secret_example()[key["key"]]
        else:
            key = ref["configMapKeyRef"]
            assert key["key"] in configmaps().get(key["name"], {}), key
            env[var["name"]] = configmaps()[key["name"]][key["key"]]
    return env


# settings whose value is the path of a file (MAILINGEST_CONFIG, MAILINGEST_CONSOLE_USERS,
# the CA files...); MAILINGEST_REPLY_TEMPLATES names a folder
FILE_SETTINGS = {s.var for s in SETTINGS if s.kind == "path"} - {"MAILINGEST_REPLY_TEMPLATES"}


def file_references(env: Mapping[str, str], mounted: Mapping[str, Any]) -> list[tuple[str, str]]:
    """(what, path) of every file a container is told to read: MAILINGEST_*_FILE and the
    settings that name a file, and the ``*_file`` keys of the config file."""
    refs = [(k, v) for k, v in env.items() if k.endswith("_FILE") or k in FILE_SETTINGS]
    config = env.get("MAILINGEST_CONFIG")
    if config:
        directory, _, name = config.rpartition("/")
        files = mounted.get(directory)
        assert files and name in files, f"MAILINGEST_CONFIG {config} is not a mounted file"
        data = tomllib.loads(files[name])
        tables = [data, *data.get("inboxes", [])]
        refs += [
            (f"{Path(config).name}: {key}", value)
            for table in tables
            for key, value in table.items()
            if key.endswith("_file")
        ]
    return refs


@pytest.mark.parametrize("where", [where for where, _, _ in k8s_our_containers()])
def test_k8s_file_settings_point_into_mounted_volumes(where: str) -> None:
    ((workload, container),) = [(w, c) for n, w, c in k8s_our_containers() if n == where]
    mounted = volume_files(workload, container)
    env = container_env(container)
    for what, path in file_references(env, mounted):
        directory, _, name = path.rpartition("/")
        assert directory in mounted and mounted[directory] is not None, (
            f"{where}: {what}={path} is not inside a mounted Secret or ConfigMap"
        )
        assert name in mounted[directory], f"{where}: {what}={path}: the volume has no {name}"


# Secret keys whose example value start-up refuses, and what a real value looks like
# (the keys are the files' names: every Secret volume mounts a key under its own name).
REFUSED_PLACEHOLDERS = {
    "staging-key": lambda: base64.urlsafe_b64encode(os.urandom(32)).decode(),
    "console-secret": lambda: secrets.token_urlsafe(32),
    "console-users": lambda: user_line("ops", "operator", "a-password-of-the-operator") + "\n",
}


@pytest.mark.parametrize("where", [where for where, _, _ in k8s_our_containers()])
def test_k8s_containers_get_the_settings_they_need(where: str, tmp_path: Path) -> None:
    """Lay the container's mounted files out under tmp_path, point its environment there,
    and load the settings as the container would."""
    ((workload, container),) = [(w, c) for n, w, c in k8s_our_containers() if n == where]
    mounted = volume_files(workload, container)
    moves = {path: str(tmp_path / f"volume{i}") for i, path in enumerate(sorted(mounted, key=len))}

    paths = re.compile("(" + "|".join(map(re.escape, sorted(moves, key=len)[::-1])) + ")/")

    def relocate(text: str) -> str:
        return paths.sub(lambda m: moves[m.group(1)] + "/", text)

    # The example's staging key and the console's secret and users are placeholders that
    # start-up refuses (a copy of the example cannot reach production unchanged); real
    # values stand in for them here.
    for path, files in mounted.items():
        Path(moves[path]).mkdir()
        for name, content in (files or {}).items():
            if name in REFUSED_PLACEHOLDERS and content == secret_example().get(name):
                content = REFUSED_PLACEHOLDERS[name]()
            (Path(moves[path]) / name).write_text(relocate(content), encoding="utf-8")
    env = {k: relocate(v) for k, v in container_env(container).items()}
    invocations = check_invocation(k8s_argv(container), where)
    for argv in probe_argvs(container):
        invocations += check_invocation(argv, where)
    try:
        load_settings(env).require(*needs(invocations))
    except ConfigError as exc:
        pytest.fail(f"{where}: {' and '.join(invocations)}: {exc}")
    if any("flower" in invocation for invocation in invocations):
        assert env.get("FLOWER_BASIC_AUTH"), f"{where}: Flower without FLOWER_BASIC_AUTH"


def test_k8s_example_staging_key_is_refused() -> None:
    from mailingest.adapters.encryption import Sealer, SealingError
    from mailingest.config.settings import Secret

    with pytest.raises(SealingError):
        Sealer(Secret(secret_example()["staging-key"]))


def test_k8s_example_console_secret_and_users_are_refused(tmp_path: Path) -> None:
    """Copied unchanged, the example's console secret and users file stop the console at
    start, each with a line naming its setting."""
    users = tmp_path / "console-users"
    users.write_text(secret_example()["console-users"], encoding="utf-8")
    secret = tmp_path / "console-secret"
    secret.write_text(secret_example()["console-secret"], encoding="utf-8")
    with pytest.raises(ConfigError, match="MAILINGEST_CONSOLE_USERS"):
        load_settings({"MAILINGEST_CONSOLE_USERS": str(users)})
    with pytest.raises(ConfigError, match="MAILINGEST_CONSOLE_SECRET"):
        load_settings({"MAILINGEST_CONSOLE_SECRET_FILE": str(secret)})
    for name in REFUSED_PLACEHOLDERS:
        assert name in secret_example(), f"{SECRET_EXAMPLE.name} has no {name}"
    parse_users(REFUSED_PLACEHOLDERS["console-users"]())  # the stand-in is a real line


def test_k8s_every_referenced_secret_and_configmap_key_exists() -> None:
    for _, workload, container in k8s_our_containers():
        volume_files(workload, container)  # volume names and items
        container_env(container)  # env refs and envFrom
    for workload in k8s_workloads():
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" in volume:
                assert volume["secret"]["secretName"] == secret_name()
                for item in volume["secret"].get("items", []):
                    assert item["key"] in secret_example(), item
            if "configMap" in volume:
                items = volume["configMap"].get("items", [])
                data = configmaps()[volume["configMap"]["name"]]
                assert all(item["key"] in data for item in items), items


def deployment(name: str) -> dict[str, Any]:
    (found,) = [w for w in k8s_workloads() if w["metadata"]["name"] == name]
    return found


def test_k8s_one_beat_recreated() -> None:
    beat = deployment("mailingest-beat")
    assert beat["spec"]["replicas"] == 1, "exactly one beat"
    assert beat["spec"]["strategy"]["type"] == "Recreate", "the old beat stops first"
    assert k8s_argv(pod_spec(beat)["containers"][0])[:2] == ["mailingest", "beat"]


def test_k8s_worker_is_probed_scalable_and_shuts_down_warm() -> None:
    worker = deployment("mailingest-worker")
    spec = pod_spec(worker)
    assert worker["spec"]["replicas"] >= 2
    (main,) = [c for c in spec["containers"] if k8s_argv(c)[:2] == ["mailingest", "worker"]]
    assert "readinessProbe" in main and "livenessProbe" in main, "the worker has probes"
    checks = [k8s_argv(c) for c in spec.get("initContainers", [])]
    assert ["mailingest", "check-config"] in [argv[:2] for argv in checks], (
        "an init container runs mailingest check-config"
    )
    env = container_env(main)
    limit = int(env.get("MAILINGEST_TASK_TIME_LIMIT") or DEFAULT_TASK_TIME_LIMIT)
    assert spec["terminationGracePeriodSeconds"] > limit, "warm shutdown outlasts a task"
    port = int(env["MAILINGEST_METRICS_PORT"])
    assert port in [p["containerPort"] for p in main["ports"]]
    annotations = worker["spec"]["template"]["metadata"].get("annotations", {})
    assert annotations.get("prometheus.io/port") == str(port)
    mounts = {m["mountPath"]: m["name"] for m in main["volumeMounts"]}
    volumes = {v["name"]: v for v in spec["volumes"]}
    assert "/tmp" in mounts and "emptyDir" in volumes[mounts["/tmp"]], (
        "read-only root: /tmp (Prometheus multiprocess files) is an emptyDir"
    )


def test_k8s_pods_run_restricted() -> None:
    for workload in k8s_workloads():
        name = workload["metadata"]["name"]
        spec = pod_spec(workload)
        pod = spec.get("securityContext", {})
        assert pod.get("runAsNonRoot") is True, f"{name}: runAsNonRoot"
        assert pod.get("runAsUser", 1) != 0, f"{name}: runs as root"
        assert pod.get("seccompProfile", {}).get("type") == "RuntimeDefault", name
        for container in containers(workload):
            security = container.get("securityContext", {})
            where = f"{name}/{container['name']}"
            assert security.get("allowPrivilegeEscalation") is False, where
            assert security.get("readOnlyRootFilesystem") is True, where
            assert security.get("capabilities", {}).get("drop") == ["ALL"], where
            assert container.get("resources", {}).get("limits", {}).get("memory"), where


def test_k8s_flower_has_a_service_and_a_login() -> None:
    flower = deployment("mailingest-flower")
    (container,) = pod_spec(flower)["containers"]
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert option_value(k8s_argv(container), "--port") == str(ports["http"])
    (service,) = [s for s in k8s_kind("Service") if s["metadata"]["name"] == "mailingest-flower"]
    labels = flower["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert all(
        p["targetPort"] in ports or p["targetPort"] in ports.values()
        for p in service["spec"]["ports"]
    )
    refs = [v for v in container["env"] if v["name"] == "FLOWER_BASIC_AUTH"]
    assert refs and "secretKeyRef" in refs[0]["valueFrom"], "Flower's login from the Secret"
    assert container["readinessProbe"]["httpGet"]["path"] == "/healthcheck"


def test_k8s_console_has_a_service_probes_and_its_users_file() -> None:
    """One console, listening on the pod's addresses on the port its Service targets;
    started, ready and alive by /healthz (no login; 503 without Redis), with a liveness
    that rides out a Redis outage of minutes rather than restart it in a loop; its
    secret and users file come from the Secret, mounted in no other pod."""
    console = deployment("mailingest-console")
    assert console["spec"]["replicas"] == 1
    (container,) = pod_spec(console)["containers"]
    argv = k8s_argv(container)
    assert argv[:2] == ["mailingest", "console"], argv
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert option_value(argv, "--port") == str(ports["http"])
    assert option_value(argv, "--host") == "0.0.0.0", "on the pod's loopback no one reaches it"
    for kind in ("startupProbe", "readinessProbe", "livenessProbe"):
        probe = container.get(kind)
        assert probe, f"the console has no {kind}"
        assert probe["httpGet"]["path"] == "/healthz", f"{kind}: {probe}"
        assert probe["httpGet"]["port"] in ("http", ports["http"]), f"{kind}: {probe}"
    liveness = container["livenessProbe"]
    patience = liveness.get("periodSeconds", 10) * liveness.get("failureThreshold", 3)
    assert patience >= 180, f"liveness restarts the console after {patience} s without Redis"

    (service,) = [s for s in k8s_kind("Service") if s["metadata"]["name"] == "mailingest-console"]
    assert service["spec"].get("type", "ClusterIP") == "ClusterIP", "not exposed outside"
    labels = console["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert [p["targetPort"] for p in service["spec"]["ports"]] in (["http"], [ports["http"]])

    env = {v["name"]: v for v in container["env"]}
    assert "value" not in env.get("MAILINGEST_CONSOLE_SECRET", {}), "a secret in the manifest"
    volumes = {v["name"]: v for v in pod_spec(console)["volumes"]}
    mounts = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"]}
    for setting, key in (
        ("MAILINGEST_CONSOLE_SECRET_FILE", "console-secret"),
        ("MAILINGEST_CONSOLE_USERS", "console-users"),
    ):
        directory, _, name = env[setting]["value"].rpartition("/")
        secret = mounts.get(directory, {}).get("secret")
        assert secret, f"{setting}: {directory} is not a mounted Secret"
        items = {item["path"]: item["key"] for item in secret.get("items", [])}
        assert (items.get(name) if items else name) == key, f"{setting}: not the Secret's {key}"
    for workload in k8s_workloads():
        if workload["metadata"]["name"] == console["metadata"]["name"]:
            continue
        for volume in pod_spec(workload).get("volumes", []):
            if "secret" not in volume:
                continue
            items = volume["secret"].get("items")
            keys = {item["key"] for item in items} if items is not None else set(secret_example())
            assert not keys & {"console-secret", "console-users"}, (
                f"{workload['metadata']['name']} mounts the console's secret or users"
            )


def test_k8s_redis_persists_with_aof() -> None:
    (redis,) = [w for w in k8s_kind("StatefulSet") if w["metadata"]["name"] == "redis"]
    assert redis["spec"]["replicas"] == 1
    (container,) = pod_spec(redis)["containers"]
    argv = k8s_argv(container)
    assert option_value(argv, "--appendonly") == "yes"
    assert option_value(argv, "--maxmemory-policy") == "noeviction"
    data = option_value(argv, "--dir")
    claims = [t["metadata"]["name"] for t in redis["spec"]["volumeClaimTemplates"]]
    assert {m["mountPath"]: m["name"] for m in container["volumeMounts"]}.get(data) in claims
    services = {s["metadata"]["name"]: s for s in k8s_kind("Service")}
    redis_url = secret_example()["redis-url"]
    assert host_of(redis_url) in services, "the example redis-url names the Redis Service"
    assert services[host_of(redis_url)]["spec"]["selector"].items() <= (
        redis["spec"]["template"]["metadata"]["labels"].items()
    )
