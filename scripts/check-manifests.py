#!/usr/bin/env python3
"""Check config/: the static manifest parses and has what aws-node needs, the Helm chart renders
(tests/chartrender: Go's text/template, Helm's engine) with its defaults and with overrides,
both agree on the environment, the ENIConfig CRD is in both (chart: crds/), the ClusterRole grants
exactly what ipamd uses, the chart renders ENIConfigs from values, and the conflist template is
JSON once substituted.
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


# The ClusterRole: exactly these (apiGroup, resource, verb), no more. Upstream's also has namespaces,
# list/watch on pods, list on events, networking.k8s.aws policy endpoints, vpcresources.k8s.aws
# cninodes and nonResourceURLs, for features this ipamd does not implement.
RBAC = {(g, r, v) for g, r, vs in [
    ("", "nodes", ["get", "list", "watch"]),
    ("crd.k8s.amazonaws.com", "eniconfigs", ["get", "list", "watch"]),
    ("", "pods", ["get", "patch"]),
    ("", "events", ["create", "patch"]),
    ("events.k8s.io", "events", ["create", "patch"]),
] for v in vs}

# Environment ipamd reads for custom networking, subnet discovery and the pod IP annotation, with
# upstream's defaults.
ENV_DEFAULTS = {
    "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "false",
    "ENABLE_SUBNET_DISCOVERY": "true",
    "ANNOTATE_POD_IP": "false",
}
DOWNWARD = {"MY_NODE_NAME": "spec.nodeName", "MY_POD_NAME": "metadata.name"}


def role_checks(role, where):
    check(all(not r.get("nonResourceURLs") and not r.get("resourceNames") for r in role["rules"]),
          f"{where}: ClusterRole rules are by resource type (no nonResourceURLs, no resourceNames)")
    got = set()
    for rule in role["rules"]:
        for g in rule["apiGroups"]:
            for r in rule["resources"]:
                for v in rule["verbs"]:
                    got.add((g, r, v))
    check(got == RBAC, f"{where}: ClusterRole grants exactly what ipamd uses "
                       f"(extra {sorted(got - RBAC)}, missing {sorted(RBAC - got)})")


def env_checks(ds, where):
    env = {e["name"]: e for e in ds["spec"]["template"]["spec"]["containers"][0]["env"]}
    for k, v in ENV_DEFAULTS.items():
        check(env.get(k, {}).get("value") == v, f"{where}: {k}={v!r}")
    for k, path in DOWNWARD.items():
        ref = env.get(k, {}).get("valueFrom", {}).get("fieldRef", {})
        check(ref.get("fieldPath") == path, f"{where}: {k} from the downward API ({path})")
    for k in ["ENI_CONFIG_LABEL_DEF", "ENI_CONFIG_ANNOTATION_DEF"]:
        check(k not in env, f"{where}: {k} left to ipamd's default, as upstream's manifest does")


def crd_checks(crd, where):
    check(crd["apiVersion"] == "apiextensions.k8s.io/v1", f"{where}: CRD is apiextensions.k8s.io/v1")
    check(crd["metadata"]["name"] == "eniconfigs.crd.k8s.amazonaws.com", f"{where}: CRD name")
    spec = crd["spec"]
    check(spec["group"] == "crd.k8s.amazonaws.com", f"{where}: CRD group")
    check(spec["scope"] == "Cluster", f"{where}: ENIConfig is cluster-scoped")
    check(spec["names"].get("kind") == "ENIConfig" and spec["names"].get("plural") == "eniconfigs"
          and spec["names"].get("singular") == "eniconfig", f"{where}: CRD names")
    vs = spec["versions"]
    check([v["name"] for v in vs] == ["v1alpha1"] and vs[0]["served"] is True and vs[0]["storage"] is True,
          f"{where}: one version, v1alpha1, served and stored")
    root = vs[0]["schema"]["openAPIV3Schema"]
    check(root["type"] == "object" and root.get("x-kubernetes-preserve-unknown-fields") is True,
          f"{where}: root schema is an object preserving unknown fields")
    es = root["properties"]["spec"]
    props = es["properties"]
    check(es["type"] == "object" and props["subnet"]["type"] == "string", f"{where}: spec.subnet is a string")
    check(props["securityGroups"]["type"] == "array" and props["securityGroups"]["items"]["type"] == "string",
          f"{where}: spec.securityGroups is an array of strings")
    check(es.get("required") == ["subnet"], f"{where}: spec.subnet is required")
    return root


def eniconfig_valid(obj, schema):
    spec = obj.get("spec", {})
    props = schema["properties"]["spec"]["properties"]
    return (obj["apiVersion"] == "crd.k8s.amazonaws.com/v1alpha1" and "namespace" not in obj["metadata"]
            and set(spec) <= set(props) and isinstance(spec.get("subnet"), str)
            and all(isinstance(g, str) for g in spec.get("securityGroups", [])))


def render(overrides, fails=None):
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
    if fails is not None:
        check(out.returncode != 0 and fails in out.stderr,
              f"chart refuses to render with {overrides}: {out.stderr.strip()}")
        return []
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
for k in ["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]:
    check(k in static, f"static manifest has a {k}")
schema = crd_checks(static["CustomResourceDefinition"], "static manifest")
role_checks(static["ClusterRole"], "static manifest")
env_checks(static["DaemonSet"], "static manifest")
check(static["DaemonSet"]["metadata"]["name"] == "aws-node", "static manifest: DaemonSet aws-node")
static_env = daemonset_checks(static["DaemonSet"], "static manifest")

crd_dir = os.path.join(CHART, "crds")
crd_files = sorted(os.listdir(crd_dir)) if os.path.isdir(crd_dir) else []
check(crd_files == ["customresourcedefinition.yaml"], "chart: crds/customresourcedefinition.yaml, as upstream's chart")
chart_crds = docs(open(os.path.join(crd_dir, crd_files[0])).read())
check(len(chart_crds) == 1 and chart_crds[0]["kind"] == "CustomResourceDefinition", "chart: crds/ holds the one CRD")
crd_checks(chart_crds[0], "chart crds/")
check(chart_crds[0] == static["CustomResourceDefinition"], "chart and static manifest have the same CRD")

rendered_docs = render({})
rendered = kinds(rendered_docs)
for k in ["ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]:
    check(k in rendered, f"chart renders a {k}")
check("CustomResourceDefinition" not in rendered, "chart templates render no CRD (Helm installs crds/)")
check(not any(d["kind"] == "ENIConfig" for d in rendered_docs), "chart renders no ENIConfig by default")
role_checks(rendered["ClusterRole"], "chart")
env_checks(rendered["DaemonSet"], "chart")
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

check(over["ClusterRoleBinding"]["subjects"][0]["name"] == "custom", "ClusterRoleBinding binds serviceAccount.name")

subnets = {"us-west-2a": {"id": "subnet-0a", "securityGroups": ["sg-1", "sg-2"]}, "us-west-2b": {"id": "subnet-0b"}}
eni = [d for d in render({"eniConfig.create": True, "eniConfig.subnets": subnets}) if d["kind"] == "ENIConfig"]
check(sorted(d["metadata"]["name"] for d in eni) == ["us-west-2a", "us-west-2b"],
      "eniConfig.create renders one ENIConfig per eniConfig.subnets key, named after it")
byname = {d["metadata"]["name"]: d for d in eni}
check(byname["us-west-2a"]["spec"] == {"subnet": "subnet-0a", "securityGroups": ["sg-1", "sg-2"]},
      "ENIConfig spec: subnet and securityGroups from values")
check(byname["us-west-2b"]["spec"] == {"subnet": "subnet-0b"}, "ENIConfig without securityGroups has none")
check(all(eniconfig_valid(d, schema) for d in eni), "rendered ENIConfigs fit the CRD's schema")
check(not any(d["kind"] == "ENIConfig" for d in render({"eniConfig.create": False, "eniConfig.subnets": subnets})),
      "eniConfig.create=false renders no ENIConfig even with subnets")
render({"eniConfig.create": True}, fails="eniConfig.subnets must be set")
render({"eniConfig.create": True, "eniConfig.subnets": {"us-west-2c": {"securityGroups": ["sg-3"]}}},
       fails="eniConfig.subnets.us-west-2c.id must be set")

tmpl = open(os.path.join(ROOT, "config/10-aws.conflist")).read()
for ph in ["__VETHPREFIX__", "__MTU__", "__PODSGENFORCINGMODE__", "__PLUGINLOGFILE__", "__PLUGINLOGLEVEL__"]:
    check(ph in tmpl, f"conflist template has {ph}")
sub = tmpl
for ph in ["__VETHPREFIX__", "__MTU__", "__PODSGENFORCINGMODE__", "__PLUGINLOGFILE__", "__PLUGINLOGLEVEL__", "__RANDOMIZESNAT__"]:
    sub = sub.replace(ph, "x")
conf = json.loads(sub)
check([p["type"] for p in conf["plugins"]] == ["aws-cni", "portmap"], "conflist: aws-cni then portmap")

print(f"manifests: {passed} checks passed")
