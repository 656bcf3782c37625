"""Tests for kube_api.py over HTTPS against a server started as a subprocess, plus
Debian's kubectl as an independent client when it is installed.

    .venv/bin/python -m unittest tests/rig/test_kube_api.py
"""
import base64
import http.client
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import tempfile
import threading
import time
import unittest
import urllib.error
import urllib.request
from urllib.parse import quote

HERE = os.path.dirname(os.path.abspath(__file__))
KUBECTL = "/usr/bin/kubectl"
TOKEN = "test-token"
SERVER = None  # (process, port, dir)


def start_server(*extra):
    d = tempfile.mkdtemp(prefix="kube-api-")
    ready = os.path.join(d, "port")
    with open(os.path.join(d, "stderr"), "w") as err:
        proc = subprocess.Popen(
            [sys.executable, os.path.join(HERE, "kube_api.py"), "--port", "0", "--dir", d,
             "--ready-file", ready, "--token", TOKEN, "--bookmark-interval", "0.5",
             "--log", os.path.join(d, "requests.log"), *extra],
            stdout=subprocess.DEVNULL, stderr=err)
    deadline = time.monotonic() + 20
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"kube_api did not start: {stderr_of((proc, 0, d))}")
        time.sleep(0.02)
    with open(ready) as f:
        return proc, int(f.read()), d


def stderr_of(server):
    with open(os.path.join(server[2], "stderr")) as f:
        return f.read()


def stop_server(server):
    """Stops it and fails if it printed anything (a traceback is an emulator bug)."""
    proc, _, d = server
    proc.send_signal(signal.SIGTERM)
    code = proc.wait(timeout=5)
    err = stderr_of(server)
    shutil.rmtree(d, ignore_errors=True)
    if code != 0 or err:
        raise AssertionError(f"kube_api exited {code}; stderr:\n{err}")


def setUpModule():
    global SERVER
    SERVER = start_server()


def tearDownModule():
    stop_server(SERVER)


def tls_context(server=None):
    """Verifies as strictly as OpenSSL can, standing in for rustls/webpki, which is stricter
    about certificates than Python's defaults."""
    ctx = ssl.create_default_context(cafile=os.path.join((server or SERVER)[2], "ca.crt"))
    ctx.verify_flags |= ssl.VERIFY_X509_STRICT
    return ctx


