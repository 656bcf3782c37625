#!/usr/bin/env python3
"""kube-api: the smallest Kubernetes API server our tests need (nodes, pods, events,
namespaces and the ENIConfig CRD) over HTTPS with a bearer token, real
resourceVersions, selectors, watches and faults. Standard library only.
See README.md next to this file for what it emulates and what it does not.

    python3 kube_api.py --port 0 --dir DIR --ready-file F [--token T]
"""
from __future__ import annotations

import argparse
import base64
import collections
import copy
import datetime
import hmac
import http.server
import itertools
import json
import os
import re
import secrets
import select
import signal
import socket
import socketserver
import ssl
import subprocess
import sys
import threading
import time
import traceback
import uuid
from urllib.parse import parse_qs, urlsplit

VERSION = {  # kubectl warns beyond one minor of skew; Debian's kubectl is 1.32
    "major": "1", "minor": "32", "gitVersion": "v1.32.0-kube-api-emu", "gitCommit": "0" * 40,
    "gitTreeState": "clean", "buildDate": "2025-01-01T00:00:00Z", "goVersion": "go1.23.4",
    "compiler": "gc", "platform": "linux/amd64"}
PUBLIC_PATHS = {"/version", "/healthz", "/livez", "/readyz"}  # anonymous-readable on a real server
DEFAULT_NAMESPACES = ("default", "kube-system", "kube-public", "kube-node-lease")
ALL_VERBS = ["create", "delete", "get", "list", "patch", "update", "watch"]
DNS_SUBDOMAIN = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$")
DNS_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")
LABEL_NAME = re.compile(r"^[A-Za-z0-9]([-A-Za-z0-9_.]*[A-Za-z0-9])?$")
JSON_CT = "application/json"
MERGE_PATCH, STRATEGIC_PATCH, JSON_PATCH = ("application/merge-patch+json",
                                            "application/strategic-merge-patch+json",
                                            "application/json-patch+json")


def now_rfc3339() -> str:
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


class ApiError(Exception):
    """A failure rendered as a meta/v1 Status, as the real server answers."""

    def __init__(self, code: int, reason: str, message: str, details: dict | None = None):
        super().__init__(message)
        self.code, self.reason, self.message, self.details = code, reason, message, details

    def status(self) -> dict:
        body = {"kind": "Status", "apiVersion": "v1", "metadata": {}, "status": "Failure",
                "message": self.message, "reason": self.reason, "code": self.code}
        if self.details is not None:
            body["details"] = self.details
        return body


def bad_request(message: str) -> ApiError:
    return ApiError(400, "BadRequest", message)


def expired(rv: int, floor: int) -> ApiError:
    return ApiError(410, "Expired", f"too old resource version: {rv} ({floor + 1})")


# ---------------------------------------------------------------- resources

def _rename(obj: dict, pairs) -> dict:
    out = copy.deepcopy(obj)
    for a, b in pairs:
        if a in out:
            out[b] = out.pop(a)
    return out


# events.k8s.io/v1 and core/v1 Events share one storage on a real server too; field renames only.
EVENT_RENAMES = [("message", "note"), ("involvedObject", "regarding"),
                 ("reportingComponent", "reportingController"), ("source", "deprecatedSource"),
                 ("firstTimestamp", "deprecatedFirstTimestamp"),
                 ("lastTimestamp", "deprecatedLastTimestamp"), ("count", "deprecatedCount")]


class Kind:
    """One resource as served at one group/version. Objects are kept in the form of the
    resource's storage (`storage`); `to_view`/`from_view` convert for another version."""

    def __init__(self, group, version, plural, kind, namespaced, short=(), storage=None,
                 status_sub=False, fields=None, renames=None, always=()):
        self.group, self.version, self.plural, self.kind = group, version, plural, kind
        self.namespaced, self.short, self.status_sub = namespaced, list(short), status_sub
        self.storage = storage or (f"{plural}.{group}" if group else plural)
        self.fields = {"metadata.name": ("metadata.name", ""),
                       "metadata.namespace": ("metadata.namespace", ""), **(fields or {})}
        self.renames = renames or []
        self.always = always  # fields a Go client always serializes (value structs)
        self.api_version = f"{group}/{version}" if group else version

    @property
    def resource(self) -> str:  # as RBAC and error messages name it
        return f"{self.plural}.{self.group}" if self.group else self.plural

    def to_view(self, stored: dict) -> dict:
        obj = _rename(stored, self.renames)
        obj["apiVersion"], obj["kind"] = self.api_version, self.kind
        for field in self.always:
            obj.setdefault(field, {})
        return obj

    def from_view(self, view: dict, storage_kind: "Kind") -> dict:
        obj = _rename(view, [(b, a) for a, b in self.renames])
        obj["apiVersion"], obj["kind"] = storage_kind.api_version, storage_kind.kind
        return obj


KINDS = [
    Kind("", "v1", "namespaces", "Namespace", False, ["ns"], status_sub=True,
         fields={"status.phase": ("status.phase", "")}),
    Kind("", "v1", "nodes", "Node", False, ["no"], status_sub=True,
         fields={"spec.unschedulable": ("spec.unschedulable", "false")}),
    Kind("", "v1", "pods", "Pod", True, ["po"], status_sub=True, fields={
        f: (f, d) for f, d in [("spec.nodeName", ""), ("spec.restartPolicy", ""),
                               ("spec.schedulerName", ""), ("spec.serviceAccountName", ""),
                               ("spec.hostNetwork", "false"), ("status.phase", ""),
                               ("status.podIP", ""), ("status.nominatedNodeName", "")]}),
    Kind("", "v1", "events", "Event", True, ["ev"], fields={
        **{f"involvedObject.{f}": (f"involvedObject.{f}", "") for f in
           ("kind", "namespace", "name", "uid", "apiVersion", "resourceVersion", "fieldPath")},
        "reason": ("reason", ""), "reportingComponent": ("reportingComponent", ""),
        "source": ("source.component", ""), "type": ("type", "")}, always=["involvedObject"]),
    Kind("events.k8s.io", "v1", "events", "Event", True, ["ev"], storage="events",
         renames=EVENT_RENAMES, always=["regarding"]),
    Kind("crd.k8s.amazonaws.com", "v1alpha1", "eniconfigs", "ENIConfig", False),
]
STORAGE_KIND = {k.storage: k for k in KINDS if not k.renames}


def lookup(obj: dict, path: str):
    for part in path.split("."):
        if not isinstance(obj, dict):
            return None
        obj = obj.get(part)
    return obj


# ---------------------------------------------------------------- selectors

def _split_unescaped(s: str, sep: str) -> list[str]:
    parts, cur, i = [], "", 0
    while i < len(s):
        if s[i] == "\\" and i + 1 < len(s):
            cur += s[i:i + 2]
            i += 2
            continue
        if s[i] == sep:
            parts.append(cur)
            cur = ""
        else:
            cur += s[i]
        i += 1
    return parts + [cur]


