#!/usr/bin/env python3
"""Check config/ and the Dockerfile: the static manifest parses and has what aws-node needs, the
Helm chart renders (tests/chartrender: Go's text/template, Helm's engine) with its defaults, with
overrides and with a values file in upstream's chart's shape (tests/data/upstream-values.yaml),
chart and static manifest agree (environment, pod spec, RBAC, CRD), the ENIConfig CRD is in both
(chart: crds/), the ClusterRole grants exactly what ipamd and the network policy agent use, the
chart renders ENIConfigs from values, the conflist template is JSON once substituted, and every
command upstream's DaemonSet and ours run exists in the images the Dockerfile lays out.
Run by scripts/test.sh; prints one line per check and exits non-zero on the first failure."""
import base64
import copy
import json
import os
import posixpath
import re
import shlex
import subprocess
import sys
import tempfile

import yaml

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CHART = os.path.join(ROOT, "config/helm/aws-vpc-cni")
UPSTREAM_VALUES = os.path.join(ROOT, "tests/data/upstream-values.yaml")
passed = 0


def check(cond, what):
    global passed
    if not cond:
        print(f"FAIL {what}")
        sys.exit(1)
    passed += 1
    print(f"ok   {what}")


def read(rel):
    with open(os.path.join(ROOT, rel)) as f:
        return f.read()


class StrictLoader(yaml.SafeLoader):
    """A YAML loader that refuses a key given twice in one mapping (which a template slip such as
    a second timeoutSeconds produces, and which the API server would also refuse)."""

    def construct_mapping(self, node, deep=False):
        keys = [self.construct_object(k, deep=deep) for k, _ in node.value]
        dup = sorted({str(k) for k in keys if keys.count(k) > 1})
        if dup:
            raise yaml.constructor.ConstructorError(None, None, f"duplicate keys {dup}", node.start_mark)
        return super().construct_mapping(node, deep)


def docs(text):
    return [d for d in yaml.load_all(text, Loader=StrictLoader) if d]


def kinds(ds):
    return {d["kind"]: d for d in ds}


# ---------------------------------------------------------------------------------------------
# Facts from upstream v1.23.1: its aws-node manifest (config/master/aws-k8s-cni.yaml) and the
# Dockerfiles of the images that manifest names (scripts/dockerfiles/Dockerfile.release and
# Dockerfile.init). No container of that DaemonSet sets a command, so each runs its image's
# default; the probes exec the same command in the aws-node container.
UPSTREAM_AWS_NODE_CMD = ["/app/aws-vpc-cni"]  # amazon-k8s-cni: ENTRYPOINT, WORKDIR /app
UPSTREAM_INIT_CMD = ["/init/aws-vpc-cni-init"]  # amazon-k8s-cni-init: CMD, WORKDIR /init
UPSTREAM_PROBE = ["/app/grpc-health-probe", "-addr=unix:///var/run/aws-node/ipamd.sock",
                  "-connect-timeout=5s", "-rpc-timeout=5s"]  # liveness and readiness alike
UPSTREAM_PROBE_TIMING = {"livenessProbe": (60, 10), "readinessProbe": (1, 10)}  # delay, timeout
UPSTREAM_ENV = {
    "ADDITIONAL_ENI_TAGS": "{}", "AWS_VPC_CNI_NODE_PORT_SUPPORT": "true", "AWS_VPC_ENI_MTU": "9001",
    "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "false", "AWS_VPC_K8S_CNI_EXTERNALSNAT": "false",
    "AWS_VPC_K8S_CNI_LOGLEVEL": "DEBUG", "AWS_VPC_K8S_CNI_LOG_FILE": "/host/var/log/aws-routed-eni/ipamd.log",
    "AWS_VPC_K8S_CNI_RANDOMIZESNAT": "prng", "AWS_VPC_K8S_CNI_VETHPREFIX": "eni",
    "AWS_VPC_K8S_PLUGIN_LOG_FILE": "/var/log/aws-routed-eni/plugin.log", "AWS_VPC_K8S_PLUGIN_LOG_LEVEL": "DEBUG",
    "DISABLE_INTROSPECTION": "false", "DISABLE_METRICS": "false", "DISABLE_NETWORK_RESOURCE_PROVISIONING": "false",
    "ENABLE_IMDS_ONLY_MODE": "false", "ENABLE_IPv4": "true", "ENABLE_IPv6": "false", "ENABLE_MULTI_NIC": "false",
    "ENABLE_POD_ENI": "false", "ENABLE_PREFIX_DELEGATION": "false", "ENABLE_SUBNET_DISCOVERY": "true",
    "NETWORK_POLICY_ENFORCING_MODE": "standard", "VPC_CNI_VERSION": "v1.23.1", "WARM_ENI_TARGET": "1",
    "WARM_PREFIX_TARGET": "1",
}
OWN_VALUE_ENV = {"VPC_CNI_VERSION"}  # names this project's version, not upstream's
UPSTREAM_INIT_ENV = {"DISABLE_TCP_EARLY_DEMUX": "false", "ENABLE_IPv6": "false"}
UPSTREAM_AGENT = {
    "image": "602401143452.dkr.ecr.us-west-2.amazonaws.com/amazon/aws-network-policy-agent:v1.4.2",
    "ports": [{"containerPort": 8162, "name": "agentmetrics"}],
    "args": ["--enable-ipv6=false", "--enable-network-policy=false", "--enable-cloudwatch-logs=false",
             "--enable-policy-event-logs=false", "--log-file=/var/log/aws-routed-eni/network-policy-agent.log",
             "--metrics-bind-addr=:8162", "--health-probe-bind-addr=:8163",
             "--conntrack-cache-cleanup-period=300", "--conntrack-cache-table-size=524288", "--log-level=debug"],
    "env": {"MY_NODE_NAME": "spec.nodeName"},
    "securityContext": {"capabilities": {"add": ["NET_ADMIN"]}, "privileged": True},
    "mounts": {"/host/opt/cni/bin": "cni-bin-dir", "/sys/fs/bpf": "bpf-pin-path",
               "/var/log/aws-routed-eni": "log-dir", "/var/run/aws-node": "run-dir"},
}
UPSTREAM_HOST_PATHS = {"bpf-pin-path": "/sys/fs/bpf", "cni-bin-dir": "/opt/cni/bin", "cni-net-dir": "/etc/cni/net.d",
                       "log-dir": "/var/log/aws-routed-eni", "run-dir": "/var/run/aws-node",
                       "xtables-lock": "/run/xtables.lock"}
