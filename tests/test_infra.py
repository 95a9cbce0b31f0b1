"""infra/k8s: the Kubernetes base job template, the Secret example and their secrecy rules."""

from __future__ import annotations

import copy
import json
import math
import random
import re
import string
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml

from veiltrain.store import ENDPOINT_VARIABLE, credential_variables

K8S = Path(__file__).resolve().parent.parent / "infra" / "k8s"
TEMPLATE = K8S / "base-job-template.json"
SECRET_EXAMPLE = K8S / "secret-example.yaml"
PLACEHOLDER = re.compile(r"\{\{\s*([A-Za-z_][A-Za-z0-9_.]*)\s*\}\}")
TOKEN = re.compile(r"[A-Za-z0-9+/=]{20,}")
SENSITIVE_ENV = re.compile(r"KEY|SECRET|TOKEN|PASSWORD|CREDENTIAL|ENDPOINT", re.IGNORECASE)
# Job variables a deployment of party 1 would set; the rest come from the template's defaults.
PARTY_1 = {
    "image": "registry.example.org/veiltrain-gpu:0.1.0",
    "party_rank": "1",
    "rendezvous": "tcp://10.77.0.10:29500",
}


def load_template() -> dict[str, Any]:
    """The template as JSON (a fresh copy each call)."""
    template: dict[str, Any] = json.loads(TEMPLATE.read_text())
    return template


def properties(template: dict[str, Any]) -> dict[str, Any]:
    """The declared job variables."""
    props: dict[str, Any] = template["variables"]["properties"]
    return props


def pod_spec(job_manifest: dict[str, Any]) -> dict[str, Any]:
    """The pod template's spec inside a Job manifest."""
    spec: dict[str, Any] = job_manifest["spec"]["template"]["spec"]
    return spec


def container(job_manifest: dict[str, Any]) -> dict[str, Any]:
    """The Job's only container."""
    only: dict[str, Any] = pod_spec(job_manifest)["containers"][0]
    return only


def strings(node: Any) -> Iterator[str]:
    """Every string in a JSON tree, keys included."""
    if isinstance(node, str):
        yield node
    elif isinstance(node, dict):
        for key, value in node.items():
            yield key
            yield from strings(value)
    elif isinstance(node, list):
        for item in node:
            yield from strings(item)


def defaults(template: dict[str, Any]) -> dict[str, Any]:
    """Job variable defaults, dropping nulls as Prefect does before templating."""
    return {
        name: copy.deepcopy(spec["default"])
        for name, spec in properties(template).items()
        if spec.get("default") is not None
    }


def render(template: dict[str, Any], values: dict[str, str]) -> dict[str, Any]:
    """The job configuration with defaults and `values` filled in, as a Prefect worker does."""
    from prefect.utilities.templating import apply_values

    variables = defaults(template) | values
    rendered: dict[str, Any] = apply_values(template["job_configuration"], variables)
    return rendered


def entropy(token: str) -> float:
    """Shannon entropy in bits per character."""
    counts = Counter(token)
    return -sum(n / len(token) * math.log2(n / len(token)) for n in counts.values())


def looks_like_credential(text: str) -> list[str]:
    """Long mixed letter-and-digit tokens with high entropy, or AWS-style access key ids."""
    found = [t for t in TOKEN.findall(text) if re.search(r"\d", t) and re.search(r"[A-Za-z]", t)]
    found = [t for t in found if entropy(t) >= 3.5]
    return found + re.findall(r"\b(?:AKIA|ASIA)[A-Z0-9]{16}\b", text)


# --- structure, without prefect-kubernetes ------------------------------------------------------


def test_template_has_the_two_top_level_keys() -> None:
    template = load_template()
    assert set(template) == {"job_configuration", "variables"}
    assert isinstance(properties(template), dict) and properties(template)
    for key in ("command", "env", "labels", "name", "namespace", "job_manifest"):
        assert key in template["job_configuration"], key
    for key in ("cluster_config", "job_watch_timeout_seconds", "pod_watch_timeout_seconds"):
        assert key in template["job_configuration"], key
    assert "stream_output" in template["job_configuration"]


def test_every_placeholder_is_a_declared_variable() -> None:
    template = load_template()
    used = {m for s in strings(template["job_configuration"]) for m in PLACEHOLDER.findall(s)}
    assert {"image", "gpu_count", "party_rank", "rendezvous", "credentials_secret"} <= used
    assert used <= set(properties(template)), used - set(properties(template))
    assert set(template["variables"]["required"]) <= set(properties(template))


def test_prefect_server_accepts_the_template() -> None:
    from prefect.server.schemas.actions import validate_base_job_template

    assert validate_base_job_template(load_template())
    broken = load_template()
    broken["job_configuration"]["job_manifest"]["spec"]["x"] = "{{ undeclared_variable }}"
    with pytest.raises(ValueError, match="undeclared_variable"):
        validate_base_job_template(broken)