def parse_field_selector(text: str, kind: Kind):
    """-> list of (path, default, op, value); op is '=' or '!='."""
    reqs = []
    for term in filter(None, (t.strip() for t in _split_unescaped(text or "", ","))):
        m = re.match(r"^((?:[^\\=!]|\\.)+?)\s*(!=|==|=)\s*(.*)$", term)
        if not m:
            raise bad_request(f'invalid selector: \'{text}\'; can\'t understand \'{term}\'')
        field, op, value = m.group(1).strip(), m.group(2), m.group(3)
        if field not in kind.fields:
            raise bad_request(f"field label not supported: {field}")
        value = re.sub(r"\\(.)", r"\1", value)
        reqs.append((*kind.fields[field], "!=" if op == "!=" else "=", value))
    return reqs


def _field_value(obj: dict, path: str, default: str) -> str:
    v = lookup(obj, path)
    if v is None:
        return default
    return ("true" if v else "false") if isinstance(v, bool) else str(v)


LABEL_TERM = re.compile(
    r"^(?P<not>!)?\s*(?P<key>[A-Za-z0-9][-A-Za-z0-9_./]*)\s*(?:"
    r"(?P<op>==|=|!=|>|<)\s*(?P<val>[-A-Za-z0-9_.]*)"
    r"|\s(?P<setop>in|notin)\s*\((?P<set>[^()]*)\))?$")


def _valid_label_key(key: str) -> bool:
    prefix, _, name = key.rpartition("/")
    return (bool(LABEL_NAME.match(name)) and len(name) <= 63
            and (not prefix or (bool(DNS_SUBDOMAIN.match(prefix)) and len(prefix) <= 253)))


def parse_label_selector(text: str):
    """-> list of (key, op, values); op in exists, !, =, !=, in, notin, >, <."""
    terms, depth, cur = [], 0, ""
    for ch in text or "":
        depth += (ch == "(") - (ch == ")")
        if ch == "," and depth == 0:
            terms.append(cur)
            cur = ""
        else:
            cur += ch
    terms.append(cur)
    reqs = []
    for term in (t.strip() for t in terms):
        if not term:
            if text and text.strip():
                raise bad_request(f"unable to parse requirement: empty term in {text!r}")
            continue
        m = LABEL_TERM.match(term)
        if not m or not _valid_label_key(m["key"]) or (m["not"] and (m["op"] or m["setop"])):
            raise bad_request(f"unable to parse requirement: invalid label selector term {term!r}")
        if m["setop"]:
            values = [v.strip() for v in m["set"].split(",")]
            reqs.append((m["key"], m["setop"], values))
        elif m["op"]:
            op = "=" if m["op"] == "==" else m["op"]
            if op in "<>" and not re.match(r"^-?\d+$", m["val"]):
                raise bad_request(f"unable to parse requirement: for 'gt', 'lt' operators, "
                                  f"the value must be an integer: {term!r}")
            reqs.append((m["key"], op, [m["val"]]))
        else:
            reqs.append((m["key"], "!" if m["not"] else "exists", []))
    return reqs


def _label_match(labels: dict, key: str, op: str, values: list[str]) -> bool:
    has, v = key in labels, labels.get(key)
    if op == "exists":
        return has
    if op == "!":
        return not has
    if op == "=":
        return has and v == values[0]
    if op == "!=":
        return not has or v != values[0]
    if op == "in":
        return has and v in values
    if op == "notin":
        return not has or v not in values
    try:
        return has and (int(v) > int(values[0]) if op == ">" else int(v) < int(values[0]))
    except ValueError:
        return False


class Selector:
    """Namespace + fieldSelector + labelSelector, evaluated on stored objects."""

    def __init__(self, kind: Kind, namespace: str | None, fields: str = "", labels: str = ""):
        self.kind, self.namespace = kind, namespace
        self.fields = parse_field_selector(fields, kind)
        self.labels = parse_label_selector(labels)

    def __call__(self, stored: dict | None) -> bool:
        if stored is None:
            return False
        meta = stored.get("metadata", {})
        if self.namespace is not None and meta.get("namespace") != self.namespace:
            return False
        view = self.kind.to_view(stored) if self.kind.renames else stored
        for path, default, op, value in self.fields:
            if (_field_value(view, path, default) == value) != (op == "="):
                return False
        labels = meta.get("labels") or {}
        return all(_label_match(labels, *r) for r in self.labels)


# ---------------------------------------------------------------- patches

def merge_patch(target, patch):
    """RFC 7386; a map marked `$replace` (from a strategic patch) replaces the target."""
    if isinstance(patch, dict) and "$replace" in patch:
        return copy.deepcopy(patch["$replace"])
    if not isinstance(patch, dict):
        return copy.deepcopy(patch)
    out = copy.deepcopy(target) if isinstance(target, dict) else {}
    for k, v in patch.items():
        if v is None:
            out.pop(k, None)
        else:
            out[k] = merge_patch(out.get(k), v)
    return out


def strategic_to_merge(patch):
    """A strategic merge patch read as a JSON merge patch: lists are replaced, not merged by
    key; `$patch: delete|replace` on a map is honoured; other `$` directives are dropped."""
    if not isinstance(patch, dict):
        return patch
    directive = patch.get("$patch")
    if directive == "delete":
        return None
    out = {k: strategic_to_merge(v) for k, v in patch.items() if not k.startswith("$")}
    if directive == "replace":
        return {"$replace": out}
    return out


def _pointer(path: str) -> list[str]:
    if path == "":
        return []
    if not path.startswith("/"):
        raise bad_request(f"invalid JSON pointer {path!r}")
    return [p.replace("~1", "/").replace("~0", "~") for p in path[1:].split("/")]


def _walk(doc, tokens):
    for t in tokens:
        if isinstance(doc, dict) and t in doc:
            doc = doc[t]
        elif isinstance(doc, list) and t.isdigit() and int(t) < len(doc):
            doc = doc[int(t)]
        else:
            raise ApiError(422, "Invalid", f"the server rejected our request due to an error in "
                           f"our request: path /{'/'.join(tokens)} not found")
    return doc


def json_patch(doc, ops):
    """RFC 6902: add, remove, replace, move, copy, test."""
    if not isinstance(ops, list):
        raise bad_request("json patch must be a list of operations")
    doc = copy.deepcopy(doc)
    for op in ops:
        if not isinstance(op, dict) or "op" not in op or "path" not in op:
            raise bad_request(f"invalid json patch operation {op!r}")
        kind, tokens = op["op"], _pointer(op["path"])

        def remove(tokens):
            if not tokens:
                raise ApiError(422, "Invalid", "json patch: cannot remove the whole document")
            parent = _walk(doc, tokens[:-1])
            _walk(parent, tokens[-1:])  # 422 when absent
            return parent.pop(int(tokens[-1]) if isinstance(parent, list) else tokens[-1])

        def add(tokens, value):
            nonlocal doc
            if not tokens:
                doc = value
                return
            parent, last = _walk(doc, tokens[:-1]), tokens[-1]
            if isinstance(parent, list):
                if last == "-":
                    parent.append(value)
                elif last.isdigit() and int(last) <= len(parent):
                    parent.insert(int(last), value)
                else:
                    raise ApiError(422, "Invalid", f"json patch: bad array index {last!r}")
            elif isinstance(parent, dict):
                parent[last] = value
            else:
                raise ApiError(422, "Invalid", f"json patch: cannot add into {op['path']!r}")

        if kind == "add":
            add(tokens, copy.deepcopy(op.get("value")))
        elif kind == "remove":
            remove(tokens)
        elif kind == "replace":
            if tokens:
                _walk(doc, tokens)
                remove(tokens)
            add(tokens, copy.deepcopy(op.get("value")))
        elif kind in ("move", "copy"):
            src = _pointer(op.get("from", ""))
            value = remove(src) if kind == "move" else copy.deepcopy(_walk(doc, src))
            add(tokens, value)
        elif kind == "test":
            if _walk(doc, tokens) != op.get("value"):
                raise ApiError(422, "Invalid", f"the server rejected our request due to an error "
                               f"in our request: testing value {op['path']} failed")
        else:
            raise bad_request(f"unknown json patch operation {kind!r}")
    return doc