UPSTREAM_AFFINITY = {"nodeAffinity": {"requiredDuringSchedulingIgnoredDuringExecution": {"nodeSelectorTerms": [
    {"matchExpressions": [
        {"key": "kubernetes.io/os", "operator": "In", "values": ["linux"]},
        {"key": "kubernetes.io/arch", "operator": "In", "values": ["amd64", "arm64"]},
        {"key": "eks.amazonaws.com/compute-type", "operator": "NotIn", "values": ["fargate", "hybrid", "auto"]},
    ]}]}}}
# ---------------------------------------------------------------------------------------------


def pod_spec(ds):
    return ds["spec"]["template"]["spec"]


def container(ds, name, init=False):
    cs = pod_spec(ds).get("initContainers" if init else "containers", [])
    return next((c for c in cs if c["name"] == name), None)


def env_of(c):
    return {e["name"]: e for e in c.get("env", [])}


def daemonset_checks(ds, where):
    spec = pod_spec(ds)
    check(spec.get("hostNetwork") is True, f"{where}: hostNetwork")
    init = container(ds, "aws-vpc-cni-init", init=True)
    check(init is not None and "command" not in init and "args" not in init
          and init["image"].split("/")[-1].startswith("amazon-k8s-cni-init:"),
          f"{where}: init container runs the amazon-k8s-cni-init image's own command, as upstream's")
    c = container(ds, "aws-node")
    check(c is not None and spec["containers"][0] is c, f"{where}: aws-node is the first container")
    check("command" not in c and "args" not in c, f"{where}: aws-node runs its image's entrypoint, as upstream's")
    check(c["readinessProbe"]["exec"]["command"][-1] == "probe", f"{where}: readiness probe")
    check(c["livenessProbe"]["exec"]["command"][-1] == "--live", f"{where}: liveness probe")
    for probe, (delay, timeout) in UPSTREAM_PROBE_TIMING.items():
        check((c[probe].get("initialDelaySeconds"), c[probe].get("timeoutSeconds")) == (delay, timeout),
              f"{where}: {probe} initialDelaySeconds {delay}, timeoutSeconds {timeout}, as upstream's")
    mounts = {m["mountPath"] for m in c["volumeMounts"]}
    for p in ["/host/opt/cni/bin", "/host/etc/cni/net.d", "/var/run/aws-node", "/run/xtables.lock"]:
        check(p in mounts, f"{where}: mounts {p}")
    vols = {v["name"] for v in spec["volumes"]}
    every = [m["name"] for x in spec["containers"] + spec["initContainers"] for m in x.get("volumeMounts", [])]
    check(set(every) <= vols, f"{where}: every mount has a volume")
    return {e["name"]: e.get("value") for e in c["env"]}


def upstream_parity_checks(ds, where):
    """What a drop-in for upstream's DaemonSet must keep: its environment, volumes, affinity and
    the network policy agent beside aws-node."""
    env = env_of(container(ds, "aws-node"))
    wrong = {k: env.get(k, {}).get("value") for k, v in UPSTREAM_ENV.items()
             if k not in OWN_VALUE_ENV and env.get(k, {}).get("value") != v}
    check(not wrong, f"{where}: aws-node sets every variable upstream's does, to upstream's value (differ: {wrong})")
    check(all(env.get(k, {}).get("value") for k in OWN_VALUE_ENV), f"{where}: sets {sorted(OWN_VALUE_ENV)}")
    ienv = env_of(container(ds, "aws-vpc-cni-init", init=True))
    check(all(ienv.get(k, {}).get("value") == v for k, v in UPSTREAM_INIT_ENV.items()),
          f"{where}: init container sets upstream's {sorted(UPSTREAM_INIT_ENV)}")
    hp = {v["name"]: v.get("hostPath", {}).get("path") for v in pod_spec(ds)["volumes"]}
    check(all(hp.get(k) == v for k, v in UPSTREAM_HOST_PATHS.items()),
          f"{where}: upstream's volumes (names and host paths)")
    check(pod_spec(ds).get("affinity") == UPSTREAM_AFFINITY, f"{where}: upstream's node affinity")
    agent_checks(ds, where, UPSTREAM_AGENT)


