"""The Kubernetes example (deploy/kubernetes): the manifests parse, the Service and the
InferencePool select the Deployment's pods on the port the container serves, the container's
flags are `camelid serve` flags, and the probes and the scrape path are routes the server has."""

from pathlib import Path

import pytest

yaml = pytest.importorskip("yaml")

from camelid.cli import build_parser  # noqa: E402

DEPLOY = Path(__file__).resolve().parents[1] / "deploy" / "kubernetes"


def docs():
    out = {}
    for f in sorted(DEPLOY.glob("*.yaml")):
        for d in yaml.safe_load_all(f.read_text()):
            out[d["kind"]] = d
    return out


def test_selectors_ports_flags_and_routes_fit_together():
    d = docs()
    assert set(d) == {"Deployment", "Service", "InferencePool", "HTTPRoute"}
    pod = d["Deployment"]["spec"]["template"]
    labels = pod["metadata"]["labels"]
    (container,) = pod["spec"]["containers"]
    port = {p["name"]: p["containerPort"] for p in container["ports"]}["http"]
    for selector in (d["Service"]["spec"]["selector"], d["InferencePool"]["spec"]["selector"]["matchLabels"],
                     d["Deployment"]["spec"]["selector"]["matchLabels"]):
        assert selector.items() <= labels.items()
    assert [p["number"] for p in d["InferencePool"]["spec"]["targetPorts"]] == [port]
    assert d["HTTPRoute"]["spec"]["rules"][0]["backendRefs"][0]["name"] == d["InferencePool"]["metadata"]["name"]
    # the image's entrypoint is `camelid serve --host 0.0.0.0 --port 8000`; the args are its flags
    args = build_parser().parse_args(["serve", "--host", "0.0.0.0", "--port", str(port), *container["args"]])
    assert args.kv_cache_memory == "1GiB" and args.max_prefill_chunk == 256
    grace = float(container["args"][container["args"].index("--shutdown-grace") + 1])
    assert pod["spec"]["terminationGracePeriodSeconds"] > grace
    from camelid.serve import app

    source = Path(app.__file__).read_text()
    for path in (container["readinessProbe"]["httpGet"]["path"], container["livenessProbe"]["httpGet"]["path"],
                 pod["metadata"]["annotations"]["prometheus.io/path"]):
        assert f'@app.get("{path}")' in source