# ---------------------------------------------------------------- store

class Store:
    """All objects, one global resourceVersion counter, and a bounded event history.
    Every write bumps the counter by one and appends one event, so the history holds
    exactly the events with rv in (floor, rv]. Stored objects are never mutated."""

    def __init__(self, history: int):
        self.cond = threading.Condition()
        self.objects: dict[tuple, dict] = {}  # (storage, namespace, name) -> object
        self.rv = 0
        self.floor = 0
        self.history: collections.deque = collections.deque()  # (rv, type, storage, old, new)
        self.max_history = history
        self.closed = False

    def _commit(self, type_: str, storage: str, key: tuple, old, new) -> dict:
        self.rv += 1
        obj = copy.deepcopy(old) if new is None else new  # a deletion carries its own rv
        obj["metadata"]["resourceVersion"] = str(self.rv)
        if new is None:
            del self.objects[key]
        else:
            self.objects[key] = new
        self.history.append((self.rv, type_, storage, old, obj))
        while len(self.history) > self.max_history:
            self.floor = self.history.popleft()[0]
        self.cond.notify_all()
        return obj

    def get(self, key):
        with self.cond:
            return self.objects.get(key)

    def list(self, storage: str, match) -> tuple[list[dict], int]:
        with self.cond:
            items = [o for k, o in sorted(self.objects.items()) if k[0] == storage and match(o)]
            return items, self.rv

    def create(self, key: tuple, obj: dict) -> dict:
        with self.cond:
            if key in self.objects:
                raise KeyError(key)
            return self._commit("ADDED", key[0], key, None, obj)

    def mutate(self, key: tuple, fn):
        """fn(current) -> new object, or None to delete; raises to abort. A no-op write
        stores nothing and sends no event, as on a real server."""
        with self.cond:
            cur = self.objects.get(key)
            if cur is None:
                raise LookupError(key)
            new = fn(cur)
            if new is None:
                return self._commit("DELETED", key[0], key, cur, None), "DELETED"
            new["metadata"]["resourceVersion"] = cur["metadata"]["resourceVersion"]
            if new == cur:
                return cur, None
            return self._commit("MODIFIED", key[0], key, cur, new), "MODIFIED"

    def compact(self):
        with self.cond:
            self.history.clear()
            self.floor = self.rv

    def watch_events(self, cursor: int, timeout: float) -> tuple[list, int]:
        """Events after `cursor` (waiting up to `timeout` for one) and the new cursor."""
        with self.cond:
            if self.rv <= cursor and not self.closed:
                self.cond.wait(timeout)
            if cursor < self.floor:
                raise expired(cursor, self.floor)
            n = self.rv - cursor
            if n <= 0:
                return [], max(cursor, self.rv)
            return list(itertools.islice(self.history, len(self.history) - n, None)), self.rv

    def close(self):
        with self.cond:
            self.closed = True
            self.cond.notify_all()


# ---------------------------------------------------------------- the API

def _list_kind(kind: Kind) -> str:
    return kind.kind + "List"