def agent_checks(ds, where, want):
    a = container(ds, "aws-eks-nodeagent")
    check(a is not None, f"{where}: has the aws-eks-nodeagent container")
    check(a["image"] == want["image"], f"{where}: aws-eks-nodeagent image {want['image']}")
    check("command" not in a and a["args"] == want["args"], f"{where}: aws-eks-nodeagent args {want['args']}")
    check(a["ports"] == want["ports"], f"{where}: aws-eks-nodeagent ports {want['ports']}")
    check({k: e.get("valueFrom", {}).get("fieldRef", {}).get("fieldPath") for k, e in env_of(a).items()} == want["env"],
          f"{where}: aws-eks-nodeagent env MY_NODE_NAME from the downward API")
    check(a["securityContext"] == want["securityContext"], f"{where}: aws-eks-nodeagent securityContext")
    check({m["mountPath"]: m["name"] for m in a["volumeMounts"]} == want["mounts"],
          f"{where}: aws-eks-nodeagent mounts {sorted(want['mounts'])}")
    # The plugin finds the agent at npa.sock and the agent finds ipamd at ipamd.sock: one directory
    # of the node, mounted in both containers.
    node_mounts = {m["mountPath"]: m["name"] for m in container(ds, "aws-node")["volumeMounts"]}
    np_dir = posixpath.dirname(NP_AGENT_SOCKET)
    check(node_mounts.get(np_dir) is not None and node_mounts.get(np_dir) == want["mounts"].get(np_dir),
          f"{where}: aws-node and the agent share {np_dir} (npa.sock, ipamd.sock)")


# The ClusterRole: exactly these (apiGroup, resource, verb), no more. ipamd's own, then the network
# policy agent's (it runs with the same ServiceAccount and watches the PolicyEndpoints the network
# policy controller writes; the nonResourceURLs are its API group's discovery, as upstream grants).
# Upstream's also has namespaces, list/watch on pods, list on events and vpcresources.k8s.aws
# cninodes, for features this ipamd does not implement.
IPAMD_RBAC = {(g, r, v) for g, r, vs in [
    ("", "nodes", ["get", "list", "watch"]),
    ("crd.k8s.amazonaws.com", "eniconfigs", ["get", "list", "watch"]),
    ("", "pods", ["get", "patch"]),
    ("", "events", ["create", "patch"]),
    ("events.k8s.io", "events", ["create", "patch"]),
] for v in vs}
AGENT_RBAC = {(g, r, v) for g, r, vs in [
    ("networking.k8s.aws", "policyendpoints", ["get", "list", "watch"]),
    ("networking.k8s.aws", "clusterpolicyendpoints", ["get", "list", "watch"]),
    ("networking.k8s.aws", "policyendpoints/status", ["get"]),
    ("networking.k8s.aws", "clusterpolicyendpoints/status", ["get"]),
    ("nonResourceURL", "/apis/networking.k8s.aws", ["get"]),
    ("nonResourceURL", "/apis/networking.k8s.aws/*", ["get"]),
] for v in vs}

# Environment ipamd reads for custom networking, subnet discovery and the pod IP annotation, with
# upstream's defaults.
ENV_DEFAULTS = {
    "AWS_VPC_K8S_CNI_CUSTOM_NETWORK_CFG": "false",
    "ENABLE_SUBNET_DISCOVERY": "true",
    "ANNOTATE_POD_IP": "false",
}
DOWNWARD = {"MY_NODE_NAME": "spec.nodeName", "MY_POD_NAME": "metadata.name"}


def rbac_set(role):
    got = set()
    for rule in role["rules"]:
        for u in rule.get("nonResourceURLs", []):
            for v in rule["verbs"]:
                got.add(("nonResourceURL", u, v))
        for g in rule.get("apiGroups", []):
            for r in rule.get("resources", []):
                for v in rule["verbs"]:
                    got.add((g, r, v))
    return got


def role_checks(role, where, want):
    check(all(not r.get("resourceNames") for r in role["rules"])
          and all(("nonResourceURL", u, v) in AGENT_RBAC for r in role["rules"]
                  for u in r.get("nonResourceURLs", []) for v in r["verbs"]),
          f"{where}: ClusterRole rules are by resource type (no resourceNames; nonResourceURLs only "
          f"the agent's API group discovery)")
    got = rbac_set(role)
    check(got == want, f"{where}: ClusterRole grants exactly what ipamd{' and the agent' if want & AGENT_RBAC else ''} "
                       f"use (extra {sorted(got - want)}, missing {sorted(want - got)})")


def env_checks(ds, where):
    env = env_of(container(ds, "aws-node"))
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


def helm_merge(base, user):
    """Helm's merge of a user's values over the chart's: maps merge key by key, anything else
    (lists included) replaces, and a null removes the chart's key."""
    out = copy.deepcopy(base)
    for k, v in user.items():
        if v is None:
            out.pop(k, None)
        elif isinstance(v, dict) and isinstance(out.get(k), dict):
            out[k] = helm_merge(out[k], v)
        else:
            out[k] = copy.deepcopy(v)
    return out


