"""The Kubernetes GPU work pool of infra/k8s (docs/kubernetes.md), without a cluster.

A real `prefect server start` on loopback; through the real CLI, `prefect work-pool create patchcore-gpu --type
kubernetes --base-job-template infra/k8s/gpu-job-template.json` and `prefect deploy --prefect-file
infra/k8s/prefect.yaml -n full-benchmark-gpu`. Then the Job manifest a Kubernetes worker would submit for a run
of that deployment is built with prefect-kubernetes' own code path (`KubernetesWorkerJobConfiguration.
resolve_for_flow_run`, what `KubernetesWorker` calls before `create_namespaced_job`) and checked field by field,
and against the Kubernetes API models (kubernetes_asyncio) so a misspelt field cannot pass unnoticed.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import yaml

REPO = Path(__file__).resolve().parents[1]
TEMPLATE = REPO / "infra" / "k8s" / "gpu-job-template.json"
GPU_PREFECT_FILE = REPO / "infra" / "k8s" / "prefect.yaml"
POOL, DEPLOYMENT = "patchcore-gpu", "full-benchmark-gpu"
IMAGE, NAMESPACE = "registry.example.com/patchcore-worker:0.1.0", "patchcore"  # as docs/kubernetes.md deploys


def _digest(path: Path) -> str | None:
    return hashlib.sha256(path.read_bytes()).hexdigest() if path.exists() else None


@pytest.fixture(scope="module")
def gpu_server(tmp_path_factory):
    """`prefect server start` with the patchcore-gpu pool and the full-benchmark-gpu deployment, by the CLI."""
    import prefect_kubernetes  # noqa: F401 - a dependency: the `kubernetes` worker type comes from it

    from infra import local_servers

    watched = [REPO / "prefect.yaml", GPU_PREFECT_FILE]
    before = {p: _digest(p) for p in watched}
    dot_prefect = (REPO / ".prefect").exists()
    server = local_servers.PrefectServer(tmp_path_factory.mktemp("prefect-home"))
    server.start()
    try:
        server.cli("work-pool", "create", POOL, "--type", "kubernetes", "--base-job-template", str(TEMPLATE),
                   cwd=REPO)
        deployed = server.cli("deploy", "--prefect-file", str(GPU_PREFECT_FILE.relative_to(REPO)), "-n", DEPLOYMENT,
                              "--job-variable", f"image={IMAGE}", "--job-variable", f"namespace={NAMESPACE}", cwd=REPO)
        assert "successfully created" in deployed.stdout, deployed.stdout[-3000:]
        # `prefect deploy` leaves the repository as it was: no prefect.yaml rewritten, no .prefect/ folder.
        assert {p: _digest(p) for p in watched} == before
        assert (REPO / ".prefect").exists() == dot_prefect
        yield server
    finally:
        server.stop()


def _run(server, fn):
    """`fn(client)` against `server`, with an async PrefectClient (the worker's configuration code is async)."""
    from prefect import get_client
    from prefect.settings import PREFECT_API_URL, temporary_settings

    async def main():
        async with get_client() as client:
            return await fn(client)

    with temporary_settings({PREFECT_API_URL: server.url}):
        return asyncio.run(main())


async def _job_manifest(client, job_variables: dict | None = None) -> dict:
    """The Job manifest `KubernetesWorker` would create for a new run of the deployment (no cluster needed)."""
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    deployment = await client.read_deployment_by_name(f"patchcore/{DEPLOYMENT}")
    flow_run = await client.create_flow_run_from_deployment(deployment.id, job_variables=job_variables)
    pool = await client.read_work_pool(POOL)
    configuration = await KubernetesWorkerJobConfiguration.resolve_for_flow_run(
        flow_run, client=client, work_pool=pool, worker_name="test-kubernetes-worker")
    return configuration.job_manifest


def _container(manifest: dict) -> dict:
    [container] = manifest["spec"]["template"]["spec"]["containers"]
    return container


def _env(container: dict) -> dict[str, dict]:
    names = [e["name"] for e in container["env"]]
    assert len(names) == len(set(names)), names  # one entry per variable: an override replaces the template's
    return {e["name"]: e for e in container["env"]}


def test_template_placeholders_are_declared_variables():
    """Every `{{ name }}` of the job configuration is a variable of the template (or Prefect fills nothing)."""
    from prefect.utilities.templating import find_placeholders

    template = json.loads(TEMPLATE.read_text())
    declared = set(template["variables"]["properties"])
    used = {p.name for p in find_placeholders(template["job_configuration"])}
    assert used - declared == set()
    assert {"gpu_count", "cpu_request", "memory_limit", "node_selector", "tolerations", "s3_secret_name",
            "mlflow_secret_name", "work_volume_claim", "image", "namespace", "command", "env"} <= used
    defaults = {k: v.get("default") for k, v in template["variables"]["properties"].items()}
    assert defaults["gpu_count"] == 1 and defaults["cpu_request"] == "8" and defaults["memory_limit"] == "32Gi"
    assert (defaults["s3_secret_name"], defaults["mlflow_secret_name"], defaults["work_volume_claim"]) == (
        "patchcore-s3", "patchcore-mlflow", "patchcore-work")


def test_gpu_deployment_uses_the_model_of_prefect_yaml():
    root = yaml.safe_load((REPO / "prefect.yaml").read_text())
    gpu = yaml.safe_load(GPU_PREFECT_FILE.read_text())
    [bench] = [d for d in root["deployments"] if d["name"] == "full-benchmark"]
    [gpu_bench] = gpu["deployments"]
    assert gpu_bench["parameters"]["config"] == bench["parameters"]["config"] == root["definitions"]["model"]
    assert gpu_bench["entrypoint"] == bench["entrypoint"]
    assert gpu_bench["work_pool"] == {"name": POOL, "work_queue_name": "default",
                                      "job_variables": {"image": "patchcore-worker:latest", "gpu_count": 1}}


def test_pool_and_deployment_exist(gpu_server):
    async def read(client):
        return await client.read_work_pool(POOL), await client.read_deployment_by_name(f"patchcore/{DEPLOYMENT}")

    pool, deployment = _run(gpu_server, read)
    assert pool.type == "kubernetes"
    resources = pool.base_job_template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"][
        "containers"][0]["resources"]
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert deployment.work_pool_name == POOL and deployment.work_queue_name == "default"
    assert deployment.entrypoint == "flows/patchcore.py:patchcore"
    assert set(deployment.tags) == {"patchcore", "benchmark", "gpu"}
    assert deployment.parameters["mode"] == "full-benchmark"
    assert deployment.parameters["data_url"] == "s3://patchcore/datasets/mvtec"
    assert deployment.parameters["config"]["backbone"] == "wide_resnet50_2"
    # The deploy command's job variables (Prefect 3.8.8 replaces the file's job_variables with them; gpu_count
    # then comes from the pool's default, also 1).
    assert deployment.job_variables["image"] == IMAGE and deployment.job_variables["namespace"] == NAMESPACE
    assert deployment.job_variables.get("gpu_count", 1) == 1
    # The flow code is in the image: the run's working directory is the image's copy of the project.
    assert deployment.pull_steps == [
        {"prefect.deployments.steps.set_working_directory": {"directory": "/opt/patchcore"}}]


