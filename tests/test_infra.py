"""The GPU work pool template renders into a Kubernetes job that asks for GPUs (offline: the same
rendering a Kubernetes worker does before it submits the job)."""

from __future__ import annotations

import asyncio
import json
import sys

import yaml

from tests.support import ROOT


def _render(values: dict) -> dict:
    from prefect_kubernetes.worker import KubernetesWorkerJobConfiguration

    template = json.loads((ROOT / "infra" / "gpu-work-pool.json").read_text())
    config = asyncio.run(KubernetesWorkerJobConfiguration.from_template_and_values(template, values))
    return config.job_manifest["spec"]["template"]["spec"]


def test_committed_template_is_what_the_script_builds():
    sys.path.insert(0, str(ROOT / "infra"))
    from gpu_work_pool import gpu_base_job_template

    assert json.loads((ROOT / "infra" / "gpu-work-pool.json").read_text()) == gpu_base_job_template()


def test_gpu_work_pool_job_requests_gpus_on_gpu_nodes():
    pod = _render({"image": "registry.example/cul:gpu", "gpu_count": 2})
    container = pod["containers"][0]
    assert container["image"] == "registry.example/cul:gpu"
    assert container["envFrom"] == [{"secretRef": {"name": "cul-env"}}]  # the Secret of infra/k8s
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert _render({"image": "x"})["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_prefect_yaml_dispatches_requests_to_the_gpu_pool_from_fresh_clones():
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    gpu, dispatch = deployments["gpu"], deployments["dispatch"]
    assert gpu["entrypoint"] == "flows/continual.py:request_flow" and gpu["work_pool"]["name"] == "cul-gpu"
    assert gpu["work_pool"]["job_variables"]["gpu_count"] >= 1
    assert (
        dispatch["entrypoint"] == deployments["scheduled"]["entrypoint"] and dispatch["work_pool"]["name"] == "cul-cpu"
    )
    from cul.config import DispatchSettings

    assert DispatchSettings().deployment == "cul-request/gpu"  # the flow's name / this deployment
    for d in (gpu, dispatch):  # no shared disk: each run clones the repository
        assert d["pull"] == [{"cul.io.workspace.checkout": {}}]
    from cul.io.workspace import checkout

    assert callable(checkout)


def _compose() -> dict:
    return yaml.safe_load((ROOT / "infra" / "compose.yaml").read_text())


def test_the_compose_stack_wires_every_service_to_the_shared_postgres_s3_and_servers():
    import re

    compose = _compose()
    services = compose["services"]
    assert set(services) == {"postgres", "minio", "buckets", "prefect", "mlflow", "hooks", "worker-cpu", "worker-gpu"}
    env_file = (ROOT / "infra" / ".env.example").read_text()
    declared = set(re.findall(r"^([A-Z_]+)=", env_file, re.MULTILINE))
    used = set(re.findall(r"\$\{([A-Z_]+)\}", (ROOT / "infra" / "compose.yaml").read_text()))
    assert used <= declared, f"variables compose uses but .env.example does not declare: {used - declared}"

    databases = set(re.findall(r"CREATE DATABASE (\w+);", (ROOT / "infra" / "postgres-init.sql").read_text()))
    assert databases == {"prefect", "mlflow", "cul"}
    prefect_db = services["prefect"]["environment"]["PREFECT_API_DATABASE_CONNECTION_URL"]
    assert prefect_db.startswith("postgresql+asyncpg://") and "@postgres:5432/prefect" in prefect_db
    mlflow_cmd = " ".join(services["mlflow"]["command"])
    assert "--backend-store-uri=postgresql+psycopg://" in mlflow_cmd and "@postgres:5432/mlflow" in mlflow_cmd
    assert "--default-artifact-root=s3://cul/mlflow" in mlflow_cmd
    assert services["mlflow"]["environment"]["MLFLOW_WEBHOOK_SECRET_ENCRYPTION_KEY"]

    ours = ["mlflow", "hooks", "worker-cpu", "worker-gpu"]
    for name in ours:
        svc = services[name]
        env = svc["environment"]
        assert svc["image"] == "${CUL_IMAGE}"
        assert (
            env["PREFECT_API_URL"] == "http://prefect:4200/api" and env["MLFLOW_TRACKING_URI"] == "http://mlflow:5000"
        )
        assert env["CUL_DATABASE_URL"].endswith("@postgres:5432/cul") and env["CUL_S3_ENDPOINT"] == "http://minio:9000"
        assert env["CUL_DVC_REMOTE_URL"].startswith("s3://cul/") and env["CUL_REPO_URL"] == "${CUL_REPO_URL}"
        for dep in svc.get("depends_on", {}):
            assert dep in services
    assert "4200" in services["prefect"]["command"] and "--port=5000" in services["mlflow"]["command"]
    pools = {services[w]["command"][services[w]["command"].index("--pool") + 1] for w in ("worker-cpu", "worker-gpu")}
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    assert pools == {deployments["dispatch"]["work_pool"]["name"], deployments["gpu"]["work_pool"]["name"]}
    hooks = services["hooks"]["command"]
    assert hooks[hooks.index("--deployment") + 1] == "cul-continual/dispatch"
    assert services["worker-gpu"]["deploy"]["resources"]["reservations"]["devices"][0]["capabilities"] == ["gpu"]


def test_the_image_installs_through_the_newcomers_script_and_kubernetes_runs_it():
    dockerfile = (ROOT / "infra" / "Dockerfile").read_text()
    assert "scripts/install.sh" in dockerfile and "ARG TORCH_INDEX" in dockerfile
    assert "scripts/install.sh" in (ROOT / ".ci" / "run").read_text()
    docs = {}
    for f in sorted((ROOT / "infra" / "k8s").glob("*.yaml")):
        for doc in yaml.safe_load_all(f.read_text()):
            docs[(doc["kind"], doc["metadata"]["name"])] = doc
    secret = docs[("Secret", "cul-env")]["stringData"]
    for key in ("CUL_DATABASE_URL", "PREFECT_API_URL", "MLFLOW_TRACKING_URI", "CUL_REPO_URL", "CUL_WEBHOOK_SECRET"):
        assert key in secret
    gpu_worker = docs[("Deployment", "cul-worker-gpu")]["spec"]["template"]["spec"]
    assert gpu_worker["serviceAccountName"] == "cul-worker"
    assert gpu_worker["containers"][0]["args"][-2:] == ["--type", "kubernetes"]
    rules = docs[("Role", "cul-worker")]["rules"]
    assert any("jobs" in r["resources"] and "create" in r["verbs"] for r in rules)
    for name in ("cul-worker-cpu", "cul-worker-gpu", "cul-hooks"):
        container = docs[("Deployment", name)]["spec"]["template"]["spec"]["containers"][0]
        assert container["envFrom"] == [{"secretRef": {"name": "cul-env"}}]
    assert docs[("Service", "cul-hooks")]["spec"]["ports"][0]["port"] == 8090
