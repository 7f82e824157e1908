"""The Kubernetes manifests in ``deploy/k8s/`` against the Kubernetes API schemas (shipped with
``kubernetes-validate``, so this runs offline; no cluster needed), and their drain timings
against each other."""

from __future__ import annotations

from pathlib import Path

import kubernetes_validate
import pytest
import yaml

K8S = Path(__file__).resolve().parents[2] / "deploy" / "k8s"
VERSION = kubernetes_validate.latest_version()


def resources() -> list[dict]:
    found = []
    for path in sorted(K8S.glob("*.yaml")):
        found += [doc for doc in yaml.safe_load_all(path.read_text()) if doc]
    return found


def by_kind(kind: str) -> dict:
    (resource,) = [r for r in resources() if r["kind"] == kind]
    return resource


@pytest.mark.parametrize("resource", resources(), ids=lambda r: r["kind"])
def test_manifest_matches_the_kubernetes_schema(resource):
    # strict: unknown fields (a typo in a probe, say) fail too; raises ValidationError.
    kubernetes_validate.validate(resource, VERSION, strict=True)


def test_a_typo_fails_validation():
    deployment = by_kind("Deployment")
    deployment["spec"]["template"]["spec"]["containers"][0]["readinesProbe"] = {}
    with pytest.raises(kubernetes_validate.ValidationError):
        kubernetes_validate.validate(deployment, VERSION, strict=True)


def test_kinds_probes_gpu_and_drain_timing():
    assert {r["kind"] for r in resources()} == {
        "Deployment",
        "Service",
        "PodDisruptionBudget",
    }
    pod = by_kind("Deployment")["spec"]["template"]["spec"]
    (container,) = pod["containers"]
    for probe in ("startupProbe", "readinessProbe", "livenessProbe"):
        assert container[probe]["grpc"]["port"] == 50051, probe  # grpc.health.v1
    assert container["resources"]["requests"]["nvidia.com/gpu"] == 1
    args = dict(a.split("=", 1) for a in container["args"] if a.startswith("--"))
    grace_s = float(args["--grace-s"])
    pre_stop_s = container["lifecycle"]["preStop"]["sleep"]["seconds"]
    # The kubelet SIGKILLs after terminationGracePeriodSeconds, counted from preStop's start.
    assert pod["terminationGracePeriodSeconds"] >= pre_stop_s + grace_s + 5
    live = container["livenessProbe"]
    # A draining pod answers NOT_SERVING: liveness must not restart it before the drain ends.
    assert live["periodSeconds"] * live["failureThreshold"] > pod["terminationGracePeriodSeconds"]
    selector = by_kind("Service")["spec"]["selector"]
    assert by_kind("PodDisruptionBudget")["spec"]["selector"]["matchLabels"] == selector