class Emulator:
    def __init__(self, token: str, user: str, history: int, bookmark_interval: float,
                 log_path: str | None = None):
        self.token, self.user = token, user
        self.log_request = RequestLog(log_path)
        self.bookmark_interval = bookmark_interval
        self.store = Store(history)
        self.lock = threading.Lock()
        self.deny_rules: list[dict] = []
        self.counts: collections.Counter = collections.Counter()
        self.frontend: Frontend | None = None
        self.seed()

    def seed(self):
        for ns in DEFAULT_NAMESPACES:
            if self.store.get(("namespaces", "", ns)) is None:
                self.create(KINDS[0], None, {"metadata": {"name": ns}})

    # ---- bookkeeping

    def count(self, verb: str, kind: Kind, sub: str | None):
        with self.lock:
            self.counts[(verb, kind.group, kind.plural + (f"/{sub}" if sub else ""))] += 1

    def requests(self) -> dict:
        with self.lock:
            counts, by_group = collections.Counter(), {}
            for (verb, group, res), n in self.counts.items():
                counts[f"{verb} {res}"] += n
                by_group.setdefault(group, {})[f"{verb} {res}"] = n
            return {"total": sum(self.counts.values()), "counts": dict(counts),
                    "by_group": by_group}

    def check_denied(self, verb: str, kind: Kind, sub: str | None, ns: str | None, name: str | None):
        resource = kind.plural + (f"/{sub}" if sub else "")
        with self.lock:
            hit = any(r["verb"] in ("*", verb) and r["resource"] in ("*", resource)
                      and r.get("group") in (None, "*", kind.group)
                      and r.get("namespace") in (None, ns) for r in self.deny_rules)
        if hit:
            where = f'in the namespace "{ns}"' if ns else "at the cluster scope"
            subject = f'{kind.resource} "{name}"' if name else kind.resource
            details = {"kind": kind.plural, **({"name": name} if name else {}),
                       **({"group": kind.group} if kind.group else {})}
            raise ApiError(403, "Forbidden", f'{subject} is forbidden: User "{self.user}" cannot '
                           f'{verb} resource "{resource}" in API group "{kind.group}" {where}',
                           details)

    # ---- errors

    def not_found(self, kind: Kind, name: str) -> ApiError:
        return ApiError(404, "NotFound", f'{kind.resource} "{name}" not found',
                        {"name": name, **({"group": kind.group} if kind.group else {}),
                         "kind": kind.plural})

    def conflict(self, kind: Kind, name: str, why="the object has been modified; please apply "
                 "your changes to the latest version and try again") -> ApiError:
        return ApiError(409, "Conflict", f'Operation cannot be fulfilled on {kind.resource} '
                        f'"{name}": {why}', {"name": name, "kind": kind.plural,
                                             **({"group": kind.group} if kind.group else {})})

    def invalid(self, kind: Kind, name: str, field: str, reason: str, message: str) -> ApiError:
        return ApiError(422, "Invalid", f'{kind.kind} "{name}" is invalid: {field}: {message}',
                        {"name": name, "kind": kind.kind,
                         **({"group": kind.group} if kind.group else {}),
                         "causes": [{"reason": reason, "message": message, "field": field}]})

    # ---- validation and bookkeeping fields

    def validate(self, kind: Kind, obj: dict, creating=False):
        """The checks of the real server that protect clients: k8s-openapi cannot read a Pod
        without containers, for one. Not the full per-kind validation."""
        meta = obj["metadata"]
        name = meta.get("name") or ""
        pattern = DNS_LABEL if kind.plural == "namespaces" else DNS_SUBDOMAIN
        if not pattern.match(name) or len(name) > 253:
            raise self.invalid(kind, name, "metadata.name", "FieldValueInvalid",
                               f'Invalid value: "{name}": a lowercase RFC 1123 subdomain must '
                               f"consist of lower case alphanumeric characters, '-' or '.'")
        for field in ("labels", "annotations"):
            values = meta.get(field)
            if values is None:
                continue
            if not isinstance(values, dict) or not all(isinstance(v, str) for v in values.values()):
                raise self.invalid(kind, name, f"metadata.{field}", "FieldValueInvalid",
                                   "Invalid value: must be a map of strings")
            for k, v in values.items():
                if not _valid_label_key(k):
                    raise self.invalid(kind, name, f"metadata.{field}", "FieldValueInvalid",
                                       f'Invalid value: "{k}": name part must consist of '
                                       "alphanumeric characters, '-', '_' or '.'")
                if field == "labels" and v and (not LABEL_NAME.match(v) or len(v) > 63):
                    raise self.invalid(kind, name, "metadata.labels", "FieldValueInvalid",
                                       f'Invalid value: "{v}": a valid label must be an empty '
                                       "string or consist of alphanumeric characters, '-', '_' "
                                       "or '.', and must start and end with an alphanumeric "
                                       "character")
        if kind.plural == "pods":
            containers = (obj.get("spec") or {}).get("containers")
            if not isinstance(containers, list) or not containers:
                raise self.invalid(kind, name, "spec.containers", "FieldValueRequired", "Required value")
            for i, c in enumerate(containers):
                for f in ("name", "image"):
                    if not isinstance(c, dict) or not isinstance(c.get(f), str) or not c[f]:
                        raise self.invalid(kind, name, f"spec.containers[{i}].{f}",
                                           "FieldValueRequired", "Required value")
        if kind.storage == "events" and creating:
            self.validate_event(kind, name, kind.from_view(obj, STORAGE_KIND["events"]) if kind.renames else obj)
        if kind.group == "events.k8s.io" and creating:
            for f in ("eventTime", "reportingController", "reportingInstance", "action", "reason"):
                if not obj.get(f):
                    raise self.invalid(kind, name, f, "FieldValueRequired", "Required value")
            if obj.get("type") not in ("Normal", "Warning"):
                raise self.invalid(kind, name, "type", "FieldValueNotSupported",
                                   f'Unsupported value: "{obj.get("type", "")}": supported values: '
                                   '"Normal", "Warning"')
        if kind.plural == "eniconfigs":
            spec = obj.get("spec", {})
            if not isinstance(spec, dict):
                raise self.invalid(kind, name, "spec", "FieldValueTypeInvalid",
                                   'Invalid value: "": spec in body must be of type object')
            if "subnet" in spec and not isinstance(spec["subnet"], str):
                raise self.invalid(kind, name, "spec.subnet", "FieldValueTypeInvalid",
                                   "Invalid value: spec.subnet in body must be of type string")
            sgs = spec.get("securityGroups")
            if sgs is not None and not (isinstance(sgs, list) and all(isinstance(s, str) for s in sgs)):
                raise self.invalid(kind, name, "spec.securityGroups", "FieldValueTypeInvalid",
                                   "Invalid value: spec.securityGroups in body must be of type array of strings")

    def validate_event(self, kind: Kind, name: str, ev: dict):
        """The real server's checks for every event (core form), whichever API wrote it:
        an event with eventTime must say who reported it, and namespaces must agree."""
        ns, obj_ns = ev["metadata"].get("namespace", ""), (ev.get("involvedObject") or {}).get("namespace", "")
        component = "reportingController" if kind.renames else "reportingComponent"
        if not ev.get("eventTime"):
            if (ns not in ("", "default")) if not obj_ns else ns != obj_ns:
                raise self.invalid(kind, name, "involvedObject.namespace", "FieldValueInvalid",
                                   f'Invalid value: "{obj_ns}": does not match event.namespace')
            return
        if not obj_ns and ns not in ("default", "kube-system"):
            raise self.invalid(kind, name, "involvedObject.namespace", "FieldValueInvalid",
                               f'Invalid value: "{obj_ns}": does not match event.namespace')
        if not _valid_label_key(ev.get("reportingComponent") or ""):
            raise self.invalid(kind, name, component, "FieldValueRequired", "Required value")
        for field, limit in (("reportingInstance", 128), ("action", 128), ("reason", 128)):
            if not ev.get(field) or len(ev[field]) > limit:
                raise self.invalid(kind, name, field, "FieldValueInvalid",
                                   f"Required value, at most {limit} characters")
        if len(ev.get("message") or "") > 1024:
            raise self.invalid(kind, name, "note" if kind.renames else "message",
                               "FieldValueInvalid", "can have at most 1024 characters")

    @staticmethod
    def _spec_part(kind: Kind, obj: dict) -> dict:
        skip = {"metadata", "kind", "apiVersion"} | ({"status"} if kind.status_sub else set())
        return {k: v for k, v in obj.items() if k not in skip}

    def parse_object(self, kind: Kind, body: bytes) -> dict:
        try:
            obj = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"the object provided is unrecognized: {e}")
        if not isinstance(obj, dict):
            raise bad_request("the object provided is unrecognized (must be a JSON object)")
        for field, want in (("kind", kind.kind), ("apiVersion", kind.api_version)):
            if obj.get(field) not in (None, "", want):
                raise bad_request(f"the API version in the data ({obj.get('apiVersion')}) does "
                                  f"not match the expected API version ({kind.api_version})"
                                  if field == "apiVersion" else
                                  f"the kind in the data ({obj.get('kind')}) does not match "
                                  f"the expected kind ({kind.kind})")
        if not isinstance(obj.setdefault("metadata", {}), dict):
            raise bad_request("metadata must be an object")
        obj["apiVersion"], obj["kind"] = kind.api_version, kind.kind
        return obj

    # ---- verbs; objects in and out are in the kind's view

    def storage_of(self, kind: Kind) -> Kind:
        return STORAGE_KIND[kind.storage]

    def key(self, kind: Kind, ns: str | None, name: str) -> tuple:
        return kind.storage, ns or "", name

    def get(self, kind: Kind, ns, name) -> dict:
        obj = self.store.get(self.key(kind, ns, name))
        if obj is None:
            raise self.not_found(kind, name)
        return kind.to_view(obj)

    def list(self, kind: Kind, sel: Selector) -> dict:
        items, rv = self.store.list(kind.storage, sel)
        return {"kind": _list_kind(kind), "apiVersion": kind.api_version,
                "metadata": {"resourceVersion": str(rv)}, "items": [kind.to_view(o) for o in items]}

    def create(self, kind: Kind, ns: str | None, obj: dict) -> dict:
        meta = obj.setdefault("metadata", {})
        if kind.namespaced:
            if meta.get("namespace") not in (None, "", ns):
                raise bad_request("the namespace of the provided object does not match the "
                                  "namespace sent on the request")
            meta["namespace"] = ns
        else:
            meta.pop("namespace", None)
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + secrets.token_hex(3)[:5]
        if not meta.get("name"):
            raise self.invalid(kind, "", "metadata.name", "FieldValueRequired",
                               "Required value: name or generateName is required")
        self.validate(kind, obj, creating=True)
        if kind.namespaced and self.store.get(("namespaces", "", ns)) is None:
            raise ApiError(404, "NotFound", f'namespaces "{ns}" not found',
                           {"name": ns, "kind": "namespaces"})
        for k in ("resourceVersion", "deletionTimestamp", "deletionGracePeriodSeconds",
                  "managedFields", "selfLink"):
            meta.pop(k, None)
        meta.update(uid=str(uuid.uuid4()), creationTimestamp=now_rfc3339(), generation=1)
        if kind.plural == "pods":
            if not isinstance(obj.get("status"), dict):
                obj["status"] = {}
            obj["status"].setdefault("phase", "Pending")
        if kind.plural == "namespaces":
            obj.setdefault("spec", {"finalizers": ["kubernetes"]})
            obj.setdefault("status", {"phase": "Active"})
        stored = kind.from_view(obj, self.storage_of(kind))
        try:
            return kind.to_view(self.store.create(self.key(kind, ns, meta["name"]), stored))
        except KeyError:
            raise ApiError(409, "AlreadyExists", f'{kind.resource} "{meta["name"]}" already exists',
                           {"name": meta["name"], "kind": kind.plural,
                            **({"group": kind.group} if kind.group else {})})

    def write(self, kind: Kind, ns, name, sub: str | None, change) -> dict:
        """Read-modify-write: change(view) -> new view. Keeps what the server owns."""

        def fn(cur):
            old = kind.to_view(cur)
            new = change(copy.deepcopy(old))
            if not isinstance(new, dict) or not isinstance(new.get("metadata"), dict):
                raise bad_request("the object provided is unrecognized")
            meta, ometa = new["metadata"], old["metadata"]
            if meta.get("name", name) != name:
                raise bad_request(f"the name of the object ({meta.get('name')}) does not match "
                                  f"the name on the URL ({name})")
            if kind.namespaced and meta.get("namespace", ns) != ns:
                raise bad_request("the namespace of the provided object does not match the "
                                  "namespace sent on the request")
            if meta.get("uid") not in (None, ometa["uid"]):
                raise self.conflict(kind, name, f"Precondition failed: UID in precondition: "
                                    f"{meta['uid']}, UID in object meta: {ometa['uid']}")
            rv = meta.get("resourceVersion")
            if rv not in (None, "") and rv != ometa["resourceVersion"]:
                raise self.conflict(kind, name)
            new["apiVersion"], new["kind"] = kind.api_version, kind.kind
            for k in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp",
                      "deletionGracePeriodSeconds"):
                if k in ometa:
                    meta[k] = ometa[k]
                else:
                    meta.pop(k, None)
            meta.pop("managedFields", None)
            if kind.status_sub:
                if sub == "status":  # the status subresource changes status only
                    status, new = new.get("status"), copy.deepcopy(old)
                    new.pop("status", None)
                    if status is not None:
                        new["status"] = status
                elif "status" in old:
                    new["status"] = old["status"]
                else:
                    new.pop("status", None)
            self.validate(kind, new)
            gen = ometa.get("generation", 1)
            meta = new["metadata"]
            meta["generation"] = gen + (self._spec_part(kind, new) != self._spec_part(kind, old))
            if meta.get("deletionTimestamp") and not meta.get("finalizers"):
                return None  # the last finalizer is gone: the deletion completes
            return kind.from_view(new, self.storage_of(kind))

        try:
            obj, _ = self.store.mutate(self.key(kind, ns, name), fn)
        except LookupError:
            raise self.not_found(kind, name)
        return kind.to_view(obj)

    def update(self, kind, ns, name, sub, body: bytes) -> dict:
        new = self.parse_object(kind, body)
        if new["metadata"].get("name") != name:
            raise bad_request(f"the name of the object ({new['metadata'].get('name')}) does not "
                              f"match the name on the URL ({name})")
        return self.write(kind, ns, name, sub, lambda _old: new)

    def patch(self, kind, ns, name, sub, content_type: str, body: bytes) -> dict:
        ctype = content_type.split(";")[0].strip().lower()
        if ctype.startswith("application/apply-patch"):
            raise ApiError(415, "UnsupportedMediaType", "server-side apply is not emulated by "
                           "kube_api.py (see tests/rig/README.md)")
        crd = bool(kind.group) and kind.group != "events.k8s.io"
        if ctype not in (MERGE_PATCH, JSON_PATCH) and (ctype != STRATEGIC_PATCH or crd):
            accepted = [JSON_PATCH, MERGE_PATCH] + ([] if crd else [STRATEGIC_PATCH])
            raise ApiError(415, "UnsupportedMediaType", "the body of the request was in an "
                           "unknown format - accepted media types include: "
                           + ", ".join(accepted + ["application/apply-patch+yaml"]))
        try:
            patch = json.loads(body or b"null")
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"error decoding patch: {e}")
        if ctype == JSON_PATCH:
            return self.write(kind, ns, name, sub, lambda old: json_patch(old, patch))
        if not isinstance(patch, dict):
            raise bad_request("a merge patch must be a JSON object")
        if ctype == STRATEGIC_PATCH:
            return self.write(kind, ns, name, sub,
                              lambda old: merge_patch(old, strategic_to_merge(patch)))
        return self.write(kind, ns, name, sub, lambda old: merge_patch(old, patch))

    def delete(self, kind, ns, name, body: bytes) -> dict:
        try:
            opts = json.loads(body) if body else {}
        except (ValueError, UnicodeDecodeError) as e:
            raise bad_request(f"invalid DeleteOptions: {e}")
        if (opts or {}).get("dryRun"):
            raise bad_request("dryRun is not emulated by kube_api.py")
        pre = (opts or {}).get("preconditions") or {}

        def fn(cur):
            meta = cur["metadata"]
            if pre.get("uid") not in (None, meta["uid"]):
                raise self.conflict(kind, name, f"Precondition failed: UID in precondition: "
                                    f"{pre['uid']}, UID in object meta: {meta['uid']}")
            if pre.get("resourceVersion") not in (None, meta["resourceVersion"]):
                raise self.conflict(kind, name, f"Precondition failed: ResourceVersion in "
                                    f"precondition: {pre['resourceVersion']}, ResourceVersion in "
                                    f"object meta: {meta['resourceVersion']}")
            if meta.get("finalizers"):  # finalizers hold the object until they are removed
                if meta.get("deletionTimestamp"):
                    return copy.deepcopy(cur)
                new = copy.deepcopy(cur)
                new["metadata"].update(deletionTimestamp=now_rfc3339(), deletionGracePeriodSeconds=0)
                return new
            return None

        key = self.key(kind, ns, name)
        try:
            obj, _ = self.store.mutate(key, fn)
        except LookupError:
            raise self.not_found(kind, name)
        if kind.plural == "namespaces" and obj["metadata"].get("deletionTimestamp") is None:
            with self.store.cond:  # no finalization phase: the namespace's objects go at once
                for k in [k for k in self.store.objects if k[1] == name]:
                    self.store.mutate(k, lambda _cur: None)
        return kind.to_view(obj)

    def reset(self):
        """Delete everything (watchers see DELETED events) and recreate the namespaces."""
        with self.store.cond:
            for key in sorted(self.store.objects):
                self.store.mutate(key, lambda _cur: None)
            self.seed()
        with self.lock:
            self.deny_rules.clear()
            self.counts.clear()


