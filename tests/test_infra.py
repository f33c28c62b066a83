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
    assert container["resources"]["limits"]["nvidia.com/gpu"] == 2
    assert pod["nodeSelector"] == {"nvidia.com/gpu.present": "true"}
    assert pod["tolerations"][0]["key"] == "nvidia.com/gpu"
    assert _render({"image": "x"})["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == 1


def test_prefect_yaml_has_a_gpu_deployment_on_that_pool():
    deployments = {d["name"]: d for d in yaml.safe_load((ROOT / "prefect.yaml").read_text())["deployments"]}
    gpu = deployments["gpu"]
    assert gpu["work_pool"]["name"] == "cul-gpu" and gpu["entrypoint"] == deployments["scheduled"]["entrypoint"]
    assert gpu["work_pool"]["job_variables"]["gpu_count"] >= 1
