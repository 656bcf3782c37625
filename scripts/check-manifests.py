#!/usr/bin/env python3
"""Check config/: the static manifest parses and has what aws-node needs, the Helm chart renders
(tests/chartrender: Go's text/template, Helm's engine) with its defaults and with overrides,
both agree on the environment, and the conflist template is JSON once substituted.
Run by scripts/test.sh; prints one line per check and exits non-zero on the first failure."""
import json
import os
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "config/helm/aws-vpc-cni")
passed = 0


def check(cond, what):
    global passed
    if not cond:
        print(f"FAIL {what}")
        sys.exit(1)
    passed += 1
    print(f"ok   {what}")


def docs(text):
    return [d for d in yaml.safe_load_all(text) if d]


def kinds(ds):
    return {d["kind"]: d for d in ds}


def daemonset_checks(ds, where):
    spec = ds["spec"]["template"]["spec"]
    check(spec.get("hostNetwork") is True, f"{where}: hostNetwork")
    check(spec["initContainers"][0]["command"][-1] == "init", f"{where}: init container runs aws-vpc-cni init")
    c = spec["containers"][0]
    check(c["readinessProbe"]["exec"]["command"][-1] == "probe", f"{where}: readiness probe")
    check(c["livenessProbe"]["exec"]["command"][-1] == "--live", f"{where}: liveness probe")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for p in ["/host/opt/cni/bin", "/host/etc/cni/net.d", "/var/run/aws-node", "/run/xtables.lock"]:
        check(p in mounts, f"{where}: mounts {p}")
    vols = {v["name"] for v in spec["volumes"]}
    check({m["name"] for m in c["volumeMounts"]} <= vols, f"{where}: every mount has a volume")
    return {e["name"]: e.get("value") for e in c["env"]}


def render(overrides):
    values = yaml.safe_load(open(os.path.join(CHART, "values.yaml")))
    for k, v in overrides.items():
        cur = values
        parts = k.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    chart = yaml.safe_load(open(os.path.join(CHART, "Chart.yaml")))
    ctx = {
        "Values": values,
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
        "Release": {"Name": "aws-vpc-cni", "Namespace": "kube-system"},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ctx, f)
    out = subprocess.run([RENDERER, CHART, f.name], capture_output=True, text=True)
    os.unlink(f.name)
    check(out.returncode == 0, f"chart renders with {overrides or 'defaults'} {out.stderr.strip()}")
    return docs(out.stdout)


def build_renderer():
    out_dir = os.path.join(ROOT, "target", "chartrender-build")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, "chartrender")
    env = dict(os.environ, GO111MODULE="off", GOPATH=out_dir, GOCACHE=os.path.join(out_dir, "cache"))
    subprocess.run(["go", "build", "-o", exe, "."], cwd=os.path.join(ROOT, "tests/chartrender"), env=env, check=True)
    return exe


RENDERER = build_renderer()

static = kinds(docs(open(os.path.join(ROOT, "config/aws-k8s-cni.yaml")).read()))
for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]:
    check(k in static, f"static manifest has a {k}")
check(static["DaemonSet"]["metadata"]["name"] == "aws-node", "static manifest: DaemonSet aws-node")
static_env = daemonset_checks(static["DaemonSet"], "static manifest")

rendered = kinds(render({}))
for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]:
    check(k in rendered, f"chart renders a {k}")
chart_env = daemonset_checks(rendered["DaemonSet"], "chart")
check(static_env == chart_env, "chart and static manifest set the same environment")
check(rendered["DaemonSet"]["metadata"]["name"] == "aws-node", "chart: DaemonSet aws-node")

over = kinds(render({"serviceAccount.create": False, "serviceAccount.name": "custom",
                     "extraEnv": {"WARM_IP_TARGET": "5", "CLUSTER_NAME": "prod"},
                     "podAnnotations": {"team": "net"}, "nodeSelector": {"pool": "a"}}))
check("ServiceAccount" not in over, "serviceAccount.create=false renders no ServiceAccount")
ds = over["DaemonSet"]["spec"]["template"]
check(ds["spec"]["serviceAccountName"] == "custom", "serviceAccount.name is used")
env = {e["name"]: e.get("value") for e in ds["spec"]["containers"][0]["env"]}
check(env.get("WARM_IP_TARGET") == "5" and env.get("CLUSTER_NAME") == "prod", "extraEnv is added")
check(ds["metadata"]["annotations"] == {"team": "net"}, "podAnnotations")
check(ds["spec"]["nodeSelector"] == {"pool": "a"}, "nodeSelector")

tmpl = open(os.path.join(ROOT, "config/10-aws.conflist")).read()
for ph in ["__VETHPREFIX__", "__MTU__", "__PODSGENFORCINGMODE__", "__PLUGINLOGFILE__", "__PLUGINLOGLEVEL__"]:
    check(ph in tmpl, f"conflist template has {ph}")
sub = tmpl
for ph in ["__VETHPREFIX__", "__MTU__", "__PODSGENFORCINGMODE__", "__PLUGINLOGFILE__", "__PLUGINLOGLEVEL__", "__RANDOMIZESNAT__"]:
    sub = sub.replace(ph, "x")
conf = json.loads(sub)
check([p["type"] for p in conf["plugins"]] == ["aws-cni", "portmap"], "conflist: aws-cni then portmap")

print(f"manifests: {passed} checks passed")