# ---------------------------------------------------------------- discovery

def _group_doc(group: str) -> dict:
    versions = sorted({k.version for k in KINDS if k.group == group})
    gvs = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
    return {"name": group, "versions": gvs, "preferredVersion": gvs[0]}


def _resource_list(group: str, version: str) -> dict | None:
    kinds = [k for k in KINDS if k.group == group and k.version == version]
    if not kinds:
        return None
    resources = []
    for k in kinds:
        resources.append({"name": k.plural, "singularName": k.kind.lower(), "namespaced": k.namespaced,
                          "kind": k.kind, "verbs": ALL_VERBS, "shortNames": k.short})
        if k.status_sub:
            resources.append({"name": f"{k.plural}/status", "singularName": "",
                              "namespaced": k.namespaced, "kind": k.kind,
                              "verbs": ["get", "patch", "update"]})
    return {"kind": "APIResourceList", "apiVersion": "v1",
            "groupVersion": f"{group}/{version}" if group else version, "resources": resources}


def discovery(path: str, port: int) -> dict | None:
    if path == "/version":
        return VERSION
    if path == "/api":
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": [
            {"clientCIDR": "0.0.0.0/0", "serverAddress": f"127.0.0.1:{port}"}]}
    if path == "/api/v1":
        return _resource_list("", "v1")
    if path == "/apis":
        groups = sorted({k.group for k in KINDS if k.group})
        return {"kind": "APIGroupList", "apiVersion": "v1", "groups": [_group_doc(g) for g in groups]}
    parts = path.split("/")[2:]
    if path.startswith("/apis/") and len(parts) == 1 and any(k.group == parts[0] for k in KINDS):
        return {"kind": "APIGroup", "apiVersion": "v1", **_group_doc(parts[0])}
    if path.startswith("/apis/") and len(parts) == 2:
        return _resource_list(*parts)
    return None


