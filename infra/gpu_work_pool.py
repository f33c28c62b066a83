"""The GPU work pool's base job template: Prefect's default Kubernetes job, plus a `gpu_count`
variable that becomes an `nvidia.com/gpu` limit, a node selector and a toleration for GPU nodes,
and `env_secret`: the Kubernetes Secret whose keys become the pod's environment (the database,
S3, MLflow and git settings of infra/k8s/secret.example.yaml).

    python infra/gpu_work_pool.py                      # writes infra/gpu-work-pool.json
    prefect work-pool create cul-gpu --type kubernetes --base-job-template infra/gpu-work-pool.json
    prefect --no-prompt deploy --name gpu              # the `gpu` deployment of prefect.yaml

Prefect's default template has no GPU variable; flow runs of the `gpu` deployment (the request
flow, dispatched by the continual flow) then run in a pod on a GPU node, with the image named in
prefect.yaml.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path

OUT = Path(__file__).with_name("gpu-work-pool.json")
GPU_VARIABLES = {
    "gpu_count": {
        "title": "GPUs",
        "description": "nvidia.com/gpu limit of the flow-run pod.",
        "type": "integer",
        "default": 1,
    },
    "gpu_node_selector": {
        "title": "GPU node selector",
        "type": "object",
        "description": "Node labels the pod must match.",
        "default": {"nvidia.com/gpu.present": "true"},
    },
    "env_secret": {
        "title": "Environment secret",
        "type": "string",
        "description": "Secret whose keys become the flow-run pod's environment variables.",
        "default": "cul-env",
    },
}


def gpu_base_job_template() -> dict:
    from prefect_kubernetes.worker import KubernetesWorker

    template = copy.deepcopy(KubernetesWorker.get_default_base_job_template())
    template["variables"]["properties"].update(GPU_VARIABLES)
    pod = template["job_configuration"]["job_manifest"]["spec"]["template"]["spec"]
    pod["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] = "{{ gpu_count }}"
    pod["containers"][0]["envFrom"] = [{"secretRef": {"name": "{{ env_secret }}"}}]
    pod["nodeSelector"] = "{{ gpu_node_selector }}"
    pod["tolerations"] = [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    return template


if __name__ == "__main__":
    OUT.write_text(json.dumps(gpu_base_job_template(), indent=2) + "\n")
    print(f"-> {OUT}")