def render(overrides, fails=None, values_file=None):
    with open(os.path.join(CHART, "values.yaml")) as f:
        values = yaml.load(f, Loader=StrictLoader)
    if values_file:
        with open(values_file) as f:
            values = helm_merge(values, yaml.load(f, Loader=StrictLoader))
    for k, v in overrides.items():
        cur = values
        parts = k.split(".")
        for p in parts[:-1]:
            cur = cur.setdefault(p, {})
        cur[parts[-1]] = v
    with open(os.path.join(CHART, "Chart.yaml")) as f:
        chart = yaml.safe_load(f)
    ctx = {
        "Values": values,
        "Chart": {"Name": chart["name"], "Version": chart["version"], "AppVersion": chart["appVersion"]},
        "Release": {"Name": "aws-vpc-cni", "Namespace": "kube-system", "Service": "Helm"},
    }
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(ctx, f)
    out = subprocess.run([RENDERER, CHART, f.name], capture_output=True, text=True)
    os.unlink(f.name)
    label = " + ".join(x for x in [os.path.relpath(values_file, ROOT) if values_file else "",
                                   str(overrides) if overrides else ""] if x) or "defaults"
    if fails is not None:
        check(out.returncode != 0 and fails in out.stderr,
              f"chart refuses to render with {label}: {out.stderr.strip()}")
        return []
    check(out.returncode == 0, f"chart renders with {label} {out.stderr.strip()}")
    try:
        return docs(out.stdout)
    except yaml.YAMLError as e:
        check(False, f"chart output with {label} is YAML: {e}")


def build_renderer():
    out_dir = os.path.join(ROOT, "target", "chartrender-build")
    os.makedirs(out_dir, exist_ok=True)
    exe = os.path.join(out_dir, "chartrender")
    env = dict(os.environ, GO111MODULE="off", GOPATH=out_dir, GOCACHE=os.path.join(out_dir, "cache"))
    subprocess.run(["go", "build", "-o", exe, "."], cwd=os.path.join(ROOT, "tests/chartrender"), env=env, check=True)
    return exe


def keyed(obj):
    """A pod spec with its named lists (containers, env, volumes, ports; mounts by path) turned into
    maps, so two specs compare regardless of order."""
    if isinstance(obj, dict):
        return {k: keyed(v) for k, v in obj.items()}
    if isinstance(obj, list) and obj and all(isinstance(x, dict) for x in obj):
        for key in ("name", "mountPath"):
            if all(key in x for x in obj) and len({str(x[key]) for x in obj}) == len(obj):
                return {str(x[key]): keyed(x) for x in obj}
    if isinstance(obj, list):
        return [keyed(x) for x in obj]
    return obj


def diff(a, b, path=""):
    if isinstance(a, dict) and isinstance(b, dict):
        out = []
        for k in sorted(set(a) | set(b), key=str):
            out += diff(a.get(k), b.get(k), f"{path}.{k}")
        return out
    return [] if a == b else [path]


# ---------------------------------------------------------------------------------------------
# The images, as the Dockerfile lays them out.

def dockerfile_stages(text):
    """Each stage of a Dockerfile: name, WORKDIR, the files COPY puts where (path -> (from, source)),
    the links RUN ln -s makes (path -> target), ENTRYPOINT and CMD (exec form)."""
    instrs, buf = [], ""
    for line in text.splitlines():
        s = line.strip()
        if s.startswith("#") or (not s and not buf):
            continue
        if s.endswith("\\"):
            buf += s[:-1] + " "
            continue
        instrs.append(buf + s)
        buf = ""
    stages = []
    for ins in instrs:
        op, _, rest = ins.partition(" ")
        op, rest = op.upper(), rest.strip()
        if op == "FROM":
            w = rest.split()
            stages.append({"name": w[2] if len(w) >= 3 and w[1].lower() == "as" else None, "workdir": "/",
                           "files": {}, "links": {}, "entrypoint": None, "cmd": None, "run": []})
            continue
        st = stages[-1]
        if op == "WORKDIR":
            st["workdir"] = posixpath.join(st["workdir"], rest)
        elif op == "COPY":
            args = shlex.split(rest)
            frm = next((a.split("=", 1)[1] for a in args if a.startswith("--from=")), None)
            paths = [a for a in args if not a.startswith("--")]
            srcs, dest = paths[:-1], posixpath.join(st["workdir"], paths[-1])
            for src in srcs:
                to = posixpath.join(dest, posixpath.basename(src)) if dest.endswith("/") or len(srcs) > 1 else dest
                st["files"][posixpath.normpath(to)] = (frm, src)
        elif op == "RUN":
            st["run"].append(rest)
            for cmd in re.split(r"&&|;", rest):
                w = shlex.split(cmd)
                if len(w) == 4 and w[0] == "ln" and w[1] in ("-s", "-sf", "-fs"):
                    st["links"][posixpath.normpath(posixpath.join(st["workdir"], w[3]))] = w[2]
        elif op in ("ENTRYPOINT", "CMD"):
            try:
                st[op.lower()] = json.loads(rest)
            except ValueError:
                st[op.lower()] = ["/bin/sh", "-c", rest]
    return stages


def resolve(stage, path):
    """The file a path in the image ends at, following links; None when nothing is there."""
    for _ in range(8):
        if path in stage["files"]:
            return path
        if path not in stage["links"]:
            return None
        path = posixpath.normpath(posixpath.join(posixpath.dirname(path), stage["links"][path]))
    return None


def code_has(src, literal):
    """The Rust source has the string literal outside comments."""
    return any(literal in line for line in src.splitlines() if not line.strip().startswith("//"))


def default_command(stage):
    return (stage["entrypoint"] or []) + (stage["cmd"] or [])