def call(method, path, body=None, token=TOKEN, ctype="application/json", server=None):
    """-> (status, parsed JSON body)."""
    server = server or SERVER
    data = None if body is None else body if isinstance(body, bytes) else json.dumps(body).encode()
    req = urllib.request.Request(f"https://127.0.0.1:{server[1]}{path}", data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", ctype)
    if token is not None:
        req.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(req, context=tls_context(server), timeout=10) as resp:
            return resp.status, json.load(resp)
    except urllib.error.HTTPError as e:
        return e.code, json.load(e)


def ok(method, path, body=None, **kw):
    status, obj = call(method, path, body, **kw)
    assert status in (200, 201), (status, obj)
    return obj


def node(name, labels=None, **extra):
    return {"apiVersion": "v1", "kind": "Node",
            "metadata": {"name": name, "labels": labels or {}}, **extra}


def pod(name, ns="default", labels=None, node_name="node-a"):
    return {"apiVersion": "v1", "kind": "Pod",
            "metadata": {"name": name, "namespace": ns, "labels": labels or {}},
            "spec": {"nodeName": node_name, "containers": [{"name": "c", "image": "busybox"}]}}


def eniconfig(name, subnet="subnet-1"):
    return {"apiVersion": "crd.k8s.amazonaws.com/v1alpha1", "kind": "ENIConfig",
            "metadata": {"name": name}, "spec": {"subnet": subnet, "securityGroups": ["sg-1"]}}


EVENT = {"apiVersion": "events.k8s.io/v1", "kind": "Event", "metadata": {"name": "e1"},
         "note": "hello", "reason": "Test", "type": "Normal", "action": "Tested",
         "reportingController": "aws-node", "reportingInstance": "node-a",
         "eventTime": "2024-01-01T00:00:00.000000Z"}
ENI = "/apis/crd.k8s.amazonaws.com/v1alpha1/eniconfigs"
PODS = "/api/v1/namespaces/default/pods"


class Watch:
    """A streaming watch read line by line (http.client undoes the chunking)."""

    def __init__(self, path, server=None):
        server = server or SERVER
        self.conn = http.client.HTTPSConnection("127.0.0.1", server[1],
                                                context=tls_context(server), timeout=10)
        self.conn.request("GET", path, headers={"Authorization": f"Bearer {TOKEN}"})
        self.resp = self.conn.getresponse()
        assert self.resp.status == 200, self.resp.status

    def next(self, skip_bookmarks=True):
        while True:
            line = self.resp.readline()
            if not line:
                return None
            event = json.loads(line)
            if not (skip_bookmarks and event["type"] == "BOOKMARK"):
                return event

    def rest(self, **kw):
        """Every event until the server ends the stream."""
        events = []
        while (e := self.next(**kw)) is not None:
            events.append(e)
        self.close()
        return events

    def close(self):
        self.conn.close()


class KubeApiTest(unittest.TestCase):
    def setUp(self):
        ok("POST", "/_emu/reset", token=None)

    def rv(self):
        return int(ok("GET", "/_emu/health", token=None)["resourceVersion"])

    def assertStatus(self, got, code, reason):
        status, body = got
        self.assertEqual(status, code, body)
        self.assertEqual((body["kind"], body["status"], body["code"], body["reason"]),
                         ("Status", "Failure", code, reason), body)
        return body

    # ---- basics

    def test_auth(self):
        self.assertStatus(call("GET", "/api/v1/nodes", token=None), 401, "Unauthorized")
        self.assertStatus(call("GET", "/api/v1/nodes", token="wrong"), 401, "Unauthorized")
        self.assertStatus(call("GET", "/version", token="wrong"), 401, "Unauthorized")
        self.assertEqual(ok("GET", "/version", token=None)["major"], "1")
        self.assertTrue(ok("GET", "/_emu/health", token=None)["ok"])

    def test_files(self):
        d = SERVER[2]
        with open(os.path.join(d, "token")) as f:
            self.assertEqual(f.read(), TOKEN)
        with open(os.path.join(d, "kubeconfig")) as f:
            text = f.read()
        self.assertIn(f"server: https://127.0.0.1:{SERVER[1]}", text)
        self.assertIn(f"token: {TOKEN}", text)
        ca = text.split("certificate-authority-data: ")[1].split()[0]
        with open(os.path.join(d, "ca.crt"), "rb") as f:
            self.assertEqual(base64.b64decode(ca), f.read())
        # The server certificate answers to every name an in-cluster client may use.
        for host in ("localhost", "kubernetes.default.svc"):
            with socket.create_connection(("127.0.0.1", SERVER[1])) as raw:
                with tls_context().wrap_socket(raw, server_hostname=host) as tls:
                    self.assertTrue(tls.version())

    def test_discovery(self):
        core = ok("GET", "/api/v1")
        self.assertEqual(core["kind"], "APIResourceList")
        names = {r["name"]: r for r in core["resources"]}
        self.assertTrue({"nodes", "pods", "events", "namespaces", "pods/status"} <= set(names))
        self.assertFalse(names["nodes"]["namespaced"])
        self.assertTrue(names["pods"]["namespaced"])
        groups = {g["name"] for g in ok("GET", "/apis")["groups"]}
        self.assertEqual(groups, {"crd.k8s.amazonaws.com", "events.k8s.io"})
        crd = ok("GET", "/apis/crd.k8s.amazonaws.com/v1alpha1")
        self.assertEqual(crd["groupVersion"], "crd.k8s.amazonaws.com/v1alpha1")
        self.assertEqual([(r["name"], r["kind"], r["namespaced"]) for r in crd["resources"]],
                         [("eniconfigs", "ENIConfig", False)])
        self.assertEqual(ok("GET", "/api")["versions"], ["v1"])
        self.assertStatus(call("GET", "/apis/apps/v1/deployments"), 404, "NotFound")

    # ---- verbs

    def test_create_get_list_delete(self):
        start = self.rv()
        created = ok("POST", "/api/v1/nodes", node("node-a", {"zone": "a"}))
        meta = created["metadata"]
        self.assertEqual(int(meta["resourceVersion"]), start + 1)
        self.assertTrue(meta["uid"] and meta["creationTimestamp"].endswith("Z"))
        self.assertEqual(meta["generation"], 1)
        self.assertEqual(ok("GET", "/api/v1/nodes/node-a"), created)
        listed = ok("GET", "/api/v1/nodes")
        self.assertEqual((listed["kind"], listed["apiVersion"]), ("NodeList", "v1"))
        self.assertEqual(listed["metadata"]["resourceVersion"], str(self.rv()))
        self.assertEqual([n["metadata"]["name"] for n in listed["items"]], ["node-a"])
        body = self.assertStatus(call("POST", "/api/v1/nodes", node("node-a")), 409, "AlreadyExists")
        self.assertEqual(body["message"], 'nodes "node-a" already exists')
        body = self.assertStatus(call("GET", "/api/v1/nodes/nope"), 404, "NotFound")
        self.assertEqual(body["details"], {"name": "nope", "kind": "nodes"})
        body = self.assertStatus(call("GET", f"{ENI}/nope"), 404, "NotFound")
        self.assertEqual(body["message"], 'eniconfigs.crd.k8s.amazonaws.com "nope" not found')
        deleted = ok("DELETE", "/api/v1/nodes/node-a")
        self.assertEqual(int(deleted["metadata"]["resourceVersion"]), start + 2)
        self.assertStatus(call("GET", "/api/v1/nodes/node-a"), 404, "NotFound")
        self.assertStatus(call("DELETE", "/api/v1/nodes/node-a"), 404, "NotFound")

    def test_eniconfig_and_namespaced(self):
        ok("POST", ENI, eniconfig("us-west-2a"))
        got = ok("GET", f"{ENI}/us-west-2a")
        self.assertEqual((got["kind"], got["apiVersion"]), ("ENIConfig", "crd.k8s.amazonaws.com/v1alpha1"))
        self.assertNotIn("namespace", got["metadata"])
        ok("POST", PODS, pod("p1"))
        self.assertEqual(ok("GET", f"{PODS}/p1")["metadata"]["namespace"], "default")
        self.assertEqual(len(ok("GET", "/api/v1/pods")["items"]), 1)
        self.assertEqual(ok("GET", "/api/v1/namespaces/kube-system/pods")["items"], [])
        self.assertStatus(call("POST", "/api/v1/namespaces/nope/pods", pod("p1", ns="nope")),
                          404, "NotFound")
        self.assertStatus(call("POST", PODS, pod("p2", ns="other")), 400, "BadRequest")
        ok("POST", "/api/v1/namespaces", {"metadata": {"name": "other"}})
        ok("POST", "/api/v1/namespaces/other/pods", pod("p2", ns="other"))
        ok("DELETE", "/api/v1/namespaces/other")  # takes its objects with it
        self.assertStatus(call("GET", "/api/v1/namespaces/other/pods/p2"), 404, "NotFound")

    def test_events_both_apis(self):
        ok("POST", "/apis/events.k8s.io/v1/namespaces/default/events",
           {**EVENT, "regarding": {"kind": "Node", "name": "node-a"}})
        core = ok("GET", "/api/v1/namespaces/default/events/e1")
        self.assertEqual((core["message"], core["involvedObject"]["name"], core["reportingComponent"]),
                         ("hello", "node-a", "aws-node"))
        ok("PATCH", "/apis/events.k8s.io/v1/namespaces/default/events/e1",
           {"series": {"count": 2, "lastObservedTime": "2024-01-01T00:00:01.000000Z"}},
           ctype="application/merge-patch+json")
        new = ok("GET", "/apis/events.k8s.io/v1/namespaces/default/events/e1")
        self.assertEqual((new["note"], new["series"]["count"]), ("hello", 2))
        sel = quote("involvedObject.name=node-a,reason=Test")
        self.assertEqual(len(ok("GET", f"/api/v1/events?fieldSelector={sel}")["items"]), 1)
        ok("POST", "/api/v1/namespaces/default/events", {
            "metadata": {"name": "e2"}, "message": "core", "involvedObject": {"kind": "Pod"}})
        self.assertEqual(ok("GET", "/apis/events.k8s.io/v1/namespaces/default/events/e2")["note"], "core")
        body = self.assertStatus(call("POST", "/apis/events.k8s.io/v1/namespaces/default/events",
                                      {**EVENT, "metadata": {"name": "e3"}, "type": "Odd"}), 422, "Invalid")
        self.assertEqual(body["details"]["causes"][0]["field"], "type")
        # A core event with eventTime (as ipamd posts them) must name its reporter.
        core_event = {"metadata": {"name": "e4"}, "involvedObject": {"kind": "Node", "name": "node-a"},
                      "eventTime": "2024-01-01T00:00:00.000000Z", "reason": "R", "action": "A",
                      "reportingInstance": "node-a", "type": "Warning", "message": "m"}
        body = self.assertStatus(call("POST", "/api/v1/namespaces/default/events", core_event), 422, "Invalid")
        self.assertEqual(body["details"]["causes"][0]["field"], "reportingComponent")
        ok("POST", "/api/v1/namespaces/default/events", {**core_event, "reportingComponent": "aws-node"})
        pod_event = {"metadata": {"name": "e5"}, "involvedObject": {"kind": "Pod", "namespace": "other"}}
        self.assertStatus(call("POST", "/api/v1/namespaces/default/events", pod_event), 422, "Invalid")

    def test_patch_kinds(self):
        ok("POST", "/api/v1/nodes", node("node-a", {"a": "1", "b": "2"}, spec={"podCIDR": "10.0.0.0/24"}))
        path = "/api/v1/nodes/node-a"
        merged = ok("PATCH", path, {"metadata": {"labels": {"a": None, "c": "3"}}},
                    ctype="application/merge-patch+json")
        self.assertEqual(merged["metadata"]["labels"], {"b": "2", "c": "3"})
        strategic = ok("PATCH", path, {"metadata": {"annotations": {"x": "y"}, "$setElementOrder/finalizers": []}},
                       ctype="application/strategic-merge-patch+json")
        self.assertEqual(strategic["metadata"]["annotations"], {"x": "y"})
        jp = ok("PATCH", path, [
            {"op": "test", "path": "/metadata/labels/b", "value": "2"},
            {"op": "add", "path": "/metadata/labels/vpc.amazonaws.com~1eniConfig", "value": "az1"},
            {"op": "replace", "path": "/metadata/labels/c", "value": "4"},
            {"op": "remove", "path": "/metadata/labels/b"}], ctype="application/json-patch+json")
        self.assertEqual(jp["metadata"]["labels"], {"c": "4", "vpc.amazonaws.com/eniConfig": "az1"})
        self.assertEqual(jp["metadata"]["generation"], 1)  # metadata changes leave generation alone
        self.assertStatus(call("PATCH", path, [{"op": "test", "path": "/metadata/labels/c", "value": "no"}],
                               ctype="application/json-patch+json"), 422, "Invalid")
        self.assertStatus(call("PATCH", path, {"metadata": {}}, ctype="application/apply-patch+yaml"),
                          415, "UnsupportedMediaType")
        rv = self.rv()
        same = ok("PATCH", path, {"metadata": {"labels": {"c": "4"}}}, ctype="application/merge-patch+json")
        self.assertEqual((int(same["metadata"]["resourceVersion"]), self.rv()), (rv, rv))  # no-op: no write
        spec = ok("PATCH", path, {"spec": {"unschedulable": True}}, ctype="application/merge-patch+json")
        self.assertEqual(spec["metadata"]["generation"], 2)
        stale = {"metadata": {"resourceVersion": "1", "labels": {"z": "1"}}}
        self.assertStatus(call("PATCH", path, stale, ctype="application/merge-patch+json"), 409, "Conflict")
        self.assertStatus(call("PATCH", "/api/v1/nodes/nope", {}, ctype="application/merge-patch+json"),
                          404, "NotFound")

    def test_update_conflict(self):
        cur = ok("POST", ENI, eniconfig("az1"))
        cur["spec"]["subnet"] = "subnet-2"
        new = ok("PUT", f"{ENI}/az1", cur)
        self.assertGreater(int(new["metadata"]["resourceVersion"]), int(cur["metadata"]["resourceVersion"]))
        self.assertEqual((new["spec"]["subnet"], new["metadata"]["generation"]), ("subnet-2", 2))
        cur["spec"]["subnet"] = "subnet-3"  # still carries the old resourceVersion
        body = self.assertStatus(call("PUT", f"{ENI}/az1", cur), 409, "Conflict")
        self.assertIn("the object has been modified", body["message"])
        cur["metadata"]["name"] = "other"
        self.assertStatus(call("PUT", f"{ENI}/az1", cur), 400, "BadRequest")

    def test_bad_bodies(self):
        self.assertStatus(call("POST", "/api/v1/nodes", b"{not json"), 400, "BadRequest")
        body = self.assertStatus(call("POST", "/api/v1/nodes", {"metadata": {}}), 422, "Invalid")
        self.assertEqual(body["details"]["causes"][0]["field"], "metadata.name")
        self.assertStatus(call("POST", "/api/v1/nodes", node("Bad_Name")), 422, "Invalid")
        self.assertStatus(call("POST", "/api/v1/nodes", node("n", {"k": "bad value!"})), 422, "Invalid")
        self.assertStatus(call("POST", ENI, {"metadata": {"name": "x"}, "spec": {"subnet": 5}}), 422, "Invalid")
        no_image = pod("p1")
        del no_image["spec"]["containers"][0]["image"]
        body = self.assertStatus(call("POST", PODS, no_image), 422, "Invalid")
        self.assertEqual(body["details"]["causes"][0]["field"], "spec.containers[0].image")
        self.assertStatus(call("POST", "/api/v1/nodes", {"kind": "Pod", "metadata": {"name": "n"}}),
                          400, "BadRequest")

    def test_status_subresource_and_finalizers(self):
        ok("POST", PODS, pod("p1"))
        ok("PATCH", f"{PODS}/p1", {"status": {"podIP": "10.0.0.5"}}, ctype="application/merge-patch+json")
        self.assertNotIn("podIP", ok("GET", f"{PODS}/p1")["status"])  # the main resource ignores status
        ok("PATCH", f"{PODS}/p1/status", {"status": {"podIP": "10.0.0.5"}, "metadata": {"labels": {"x": "y"}}},
           ctype="application/merge-patch+json")
        got = ok("GET", f"{PODS}/p1")
        self.assertEqual((got["status"]["podIP"], got["metadata"]["labels"]), ("10.0.0.5", {}))
        ok("PATCH", f"{PODS}/p1", {"metadata": {"finalizers": ["test/hold"]}}, ctype="application/merge-patch+json")
        held = ok("DELETE", f"{PODS}/p1")
        self.assertIn("deletionTimestamp", held["metadata"])
        self.assertIn("deletionTimestamp", ok("GET", f"{PODS}/p1")["metadata"])
        ok("PATCH", f"{PODS}/p1", {"metadata": {"finalizers": None}}, ctype="application/merge-patch+json")
        self.assertStatus(call("GET", f"{PODS}/p1"), 404, "NotFound")

    def test_metadata_only_and_unsupported(self):
        """kube-rs metadata_watcher asks for PartialObjectMetadata; dry runs and server-side
        apply are refused rather than silently done wrong."""
        ok("POST", PODS, pod("p1", labels={"app": "web"}))
        accept = "application/json;as=PartialObjectMetadataList;g=meta.k8s.io;v=v1,application/json"
        req = urllib.request.Request(f"https://127.0.0.1:{SERVER[1]}{PODS}", headers={
            "Authorization": f"Bearer {TOKEN}", "Accept": accept})
        with urllib.request.urlopen(req, context=tls_context(), timeout=10) as resp:
            listed = json.load(resp)
        self.assertEqual((listed["kind"], listed["apiVersion"]), ("PartialObjectMetadataList", "meta.k8s.io/v1"))
        self.assertEqual(listed["items"][0]["metadata"]["labels"], {"app": "web"})
        self.assertNotIn("spec", listed["items"][0])
        self.assertStatus(call("POST", f"{PODS}?dryRun=All", pod("p2")), 400, "BadRequest")
        self.assertStatus(call("GET", f"{PODS}/p2"), 404, "NotFound")
        self.assertStatus(call("PATCH", f"{PODS}/p1?fieldManager=x", {"metadata": {}},
                               ctype="application/apply-patch+yaml"), 415, "UnsupportedMediaType")
        ok("POST", ENI, eniconfig("az1"))
        self.assertStatus(call("PATCH", f"{ENI}/az1", {"metadata": {"labels": {"a": "b"}}},
                               ctype="application/strategic-merge-patch+json"), 415, "UnsupportedMediaType")

    # ---- selectors

    def names(self, path):
        return sorted(i["metadata"]["name"] for i in ok("GET", path)["items"])

    def test_label_selectors(self):
        for name, labels in [("n1", {"zone": "a", "tier": "1"}), ("n2", {"zone": "b", "tier": "2"}),
                             ("n3", {"zone": "c"}), ("n4", {})]:
            ok("POST", "/api/v1/nodes", node(name, labels))
        cases = {"zone=a": ["n1"], "zone==b": ["n2"], "zone!=a": ["n2", "n3", "n4"],
                 "zone": ["n1", "n2", "n3"], "!zone": ["n4"], "zone in (a, c)": ["n1", "n3"],
                 "zone notin (a,c)": ["n2", "n4"], "zone,tier=2": ["n2"], "tier>1": ["n2"],
                 "zone in (a,b),!tier": [], "": ["n1", "n2", "n3", "n4"]}
        for sel, want in cases.items():
            self.assertEqual(self.names(f"/api/v1/nodes?labelSelector={quote(sel)}"), want, sel)
        self.assertStatus(call("GET", f"/api/v1/nodes?labelSelector={quote('zone in a')}"), 400, "BadRequest")

    def test_field_selectors(self):
        ok("POST", "/api/v1/namespaces", {"metadata": {"name": "other"}})
        ok("POST", PODS, pod("p1", node_name="node-a"))
        ok("POST", PODS, pod("p2", node_name="node-b"))
        ok("POST", "/api/v1/namespaces/other/pods", pod("p3", ns="other", node_name="node-a"))
        cases = {"metadata.name=p1": ["p1"], "metadata.name!=p1": ["p2", "p3"],
                 "metadata.namespace=other": ["p3"], "spec.nodeName=node-a": ["p1", "p3"],
                 "spec.nodeName==node-a,metadata.namespace!=other": ["p1"],
                 "status.phase=Pending": ["p1", "p2", "p3"]}
        for sel, want in cases.items():
            self.assertEqual(self.names(f"/api/v1/pods?fieldSelector={quote(sel)}"), want, sel)
        self.assertEqual(self.names(f"{PODS}?fieldSelector=spec.nodeName%3Dnode-a"), ["p1"])
        body = self.assertStatus(call("GET", "/api/v1/pods?fieldSelector=spec.foo%3Dx"), 400, "BadRequest")
        self.assertEqual(body["message"], "field label not supported: spec.foo")

    # ---- watches

    def test_watch_from_rv_in_order(self):
        ok("POST", "/api/v1/nodes", node("old"))
        rv = self.rv()
        ok("POST", "/api/v1/nodes", node("n1"))
        ok("POST", PODS, pod("p1"))  # another resource: not in this watch
        ok("PATCH", "/api/v1/nodes/n1", {"metadata": {"labels": {"x": "1"}}}, ctype="application/merge-patch+json")
        ok("DELETE", "/api/v1/nodes/n1")
        w = Watch(f"/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=2")
        first = [w.next() for _ in range(3)]
        ok("POST", "/api/v1/nodes", node("n2"))  # a live change after the stream started
        live = w.next()
        w.close()
        events = first + [live]
        self.assertEqual([(e["type"], e["object"]["metadata"]["name"]) for e in events],
                         [("ADDED", "n1"), ("MODIFIED", "n1"), ("DELETED", "n1"), ("ADDED", "n2")])
        rvs = [int(e["object"]["metadata"]["resourceVersion"]) for e in events]
        self.assertEqual(rvs, sorted(rvs))
        self.assertGreater(rvs[0], rv)
        self.assertEqual(events[1]["object"]["metadata"]["labels"], {"x": "1"})
        self.assertEqual(events[0]["object"]["kind"], "Node")

    def test_watch_initial_state(self):
        ok("POST", ENI, eniconfig("az1"))
        ok("POST", ENI, eniconfig("az2"))
        for rv in ("0", ""):
            w = Watch(f"{ENI}?watch=1&resourceVersion={rv}&timeoutSeconds=1")
            events = w.rest()
            self.assertEqual([(e["type"], e["object"]["metadata"]["name"]) for e in events],
                             [("ADDED", "az1"), ("ADDED", "az2")])
        # Streaming list (kube-rs InitialListStrategy::StreamingList).
        w = Watch(f"{ENI}?watch=true&timeoutSeconds=1&allowWatchBookmarks=true&sendInitialEvents=true"
                  f"&resourceVersionMatch=NotOlderThan&resourceVersion=0")
        events = w.rest(skip_bookmarks=False)
        self.assertEqual([e["type"] for e in events[:3]], ["ADDED", "ADDED", "BOOKMARK"])
        mark = events[2]["object"]
        self.assertEqual(mark["metadata"]["annotations"], {"k8s.io/initial-events-end": "true"})
        self.assertEqual(int(mark["metadata"]["resourceVersion"]), self.rv())
        self.assertEqual((mark["kind"], mark["apiVersion"]), ("ENIConfig", "crd.k8s.amazonaws.com/v1alpha1"))
        self.assertStatus(call("GET", f"{ENI}?watch=true&sendInitialEvents=true&allowWatchBookmarks=true"),
                          422, "Invalid")

    def test_watch_too_old(self):
        ok("POST", "/api/v1/nodes", node("n1"))
        old = self.rv() - 1
        ok("POST", "/_emu/compact", token=None)
        events = Watch(f"/api/v1/nodes?watch=true&resourceVersion={old}&timeoutSeconds=5").rest()
        self.assertEqual(len(events), 1)
        self.assertEqual(events[0]["type"], "ERROR")
        status = events[0]["object"]
        self.assertEqual((status["kind"], status["code"], status["reason"]), ("Status", 410, "Expired"))
        self.assertIn("too old resource version", status["message"])
        # The current resourceVersion is still fine.
        w = Watch(f"/api/v1/nodes?watch=true&resourceVersion={self.rv()}&timeoutSeconds=1")
        self.assertEqual(w.rest(), [])

    def test_history_bound(self):
        server = start_server("--history", "3")
        try:
            created = [ok("POST", "/api/v1/nodes", node(f"n{i}"), server=server) for i in range(5)]
            rvs = [c["metadata"]["resourceVersion"] for c in created]
            w = Watch(f"/api/v1/nodes?watch=true&resourceVersion={rvs[0]}&timeoutSeconds=5", server=server)
            self.assertEqual([e["object"]["code"] for e in w.rest()], [410])
            w = Watch(f"/api/v1/nodes?watch=true&resourceVersion={rvs[1]}&timeoutSeconds=1", server=server)
            self.assertEqual([e["object"]["metadata"]["name"] for e in w.rest()], ["n2", "n3", "n4"])
        finally:
            stop_server(server)

    def test_bookmarks_and_timeout(self):
        t0 = time.monotonic()
        w = Watch(f"/api/v1/namespaces/default/pods?watch=true&resourceVersion={self.rv()}"
                  f"&allowWatchBookmarks=true&timeoutSeconds=2")
        events = w.rest(skip_bookmarks=False)
        self.assertLess(time.monotonic() - t0, 4)  # ended at timeoutSeconds
        self.assertGreaterEqual(len(events), 2)
        for e in events:
            self.assertEqual(e["type"], "BOOKMARK")
            self.assertEqual((e["object"]["kind"], e["object"]["apiVersion"]), ("Pod", "v1"))
            self.assertEqual(e["object"]["metadata"]["resourceVersion"], str(self.rv()))
        # No bookmarks unless asked for.
        self.assertEqual(Watch(f"{PODS}?watch=true&resourceVersion={self.rv()}&timeoutSeconds=1")
                         .rest(skip_bookmarks=False), [])

    def test_connection_reused_after_watch(self):
        """hyper (kube-rs) keeps connections alive: a finished watch must leave one usable."""
        conn = http.client.HTTPSConnection("127.0.0.1", SERVER[1], context=tls_context(), timeout=10)
        auth = {"Authorization": f"Bearer {TOKEN}"}
        try:
            conn.request("GET", f"/api/v1/nodes?watch=true&resourceVersion={self.rv()}&timeoutSeconds=1", headers=auth)
            resp = conn.getresponse()
            self.assertEqual(resp.getheader("Transfer-Encoding"), "chunked")
            self.assertEqual(resp.read(), b"")
            sock = conn.sock
            conn.request("GET", "/api/v1/nodes", headers=auth)
            self.assertEqual(json.load(conn.getresponse())["kind"], "NodeList")
            self.assertIs(conn.sock, sock)
        finally:
            conn.close()

    def test_watch_selector_transitions(self):
        ok("POST", PODS, pod("p1", labels={"app": "web"}))
        w = Watch(f"{PODS}?watch=true&labelSelector=app%3Dweb&timeoutSeconds=2")
        self.assertEqual(w.next()["type"], "ADDED")
        patch = lambda app: ok("PATCH", f"{PODS}/p1", {"metadata": {"labels": {"app": app}}},
                               ctype="application/merge-patch+json")
        patch("db")
        gone = w.next()
        self.assertEqual(gone["type"], "DELETED")
        self.assertEqual(gone["object"]["metadata"]["labels"], {"app": "web"})  # as it last matched
        self.assertEqual(gone["object"]["metadata"]["resourceVersion"], str(self.rv()))
        patch("db2")  # matches neither before nor after: nothing
        patch("web")
        back = w.next()
        self.assertEqual((back["type"], back["object"]["metadata"]["labels"]), ("ADDED", {"app": "web"}))
        w.close()

    def test_many_watches(self):
        rv = self.rv()
        watches = [Watch(f"/api/v1/nodes?watch=true&resourceVersion={rv}&timeoutSeconds=3") for _ in range(20)]
        ok("POST", "/api/v1/nodes", node("n1"))
        for w in watches:
            self.assertEqual(w.next()["object"]["metadata"]["name"], "n1")
            w.close()

    # ---- faults and counters

    def test_outage(self):
        ok("POST", "/api/v1/nodes", node("survivor"))
        w = Watch(f"/api/v1/nodes?watch=true&resourceVersion={self.rv()}&timeoutSeconds=30")
        t0 = time.monotonic()
        ok("POST", "/_emu/outage", {"seconds": 1.5}, token=None)
        with self.assertRaises(ConnectionRefusedError):
            socket.create_connection(("127.0.0.1", SERVER[1]), timeout=2).close()
        try:
            self.assertIsNone(w.next())  # the open watch was cut
        except (ConnectionError, ssl.SSLError, http.client.IncompleteRead):
            pass
        w.close()
        while True:
            try:
                socket.create_connection(("127.0.0.1", SERVER[1]), timeout=2).close()
                break
            except ConnectionRefusedError:
                self.assertLess(time.monotonic() - t0, 5)
                time.sleep(0.05)
        self.assertGreater(time.monotonic() - t0, 1.4)
        self.assertEqual(ok("GET", "/api/v1/nodes/survivor")["metadata"]["name"], "survivor")

    def test_deny(self):
        ok("POST", ENI, eniconfig("az1"))
        ok("POST", "/_emu/deny", {"verb": "list", "resource": "eniconfigs"}, token=None)
        body = self.assertStatus(call("GET", ENI), 403, "Forbidden")
        self.assertEqual(body["message"], 'eniconfigs.crd.k8s.amazonaws.com is forbidden: User '
                         '"system:serviceaccount:kube-system:aws-node" cannot list resource '
                         '"eniconfigs" in API group "crd.k8s.amazonaws.com" at the cluster scope')
        ok("GET", f"{ENI}/az1")  # only list is denied
        ok("POST", "/_emu/deny", {"verb": "*", "resource": "pods", "namespace": "kube-system"}, token=None)
        body = self.assertStatus(call("GET", "/api/v1/namespaces/kube-system/pods/x"), 403, "Forbidden")
        self.assertIn('pods "x" is forbidden', body["message"])
        self.assertIn('in the namespace "kube-system"', body["message"])
        ok("GET", PODS)
        ok("POST", "/_emu/deny", {"verb": "watch", "resource": "*"}, token=None)
        self.assertStatus(call("GET", "/api/v1/nodes?watch=true"), 403, "Forbidden")
        ok("DELETE", "/_emu/deny", token=None)
        ok("GET", ENI)

    def test_request_counts(self):
        ok("POST", "/_emu/requests/reset", token=None)
        ok("GET", "/api/v1/nodes")
        ok("GET", "/api/v1/nodes")
        Watch("/api/v1/nodes?watch=true&timeoutSeconds=1").rest()
        ok("POST", ENI, eniconfig("az1"))
        call("GET", f"{ENI}/nope")
        ok("POST", "/apis/events.k8s.io/v1/namespaces/default/events", EVENT)
        got = ok("GET", "/_emu/requests", token=None)
        self.assertEqual(got["counts"], {"list nodes": 2, "watch nodes": 1, "create eniconfigs": 1,
                                         "get eniconfigs": 1, "create events": 1})
        self.assertEqual(got["by_group"]["events.k8s.io"], {"create events": 1})
        self.assertEqual(got["total"], 6)

    # ---- an independent client

    @unittest.skipUnless(os.path.exists(KUBECTL), "kubectl not installed")
    def test_kubectl(self):
        d = SERVER[2]
        cache = tempfile.mkdtemp(prefix="kubectl-cache-")
        self.addCleanup(shutil.rmtree, cache, ignore_errors=True)
        base = [KUBECTL, "--kubeconfig", os.path.join(d, "kubeconfig"), "--cache-dir", cache]

        def kubectl(*args, stdin=None):
            r = subprocess.run([*base, *args], input=stdin, capture_output=True, text=True, timeout=20)
            self.assertEqual(r.returncode, 0, f"kubectl {' '.join(args)}: {r.stderr}")
            return r.stdout

        ok("POST", "/api/v1/nodes", node("node-a", {"zone": "a"}))
        ok("POST", PODS, pod("p1"))
        self.assertIn("node-a", kubectl("get", "nodes"))
        kubectl("label", "node", "node-a", "vpc.amazonaws.com/eniConfig=az1")
        kubectl("annotate", "pod", "p1", "example.com/note=hi")
        self.assertEqual(ok("GET", "/api/v1/nodes/node-a")["metadata"]["labels"]["vpc.amazonaws.com/eniConfig"], "az1")
        self.assertEqual(ok("GET", f"{PODS}/p1")["metadata"]["annotations"], {"example.com/note": "hi"})
        manifest = ("apiVersion: crd.k8s.amazonaws.com/v1alpha1\nkind: ENIConfig\nmetadata:\n  name: az1\n"
                    "spec:\n  subnet: {subnet}\n  securityGroups: [sg-1]\n")
        # No OpenAPI is served: kubectl's client-side schema check must be off.
        self.assertIn("created", kubectl("apply", "--validate=false", "-f", "-", stdin=manifest.format(subnet="subnet-1")))
        self.assertIn("configured", kubectl("apply", "--validate=false", "-f", "-", stdin=manifest.format(subnet="subnet-2")))
        listed = json.loads(kubectl("get", "eniconfigs.crd.k8s.amazonaws.com", "-o", "json"))
        self.assertEqual([(i["metadata"]["name"], i["spec"]["subnet"]) for i in listed["items"]], [("az1", "subnet-2")])
        self.assertIn("az1", kubectl("get", "eniconfigs"))
        # get --watch: the list, then the change.
        proc = subprocess.Popen([*base, "get", "nodes", "--watch", "-o", "name"], stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True)
        guard = threading.Timer(15, proc.kill)  # a missing line must fail the test, not hang it
        guard.start()
        try:
            self.assertEqual(proc.stdout.readline().strip(), "node/node-a")
            time.sleep(0.3)
            ok("PATCH", "/api/v1/nodes/node-a", {"metadata": {"labels": {"x": "y"}}},
               ctype="application/merge-patch+json")
            self.assertEqual(proc.stdout.readline().strip(), "node/node-a")
        finally:
            guard.cancel()
            proc.kill()
            proc.communicate()


if __name__ == "__main__":
    unittest.main()