def partial(obj: dict) -> dict:
    """The PartialObjectMetadata form kube-rs's metadata_watcher and *_metadata calls ask for."""
    return {"kind": "PartialObjectMetadata", "apiVersion": "meta.k8s.io/v1",
            "metadata": obj["metadata"]}


def route(path: str):
    """-> (kind, namespace, name, subresource) or None."""
    parts = path.strip("/").split("/")
    if parts[:2] == ["api", "v1"]:
        group, version, rest = "", "v1", parts[2:]
    elif parts[0] == "apis" and len(parts) >= 3:
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return None
    kinds = {k.plural: k for k in KINDS if k.group == group and k.version == version}
    ns = None
    if len(rest) >= 3 and rest[0] == "namespaces" and rest[2] in kinds and kinds[rest[2]].namespaced:
        ns, rest = rest[1], rest[2:]
    if not rest or rest[0] not in kinds or len(rest) > 3:
        return None
    kind = kinds[rest[0]]
    name = rest[1] if len(rest) > 1 else None
    sub = rest[2] if len(rest) > 2 else None
    if (sub and (sub != "status" or not kind.status_sub)) or (ns and not kind.namespaced):
        return None
    if kind.namespaced and name and ns is None:
        return None  # a namespaced object is addressed through its namespace
    return kind, ns, name, sub


# ---------------------------------------------------------------- HTTP