def test_variables_schema_is_valid_and_defaults_validate() -> None:
    from prefect.utilities.schema_tools import is_valid_schema, validate

    schema = load_template()["variables"]
    is_valid_schema(schema, preprocess=False)
    assert validate(defaults(load_template()) | PARTY_1, schema, preprocess=True) == []


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("party_rank", 1),
        ("party_rank", "one"),
        ("party_rank", "-1"),
        ("rendezvous", "10.77.0.10:29500"),
        ("rendezvous", "tcp://host"),
        ("gpu_count", 0),
        ("credentials_secret", "Not_A_Name"),
    ],
)
def test_bad_job_variables_are_refused(name: str, value: object) -> None:
    from prefect.utilities.schema_tools import validate

    schema = load_template()["variables"]
    values = defaults(load_template()) | PARTY_1 | {name: value}
    assert validate(values, schema, preprocess=True) != []


@pytest.mark.parametrize("name", ["image", "party_rank"])
def test_party_settings_are_required(name: str) -> None:
    from prefect.utilities.schema_tools import validate

    values = defaults(load_template()) | PARTY_1
    del values[name]
    assert validate(values, load_template()["variables"], preprocess=True) != []


def test_job_manifest_is_one_gpu_container_that_never_restarts() -> None:
    manifest = load_template()["job_configuration"]["job_manifest"]
    assert (manifest["apiVersion"], manifest["kind"]) == ("batch/v1", "Job")
    assert manifest["spec"]["backoffLimit"] == 0
    assert manifest["spec"]["ttlSecondsAfterFinished"] == "{{ finished_job_ttl }}"
    spec = pod_spec(manifest)
    assert spec["restartPolicy"] == "Never"
    assert spec["automountServiceAccountToken"] is False
    assert len(spec["containers"]) == 1
    assert "initContainers" not in spec and "hostNetwork" not in spec
    resources = container(manifest)["resources"]
    assert resources["requests"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert resources["limits"]["nvidia.com/gpu"] == "{{ gpu_count }}"
    assert properties(load_template())["gpu_count"]["default"] == 1
    assert spec["nodeSelector"] == "{{ node_selector }}"
    assert spec["tolerations"] == "{{ tolerations }}"


def test_pod_runs_unprivileged() -> None:
    manifest = load_template()["job_configuration"]["job_manifest"]
    assert pod_spec(manifest)["securityContext"]["runAsNonRoot"] is True
    context = container(manifest)["securityContext"]
    assert context["runAsNonRoot"] is True and context["privileged"] is False
    assert context["allowPrivilegeEscalation"] is False
    assert context["capabilities"]["drop"] == ["ALL"]
    assert "add" not in context["capabilities"]


def test_credentials_come_only_from_the_secret() -> None:
    env = container(load_template()["job_configuration"]["job_manifest"])["env"]
    sensitive = [item for item in env if SENSITIVE_ENV.search(item["name"])]
    assert len(sensitive) == 3
    for item in sensitive:
        assert "value" not in item, item["name"]
        assert set(item["valueFrom"]) == {"secretKeyRef"}
        assert item["valueFrom"]["secretKeyRef"]["name"] == "{{ credentials_secret }}"
    keys = {item["valueFrom"]["secretKeyRef"]["key"] for item in sensitive}
    assert keys == {"access-key", "secret-key", "endpoint-url"}


def test_rendered_env_matches_what_the_party_code_reads() -> None:
    manifest = render(load_template(), PARTY_1)["job_manifest"]
    env = {item["name"]: item for item in container(manifest)["env"]}
    access, secret = credential_variables("party-1")
    assert env[access]["valueFrom"]["secretKeyRef"]["key"] == "access-key"
    assert env[secret]["valueFrom"]["secretKeyRef"]["key"] == "secret-key"
    assert env[ENDPOINT_VARIABLE]["valueFrom"]["secretKeyRef"]["optional"] is True
    assert env["VEILTRAIN_PARTY_RANK"]["value"] == "1"
    assert env["VEILTRAIN_RENDEZVOUS"]["value"] == PARTY_1["rendezvous"]
    assert all(isinstance(item.get("value", ""), str) for item in env.values())
    assert not [s for s in strings(manifest) if PLACEHOLDER.search(s)]


def test_without_a_rendezvous_the_variable_is_empty() -> None:
    values = {k: v for k, v in PARTY_1.items() if k != "rendezvous"}
    env = {e["name"]: e for e in container(render(load_template(), values)["job_manifest"])["env"]}
    assert env["VEILTRAIN_RENDEZVOUS"] == {"name": "VEILTRAIN_RENDEZVOUS"}
    assert env["VEILTRAIN_PARTY_1_ACCESS_KEY"]["valueFrom"]["secretKeyRef"]["key"] == "access-key"


def test_rendered_manifest_types_suit_kubernetes() -> None:
    manifest = render(load_template(), PARTY_1)["job_manifest"]
    spec = pod_spec(manifest)
    assert container(manifest)["resources"]["limits"]["nvidia.com/gpu"] == 1
    assert "cpu" not in container(manifest)["resources"]["limits"]  # null default: no limit
    assert spec["securityContext"]["runAsUser"] == 1000
    labels = manifest["spec"]["template"]["metadata"]["labels"]
    assert all(isinstance(v, str) for v in labels.values())
    assert manifest["spec"]["ttlSecondsAfterFinished"] == 86400


# --- secrecy of the folder ------------------------------------------------------------------------


def fake_token(seed: int, length: int, alphabet: str) -> str:
    """A deterministic random-looking token (built at run time, never stored in a file)."""
    return "".join(random.Random(seed).choices(alphabet, k=length))


@pytest.mark.parametrize("seed", range(20))
def test_credential_detector_flags_tokens_and_spares_prose(seed: int) -> None:
    assert looks_like_credential("key: " + fake_token(seed, 40, string.hexdigits.lower()[:16]))
    assert looks_like_credential("sk " + fake_token(seed, 40, string.ascii_letters + "0123456789"))
    assert looks_like_credential("AKIA" + fake_token(seed, 16, string.ascii_uppercase))
    assert not looks_like_credential("automountServiceAccountToken veiltrain-store-credentials")
    assert not looks_like_credential("REPLACE_ME nvidia.com/gpu tcp://10.77.0.10:29500")


@pytest.mark.parametrize("path", sorted(K8S.iterdir()), ids=lambda p: p.name)
def test_no_file_in_infra_holds_a_credential(path: Path) -> None:
    assert looks_like_credential(path.read_text()) == []


def test_secret_example_is_a_placeholder_matching_the_template() -> None:
    secret = yaml.safe_load(SECRET_EXAMPLE.read_text())
    assert (secret["apiVersion"], secret["kind"], secret["type"]) == ("v1", "Secret", "Opaque")
    assert "data" not in secret
    assert set(secret["stringData"].values()) == {"REPLACE_ME"}
    template = load_template()
    assert set(secret["stringData"]) == {"access-key", "secret-key", "endpoint-url"}
    assert secret["metadata"]["name"] == properties(template)["credentials_secret"]["default"]
    assert secret["metadata"]["namespace"] == properties(template)["namespace"]["default"]
    assert (
        "kubectl" in SECRET_EXAMPLE.read_text() and "--from-literal" in SECRET_EXAMPLE.read_text()
    )


# --- prefect-kubernetes' own checks, where it is installed ----------------------------------------


def test_kubernetes_worker_prepares_a_valid_job() -> None:
    worker = pytest.importorskip("prefect_kubernetes.worker")
    from prefect.client.schemas.objects import FlowRun

    config = worker.KubernetesWorkerJobConfiguration(**render(load_template(), PARTY_1))
    config.prepare_for_flow_run(FlowRun(id=uuid4(), flow_id=uuid4(), name="party-1-run"))
    env = {item["name"]: item for item in container(config.job_manifest)["env"]}
    access, secret = credential_variables("party-1")
    assert "secretKeyRef" in env[access]["valueFrom"] and "secretKeyRef" in env[secret]["valueFrom"]
    assert env["PREFECT__FLOW_RUN_ID"]["value"]
    assert env["PREFECT_FLOW_RUN_EXECUTE_SIGTERM_BEHAVIOR"]["value"] == "reschedule"
    assert container(config.job_manifest)["args"]  # the worker filled in the flow-run command
    assert config.job_manifest["metadata"]["generateName"]


def test_kubernetes_worker_refuses_a_renamed_container() -> None:
    worker = pytest.importorskip("prefect_kubernetes.worker")
    rendered = render(load_template(), PARTY_1)
    container(rendered["job_manifest"])["name"] = "party"
    with pytest.raises(ValueError, match="prefect-job"):
        worker.KubernetesWorkerJobConfiguration(**rendered)


@pytest.mark.prefect
def test_a_real_prefect_server_creates_the_pool(prefect_server: None) -> None:
    from prefect.client.orchestration import get_client
    from prefect.client.schemas.actions import WorkPoolCreate

    name = f"cluster-test-{uuid4().hex[:8]}"
    pool = WorkPoolCreate(name=name, type="kubernetes", base_job_template=load_template())
    with get_client(sync_client=True) as client:
        client.create_work_pool(pool)
        stored = client.read_work_pool(name)
        client.delete_work_pool(name)
    assert stored.base_job_template == load_template()


def test_template_keeps_every_key_of_the_stock_kubernetes_template() -> None:
    worker = pytest.importorskip("prefect_kubernetes.worker")
    stock = worker.KubernetesWorker.get_default_base_job_template()["job_configuration"]
    assert set(stock) <= set(load_template()["job_configuration"])