def built_from(stage, path):
    f = resolve(stage, path)
    return stage["files"][f] if f else (None, None)


def runs_in(stage, argv, where):
    """The first word of argv is an executable of the image, and the binary answers to it."""
    exe = resolve(stage, argv[0])
    check(exe is not None, f"{where}: {argv[0]} is in the image")
    _, src = stage["files"][exe]
    return posixpath.basename(src)


# ---------------------------------------------------------------------------------------------

RENDERER = build_renderer()
SRC_ENTRY = read("ipamd/src/bin/aws-vpc-cni.rs")
SRC_PROBE = read("ipamd/src/probe.rs")
SRC_PROTO = read("proto/src/lib.rs")
NP_AGENT_SOCKET = re.search(r'DEFAULT_NP_AGENT_SOCKET: &str = "([^"]+)"', SRC_PROTO).group(1)
IPAMD_SOCKET = re.search(r'DEFAULT_SOCKET: &str = "([^"]+)"', SRC_PROTO).group(1)

static = kinds(docs(read("config/aws-k8s-cni.yaml")))
for k in ["CustomResourceDefinition", "ServiceAccount", "ClusterRole", "ClusterRoleBinding", "ConfigMap", "DaemonSet"]:
    check(k in static, f"static manifest has a {k}")
schema = crd_checks(static["CustomResourceDefinition"], "static manifest")
role_checks(static["ClusterRole"], "static manifest", IPAMD_RBAC | AGENT_RBAC)
env_checks(static["DaemonSet"], "static manifest")
check(static["DaemonSet"]["metadata"]["name"] == "aws-node", "static manifest: DaemonSet aws-node")
static_env = daemonset_checks(static["DaemonSet"], "static manifest")
upstream_parity_checks(static["DaemonSet"], "static manifest")
check(static["DaemonSet"]["spec"]["selector"] == {"matchLabels": {"k8s-app": "aws-node"}},
      "static manifest: selector k8s-app: aws-node, as upstream's static manifest")

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
check(not any(d["kind"] == "PodMonitor" for d in rendered_docs), "chart renders no PodMonitor by default")
check([d["metadata"]["name"] for d in rendered_docs if d["kind"] == "ConfigMap"] == ["amazon-vpc-cni"],
      "chart renders only the amazon-vpc-cni ConfigMap by default (cniConfig off)")
role_checks(rendered["ClusterRole"], "chart", IPAMD_RBAC | AGENT_RBAC)
env_checks(rendered["DaemonSet"], "chart")
chart_env = daemonset_checks(rendered["DaemonSet"], "chart")
upstream_parity_checks(rendered["DaemonSet"], "chart")
check(static_env == chart_env, "chart and static manifest set the same environment")
check(rendered["DaemonSet"]["metadata"]["name"] == "aws-node", "chart: DaemonSet aws-node")
check(rendered["ConfigMap"]["data"] == static["ConfigMap"]["data"], "chart and static manifest: same amazon-vpc-cni ConfigMap")
check(rendered["DaemonSet"]["spec"]["selector"]["matchLabels"]
      == {"app.kubernetes.io/name": "aws-node", "app.kubernetes.io/instance": "aws-vpc-cni"},
      "chart: selector on name and instance by default (originalMatchLabels: false, as upstream's chart)")
labels = rendered["DaemonSet"]["metadata"]["labels"]
check(labels.get("helm.sh/chart", "").startswith("aws-vpc-cni-") and labels.get("app.kubernetes.io/managed-by") == "Helm",
      "chart: helm.sh/chart and app.kubernetes.io/managed-by labels")

orig = kinds(render({"originalMatchLabels": True}))["DaemonSet"]
check(orig["spec"]["selector"] == static["DaemonSet"]["spec"]["selector"],
      "chart with originalMatchLabels: true selects as the static manifest (k8s-app: aws-node)")
d = diff(keyed(orig["spec"]["template"]), keyed(static["DaemonSet"]["spec"]["template"]))
check(not d, f"chart (originalMatchLabels: true) and static manifest: the same pod template (differ: {d})")
check(orig["spec"]["updateStrategy"] == static["DaemonSet"]["spec"]["updateStrategy"],
      "chart and static manifest: same updateStrategy")

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
render({"cniConfig.enabled": True}, fails="cniConfig.fileContents must be set")

# ---------------------------------------------------------------------------------------------
# A values file written for upstream's chart (tests/data/upstream-values.yaml), merged over ours.
with open(UPSTREAM_VALUES) as f:
    uv = yaml.load(f, Loader=StrictLoader)
up_docs = render({}, values_file=UPSTREAM_VALUES)
up = kinds(up_docs)
uds = up["DaemonSet"]
uspec = pod_spec(uds)
node, init, agent = container(uds, "aws-node"), container(uds, "aws-vpc-cni-init", init=True), container(uds, "aws-eks-nodeagent")
W = "upstream-shaped values"
check(node["image"] == uv["image"]["override"], f"{W}: image.override is the aws-node image")
ii = uv["init"]["image"]
check(init["image"] == f"{ii['account']}.dkr.{ii['endpoint']}.{ii['region']}.{ii['domain']}/amazon-k8s-cni-init:{ii['tag']}",
      f"{W}: init.image account/endpoint/region/domain/tag make the init image's ECR address ({init['image']})")
