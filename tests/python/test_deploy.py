# SPDX-License-Identifier: MIT OR Apache-2.0
"""The Kubernetes manifest (deploy/kubernetes/reapd.yaml) is valid against
the Kubernetes API schemas (kubernetes-validate, offline) and keeps the
least-privilege properties docs/fleet.md promises."""
import pathlib

import kubernetes_validate
import yaml

from conftest import REPO

MANIFEST = REPO / "deploy" / "kubernetes" / "reapd.yaml"
K8S_VERSION = "1.31.0"


def documents():
    return [d for d in yaml.safe_load_all(MANIFEST.read_text()) if d]


def test_every_document_validates_against_the_api_schema():
    docs = documents()
    assert {d["kind"] for d in docs} == {"Namespace", "ConfigMap", "DaemonSet"}
    for doc in docs:
        kubernetes_validate.validate(doc, K8S_VERSION, strict=True)


def test_the_daemonset_is_least_privilege():
    ds = next(d for d in documents() if d["kind"] == "DaemonSet")
    pod = ds["spec"]["template"]["spec"]
    assert pod["hostPID"] is True
    assert pod["priorityClassName"] == "system-node-critical"
    (container,) = pod["containers"]
    sc = container["securityContext"]
    assert sc["capabilities"] == {"drop": ["ALL"], "add": ["KILL"]}
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["readOnlyRootFilesystem"] is True
    assert sc["privileged"] is False
    # Guaranteed QoS: requests equal limits for every resource.
    assert container["resources"]["requests"] == container["resources"]["limits"]
    assert "hostNetwork" not in pod


def test_the_policy_in_the_configmap_is_valid(tmp_path):
    import subprocess

    from conftest import BIN_DIR

    cm = next(d for d in documents() if d["kind"] == "ConfigMap")
    policy = tmp_path / "policy.toml"
    policy.write_text(cm["data"]["policy.toml"])
    out = subprocess.run([str(BIN_DIR / "reapd"), "check-policy", str(policy)], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
