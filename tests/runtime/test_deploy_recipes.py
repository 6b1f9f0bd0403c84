"""The deployment recipes in docs/serving.md and deploy/: the fields Kubernetes and KServe
require, and arguments, ports and probes that jaxmint-serve really accepts and answers."""

import re
from pathlib import Path

import pytest
import yaml
from runtime_helpers import request

from jaxmint_runtime.serve import Server
from jaxmint_runtime.serve._cli import parser
from jaxmint_runtime.serve._server import OPEN_PATHS

REPO = Path(__file__).resolve().parents[2]


def manifests() -> dict[str, dict]:
    """Every YAML document of docs/serving.md, by kind."""
    page = (REPO / "docs" / "serving.md").read_text()
    docs = {}
    for block in re.findall(r"```yaml\n(.*?)```", page, flags=re.S):
        for doc in yaml.safe_load_all(block):
            assert doc["kind"] not in docs, f"two {doc['kind']} manifests"
            docs[doc["kind"]] = doc
    return docs


@pytest.fixture(scope="module")
def docs():
    found = manifests()
    assert set(found) == {"Deployment", "Service", "ServingRuntime", "InferenceService"}
    for kind, doc in found.items():
        assert doc["apiVersion"] and doc["metadata"]["name"], kind
    return found


def serve_args(args: list[str]):
    """The container's arguments as jaxmint-serve parses them (exit 2 fails the test)."""
    return parser().parse_args(args)


def test_deployment_selects_its_pods_and_probes_what_the_server_answers(docs, artifact):
    deployment, service = docs["Deployment"], docs["Service"]
    assert deployment["apiVersion"] == "apps/v1"
    spec = deployment["spec"]
    labels = spec["template"]["metadata"]["labels"]
    assert spec["selector"]["matchLabels"].items() <= labels.items()
    assert service["spec"]["selector"].items() <= labels.items()
    (container,) = spec["template"]["spec"]["containers"]
    assert container["name"] and container["image"]
    args = serve_args(container["args"])
    ports = {p["name"]: p["containerPort"] for p in container["ports"]}
    assert ports == {"http": args.port, "grpc": 8001}  # the defaults: 8000 and 8001
    assert {p["targetPort"] for p in service["spec"]["ports"]} == set(ports)
    # Kubernetes waits this long after SIGTERM: longer than the drain it allows.
    assert spec["template"]["spec"]["terminationGracePeriodSeconds"] > args.drain_timeout
    mounts = {m["name"]: m["mountPath"] for m in container["volumeMounts"]}
    volumes = {v["name"] for v in spec["template"]["spec"]["volumes"]}
    assert set(mounts) <= volumes and args.artifacts == [mounts["models"]]
    probes = [container[p]["httpGet"] for p in ("startupProbe", "readinessProbe", "livenessProbe")]
    token = container["env"][0]
    assert token["name"] == "JAXMINT_SERVE_TOKEN" and token["valueFrom"]["secretKeyRef"]
    # The probes carry no token: the server must answer them without one.
    with Server([artifact], port=0, token="from-the-secret") as server:
        for probe in probes:
            assert probe["port"] in ports and probe["path"] in OPEN_PATHS
            assert request(server.port, "GET", probe["path"])[0] == 200
        assert request(server.port, "GET", "/v2/models/digits")[0] == 401


def test_kserve_runtime_and_inference_service_agree(docs):
    runtime, isvc = docs["ServingRuntime"], docs["InferenceService"]
    assert runtime["apiVersion"] == "serving.kserve.io/v1alpha1"
    assert isvc["apiVersion"] == "serving.kserve.io/v1beta1"
    (container,) = runtime["spec"]["containers"]
    assert container["name"] == "kserve-container"  # the name KServe looks for
    assert container["command"] == ["jaxmint-serve"]
    args = serve_args(container["args"])
    assert args.artifacts == ["/mnt/models"]  # where KServe's storage initializer writes
    assert args.host == "0.0.0.0" and (args.port, args.grpc_port) == (8080, 8081)
    assert [p["containerPort"] for p in container["ports"]] == [args.port]
    assert {"v2", "grpc-v2"} <= set(runtime["spec"]["protocolVersions"])
    model = isvc["spec"]["predictor"]["model"]
    formats = {f["name"] for f in runtime["spec"]["supportedModelFormats"]}
    assert model["modelFormat"]["name"] in formats
    assert model["runtime"] == runtime["metadata"]["name"]
    assert model["protocolVersion"] == "v2" and model["storageUri"]


def test_the_dockerfile_installs_extras_that_exist_and_runs_the_server():
    text = (REPO / "deploy" / "Dockerfile").read_text()
    extras = re.search(r'"jaxmint-runtime\[([a-z,]+)\]"', text).group(1).split(",")
    pyproject = (REPO / "export" / "pyproject.toml").read_text()
    for extra in extras:
        assert re.search(rf"^{extra} = \[", pyproject, flags=re.M), extra
    entry = yaml.safe_load(re.search(r"^ENTRYPOINT (.*)$", text, flags=re.M).group(1))
    cmd = yaml.safe_load(re.search(r"^CMD (.*)$", text, flags=re.M).group(1))
    assert entry[0] == "jaxmint-serve"
    args = serve_args([*entry[1:], *cmd])
    assert args.host == "0.0.0.0" and args.artifacts == ["/models"]
    exposed = {int(p) for p in re.search(r"^EXPOSE (.*)$", text, flags=re.M).group(1).split()}
    assert exposed == {args.port, args.grpc_port}
    assert re.search(r"^USER \d+", text, flags=re.M), "the image must not run as root"
    backends = re.search(r"^ENV JAXMINT_BACKEND=(\S+)", text, flags=re.M).group(1).split(",")
    assert set(backends) <= set(extras)