check(init["imagePullPolicy"] == "Always", f"{W}: init.image.pullPolicy")
check(agent is not None and agent["image"] == f"{uv['nodeAgent']['image']['overrideRepository']}:{uv['nodeAgent']['image']['tag']}",
      f"{W}: nodeAgent.image.overrideRepository:tag is the agent image")
check(uspec.get("imagePullSecrets") == uv["imagePullSecrets"], f"{W}: imagePullSecrets")
uenv = env_of(node)
for e in uv["extraEnv"]:
    check(uenv.get(e["name"]) == e, f"{W}: extraEnv entry {e['name']} added as given ({'valueFrom' if 'valueFrom' in e else 'value'})")
check(all(uenv.get(k, {}).get("value") == str(v) for k, v in uv["env"].items()), f"{W}: every env value")
check(uenv["NETWORK_POLICY_ENFORCING_MODE"]["value"] == "strict", f"{W}: NETWORK_POLICY_ENFORCING_MODE with the agent")
check(all(env_of(init).get(k, {}).get("value") == v for k, v in uv["init"]["env"].items()), f"{W}: init.env")
check(init["resources"] == uv["init"]["resources"], f"{W}: init.resources")
check(uspec["affinity"] == uv["affinity"], f"{W}: affinity")
check(uspec["tolerations"] == uv["tolerations"], f"{W}: tolerations")
check(uspec["nodeSelector"] == uv["nodeSelector"], f"{W}: nodeSelector")
check(uspec["priorityClassName"] == uv["priorityClassName"], f"{W}: priorityClassName")
check(uspec["securityContext"] == uv["podSecurityContext"], f"{W}: podSecurityContext")
check(uds["spec"]["updateStrategy"] == uv["updateStrategy"], f"{W}: updateStrategy")
check(uds["spec"]["selector"] == {"matchLabels": {"k8s-app": "aws-node"}}, f"{W}: originalMatchLabels: true selector")
check(uds["spec"]["template"]["metadata"]["labels"].get("tier") == "node-network", f"{W}: podLabels")
check(uds["spec"]["template"]["metadata"]["annotations"] == uv["podAnnotations"], f"{W}: podAnnotations")
check(node["securityContext"] == uv["securityContext"] and node["resources"] == uv["resources"],
      f"{W}: securityContext and resources")
check(up["ServiceAccount"]["metadata"]["annotations"] == uv["serviceAccount"]["annotations"]
      and up["ServiceAccount"]["metadata"]["name"] == "aws-node", f"{W}: serviceAccount (name null: aws-node)")
for probe in ["livenessProbe", "readinessProbe"]:
    p = node[probe]
    check(p["exec"]["command"] == UPSTREAM_PROBE and p["initialDelaySeconds"] == uv[probe]["initialDelaySeconds"]
          and p["timeoutSeconds"] == uv[probe + "TimeoutSeconds"],
          f"{W}: {probe} upstream's command, timeoutSeconds from {probe}TimeoutSeconds")
vol = {v["name"]: v for v in uspec["volumes"]}
for c in (init, node):
    check(uv["extraVolumeMounts"][0] in c["volumeMounts"], f"{W}: extraVolumeMounts in {c['name']}")
check(vol.get("ca-bundle") == uv["extraVolumes"][0], f"{W}: extraVolumes")
na = uv["nodeAgent"]
check(agent["args"] == [
    f"--enable-ipv6={na['enableIpv6']}", f"--enable-network-policy={uv['enableNetworkPolicy']}",
    f"--enable-cloudwatch-logs={na['enableCloudWatchLogs']}", f"--enable-policy-event-logs={na['enablePolicyEventLogs']}",
    f"--log-file={na['networkPolicyAgentLogFileLocation']}", f"--metrics-bind-addr=:{na['metricsBindAddr']}",
    f"--health-probe-bind-addr=:{na['healthProbeBindAddr']}",
    f"--conntrack-cache-cleanup-period={na['conntrackCacheCleanupPeriod']}",
    f"--conntrack-cache-table-size={na['conntrackCacheTableSize']}", f"--log-level={na['logLevel']}"],
    f"{W}: nodeAgent settings and enableNetworkPolicy reach the agent's args (numbers in full)")
check(agent["ports"] == [{"containerPort": int(na["metricsBindAddr"]), "name": "agentmetrics"}], f"{W}: agent metrics port")
check(agent["resources"] == na["resources"], f"{W}: nodeAgent.resources")
check(vol.get("bpf-pin-path", {}).get("hostPath", {}).get("path") == "/sys/fs/bpf"
      and {"mountPath": "/sys/fs/bpf", "name": "bpf-pin-path"} in agent["volumeMounts"], f"{W}: bpf-pin-path mounted in the agent")
cms = {d["metadata"]["name"]: d for d in up_docs if d["kind"] == "ConfigMap"}
check(cms["amazon-vpc-cni"]["data"] == {
    "enable-network-policy-controller": "true", "enable-windows-ipam": "true", "enable-windows-prefix-delegation": "true",
    "warm-prefix-target": "1", "warm-ip-target": "2", "minimum-ip-target": "4", "branch-eni-cooldown": "90"},
    f"{W}: enableNetworkPolicy and the Windows settings fill the amazon-vpc-cni ConfigMap")
conf = cms.get("aws-node", {}).get("binaryData", {}).get("10-aws.conflist")
check(conf is not None and base64.b64decode(conf).decode() == uv["cniConfig"]["fileContents"],
      f"{W}: cniConfig.fileContents in ConfigMap aws-node")