def test_worker_job_manifest_requests_a_gpu_and_wires_secrets_and_volume(gpu_server):
    manifest = _run(gpu_server, _job_manifest)
    assert manifest["kind"] == "Job" and manifest["metadata"]["namespace"] == NAMESPACE
    assert "{{" not in json.dumps(manifest)  # every placeholder was filled or dropped
    pod = manifest["spec"]["template"]["spec"]
    container = _container(manifest)
    assert container["image"] == IMAGE
    assert container["args"] == ["prefect", "flow-run", "execute"]
    resources = container["resources"]
    assert {k: str(v) for k, v in resources["limits"].items()} == {"nvidia.com/gpu": "1", "cpu": "8",
                                                                  "memory": "32Gi"}
    assert {k: str(v) for k, v in resources["requests"].items()} == {"nvidia.com/gpu": "1", "cpu": "8",
                                                                    "memory": "32Gi"}
    assert {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"} in pod["tolerations"]
    assert "nodeSelector" not in pod  # optional: absent unless the node_selector variable is set

    env = _env(container)
    assert env["PATCHCORE_DEVICE"]["value"] == "cuda"
    assert env["OMP_WAIT_POLICY"]["value"] == "PASSIVE"
    assert env["PATCHCORE_THREADS"]["valueFrom"]["resourceFieldRef"] == {
        "containerName": "prefect-job", "resource": "requests.cpu", "divisor": "1"}
    secrets = {name: e["valueFrom"]["secretKeyRef"] for name, e in env.items() if "secretKeyRef" in e.get(
        "valueFrom", {})}
    assert {name: (ref["name"], ref["key"]) for name, ref in secrets.items()} == {
        "AWS_ENDPOINT_URL": ("patchcore-s3", "endpoint-url"),
        "AWS_ACCESS_KEY_ID": ("patchcore-s3", "access-key-id"),
        "AWS_SECRET_ACCESS_KEY": ("patchcore-s3", "secret-access-key"),
        "MLFLOW_TRACKING_URI": ("patchcore-mlflow", "tracking-uri"),
    }
    assert not any("value" in env[name] for name in secrets)  # no credential in the manifest itself
    # Prefect's own variables are added by the worker: the flow run to execute and the API to report to.
    assert env["PREFECT__FLOW_RUN_ID"]["value"] and env["PREFECT_API_URL"]["value"] == gpu_server.url

    assert env["PATCHCORE_WORK_DIR"]["value"] == "/work"
    assert container["volumeMounts"] == [{"name": "work", "mountPath": "/work"}]
    assert pod["volumes"] == [{"name": "work", "persistentVolumeClaim": {"claimName": "patchcore-work"}}]
    assert pod["securityContext"]["runAsUser"] == 1000 and pod["securityContext"]["fsGroup"] == 1000

    # Every field is one the Kubernetes API knows: a round trip through the V1Job model keeps them all, except
    # the pod-level parallelism/completions that prefect-kubernetes' manifest validator requires there (they are
    # Job-spec fields; the API server ignores them on a pod spec).
    async def round_trip():
        from kubernetes_asyncio.client import ApiClient

        async with ApiClient() as api:
            job = api.deserialize(SimpleNamespace(data=json.dumps(manifest)), "V1Job")
            return api.sanitize_for_serialization(job)

    required_by_prefect = {"/spec/template/spec/parallelism", "/spec/template/spec/completions"}
    assert _paths(asyncio.run(round_trip())) == _paths(manifest) - required_by_prefect


def test_run_job_variables_override_the_pool_defaults(gpu_server):
    """What `prefect deployment run ... -jv gpu_count=2 -jv cpu_request=16 -jv env='{...}'` gives: two GPUs,
    16 CPUs, one more variable, a node selector, another claim, and the template's own variables still in place.
    Values as the CLIs send them: `-jv cpu_request=16` a JSON number, `prefect deploy --job-variable gpu_count=2`
    a string; the server validates both against the pool's schema."""
    manifest = _run(gpu_server, lambda client: _job_manifest(client, {
        "gpu_count": "2", "cpu_request": 16, "node_selector": {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"},
        "work_volume_claim": "patchcore-work-2",
        "env": {"PATCHCORE_DASK_ADDRESS": "tcp://patchcore-dask-scheduler:8786", "PATCHCORE_DEVICE": "cuda:0"}}))
    pod = manifest["spec"]["template"]["spec"]
    container = _container(manifest)
    assert str(container["resources"]["limits"]["nvidia.com/gpu"]) == "2"
    assert str(container["resources"]["requests"]["cpu"]) == "16"
    assert pod["nodeSelector"] == {"nvidia.com/gpu.product": "NVIDIA-H100-80GB-HBM3"}
    assert pod["volumes"][0]["persistentVolumeClaim"]["claimName"] == "patchcore-work-2"
    env = _env(container)
    assert env["PATCHCORE_DASK_ADDRESS"]["value"] == "tcp://patchcore-dask-scheduler:8786"
    assert env["PATCHCORE_DEVICE"]["value"] == "cuda:0"  # the run's value replaces the template's
    assert env["AWS_ACCESS_KEY_ID"]["valueFrom"]["secretKeyRef"]["name"] == "patchcore-s3"
    assert "resourceFieldRef" in env["PATCHCORE_THREADS"]["valueFrom"]


def _paths(obj, prefix: str = "") -> set[str]:
    """The key paths of a JSON document (list items by index), to compare structures whatever the scalar types."""
    if isinstance(obj, dict):
        return {p for k, v in obj.items() for p in _paths(v, f"{prefix}/{k}")} | {prefix}
    if isinstance(obj, list):
        return {p for i, v in enumerate(obj) for p in _paths(v, f"{prefix}/{i}")} | {prefix}
    return {prefix}


def test_docs_dask_cluster_manifest_is_a_valid_gpu_cluster():
    """The DaskCluster of docs/kubernetes.md: pod specs the Kubernetes API knows, GPU workers that run one task at
    a time on as many threads as their CPU request, the same image for scheduler and workers, the secrets and
    the shared claim of the pool."""
    import re

    doc = (REPO / "docs" / "kubernetes.md").read_text()
    [cluster] = [d for d in (yaml.safe_load(m) for m in re.findall(r"<<'EOF'\n(.*?)\nEOF", doc, re.S))
                 if d.get("kind") == "DaskCluster"]
    assert cluster["apiVersion"] == "kubernetes.dask.org/v1"
    name = cluster["metadata"]["name"]
    worker_pod, scheduler = cluster["spec"]["worker"]["spec"], cluster["spec"]["scheduler"]

    async def round_trips():
        from kubernetes_asyncio.client import ApiClient

        async with ApiClient() as api:
            def trip(obj, kind):
                return api.sanitize_for_serialization(api.deserialize(SimpleNamespace(data=json.dumps(obj)), kind))
            return [(trip(obj, kind), obj) for obj, kind in ((worker_pod, "V1PodSpec"),
                                                             (scheduler["spec"], "V1PodSpec"),
                                                             (scheduler["service"], "V1ServiceSpec"))]

    for tripped, original in asyncio.run(round_trips()):
        assert _paths(tripped) == _paths(original)

    [worker] = worker_pod["containers"]
    args = worker["args"]
    assert args[:2] == ["dask", "worker"]
    assert args[args.index("--nthreads") + 1] == "1"
    assert _env(worker)["PATCHCORE_THREADS"]["value"] == str(worker["resources"]["requests"]["cpu"])
    assert str(worker["resources"]["limits"]["nvidia.com/gpu"]) == "1"
    assert scheduler["spec"]["containers"][0]["image"] == worker["image"]
    env = _env(worker)
    assert env["PATCHCORE_DEVICE"]["value"] == "cuda" and env["PATCHCORE_WORK_DIR"]["value"] == "/work"
    # Dask reads the DASK_* variables into the same memory settings the local workers get.
    from dask.config import collect_env

    from flows.task_runner import WORKER_MEMORY_CONFIG

    collected = collect_env({k: e["value"] for k, e in env.items() if k.startswith("DASK_")})
    for key, value in WORKER_MEMORY_CONFIG.items():
        node = collected
        for part in key.split("."):
            node = node[part]
        assert node is value, (key, node)
    template_env = _env(json.loads(TEMPLATE.read_text())["job_configuration"]["job_manifest"]["spec"]["template"][
        "spec"]["containers"][0])
    for secret in ("AWS_ENDPOINT_URL", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "MLFLOW_TRACKING_URI"):
        ref, template_ref = env[secret]["valueFrom"]["secretKeyRef"], template_env[secret]["valueFrom"]["secretKeyRef"]
        assert ref["key"] == template_ref["key"] and ref["name"] in ("patchcore-s3", "patchcore-mlflow")
    assert worker_pod["volumes"] == [{"name": "work", "persistentVolumeClaim": {"claimName": "patchcore-work"}}]
    assert scheduler["service"]["selector"] == {"dask.org/cluster-name": name, "dask.org/component": "scheduler"}
    # The address the docs give the pipeline is the operator's Service name for this cluster.
    assert f"tcp://{name}-scheduler.patchcore.svc.cluster.local:8786" in doc