class Handler(http.server.BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server_version = "kube-api-emu"
    sys_version = ""

    def setup(self):
        self.request.settimeout(10)
        self.request.do_handshake()  # here, not in the accept loop: a slow client blocks only itself
        self.request.settimeout(None)
        super().setup()
        self.emu: Emulator = self.server.emu
        self.emu.frontend.track(self.request)

    def finish(self):
        try:
            super().finish()
        except OSError:
            pass
        finally:
            self.emu.frontend.untrack(self.request)

    def log_message(self, fmt, *args):
        pass

    def do_GET(self):
        self.dispatch()

    do_POST = do_PUT = do_PATCH = do_DELETE = do_GET

    # ---- plumbing

    def read_body(self) -> bytes:
        if "chunked" in self.headers.get("Transfer-Encoding", "").lower():
            data = b""
            while True:
                size = int(self.rfile.readline().split(b";")[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline() not in (b"\r\n", b"\n", b""):
                        pass
                    return data
                data += self.rfile.read(size)
                self.rfile.readline()
        return self.rfile.read(int(self.headers.get("Content-Length") or 0))

    def send_json(self, obj, code: int = 200, close=False):
        data = json.dumps(obj, separators=(",", ":")).encode()
        self.send_response(code)
        self.send_header("Content-Type", JSON_CT)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-cache, private")
        if close:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        self.wfile.write(data)
        self.code = code

    def dispatch(self):
        t0, self.code, self.note = time.monotonic(), 0, ""
        url = urlsplit(self.path)
        path = url.path.rstrip("/") or "/"
        query = {k: v[-1] for k, v in parse_qs(url.query, keep_blank_values=True).items()}
        try:
            body = self.read_body()
            if path.startswith("/_emu/"):
                self.admin(path, body)
            else:
                self.api(path, query, body)
        except ApiError as e:
            self.send_json(e.status(), e.code)
        except OSError as e:  # the client or an outage dropped the connection
            self.close_connection = True
            self.note = f"connection: {e.__class__.__name__}"
        except Exception as e:  # a bug here must not look like a network failure to the client
            traceback.print_exc()
            try:
                self.send_json(ApiError(500, "InternalError", f"emulator bug: {e!r}").status(), 500)
            except OSError:
                self.close_connection = True
        finally:
            self.emu.log_request(self.command, self.path, self.code, time.monotonic() - t0, self.note)

    # ---- the Kubernetes API

    def api(self, path, query, body):
        auth = self.headers.get("Authorization")
        ok = auth is not None and hmac.compare_digest(auth.encode(), f"Bearer {self.emu.token}".encode())
        if not ok and (auth is not None or path not in PUBLIC_PATHS):
            raise ApiError(401, "Unauthorized", "Unauthorized")
        if path in ("/healthz", "/livez", "/readyz"):
            data = b"ok"
            self.send_response(200)
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", "2")
            self.end_headers()
            self.wfile.write(data)
            self.code = 200
            return
        if self.command == "GET":
            doc = discovery(path, self.emu.frontend.port)
            if doc is not None:
                return self.send_json(doc)
        target = route(path)
        if target is None:
            raise ApiError(404, "NotFound", "the server could not find the requested resource", {})
        kind, ns, name, sub = target
        watch = query.get("watch", "").lower() in ("true", "1")
        verb = {("GET", False): "watch" if watch else "list", ("GET", True): "get",
                ("POST", False): "create", ("PUT", True): "update", ("PATCH", True): "patch",
                ("DELETE", True): "delete"}.get((self.command, name is not None))
        if verb is None or (sub and verb not in ("get", "update", "patch")):
            raise ApiError(405, "MethodNotAllowed", "the server does not allow this method on "
                           "the requested resource", {})
        if verb == "get" and watch:
            verb = "watch"  # GET .../name?watch=true is a watch on one object
        self.emu.count(verb, kind, sub)
        self.emu.check_denied(verb, kind, sub, ns, name)
        if query.get("dryRun") and verb not in ("get", "list", "watch"):
            raise bad_request("dryRun is not emulated by kube_api.py")
        emu = self.emu
        meta_only = "as=PartialObjectMetadata" in self.headers.get("Accept", "")
        shape = partial if meta_only else (lambda obj: obj)
        if verb == "get":
            return self.send_json(shape(emu.get(kind, ns, name)))
        if verb in ("list", "watch"):
            fields = query.get("fieldSelector", "")
            if name:
                fields = ",".join(filter(None, [fields, f"metadata.name={name}"]))
            sel = Selector(kind, ns, fields, query.get("labelSelector", ""))
            if verb == "list":
                listed = emu.list(kind, sel)
                if meta_only:
                    listed.update(kind="PartialObjectMetadataList", apiVersion="meta.k8s.io/v1",
                                  items=[partial(o) for o in listed["items"]])
                return self.send_json(listed)
            return self.watch(kind, sel, query, meta_only)
        if verb == "create":
            if kind.namespaced and ns is None:
                raise ApiError(405, "MethodNotAllowed", "the server does not allow this method "
                               "on the requested resource", {})
            return self.send_json(shape(emu.create(kind, ns, emu.parse_object(kind, body))), 201)
        if verb == "update":
            return self.send_json(shape(emu.update(kind, ns, name, sub, body)))
        if verb == "patch":
            return self.send_json(shape(emu.patch(kind, ns, name, sub,
                                                  self.headers.get("Content-Type", ""), body)))
        return self.send_json(shape(emu.delete(kind, ns, name, body)))

    def write_chunk(self, obj):
        data = json.dumps(obj, separators=(",", ":")).encode() + b"\n"
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def client_gone(self) -> bool:
        """True once the client closed its end (a watcher that went away)."""
        sock = self.request
        try:
            if not select.select([sock], [], [], 0)[0]:
                return False
            return socket.socket.recv(sock, 1, socket.MSG_PEEK) == b""
        except OSError:
            return True

    def watch(self, kind: Kind, sel: Selector, query: dict, meta_only: bool):
        emu, store = self.emu, self.emu.store
        rv_param = query.get("resourceVersion", "")
        bookmarks = query.get("allowWatchBookmarks", "").lower() in ("true", "1")
        initial_param = query.get("sendInitialEvents", "").lower()
        streaming = initial_param in ("true", "1")
        if streaming and query.get("resourceVersionMatch") != "NotOlderThan":
            raise ApiError(422, "Invalid", "ListOptions.meta.k8s.io \"\" is invalid: "
                           "resourceVersionMatch: Forbidden: sendInitialEvents requires setting "
                           "resourceVersionMatch to NotOlderThan")
        if streaming and not bookmarks:
            raise ApiError(422, "Invalid", "ListOptions.meta.k8s.io \"\" is invalid: "
                           "allowWatchBookmarks: Forbidden: sendInitialEvents requires setting "
                           "allowWatchBookmarks to true")
        try:
            cursor = int(rv_param or 0)
            timeout = float(query.get("timeoutSeconds") or 0) or 1800  # 0 means the default
        except ValueError:
            raise bad_request(f'invalid resourceVersion "{rv_param}" or timeoutSeconds')
        deadline = time.monotonic() + timeout
        # "0" or none starts with the current state as ADDED events, unless the client said no.
        initial = streaming or (cursor == 0 and initial_param not in ("false", "0"))

        self.send_response(200)
        self.send_header("Content-Type", JSON_CT)
        self.send_header("Transfer-Encoding", "chunked")
        self.send_header("Cache-Control", "no-cache, private")
        self.end_headers()
        self.code, sent = 200, 0
        epoch = emu.frontend.epoch

        def bookmark(rv, initial_end=False):
            meta = {"resourceVersion": str(rv)}
            if initial_end:
                meta["annotations"] = {"k8s.io/initial-events-end": "true"}
            self.write_chunk({"type": "BOOKMARK", "object": shape({
                "kind": kind.kind, "apiVersion": kind.api_version, "metadata": meta})})

        shape = partial if meta_only else (lambda obj: obj)

        try:
            if initial:
                items, rv = store.list(kind.storage, sel)
                cursor = max(cursor, rv)
                for obj in items:
                    self.write_chunk({"type": "ADDED", "object": shape(kind.to_view(obj))})
                sent += len(items)
                if streaming:
                    bookmark(cursor, initial_end=True)
            last_bookmark = time.monotonic()
            while True:
                left = deadline - time.monotonic()
                if left <= 0:
                    if bookmarks:
                        bookmark(cursor)
                    break
                if store.closed or emu.frontend.epoch != epoch or self.client_gone():
                    self.close_connection = True
                    return
                wait = min(left, 1.0, max(0.05, last_bookmark + emu.bookmark_interval - time.monotonic()))
                try:
                    events, new_cursor = store.watch_events(cursor, wait)
                except ApiError as e:
                    self.write_chunk({"type": "ERROR", "object": e.status()})
                    break
                for rv, type_, storage, old, new in events:
                    if storage != kind.storage:
                        continue
                    out = self._translate(type_, old, new, sel, rv)
                    if out:
                        self.write_chunk({"type": out[0], "object": shape(kind.to_view(out[1]))})
                        sent += 1
                cursor = new_cursor
                if bookmarks and time.monotonic() - last_bookmark >= emu.bookmark_interval:
                    bookmark(cursor)
                    last_bookmark = time.monotonic()
            self.wfile.write(b"0\r\n\r\n")
        finally:
            self.note = f"watch events={sent}"

    @staticmethod
    def _translate(type_, old, new, sel, rv):
        """A stored change as this watcher sees it through its selector."""
        if type_ == "ADDED":
            return ("ADDED", new) if sel(new) else None
        if type_ == "DELETED":
            return ("DELETED", new) if sel(new) else None
        was, now = sel(old), sel(new)
        if was and now:
            return "MODIFIED", new
        if now:
            return "ADDED", new
        if was:  # left the selection: the old object, at the new resourceVersion
            gone = copy.deepcopy(old)
            gone["metadata"]["resourceVersion"] = str(rv)
            return "DELETED", gone
        return None

    # ---- test controls

    def admin(self, path, body):
        emu = self.emu
        try:
            args = json.loads(body) if body else {}
        except ValueError as e:
            raise bad_request(f"bad JSON: {e}")
        method = self.command
        if path == "/_emu/health" and method == "GET":
            return self.send_json({"ok": True, "port": emu.frontend.port,
                                   "resourceVersion": str(emu.store.rv)})
        if path == "/_emu/outage" and method == "POST":
            try:
                seconds = float(args.get("seconds", 5))
            except (TypeError, ValueError):
                raise bad_request(f"seconds must be a number, not {args.get('seconds')!r}")
            emu.frontend.outage(seconds, keep=self.request)
            return self.send_json({"ok": True, "seconds": seconds}, close=True)
        if path == "/_emu/deny":
            with emu.lock:
                if method == "POST":
                    rule = {"verb": args.get("verb", "*"), "resource": args.get("resource", "*")}
                    for k in ("namespace", "group"):
                        if args.get(k) is not None:
                            rule[k] = args[k]
                    emu.deny_rules.append(rule)
                elif method == "DELETE":
                    emu.deny_rules.clear()
                rules = list(emu.deny_rules)
            return self.send_json({"rules": rules})
        if path == "/_emu/requests" and method == "GET":
            return self.send_json(emu.requests())
        if path == "/_emu/requests/reset" and method == "POST":
            with emu.lock:
                emu.counts.clear()
            return self.send_json({"ok": True})
        if path == "/_emu/reset" and method == "POST":
            emu.reset()
            return self.send_json({"ok": True, "resourceVersion": str(emu.store.rv)})
        if path == "/_emu/compact" and method == "POST":
            emu.store.compact()
            return self.send_json({"ok": True, "resourceVersion": str(emu.store.rv)})
        raise ApiError(404, "NotFound", f"no admin endpoint {method} {path}", {})


class Server(http.server.ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False  # an outage or exit must not wait for watches to end

    def __init__(self, addr, emu: Emulator, ctx: ssl.SSLContext):
        self.emu, self.ctx = emu, ctx
        super().__init__(addr, Handler)

    def server_bind(self):  # HTTPServer's also does a reverse DNS lookup we do not need
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = self.server_address[:2]

    def get_request(self):
        sock, addr = self.socket.accept()
        return self.ctx.wrap_socket(sock, server_side=True, do_handshake_on_connect=False), addr

    def handle_error(self, request, client_address):
        if not isinstance(sys.exc_info()[1], (OSError, ssl.SSLError)):
            super().handle_error(request, client_address)


class Frontend:
    """The listening socket and every open connection, so an outage can drop them all."""

    def __init__(self, emu: Emulator, host: str, port: int, ctx: ssl.SSLContext):
        self.emu, self.host, self.port, self.ctx = emu, host, port, ctx
        self.lock = threading.Lock()
        self.conns: set = set()
        self.server: Server | None = None
        self.epoch = 0  # bumped when connections are dropped; watches end when it changes
        emu.frontend = self

    def start(self):
        for attempt in range(50):  # after an outage, the port may take a moment to be free
            try:
                server = Server((self.host, self.port), self.emu, self.ctx)
                break
            except OSError:
                if attempt == 49:
                    raise
                time.sleep(0.1)
        with self.lock:
            self.server = server
            self.port = self.server.server_address[1]
            threading.Thread(target=self.server.serve_forever, kwargs={"poll_interval": 0.1},
                             name="kube-api", daemon=True).start()

    def track(self, conn):
        with self.lock:
            self.conns.add(conn)

    def untrack(self, conn):
        with self.lock:
            self.conns.discard(conn)

    def stop(self, keep=None):
        with self.lock:
            server, self.server = self.server, None
            self.epoch += 1
            conns = [c for c in self.conns if c is not keep]
        if server:
            server.shutdown()
            server.server_close()
        for conn in conns:
            try:
                socket.socket.shutdown(conn, socket.SHUT_RDWR)  # not SSLSocket's: other threads use it
            except OSError:
                pass
        with self.emu.store.cond:
            self.emu.store.cond.notify_all()

    def outage(self, seconds: float, keep=None):
        self.stop(keep=keep)
        timer = threading.Timer(seconds, self.start)
        timer.daemon = True
        timer.start()


# ---------------------------------------------------------------- setup

OPENSSL_CNF = """\
[req]
distinguished_name = dn
prompt = no
[dn]
CN = kube-api-emu
[ca]
basicConstraints = critical,CA:TRUE
keyUsage = critical,keyCertSign,cRLSign,digitalSignature
subjectKeyIdentifier = hash
[server]
basicConstraints = critical,CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = serverAuth
subjectAltName = IP:127.0.0.1,DNS:localhost,DNS:kubernetes,DNS:kubernetes.default,DNS:kubernetes.default.svc,DNS:kubernetes.default.svc.cluster.local
subjectKeyIdentifier = hash
authorityKeyIdentifier = keyid
"""


def make_certs(d: str):
    """A throwaway CA and a server certificate that rustls/webpki and Go both accept."""
    cnf = os.path.join(d, "openssl.cnf")
    with open(cnf, "w") as f:
        f.write(OPENSSL_CNF)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    run = lambda *a: subprocess.run(["openssl", *a], check=True, capture_output=True, cwd=d)
    run("req", "-x509", "-config", cnf, "-extensions", "ca", *ec, "-keyout", "ca.key",
        "-out", "ca.crt", "-days", "3650", "-subj", "/CN=kube-api-emu-ca")
    run("req", "-new", "-config", cnf, *ec, "-keyout", "server.key", "-out", "server.csr",
        "-subj", "/CN=kube-apiserver")
    run("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key",
        "-set_serial", "0x" + secrets.token_hex(8), "-days", "3650", "-extfile", cnf,
        "-extensions", "server", "-out", "server.crt")


def write_atomic(path: str, text: str):
    tmp = f"{path}.tmp.{os.getpid()}"
    with open(tmp, "w") as f:
        f.write(text)
    os.rename(tmp, path)


def write_kubeconfig(d: str, port: int, token: str):
    with open(os.path.join(d, "ca.crt"), "rb") as f:
        ca = base64.b64encode(f.read()).decode()
    write_atomic(os.path.join(d, "kubeconfig"), f"""\
apiVersion: v1
kind: Config
clusters:
- name: kube-api-emu
  cluster:
    server: https://127.0.0.1:{port}
    certificate-authority-data: {ca}
users:
- name: aws-node
  user:
    token: {token}
contexts:
- name: kube-api-emu
  context:
    cluster: kube-api-emu
    user: aws-node
    namespace: default
current-context: kube-api-emu
""")


class RequestLog:
    def __init__(self, path: str | None):
        self.f = open(path, "a", buffering=1) if path else None
        self.lock = threading.Lock()

    def __call__(self, method, path, code, seconds, note):
        if self.f:
            with self.lock:
                self.f.write(f"{time.strftime('%H:%M:%S')} {method} {path} {code} "
                             f"{seconds * 1000:.1f}ms {note}".rstrip() + "\n")


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True, help="0 picks a free port")
    parser.add_argument("--dir", required=True, help="where certs, token and kubeconfig go")
    parser.add_argument("--ready-file", help="gets the port once listening")
    parser.add_argument("--token", help="bearer token (default: random)")
    parser.add_argument("--user", default="system:serviceaccount:kube-system:aws-node",
                        help="the user named in 403 messages")
    parser.add_argument("--history", type=int, default=1000, help="watch event history size")
    parser.add_argument("--bookmark-interval", type=float, default=1.0, help="seconds")
    parser.add_argument("--log", help="one line per request")
    args = parser.parse_args(argv)

    os.makedirs(args.dir, exist_ok=True)
    token = args.token or secrets.token_hex(16)
    make_certs(args.dir)
    write_atomic(os.path.join(args.dir, "token"), token)
    write_atomic(os.path.join(args.dir, "namespace"), "kube-system")
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.load_cert_chain(os.path.join(args.dir, "server.crt"), os.path.join(args.dir, "server.key"))
    ctx.set_alpn_protocols(["http/1.1"])

    emu = Emulator(token, args.user, args.history, args.bookmark_interval, args.log)
    frontend = Frontend(emu, args.host, args.port, ctx)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    frontend.start()
    write_kubeconfig(args.dir, frontend.port, token)
    if args.ready_file:
        write_atomic(args.ready_file, f"{frontend.port}\n")
    print(f"kube-api listening on https://{args.host}:{frontend.port}", flush=True)
    while not stop.wait(3600):
        pass
    emu.store.close()
    frontend.stop()
    return 0


if __name__ == "__main__":
    sys.exit(main())