check({"mountPath": "/app/10-aws.conflist", "name": "cni-config", "subPath": "10-aws.conflist"} in node["volumeMounts"]
      and vol.get("cni-config") == {"name": "cni-config", "configMap": {"name": "aws-node"}},
      f"{W}: cniConfig mounted over /app/10-aws.conflist in aws-node")
pm = up.get("PodMonitor")
pmu = uv["podMonitor"]
check(pm is not None and pm["apiVersion"] == "monitoring.coreos.com/v1", f"{W}: podMonitor.create renders a PodMonitor")
check(pm["metadata"]["labels"] == pmu["labels"] and pm["metadata"]["annotations"] == pmu["annotations"]
      and pm["metadata"]["namespace"] == "kube-system", f"{W}: PodMonitor labels, annotations, namespace")
check([(e["port"], e["path"], e["interval"], e["scrapeTimeout"], e["relabelings"]) for e in pm["spec"]["podMetricsEndpoints"]]
      == [(p, "/metrics", pmu["interval"], pmu["scrapeTimeout"], pmu["relabelings"]) for p in ("metrics", "agentmetrics")],
      f"{W}: PodMonitor scrapes metrics and agentmetrics with interval, scrapeTimeout, relabelings")
pod_labels = uds["spec"]["template"]["metadata"]["labels"]
check(all(pod_labels.get(k) == v for k, v in pm["spec"]["selector"]["matchLabels"].items())
      and pm["spec"]["namespaceSelector"] == {"matchNames": ["kube-system"]}, f"{W}: PodMonitor selects the aws-node pods")
ports = {p["name"] for c in uspec["containers"] for p in c.get("ports", [])}
check({e["port"] for e in pm["spec"]["podMetricsEndpoints"]} <= ports, f"{W}: PodMonitor's ports are the pods' ports")
check(sorted(d["metadata"]["name"] for d in up_docs if d["kind"] == "ENIConfig") == sorted(uv["eniConfig"]["subnets"]),
      f"{W}: eniConfig.subnets render ENIConfigs")
role_checks(up["ClusterRole"], W, IPAMD_RBAC | AGENT_RBAC)

no_agent_docs = render({"nodeAgent.enabled": False}, values_file=UPSTREAM_VALUES)
na_ = kinds(no_agent_docs)
nds = na_["DaemonSet"]
check(container(nds, "aws-eks-nodeagent") is None and len(pod_spec(nds)["containers"]) == 1,
      f"{W} + nodeAgent.enabled=false: no aws-eks-nodeagent container")
check("bpf-pin-path" not in {v["name"] for v in pod_spec(nds)["volumes"]}, f"{W} + nodeAgent.enabled=false: no bpf-pin-path volume")
check("NETWORK_POLICY_ENFORCING_MODE" not in env_of(container(nds, "aws-node")),
      f"{W} + nodeAgent.enabled=false: no NETWORK_POLICY_ENFORCING_MODE (the plugin would call a missing agent)")
check([e["port"] for e in na_["PodMonitor"]["spec"]["podMetricsEndpoints"]] == ["metrics"],
      f"{W} + nodeAgent.enabled=false: PodMonitor scrapes metrics only")
role_checks(na_["ClusterRole"], f"{W} + nodeAgent.enabled=false", IPAMD_RBAC)
sel = kinds(render({"originalMatchLabels": False}, values_file=UPSTREAM_VALUES))["DaemonSet"]
check(sel["spec"]["selector"]["matchLabels"] == {"app.kubernetes.io/name": "aws-node", "app.kubernetes.io/instance": "aws-vpc-cni",
                                                 "tier": "node-network"}
      and all(sel["spec"]["template"]["metadata"]["labels"].get(k) == v for k, v in sel["spec"]["selector"]["matchLabels"].items()),
      f"{W} + originalMatchLabels=false: selector name, instance and podLabels, which the pod carries")
acct = kinds(render({"image.override": None}, values_file=UPSTREAM_VALUES))["DaemonSet"]
check(container(acct, "aws-node")["image"] == "111122223333.dkr.ecr.eu-west-1.amazonaws.com/amazon-k8s-cni:v1.23.1",
      f"{W} + no image.override: the ECR address from image.account/endpoint/region/domain/tag")

# ---------------------------------------------------------------------------------------------
# The images: every command upstream's DaemonSet runs, and every command ours runs, is in the
# layout the Dockerfile builds.
stages = dockerfile_stages(read("Dockerfile"))
final = stages[-1]
byname = {s["name"]: s for s in stages if s["name"]}
check("init" in byname and final is not byname["init"], "Dockerfile: an init stage, and the aws-node image is the default (last) stage")
istage = byname["init"]
build = byname.get("build", {"run": []})
check(any("scripts/build-plugin.sh" in r for r in build["run"]) and built_from(final, "/app/aws-cni")[1].endswith("release/aws-cni"),
      "Dockerfile: /app/aws-cni is the plugin scripts/build-plugin.sh builds")
check(default_command(final) == UPSTREAM_AWS_NODE_CMD and final["entrypoint"] == UPSTREAM_AWS_NODE_CMD,
      f"aws-node image: ENTRYPOINT {UPSTREAM_AWS_NODE_CMD}, which upstream's aws-node container runs")
check(runs_in(final, UPSTREAM_AWS_NODE_CMD, "aws-node image") == "aws-vpc-cni", "aws-node image: the entrypoint is aws-vpc-cni")
for f in ["/app/ipamd", "/app/max-pods", "/app/10-aws.conflist"]:
    check(resolve(final, f) is not None, f"aws-node image: {f}")
check(runs_in(final, UPSTREAM_PROBE, "aws-node image") == "aws-vpc-cni"
      and final["links"].get(UPSTREAM_PROBE[0]) is not None,
      f"aws-node image: {UPSTREAM_PROBE[0]} (upstream's probe) is a link to aws-vpc-cni")
check(code_has(SRC_ENTRY, '"grpc-health-probe"'),
      "aws-vpc-cni answers as grpc-health-probe when run under that name")
flags = sorted({a.lstrip("-").split("=", 1)[0] for a in UPSTREAM_PROBE[1:]} | {"service"})
check(all(f'"{f}" =>' in SRC_PROBE for f in flags), f"grpc-health-probe takes upstream's flags {flags}")
addr = UPSTREAM_PROBE[1].split("=", 1)[1]
check(addr == "unix://" + IPAMD_SOCKET, f"upstream's probe address is ipamd's socket {IPAMD_SOCKET}")
live = re.search(r"LIVE: \[&str; \d+\] = \[([^\]]*)\]", SRC_PROTO)
check(live is not None and '""' in live.group(1),
      "upstream's probe asks for service \"\" (no -service), which ipamd serves once initialised")
check(default_command(istage) == UPSTREAM_INIT_CMD, f"init image: default command {UPSTREAM_INIT_CMD}, which upstream's init container runs")
check(runs_in(istage, UPSTREAM_INIT_CMD, "init image") == "aws-vpc-cni", "init image: aws-vpc-cni-init is aws-vpc-cni")
check(code_has(SRC_ENTRY, '"aws-vpc-cni-init"'),
      "aws-vpc-cni does the init container's work when run as aws-vpc-cni-init")
init_fn = SRC_ENTRY[SRC_ENTRY.index("fn init("):]
plugins = re.findall(r'"([a-z-]+)"', re.search(r"&\[([^\]]*)\]", init_fn).group(1))
init_dir = posixpath.dirname(UPSTREAM_INIT_CMD[0])
check(all(resolve(istage, f"{init_dir}/{p}") for p in plugins), f"init image: the plugins init installs ({plugins}) are beside it")
check(all(resolve(final, f"/app/{p}") for p in plugins), f"aws-node image: the same plugins, for aws-vpc-cni init")
tmpl = read("config/10-aws.conflist")
chained = [p["type"] for p in json.loads(re.sub(r"__[A-Z]+__", "x", tmpl))["plugins"]]
# aws-cni and egress-cni come from the aws-node container's entrypoint (as upstream's), the
# rest from init.
check(set(chained) <= set(plugins) | {"aws-cni", "egress-cni"}, f"every plugin the conflist chains ({chained}) is installed on the node")
check(code_has(SRC_ENTRY, '"egress-cni"') and resolve(final, f"/app/egress-cni") is not None,
      "aws-node image: egress-cni beside the entrypoint, which installs it")
app_dir = posixpath.dirname(UPSTREAM_AWS_NODE_CMD[0])
check({"mountPath": f"{app_dir}/10-aws.conflist", "name": "cni-config", "subPath": "10-aws.conflist"} in node["volumeMounts"]
      and resolve(final, f"{app_dir}/10-aws.conflist") is not None,
      f"cniConfig replaces the template the image keeps beside its entrypoint ({app_dir}/10-aws.conflist)")
for where, dset in [("static manifest", static["DaemonSet"]), ("chart", rendered["DaemonSet"]), (W, uds)]:
    for probe in ["livenessProbe", "readinessProbe"]:
        cmd = container(dset, "aws-node")[probe]["exec"]["command"]
        runs_in(final, cmd, f"{where}: {probe} {cmd[0]}")
        if posixpath.basename(cmd[0]) == "aws-vpc-cni":
            check(code_has(SRC_ENTRY, f'"{cmd[1]}"'), f"{where}: {probe}: aws-vpc-cni takes {cmd[1]!r}")

EGRESS_PH = ["__EGRESSPLUGINENABLED__", "__NODEIP__", "__EGRESSPLUGINIPAMSUBNET__", "__EGRESSPLUGINIPAMDST__",
             "__EGRESSPLUGINIPAMDATADIR__", "__EGRESSPLUGINLOGFILE__"]
for ph in ["__VETHPREFIX__", "__MTU__", "__PODSGENFORCINGMODE__", "__PLUGINLOGFILE__", "__PLUGINLOGLEVEL__"] + EGRESS_PH:
    check(ph in tmpl, f"conflist template has {ph}")
sub = tmpl
for ph in ["__VETHPREFIX__", "__MTU__", "__PODSGENFORCINGMODE__", "__PLUGINLOGFILE__", "__PLUGINLOGLEVEL__", "__RANDOMIZESNAT__"] + EGRESS_PH:
    sub = sub.replace(ph, "x")
conf = json.loads(sub)
check([p["type"] for p in conf["plugins"]] == ["aws-cni", "egress-cni", "portmap"], "conflist: aws-cni, egress-cni, then portmap, as upstream's")

print(f"manifests: {passed} checks passed")
