#!/usr/bin/env python3
"""EC2 shim: moto's EC2 API in-process, behind a middleware that enforces what
real EC2 enforces and moto does not (instance type limits, deterministic subnet
address accounting, /28 and IPv6 /80 prefixes, InUse checks), plus fault injection and JSON
state views for the test rig. See README.md next to this file.

    python ec2_shim.py --port 0 --ready-file /tmp/shim.port [--latency-ms 5]
"""
from __future__ import annotations

import argparse
import ipaddress
import json
import logging
import os
import re
import signal
import sys
import threading
import time
import uuid
from http import HTTPStatus
from io import BytesIO
from urllib.parse import parse_qs, urlencode
from xml.sax.saxutils import escape

from werkzeug.serving import WSGIRequestHandler, make_server
from werkzeug.test import EnvironBuilder
from werkzeug.wsgi import get_input_stream

from moto.backends import get_backend
from moto.core import DEFAULT_ACCOUNT_ID
from moto.ec2.exceptions import EC2ClientError
from moto.ec2.models.elastic_network_interfaces import NetworkInterface, NetworkInterfaceBackend
from moto.ec2.models.instance_types import INSTANCE_TYPES
from moto.ec2.models import vpcs as moto_vpcs
from moto.ec2.models.subnets import Subnet
from moto.moto_api._internal.models import moto_api_backend
from moto.moto_server.werkzeug_app import DomainDispatcherApplication, create_backend_app

EC2_NS = "http://ec2.amazonaws.com/doc/2016-11-15/"
UNATTACHED_ENI_MAX_ADDRESSES = 50  # real EC2 has no per-type limit before attach; keep it bounded
PREFIX_LEN = 28
PREFIX_SIZE = 16
IPV6_PREFIX_LEN = 80  # what EC2 assigns for Ipv6PrefixCount
IPV6_SUBNET_LEN = 64  # every IPv6 subnet CIDR is a /64
# Amazon-provided VPC /56s come from here, one per VPC (see Shim.next_vpc_ipv6_cidr).
IPV6_POOL = ipaddress.IPv6Network("2600:1f14::/32")
# CreateNetworkInterface's InterfaceType values (the API lists efa, efa-only, branch and trunk;
# "interface" is the default, and RunInstances' spec documents passing it explicitly).
INTERFACE_TYPES = ("interface", "efa", "efa-only", "trunk", "branch")
EFA_TYPES = ("efa", "efa-only")
CREDENTIAL_SCOPE = re.compile(r"Credential=[^/]+/\d{8}/([a-z0-9-]+)/([a-z0-9-]+)/aws4_request")

log = logging.getLogger("ec2-shim")


class ShimError(Exception):
    """An EC2 client error rendered in real EC2's error format."""

    def __init__(self, code: str, message: str, status: int = 400):
        super().__init__(f"{code}: {message}")
        self.code, self.message, self.status = code, message, status


def ec2_error(code: str, message: str, status: int = 400):
    body = ('<?xml version="1.0" encoding="UTF-8"?><Response><Errors><Error>'
            f"<Code>{escape(code)}</Code><Message>{escape(message)}</Message>"
            f"</Error></Errors><RequestID>{uuid.uuid4()}</RequestID></Response>")
    return xml_response(status, body)


def ec2_result(action: str, inner: str):
    body = (f'<?xml version="1.0" encoding="UTF-8"?><{action}Response xmlns="{EC2_NS}">'
            f"<requestId>{uuid.uuid4()}</requestId>{inner}</{action}Response>")
    return xml_response(200, body)


def xml_response(status: int, body: str):
    data = body.encode()
    return status, [("Content-Type", "text/xml;charset=UTF-8"), ("Content-Length", str(len(data)))], data


def json_response(obj, status: int = 200):
    data = json.dumps(obj, indent=1).encode()
    return status, [("Content-Type", "application/json"), ("Content-Length", str(len(data)))], data


def indexed(params: dict, name: str, suffix: str = "") -> list[str]:
    """EC2 query lists: `Name.N` (or `Name.N.Suffix`), returned in N order."""
    pat = re.compile(re.escape(name) + r"\.(\d+)" + (re.escape("." + suffix) if suffix else "") + "$")
    found = [(int(m.group(1)), v) for k, v in params.items() if (m := pat.match(k))]
    return [v for _, v in sorted(found)]


def int_param(params: dict, name: str) -> int:
    raw = params.get(name, "0") or "0"
    try:
        value = int(raw)
    except ValueError:
        raise ShimError("InvalidParameterValue", f"Value ({raw}) for parameter {name} is invalid.")
    if value < 0:
        raise ShimError("InvalidParameterValue", f"Value ({raw}) for parameter {name} is invalid.")
    return value


def fake_authorization(region: str) -> str:
    return f"AWS4-HMAC-SHA256 Credential=shim/20240101/{region}/ec2/aws4_request, SignedHeaders=host, Signature=0"


def is_true(value) -> bool:
    return str(value).lower() == "true"


def type_network_info(instance_type: str) -> dict | None:
    return (INSTANCE_TYPES.get(instance_type) or {}).get("NetworkInfo")


class SubnetPlan:
    """The addresses of one subnet, taken or free, as real EC2 would count them:
    every ENI address and prefix plus AWS's five reserved addresses. Picks are
    the lowest free ones so that tests are deterministic."""

    def __init__(self, shim: "Shim", backend, subnet):
        self.subnet = subnet
        self.net = ipaddress.IPv4Network(subnet.cidr_block)
        first, last = int(self.net.network_address), int(self.net.broadcast_address)
        self.first, self.last = first, last
        self.used = {first, first + 1, first + 2, first + 3, last}
        for eni in list(backend.enis.values()):
            if eni.subnet.id != subnet.id:
                continue
            for item in eni.private_ip_addresses:
                self.used.add(int(ipaddress.IPv4Address(item["PrivateIpAddress"])))
            for cidr in shim.prefixes.get(eni.id, []):
                start = int(ipaddress.IPv4Network(cidr).network_address)
                self.used.update(range(start, start + PREFIX_SIZE))
        # moto records an instance's primary IP here before its ENI exists.
        for ip, owner in list(subnet._subnet_ips.items()):
            state = getattr(getattr(owner, "_state", None), "name", None)
            if state != "terminated":
                self.used.add(int(ipaddress.IPv4Address(ip)))

    def free_count(self) -> int:
        return (self.last - self.first + 1) - len(self.used)

    def take_ip(self, ip: str) -> str:
        value = int(ipaddress.IPv4Address(ip))
        if not self.first <= value <= self.last:
            raise ShimError("InvalidParameterValue",
                            f"Address {ip} does not fall within the subnet's address range")
        if value in self.used:
            raise ShimError("InvalidIPAddress.InUse", f"The specified address {ip} is already in use.")
        self.used.add(value)
        return ip

    def take_ips(self, count: int) -> list[str]:
        picked = []
        value = self.first
        while len(picked) < count and value <= self.last:
            if value not in self.used:
                picked.append(value)
            value += 1
        if len(picked) < count:
            raise ShimError("InsufficientFreeAddressesInSubnet",
                            f"There are not enough free addresses in subnet '{self.subnet.id}' "
                            "to satisfy the requested number of instances.")
        self.used.update(picked)
        return [str(ipaddress.IPv4Address(v)) for v in picked]

    def _block_free(self, start: int) -> bool:
        return not any(v in self.used for v in range(start, start + PREFIX_SIZE))

    def take_prefix(self, cidr: str) -> str:
        try:
            net = ipaddress.IPv4Network(cidr)
        except ValueError:
            raise ShimError("InvalidParameterValue", f"The prefix '{cidr}' is not a valid /28 CIDR block.")
        if net.prefixlen != PREFIX_LEN or not net.subnet_of(self.net):
            raise ShimError("InvalidParameterValue",
                            f"The prefix '{cidr}' is not a /28 inside subnet '{self.subnet.id}'.")
        start = int(net.network_address)
        if not self._block_free(start):
            raise ShimError("InvalidParameterValue", f"The prefix '{cidr}' overlaps addresses in use.")
        self.used.update(range(start, start + PREFIX_SIZE))
        return str(net)

    def take_prefixes(self, count: int) -> list[str]:
        picked = []
        start = self.first  # subnets are at least /28, so the network address is 16-aligned
        while len(picked) < count and start + PREFIX_SIZE - 1 <= self.last:
            if self._block_free(start):
                picked.append(start)
                self.used.update(range(start, start + PREFIX_SIZE))
            start += PREFIX_SIZE
        if len(picked) < count:
            for s in picked:  # the request fails as a whole
                self.used.difference_update(range(s, s + PREFIX_SIZE))
            raise ShimError("InsufficientCidrBlocks",
                            "The specified subnet does not have enough free cidr blocks to satisfy the request.")
        return [f"{ipaddress.IPv4Address(s)}/{PREFIX_LEN}" for s in picked]


def canonical_ipv6(ip: str) -> str:
    """EC2 prints IPv6 addresses compressed; a caller may write them any valid way."""
    try:
        return str(ipaddress.IPv6Address(ip))
    except ValueError:
        raise ShimError("InvalidParameterValue", f"Invalid IPv6 address {ip}")


def canonical_ipv6_prefix(cidr: str) -> str:
    try:
        return str(ipaddress.IPv6Network(cidr))
    except ValueError:
        raise ShimError("InvalidParameterValue", f"The prefix '{cidr}' is not a valid /80 IPv6 CIDR block.")


def subnet_ipv6_cidrs(subnet) -> list[str]:
    return [a["ipv6CidrBlock"] for a in subnet.ipv6_cidr_block_associations.values()
            if a["ipv6CidrBlockState"].get("State") == "associated"]


def subnet_ipv6_cidr(subnet) -> str:
    """The subnet's /64 (EC2 allows one); refused as EC2 refuses IPv6 in an IPv4-only subnet."""
    cidrs = subnet_ipv6_cidrs(subnet)
    if not cidrs:
        raise ShimError("InvalidParameterValue",
                        f"The subnet '{subnet.id}' has no IPv6 CIDR block: "
                        "IPv6 addresses and prefixes cannot be assigned in it.")
    return cidrs[0]


def vpc_ipv6_cidrs(vpc) -> list[str]:
    return [a["cidr_block"] for a in vpc.get_cidr_block_association_set(ipv6=True)
            if a.get("cidr_block_state", {}).get("state") == "associated"]


class Ipv6Plan:
    """The IPv6 side of one subnet's /64: ENI addresses, /80 prefixes and AWS's
    reserved addresses (the first four and the last, as for IPv4). A /64 cannot
    be listed address by address, so a prefix is held as its block number (the
    /80's index in the /64) and a block is free when no address falls in it.
    Picks are the lowest free ones: addresses from ::4 up, prefixes from block 1
    up (block 0 holds the reserved addresses), so tests can name them."""

    BLOCK_BITS = 128 - IPV6_PREFIX_LEN

    def __init__(self, shim: "Shim", backend, subnet):
        self.subnet = subnet
        self.net = ipaddress.IPv6Network(subnet_ipv6_cidr(subnet))
        first, last = int(self.net.network_address), int(self.net.broadcast_address)
        self.first, self.last = first, last
        self.used = {first, first + 1, first + 2, first + 3, last}
        self.blocks: set[int] = set()  # /80s held as prefixes
        for eni in list(backend.enis.values()):
            if eni.subnet.id != subnet.id:
                continue
            for ip in eni.ipv6_addresses:
                self.used.add(int(ipaddress.IPv6Address(ip)))
            for cidr in shim.ipv6_prefixes.get(eni.id, []):
                self.blocks.add(self._block(int(ipaddress.IPv6Network(cidr).network_address)))

    def _block(self, value: int) -> int:
        return (value - self.first) >> self.BLOCK_BITS

    def _block_start(self, block: int) -> int:
        return self.first + (block << self.BLOCK_BITS)

    def take_ip(self, ip: str) -> str:
        value = int(ipaddress.IPv6Address(canonical_ipv6(ip)))
        if not self.first <= value <= self.last:
            raise ShimError("InvalidParameterValue",
                            f"Address {ip} does not fall within the subnet's IPv6 address range")
        if value in self.used or self._block(value) in self.blocks:
            raise ShimError("InvalidIPAddress.InUse", f"The specified address {ip} is already in use.")
        self.used.add(value)
        return str(ipaddress.IPv6Address(value))

    def take_ips(self, count: int) -> list[str]:
        picked = []
        value = self.first
        while len(picked) < count and value <= self.last:
            if self._block(value) in self.blocks:
                value = self._block_start(self._block(value) + 1)
                continue
            if value not in self.used:
                picked.append(value)
                self.used.add(value)
            value += 1
        if len(picked) < count:
            self.used.difference_update(picked)
            raise ShimError("InsufficientFreeAddressesInSubnet",
                            f"There are not enough free IPv6 addresses in subnet '{self.subnet.id}'.")
        return [str(ipaddress.IPv6Address(v)) for v in picked]

    def _block_free(self, block: int) -> bool:
        if block in self.blocks:
            return False
        start = self._block_start(block)
        end = start + (1 << self.BLOCK_BITS)
        return not any(start <= v < end for v in self.used)

    def take_prefix(self, cidr: str) -> str:
        net = ipaddress.IPv6Network(canonical_ipv6_prefix(cidr))
        if net.prefixlen != IPV6_PREFIX_LEN or not net.subnet_of(self.net):
            raise ShimError("InvalidParameterValue",
                            f"The prefix '{cidr}' is not a /80 inside subnet '{self.subnet.id}'.")
        block = self._block(int(net.network_address))
        if not self._block_free(block):
            raise ShimError("InvalidParameterValue", f"The prefix '{cidr}' overlaps addresses in use.")
        self.blocks.add(block)
        return str(net)

    def take_prefixes(self, count: int) -> list[str]:
        # The used addresses' blocks once, not per candidate: a /64 has 65536 blocks.
        taken = self.blocks | {self._block(v) for v in self.used}
        picked = []
        block = 0
        while len(picked) < count and block < (1 << (IPV6_PREFIX_LEN - IPV6_SUBNET_LEN)):
            if block not in taken:
                picked.append(block)
            block += 1
        if len(picked) < count:
            raise ShimError("InsufficientCidrBlocks",
                            "The specified subnet does not have enough free cidr blocks to satisfy the request.")
        self.blocks.update(picked)
        return [f"{ipaddress.IPv6Address(self._block_start(b))}/{IPV6_PREFIX_LEN}" for b in picked]


class Shim:
    def __init__(self, latency_ms: int = 0, region: str = "us-west-2"):
        self.moto = DomainDispatcherApplication(create_backend_app)
        self.default_region = region
        self.default_latency_ms = latency_ms
        # Every EC2 call into moto and every read of its state goes through this
        # lock: moto is not thread-safe, and allocation must see a stable subnet.
        self.ec2_lock = threading.RLock()
        # Counters, faults and latency are touched before the EC2 lock is taken.
        self.admin_lock = threading.Lock()
        self._reset_shim_state()
        self._install_moto_patches()

    def _reset_shim_state(self):
        with self.admin_lock:
            self.latency_ms = self.default_latency_ms
            self.faults: list[dict] = []
            self.next_fault_id = 1
            self._reset_calls()
            # EC2's request rate limiting: a token bucket per API per account, sized by the
            # API's category. None until a test sets it (moto has no limits at all).
            self.account_limits: dict | None = None
            self.buckets: dict[str, list[float]] = {}
        self.prefixes: dict[str, list[str]] = {}  # ENI id -> /28s, in assignment order
        self.ipv6_prefixes: dict[str, list[str]] = {}  # ENI id -> /80s, in assignment order
        self.vpc_ipv6_count = 0  # Amazon-provided /56s handed out since the last reset
        # What CreateNetworkInterface decided for the ENI moto is about to create.
        self.pending_eni: dict | None = None
        self.mac_counter = 0
        self.regions = {self.default_region}

    def next_vpc_ipv6_cidr(self) -> str:
        """The next VPC's Amazon-provided /56: 2600:1f14:0:100::/56, then :200::, ... (the
        counter fills the 24 bits between the pool's /32 and the /56)."""
        self.vpc_ipv6_count += 1
        base = int(IPV6_POOL.network_address) + (self.vpc_ipv6_count << (128 - 56))
        return str(ipaddress.IPv6Network((base, 56)))

    def _reset_calls(self):
        self.calls = {"total": 0, "by_action": {}, "throttled": 0}
        # The distinct user agents EC2 calls came with (what a client says it is), a few.
        self.user_agents: list[str] = []

    def backend(self, region: str):
        return get_backend("ec2")[DEFAULT_ACCOUNT_ID][region]

    # ---- moto patches -----------------------------------------------------

    def _install_moto_patches(self):
        shim = self

        # moto's serializer emits <ipv4PrefixSet><item><ipv4Prefix> from this
        # attribute (the botocore model drives element names), in
        # DescribeNetworkInterfaces, CreateNetworkInterface and DescribeInstances.
        def ipv4_prefixes(eni):
            cidrs = shim.prefixes.get(eni.id)
            return [{"Ipv4Prefix": c} for c in cidrs] if cidrs else None
        NetworkInterface.ipv4_prefixes = property(ipv4_prefixes)

        # Likewise <ipv6PrefixSet><item><ipv6Prefix>.
        def ipv6_prefixes(eni):
            cidrs = shim.ipv6_prefixes.get(eni.id)
            return [{"Ipv6Prefix": c} for c in cidrs] if cidrs else None
        NetworkInterface.ipv6_prefixes = property(ipv6_prefixes)

        # moto's Amazon-provided /56 is random; a counter makes it reproducible and unique
        # across every VPC of this shim (CreateVpc, AssociateVpcCidrBlock and the admin API).
        moto_vpcs.random_ipv6_cidr = shim.next_vpc_ipv6_cidr

        # moto nests the state one level too deep ({"state": {"State": ...}}), which
        # DescribeSubnets renders as the text "{'State': 'associated'}".
        def subnet_ipv6_association_set(subnet):
            return [{"ipv6CidrBlock": a["ipv6CidrBlock"], "associationId": a["associationId"],
                     "ipv6CidrBlockState": {"State": a["ipv6CidrBlockState"].get("State")}}
                    for a in subnet.ipv6_cidr_block_associations.values()
                    if a["ipv6CidrBlockState"].get("State") == "associated"]
        Subnet.ipv6_cidr_block_association_set = property(subnet_ipv6_association_set)

        original_create = NetworkInterfaceBackend.create_network_interface

        def create_network_interface(backend, *args, **kwargs):
            eni = original_create(backend, *args, **kwargs)
            # moto's MACs are random; counting keeps them unique and reproducible.
            shim.mac_counter += 1
            n = shim.mac_counter
            eni.mac_address = f"02:00:00:{(n >> 16) & 255:02x}:{(n >> 8) & 255:02x}:{n & 255:02x}"
            pending, shim.pending_eni = shim.pending_eni, None
            if pending:
                if pending["prefixes"]:
                    shim.prefixes[eni.id] = pending["prefixes"]
                eni.ipv6_addresses = list(pending["ipv6_addresses"])
                if pending["ipv6_prefixes"]:
                    shim.ipv6_prefixes[eni.id] = pending["ipv6_prefixes"]
                eni.interface_type = pending["interface_type"]  # moto ignores InterfaceType
                if eni.interface_type == "efa-only":
                    # moto gives every ENI an address; an EFA-only interface has none.
                    eni.private_ip_address, eni.private_ip_addresses = None, []
            else:
                # An ENI RunInstances creates: moto's IPv6 addresses are random picks.
                count = int(kwargs.get("ipv6_address_count") or 0)
                eni.ipv6_addresses = []
                if not count and eni.subnet.assign_ipv6_address_on_creation and subnet_ipv6_cidrs(eni.subnet):
                    count = 1  # what EC2 does in a subnet with AssignIpv6AddressOnCreation
                if count:
                    try:
                        eni.ipv6_addresses = Ipv6Plan(shim, backend, eni.subnet).take_ips(count)
                    except ShimError as e:
                        raise EC2ClientError(e.code, e.message)
            return eni
        NetworkInterfaceBackend.create_network_interface = create_network_interface

        # moto adds the instance's groups to an attached ENI's; real EC2 keeps each
        # ENI's own (custom networking gives secondary ENIs other groups).
        NetworkInterface.group_set = property(lambda eni: eni._group_set)

        # moto's own allocator spins forever on a full subnet and ignores ENI
        # secondaries; RunInstances gets the lowest free address instead.
        def get_available_subnet_ip(subnet, instance):
            backend = shim.backend(subnet.ec2_backend.region_name)
            try:
                ip = SubnetPlan(shim, backend, subnet).take_ips(1)[0]
            except ShimError as e:
                raise EC2ClientError(e.code, e.message)
            subnet._subnet_ips[ip] = instance
            return ip
        Subnet.get_available_subnet_ip = get_available_subnet_ip

        def available_ip_address_count(subnet):
            return SubnetPlan(shim, shim.backend(subnet.ec2_backend.region_name), subnet).free_count()
        Subnet.available_ip_address_count = property(available_ip_address_count)

    # ---- WSGI entry -------------------------------------------------------

    def __call__(self, environ, start_response):
        path = environ.get("PATH_INFO", "")
        try:
            if path.startswith("/_shim/"):
                status, headers, body = self.admin(environ, path)
            else:
                status, headers, body = self.request(environ)
        except Exception as e:  # a shim bug: answer like EC2 would, keep serving
            log.exception("internal error on %s", path)
            status, headers, body = ec2_error("InternalError", f"ec2-shim: {e!r}", 500)
        start_response(f"{status} {HTTPStatus(status).phrase}", headers)
        return [body]

    def request(self, environ):
        body = get_input_stream(environ).read()
        ec2 = self._ec2_params(environ, body)
        if ec2 is None:
            return self.call_moto(environ, body)
        region, params = ec2
        action = params["Action"]
        started = time.monotonic()
        resp = self._faulted_or_handled(environ, region, params)
        log.info("%s %s %.0fms", action, resp[0], (time.monotonic() - started) * 1000)
        return resp

    def _ec2_params(self, environ, body: bytes):
        """(region, params) when this is an EC2 Query API call, else None."""
        if environ.get("REQUEST_METHOD") != "POST":
            return None
        if not environ.get("CONTENT_TYPE", "").startswith("application/x-www-form-urlencoded"):
            return None
        params = {k: v[0] for k, v in parse_qs(body.decode("utf-8", "replace"), keep_blank_values=True).items()}
        if "Action" not in params:
            return None
        scope = CREDENTIAL_SCOPE.search(environ.get("HTTP_AUTHORIZATION", ""))
        if scope:
            if scope.group(2) != "ec2":
                return None
            return scope.group(1), params
        if params.get("Version") == "2016-11-15":
            # moto routes by the credential scope; give unsigned calls one.
            environ["HTTP_AUTHORIZATION"] = fake_authorization(self.default_region)
            return self.default_region, params
        return None

    def _faulted_or_handled(self, environ, region, params):
        action = params["Action"]
        with self.admin_lock:
            agent = " ".join(filter(None, [environ.get("HTTP_USER_AGENT"), environ.get("HTTP_X_AMZ_USER_AGENT")]))
            if agent and agent not in self.user_agents and len(self.user_agents) < 16:
                self.user_agents.append(agent)
            self.calls["total"] += 1
            self.calls["by_action"][action] = self.calls["by_action"].get(action, 0) + 1
            delay_ms = self.latency_ms
            fired = None
            for fault in list(self.faults):
                if fault["action"] not in ("*", action):
                    continue
                if fault["kind"] == "latency":
                    delay_ms += fault["latency_ms"]
                elif fired is None:
                    fired = dict(fault)
                else:
                    continue
                if fault["count"] > 0:
                    fault["count"] -= 1
                    if fault["count"] == 0:
                        self.faults.remove(fault)
            if fired is None and self.account_limits is not None and not self._take_token(action):
                fired = {"kind": "throttle", "code": "RequestLimitExceeded",
                         "message": "Request limit exceeded.", "status": 503}
            if fired and fired.get("code") == "RequestLimitExceeded":
                self.calls["throttled"] += 1
        # Sleep outside every lock so latency does not serialise callers.
        if delay_ms > 0:
            time.sleep(delay_ms / 1000)
        if fired and fired["kind"] == "noop":
            # Accepted, and nothing done: what an eventually consistent or misbehaving EC2
            # looks like to a caller that trusts the reply.
            eni = params.get("NetworkInterfaceId", "")
            return ec2_result(action, f"<networkInterfaceId>{eni}</networkInterfaceId><return>true</return>")
        if fired:
            return ec2_error(fired["code"], fired["message"], fired["status"])
        return self.handle_ec2(environ, region, params)

    def _take_token(self, action: str) -> bool:
        """One token from `action`'s bucket (admin lock held); False when it is empty."""
        category = "describe" if action.startswith("Describe") else "mutating"
        limit = self.account_limits.get(category)
        if not limit:
            return True
        now = time.monotonic()
        tokens, at = self.buckets.get(action, [float(limit["burst"]), now])
        tokens = min(float(limit["burst"]), tokens + (now - at) * float(limit["rate"]))
        ok = tokens >= 1.0
        self.buckets[action] = [tokens - 1.0 if ok else tokens, now]
        return ok

    def handle_ec2(self, environ, region, params):
        handler = getattr(self, "_ec2_" + params["Action"], None)
        with self.ec2_lock:
            self.regions.add(region)
            try:
                if handler is None:
                    return self.call_moto(environ, params)
                return handler(environ, self.backend(region), params)
            except ShimError as e:
                return ec2_error(e.code, e.message, e.status)

    def call_moto(self, environ, body):
        """Run moto's WSGI app on `environ` with `body` (bytes, or params to encode)."""
        if isinstance(body, dict):
            body = urlencode(body).encode()
        environ = dict(environ)
        environ["wsgi.input"] = BytesIO(body)
        environ["CONTENT_LENGTH"] = str(len(body))
        captured = {}

        def start_response(status, headers, exc_info=None):
            captured["status"], captured["headers"] = int(status.split()[0]), headers
        result = self.moto(environ, start_response)
        try:
            data = b"".join(result)
        finally:
            if hasattr(result, "close"):
                result.close()
        headers = [(k, v) for k, v in captured["headers"] if k.lower() != "content-length"]
        headers.append(("Content-Length", str(len(data))))
        return captured["status"], headers, data

    # ---- EC2 actions moto gets wrong --------------------------------------

    def _eni(self, backend, eni_id):
        return backend.enis.get(eni_id)

    def _slot_limit(self, eni) -> tuple[int, str]:
        if eni.instance is not None:
            info = type_network_info(eni.instance.instance_type)
            if info:
                return info["Ipv4AddressesPerInterface"], eni.instance.instance_type
        return UNATTACHED_ENI_MAX_ADDRESSES, "an unattached interface"

    def _ec2_CreateNetworkInterface(self, environ, backend, params):
        subnet = backend.get_subnet(params["SubnetId"]) if params.get("SubnetId") in self._subnet_ids(backend) else None
        if subnet is None:
            return self.call_moto(environ, params)
        interface_type = params.get("InterfaceType") or "interface"
        if interface_type not in INTERFACE_TYPES:
            raise ShimError("InvalidParameterValue",
                            f"Value ({interface_type}) for parameter interfaceType is invalid.")
        # moto invents a group for an unknown id and takes one from any VPC.
        for group_id in indexed(params, "SecurityGroupId"):
            group = backend.get_security_group_from_id(group_id)
            if group is None:
                raise ShimError("InvalidGroup.NotFound", f"The security group '{group_id}' does not exist")
            if group.vpc_id != subnet.vpc_id:
                raise ShimError("InvalidParameter",
                                f"Security group {group_id} and subnet {subnet.id} belong to different networks.")
        listed = indexed(params, "PrivateIpAddresses", "PrivateIpAddress")
        flags = indexed(params, "PrivateIpAddresses", "Primary")
        primary = params.get("PrivateIpAddress") or None
        secondaries = []
        for i, ip in enumerate(listed):
            if primary is None and i < len(flags) and is_true(flags[i]):
                primary = ip
            elif ip != primary:
                secondaries.append(ip)
        count = int_param(params, "SecondaryPrivateIpAddressCount")
        wanted_prefixes = indexed(params, "Ipv4Prefix", "Ipv4Prefix")
        prefix_count = int_param(params, "Ipv4PrefixCount")
        if wanted_prefixes and prefix_count:
            raise ShimError("InvalidParameterCombination",
                            "You cannot specify both Ipv4Prefixes and Ipv4PrefixCount.")
        v6 = self._ipv6_request(params, nested=True)
        if interface_type == "efa-only" and (primary or secondaries or count or wanted_prefixes or prefix_count
                                             or any(v6)):
            raise ShimError("InvalidParameterCombination", "EFA-only network interfaces do not support IP addresses.")
        slots = 1 + len(secondaries) + count + len(wanted_prefixes) + prefix_count
        if slots > UNATTACHED_ENI_MAX_ADDRESSES:
            raise ShimError("PrivateIpAddressLimitExceeded",
                            f"Number of private addresses will exceed limit of {UNATTACHED_ENI_MAX_ADDRESSES}.")
        v6_ips, v6_count, v6_prefixes, v6_prefix_count = v6
        if not (v6_ips or v6_count) and interface_type != "efa-only" and subnet.assign_ipv6_address_on_creation \
                and subnet_ipv6_cidrs(subnet):
            v6_count = 1  # AssignIpv6AddressOnCreation covers CreateNetworkInterface too
        v6_slots = len(v6_ips) + v6_count + len(v6_prefixes) + v6_prefix_count
        if v6_slots > UNATTACHED_ENI_MAX_ADDRESSES:
            raise ShimError("InvalidParameterValue", "Number of IPv6 addresses and prefixes will exceed "
                            f"limit of {UNATTACHED_ENI_MAX_ADDRESSES}.")
        plan = SubnetPlan(self, backend, subnet)
        for ip in ([primary] if primary else []) + secondaries:
            plan.take_ip(ip)
        prefixes = [plan.take_prefix(c) for c in wanted_prefixes]
        if primary is None and interface_type != "efa-only":
            primary = plan.take_ips(1)[0]
        secondaries += plan.take_ips(count)
        prefixes += plan.take_prefixes(prefix_count)
        new_v6, new_v6_prefixes = [], []
        if v6_slots:
            plan6 = Ipv6Plan(self, backend, subnet)
            new_v6 = [plan6.take_ip(ip) for ip in v6_ips] + plan6.take_ips(v6_count)
            new_v6_prefixes = [plan6.take_prefix(p) for p in v6_prefixes] + plan6.take_prefixes(v6_prefix_count)

        # Explicit addresses only, so moto's random allocator never runs.
        rewritten = {k: v for k, v in params.items()
                     if not re.match(r"(PrivateIpAddress$|PrivateIpAddresses\.|SecondaryPrivateIpAddressCount$"
                                     r"|Ipv4Prefix\.|Ipv4PrefixCount$|Ipv6Addresses\.|Ipv6AddressCount$"
                                     r"|Ipv6Prefix\.|Ipv6PrefixCount$)", k)}
        for i, ip in enumerate(([primary] if primary else []) + secondaries, start=1):
            rewritten[f"PrivateIpAddresses.{i}.PrivateIpAddress"] = ip
            rewritten[f"PrivateIpAddresses.{i}.Primary"] = "true" if i == 1 else "false"
        self.pending_eni = {"prefixes": prefixes, "interface_type": interface_type,
                            "ipv6_addresses": new_v6, "ipv6_prefixes": new_v6_prefixes}
        try:
            return self.call_moto(environ, rewritten)
        finally:
            self.pending_eni = None

    def _ec2_AssignPrivateIpAddresses(self, environ, backend, params):
        eni = self._eni(backend, params.get("NetworkInterfaceId"))
        if eni is None:
            return self.call_moto(environ, params)
        if is_true(params.get("DryRun")):
            raise ShimError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
        if eni.interface_type == "efa-only":
            raise ShimError("InvalidParameterCombination", "EFA-only network interfaces do not support IP addresses.")
        wanted_ips = indexed(params, "PrivateIpAddress")
        count = int_param(params, "SecondaryPrivateIpAddressCount")
        wanted_prefixes = indexed(params, "Ipv4Prefix")
        prefix_count = int_param(params, "Ipv4PrefixCount")
        if (wanted_ips and count) or (wanted_prefixes and prefix_count):
            raise ShimError("InvalidParameterCombination",
                            "Specify either addresses or a count of addresses, not both.")
        if not (wanted_ips or count or wanted_prefixes or prefix_count):
            raise ShimError("MissingParameter",
                            "Either PrivateIpAddress, SecondaryPrivateIpAddressCount, Ipv4Prefix "
                            "or Ipv4PrefixCount must be specified.")
        have = [item["PrivateIpAddress"] for item in eni.private_ip_addresses]
        wanted_ips = [ip for ip in dict.fromkeys(wanted_ips) if ip not in have]
        current_prefixes = self.prefixes.get(eni.id, [])
        wanted_prefixes = [p for p in dict.fromkeys(wanted_prefixes) if p not in current_prefixes]

        limit, what = self._slot_limit(eni)
        after = len(have) + len(current_prefixes) + len(wanted_ips) + count + len(wanted_prefixes) + prefix_count
        if after > limit:
            raise ShimError("PrivateIpAddressLimitExceeded",
                            f"Number of private addresses will exceed limit of {limit} for {what} "
                            f"(network interface '{eni.id}' would have {after}).")
        plan = SubnetPlan(self, backend, eni.subnet)
        moving = []
        if is_true(params.get("AllowReassignment")):
            moving = self._secondaries_elsewhere(backend, eni, wanted_ips)
        for _, item in moving:
            plan.used.discard(int(ipaddress.IPv4Address(item["PrivateIpAddress"])))
        new_ips = [plan.take_ip(ip) for ip in wanted_ips] + plan.take_ips(count)
        new_prefixes = [plan.take_prefix(p) for p in wanted_prefixes] + plan.take_prefixes(prefix_count)

        # Everything is checked: only now change state, so a refusal changes nothing.
        for other, item in moving:
            other.private_ip_addresses.remove(item)
        if new_ips:
            backend.assign_private_ip_addresses(eni.id, private_ip_addresses=new_ips)
        if new_prefixes:
            self.prefixes[eni.id] = current_prefixes + new_prefixes
        inner = f"<networkInterfaceId>{eni.id}</networkInterfaceId>"
        if new_ips:
            inner += "<assignedPrivateIpAddressesSet>" + "".join(
                f"<item><privateIpAddress>{ip}</privateIpAddress></item>" for ip in new_ips
            ) + "</assignedPrivateIpAddressesSet>"
        if new_prefixes:
            inner += "<assignedIpv4PrefixSet>" + "".join(
                f"<item><ipv4Prefix>{p}</ipv4Prefix></item>" for p in new_prefixes
            ) + "</assignedIpv4PrefixSet>"
        return ec2_result("AssignPrivateIpAddresses", inner)

    def _secondaries_elsewhere(self, backend, target, ips):
        """AllowReassignment may move secondaries held by other ENIs (never primaries)."""
        return [(other, item) for other in backend.enis.values() if other is not target
                for item in other.private_ip_addresses
                if item["PrivateIpAddress"] in ips and not item.get("Primary")]

    def _ec2_UnassignPrivateIpAddresses(self, environ, backend, params):
        eni = self._eni(backend, params.get("NetworkInterfaceId"))
        if eni is None:
            return self.call_moto(environ, params)
        if is_true(params.get("DryRun")):
            raise ShimError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
        ips = indexed(params, "PrivateIpAddress")
        prefixes = indexed(params, "Ipv4Prefix")
        if not ips and not prefixes:
            raise ShimError("MissingParameter", "Either PrivateIpAddress or Ipv4Prefix must be specified.")
        secondaries = {item["PrivateIpAddress"] for item in eni.private_ip_addresses if not item.get("Primary")}
        if any(ip == eni.private_ip_address for ip in ips):
            raise ShimError("InvalidParameterValue",
                            f"The primary private IP address of network interface '{eni.id}' cannot be unassigned.")
        if not set(ips) <= secondaries:
            raise ShimError("InvalidParameterValue",
                            f"Some of the specified addresses are not assigned to interface {eni.id}")
        current = self.prefixes.get(eni.id, [])
        if not set(prefixes) <= set(current):
            raise ShimError("InvalidParameterValue",
                            f"Some of the specified prefixes are not assigned to interface {eni.id}")
        if ips:
            backend.unassign_private_ip_addresses(eni.id, ips)
        if prefixes:
            remaining = [p for p in current if p not in prefixes]
            if remaining:
                self.prefixes[eni.id] = remaining
            else:
                self.prefixes.pop(eni.id, None)
        return ec2_result("UnassignPrivateIpAddresses", "<return>true</return>")

    @staticmethod
    def _ipv6_request(params, nested: bool):
        """(addresses, address count, prefixes, prefix count) asked for. CreateNetworkInterface
        nests each item (`Ipv6Addresses.N.Ipv6Address`); Assign/Unassign do not."""
        ips = indexed(params, "Ipv6Addresses", "Ipv6Address" if nested else "")
        prefixes = indexed(params, "Ipv6Prefix", "Ipv6Prefix" if nested else "")
        count = int_param(params, "Ipv6AddressCount")
        prefix_count = int_param(params, "Ipv6PrefixCount")
        if ips and count:
            raise ShimError("InvalidParameterCombination",
                            "IPv6 addresses and IPv6 address count may not be specified on the same request")
        if prefixes and prefix_count:
            raise ShimError("InvalidParameterCombination",
                            "You cannot specify both Ipv6Prefixes and Ipv6PrefixCount.")
        return ips, count, prefixes, prefix_count

    def _ipv6_limit(self, eni) -> tuple[int, str]:
        if eni.instance is not None:
            info = type_network_info(eni.instance.instance_type)
            if info:
                limit = info.get("Ipv6AddressesPerInterface", 0) if info.get("Ipv6Supported") else 0
                return limit, eni.instance.instance_type
        return UNATTACHED_ENI_MAX_ADDRESSES, "an unattached interface"

    def _ec2_AssignIpv6Addresses(self, environ, backend, params):
        eni = self._eni(backend, params.get("NetworkInterfaceId"))
        if eni is None:
            return self.call_moto(environ, params)
        if is_true(params.get("DryRun")):
            raise ShimError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
        if eni.interface_type == "efa-only":
            raise ShimError("InvalidParameterCombination", "EFA-only network interfaces do not support IP addresses.")
        wanted_ips, count, wanted_prefixes, prefix_count = self._ipv6_request(params, nested=False)
        if not (wanted_ips or count or wanted_prefixes or prefix_count):
            raise ShimError("MissingParameter",
                            "Either Ipv6Addresses, Ipv6AddressCount, Ipv6Prefix or Ipv6PrefixCount must be specified.")
        have = list(eni.ipv6_addresses)
        current_prefixes = self.ipv6_prefixes.get(eni.id, [])
        wanted_ips = [ip for ip in dict.fromkeys(map(canonical_ipv6, wanted_ips)) if ip not in have]
        wanted_prefixes = [p for p in dict.fromkeys(map(canonical_ipv6_prefix, wanted_prefixes))
                           if p not in current_prefixes]

        # As for IPv4, a prefix takes one of the interface's IPv6 address slots.
        limit, what = self._ipv6_limit(eni)
        after = len(have) + len(current_prefixes) + len(wanted_ips) + count + len(wanted_prefixes) + prefix_count
        if after > limit:
            raise ShimError("InvalidParameterValue",
                            f"Number of IPv6 addresses and prefixes will exceed limit of {limit} for {what} "
                            f"(network interface '{eni.id}' would have {after}).")
        plan = Ipv6Plan(self, backend, eni.subnet)
        new_ips = [plan.take_ip(ip) for ip in wanted_ips] + plan.take_ips(count)
        new_prefixes = [plan.take_prefix(p) for p in wanted_prefixes] + plan.take_prefixes(prefix_count)

        # Everything is checked: only now change state, so a refusal changes nothing.
        eni.ipv6_addresses.extend(new_ips)
        if new_prefixes:
            self.ipv6_prefixes[eni.id] = current_prefixes + new_prefixes
        inner = ""
        if new_ips:
            inner += "<assignedIpv6Addresses>" + "".join(
                f"<item>{ip}</item>" for ip in new_ips) + "</assignedIpv6Addresses>"
        if new_prefixes:
            inner += "<assignedIpv6PrefixSet>" + "".join(
                f"<item>{p}</item>" for p in new_prefixes) + "</assignedIpv6PrefixSet>"
        inner += f"<networkInterfaceId>{eni.id}</networkInterfaceId>"
        return ec2_result("AssignIpv6Addresses", inner)

    def _ec2_UnassignIpv6Addresses(self, environ, backend, params):
        eni = self._eni(backend, params.get("NetworkInterfaceId"))
        if eni is None:
            return self.call_moto(environ, params)
        if is_true(params.get("DryRun")):
            raise ShimError("DryRunOperation", "Request would have succeeded, but DryRun flag is set.", 412)
        ips = [canonical_ipv6(ip) for ip in indexed(params, "Ipv6Addresses")]
        prefixes = [canonical_ipv6_prefix(p) for p in indexed(params, "Ipv6Prefix")]
        if not ips and not prefixes:
            raise ShimError("MissingParameter", "Either Ipv6Addresses or Ipv6Prefix must be specified.")
        if not set(ips) <= set(eni.ipv6_addresses):
            raise ShimError("InvalidParameterValue",
                            f"Some of the specified IPv6 addresses are not assigned to interface {eni.id}")
        current = self.ipv6_prefixes.get(eni.id, [])
        if not set(prefixes) <= set(current):
            raise ShimError("InvalidParameterValue",
                            f"Some of the specified IPv6 prefixes are not assigned to interface {eni.id}")
        eni.ipv6_addresses = [ip for ip in eni.ipv6_addresses if ip not in ips]
        remaining = [p for p in current if p not in prefixes]
        if remaining:
            self.ipv6_prefixes[eni.id] = remaining
        else:
            self.ipv6_prefixes.pop(eni.id, None)
        inner = f"<networkInterfaceId>{eni.id}</networkInterfaceId>"
        if ips:
            inner += "<unassignedIpv6Addresses>" + "".join(
                f"<item>{ip}</item>" for ip in dict.fromkeys(ips)) + "</unassignedIpv6Addresses>"
        if prefixes:
            inner += "<unassignedIpv6PrefixSet>" + "".join(
                f"<item>{p}</item>" for p in dict.fromkeys(prefixes)) + "</unassignedIpv6PrefixSet>"
        return ec2_result("UnassignIpv6Addresses", inner)

    def _ec2_AttachNetworkInterface(self, environ, backend, params):
        eni = self._eni(backend, params.get("NetworkInterfaceId"))
        instance = self._instance(backend, params.get("InstanceId"))
        if eni is None or instance is None:
            return self.call_moto(environ, params)
        device_index = int_param(params, "DeviceIndex")
        if eni.instance is not None:
            raise ShimError("InvalidNetworkInterface.InUse", f"Interface: [{eni.id}] in use.")
        if eni.subnet.availability_zone != instance.availability_zone:
            raise ShimError("InvalidParameterCombination",
                            "You may not attach a network interface to an instance if they are "
                            "not in the same availability zone")
        # An ENI of another VPC in the same AZ is fine: EC2 has allowed multi-VPC attachments since 2023.
        info = type_network_info(instance.instance_type)
        if info and len(instance.nics) >= info["MaximumNetworkInterfaces"]:
            raise ShimError("AttachmentLimitExceeded",
                            f"Interface count {len(instance.nics) + 1} exceeds the limit for {instance.instance_type}")
        if info and eni.interface_type in EFA_TYPES:
            efa_limit = (info.get("EfaInfo") or {}).get("MaximumEfaInterfaces", 0) if info.get("EfaSupported") else 0
            efas = sum(1 for n in instance.nics.values() if n.interface_type in EFA_TYPES)
            if efas >= efa_limit:
                raise ShimError("InvalidParameterCombination",
                                f"EFA interface count {efas + 1} exceeds the limit of {efa_limit} "
                                f"for {instance.instance_type}.")
        if device_index in instance.nics:
            raise ShimError("InvalidParameterValue",
                            f"Instance '{instance.id}' already has an interface attached at device index '{device_index}'.")
        resp = self.call_moto(environ, params)
        if resp[0] == 200:
            eni.delete_on_termination = False  # a new attachment starts with the API's default
        return resp

    def _ec2_DetachNetworkInterface(self, environ, backend, params):
        attachment_id = params.get("AttachmentId")
        eni = next((e for e in backend.enis.values() if e.attachment_id and e.attachment_id == attachment_id), None)
        if eni is not None and eni.device_index == 0:
            raise ShimError("OperationNotPermitted",
                            "The network interface at device index 0 cannot be detached.")
        return self.call_moto(environ, params)

    def _ec2_DeleteNetworkInterface(self, environ, backend, params):
        eni = self._eni(backend, params.get("NetworkInterfaceId"))
        if eni is not None and eni.instance is not None and not is_true(params.get("DryRun")):
            raise ShimError("InvalidNetworkInterface.InUse", f"The network interface '{eni.id}' is currently in use.")
        resp = self.call_moto(environ, params)
        self._forget_deleted_enis(backend)
        return resp

    def _ec2_ModifyNetworkInterfaceAttribute(self, environ, backend, params):
        if "Attachment.DeleteOnTermination" not in params:
            return self.call_moto(environ, params)
        eni = self._eni(backend, params.get("NetworkInterfaceId"))
        if eni is None:
            return self.call_moto(environ, params)
        if not eni.attachment_id or params.get("Attachment.AttachmentId") != eni.attachment_id:
            raise ShimError("InvalidAttachmentID.NotFound",
                            f"The attachment ID '{params.get('Attachment.AttachmentId')}' does not exist")
        eni.delete_on_termination = is_true(params["Attachment.DeleteOnTermination"])
        rest = {k: v for k, v in params.items() if not k.startswith("Attachment.")}
        if any(k.startswith(("Description.", "SourceDestCheck.", "SecurityGroupId.")) for k in rest):
            return self.call_moto(environ, rest)
        return ec2_result("ModifyNetworkInterfaceAttribute", "<return>true</return>")

    def _ec2_RunInstances(self, environ, backend, params):
        subnet_id = params.get("SubnetId") or params.get("NetworkInterface.1.SubnetId")
        if subnet_id in self._subnet_ids(backend):
            if int_param(params, "Ipv6AddressCount"):
                subnet_ipv6_cidr(backend.get_subnet(subnet_id))
            free = SubnetPlan(self, backend, backend.get_subnet(subnet_id)).free_count()
            if free < max(1, int_param(params, "MinCount")):
                raise ShimError("InsufficientFreeAddressesInSubnet",
                                f"There are not enough free addresses in subnet '{subnet_id}' "
                                "to satisfy the requested number of instances.")
            # Real EC2 launches what fits between MinCount and MaxCount.
            if int_param(params, "MaxCount") > free:
                params = {**params, "MaxCount": str(free)}
        before = {i.id for i in backend.all_instances()}
        resp = self.call_moto(environ, params)
        if not any(k.startswith("NetworkInterface.") for k in params):
            # Real EC2 deletes the primary ENI it created at launch on termination.
            for instance in backend.all_instances():
                if instance.id not in before and 0 in instance.nics:
                    instance.nics[0].delete_on_termination = True
        return resp

    def _ec2_TerminateInstances(self, environ, backend, params):
        resp = self.call_moto(environ, params)
        if resp[0] != 200:
            return resp
        # moto leaves non-DeleteOnTermination ENIs attached to the dead
        # instance and its primary IP taken; real EC2 frees both.
        for instance_id in indexed(params, "InstanceId"):
            instance = self._instance(backend, instance_id)
            if instance is None:
                continue
            for eni in list(instance.nics.values()):
                if eni.id in backend.enis:
                    instance.detach_eni(eni)
                    eni.delete_on_termination = False
            instance.nics.clear()
            subnet = backend.get_subnet(instance.subnet_id) if instance.subnet_id else None
            if subnet is not None:
                for ip, owner in list(subnet._subnet_ips.items()):
                    if owner is instance:
                        subnet.del_subnet_ip(ip)
        self._forget_deleted_enis(backend)
        return resp

    def _forget_deleted_enis(self, backend):
        for held in (self.prefixes, self.ipv6_prefixes):
            for eni_id in [e for e in held if e not in backend.enis]:
                del held[eni_id]

    def _instance(self, backend, instance_id):
        if not instance_id:
            return None
        return next((i for i in backend.all_instances() if i.id == instance_id), None)

    def _subnet_ids(self, backend) -> set[str]:
        return {s.id for by_az in backend.subnets.values() for s in by_az.values()}

    # ---- admin API --------------------------------------------------------

    def admin(self, environ, path):
        method = environ.get("REQUEST_METHOD", "GET")
        try:
            raw = get_input_stream(environ).read()
            body = json.loads(raw) if raw.strip() else {}
        except ValueError as e:
            return json_response({"error": f"bad JSON: {e}"}, 400)
        route = (method, path.rstrip("/"))
        try:
            if route == ("GET", "/_shim/health"):
                return json_response({"ok": True})
            if route[1] == "/_shim/faults":
                return self.admin_faults(method, body)
            if route == ("GET", "/_shim/latency"):
                return json_response({"ms": self.latency_ms})
            if route == ("POST", "/_shim/latency"):
                with self.admin_lock:
                    self.latency_ms = max(0, int(body.get("ms", 0)))
                return json_response({"ms": self.latency_ms})
            if route[1] == "/_shim/account-limits":
                with self.admin_lock:
                    if method == "POST":
                        self.account_limits = {k: {"burst": float(v["burst"]), "rate": float(v["rate"])}
                                               for k, v in body.items() if k in ("mutating", "describe")}
                        self.buckets = {}
                    elif method == "DELETE":
                        self.account_limits = None
                        self.buckets = {}
                    return json_response(self.account_limits or {})
            if route == ("GET", "/_shim/calls"):
                with self.admin_lock:
                    return json_response(dict(json.loads(json.dumps(self.calls)),
                                              user_agents=list(self.user_agents)))
            if route == ("POST", "/_shim/calls/reset"):
                with self.admin_lock:
                    self._reset_calls()
                return json_response({"ok": True})
            if route == ("POST", "/_shim/reset"):
                with self.ec2_lock:
                    moto_api_backend.reset()
                    self._reset_shim_state()
                return json_response({"ok": True})
            if route == ("POST", "/_shim/instance"):
                return json_response(self.admin_instance(body))
            if method == "GET" and path.startswith("/_shim/imds/"):
                view = self.imds_view(path[len("/_shim/imds/"):])
                if view is None:
                    return json_response({"error": "instance not found"}, 404)
                return json_response(view)
            if route == ("GET", "/_shim/enis"):
                return json_response(self.enis_view())
            if route == ("POST", "/_shim/vpc-cidr"):
                return json_response(self.admin_vpc_cidr(body))
            if route == ("POST", "/_shim/subnet"):
                return json_response(self.admin_subnet(body))
            if route == ("POST", "/_shim/security-group"):
                return json_response(self.admin_security_group(body))
        except (ShimError, EC2ClientError) as e:
            return json_response({"error": str(e), "code": getattr(e, "code", None)}, 400)
        except (KeyError, ValueError, TypeError) as e:
            return json_response({"error": f"bad request: {e!r}"}, 400)
        return json_response({"error": f"no such endpoint: {method} {path}"}, 404)

    def admin_faults(self, method, body):
        with self.admin_lock:
            if method == "GET":
                return json_response(self.faults)
            if method == "DELETE":
                self.faults = []
                return json_response({"ok": True})
            if method != "POST":
                return json_response({"error": "use GET, POST or DELETE"}, 405)
            kind = body.get("kind")
            if kind not in ("throttle", "error", "latency", "noop"):
                return json_response({"error": "kind must be throttle, error, latency or noop"}, 400)
            fault = {"id": self.next_fault_id, "action": body.get("action", "*"), "kind": kind,
                     "count": int(body.get("count", 1))}
            if fault["count"] == 0 or fault["count"] < -1:
                return json_response({"error": "count must be positive or -1"}, 400)
            if kind == "throttle":
                fault.update(code=body.get("code", "RequestLimitExceeded"),
                             message=body.get("message", "Request limit exceeded."),
                             status=int(body.get("status", 503)))
            elif kind == "error":
                code = body.get("code", "InternalError")
                default_status = {"InternalError": 500, "ServiceUnavailable": 503,
                                  "RequestLimitExceeded": 503, "UnauthorizedOperation": 403}.get(code, 400)
                fault.update(code=code, message=body.get("message", f"{code} (injected by ec2-shim)"),
                             status=int(body.get("status", default_status)))
            elif kind == "latency":
                fault["latency_ms"] = int(body.get("latency_ms", 200))
            self.next_fault_id += 1
            self.faults.append(fault)
            return json_response(fault)

    def _moto_query(self, region, params):
        """An EC2 call for the rig's own setup: through the shim's handlers (so
        RunInstances allocates as usual), but never counted or faulted."""
        params = {"Version": "2016-11-15", **params}
        environ = EnvironBuilder(
            path="/", method="POST", data=urlencode(params), content_type="application/x-www-form-urlencoded",
            headers={"Authorization": fake_authorization(region)},
        ).get_environ()
        status, _, body = self.handle_ec2(environ, region, params)
        text = body.decode()
        if status != 200:
            code = re.search(r"<Code>(.*?)</Code>", text)
            message = re.search(r"<Message>(.*?)</Message>", text)
            raise ShimError(code.group(1) if code else "Error", message.group(1) if message else text)
        return text

    def admin_instance(self, body):
        region = self.default_region
        az = body.get("az") or f"{region}a"
        region = az[:-1]
        instance_type = body.get("instance_type", "t3.medium")
        if instance_type not in INSTANCE_TYPES:
            raise ShimError("InvalidParameterValue", f"unknown instance type {instance_type}")
        with self.ec2_lock:
            self.regions.add(region)
            backend = self.backend(region)
            if body.get("vpc_id"):
                vpc = backend.get_vpc(body["vpc_id"])
            else:
                vpc = backend.create_vpc(cidr_block=body.get("vpc_cidr", "10.0.0.0/16"))
            for cidr in body.get("extra_vpc_cidrs") or []:
                self._associate_cidr(backend, vpc, cidr)
            if body.get("subnet_id"):
                subnet = backend.get_subnet(body["subnet_id"])
                az = subnet.availability_zone
            else:
                subnet = backend.create_subnet(vpc.id, body.get("subnet_cidr", "10.0.1.0/24"), availability_zone=az)
            if body.get("ipv6"):
                self._enable_ipv6(backend, vpc, subnet)  # before RunInstances: its ENI takes an IPv6 address
            group = self._security_group(backend, vpc.id, "shim-node", "ec2-shim test node")
            images = backend.describe_images(owners=["amazon"]) or list(backend.amis.values())
            text = self._moto_query(region, {
                "Action": "RunInstances", "ImageId": images[0].id, "MinCount": "1", "MaxCount": "1",
                "InstanceType": instance_type, "SubnetId": subnet.id, "SecurityGroupId.1": group.id,
            })
            instance = self._instance(backend, re.search(r"<instanceId>(i-[0-9a-f]+)</instanceId>", text).group(1))
            eni = instance.nics[0]
            reply = {"instance_id": instance.id, "instance_type": instance_type, "vpc_id": vpc.id,
                     "subnet_id": subnet.id, "security_group_ids": [group.id], "primary_eni": eni.id,
                     "primary_ip": eni.private_ip_address, "mac": eni.mac_address, "az": az, "region": region}
            if subnet_ipv6_cidrs(subnet):
                reply.update(ipv6=eni.ipv6_addresses[0] if eni.ipv6_addresses else None,
                             subnet_ipv6_cidr=subnet_ipv6_cidrs(subnet)[0],
                             vpc_ipv6_cidr=vpc_ipv6_cidrs(vpc)[0])
            return reply

    def _enable_ipv6(self, backend, vpc, subnet):
        """What an EKS IPv6 cluster's VPC looks like: an Amazon-provided /56 on the VPC, the
        subnet's /64 the lowest one no other subnet of the VPC holds, and
        AssignIpv6AddressOnCreation on. Keeps what is already there."""
        if not vpc_ipv6_cidrs(vpc):
            backend.associate_vpc_cidr_block(vpc.id, None, True)
        if not subnet_ipv6_cidrs(subnet):
            taken = {c for s in backend.describe_subnets(filters={"vpc-id": vpc.id}) for c in subnet_ipv6_cidrs(s)}
            pool = ipaddress.IPv6Network(vpc_ipv6_cidrs(vpc)[0])
            free = (n for n in pool.subnets(new_prefix=IPV6_SUBNET_LEN) if str(n) not in taken)
            cidr = next(free, None)
            if cidr is None:
                raise ShimError("InvalidSubnet.Conflict", f"Every /64 of {pool} is taken by a subnet.")
            backend.associate_subnet_cidr_block(subnet.id, str(cidr))
        subnet.assign_ipv6_address_on_creation = True

    def _find_vpc(self, vpc_id):
        for region in sorted(self.regions):
            backend = self.backend(region)
            if vpc_id in backend.vpcs:
                return region, backend, backend.vpcs[vpc_id]
        raise ShimError("InvalidVpcID.NotFound", f"The vpc ID '{vpc_id}' does not exist")

    def _associate_cidr(self, backend, vpc, cidr):
        if cidr not in self._vpc_cidrs(vpc):
            backend.associate_vpc_cidr_block(vpc.id, cidr, False)

    @staticmethod
    def _security_group(backend, vpc_id, name, description):
        group = next((g for g in backend.groups[vpc_id].values() if g.name == name), None)
        return group or backend.create_security_group(name, description, vpc_id=vpc_id)

    def admin_vpc_cidr(self, body):
        with self.ec2_lock:
            _, backend, vpc = self._find_vpc(body["vpc_id"])
            self._associate_cidr(backend, vpc, body["cidr"])
            return {"vpc_id": vpc.id, "vpc_cidrs": self._vpc_cidrs(vpc)}

    def admin_subnet(self, body):
        with self.ec2_lock:
            region, backend, vpc = self._find_vpc(body["vpc_id"])
            if body.get("vpc_cidr"):  # a custom-networking subnet usually needs a secondary VPC CIDR
                self._associate_cidr(backend, vpc, body["vpc_cidr"])
            az = body.get("az") or f"{region}a"
            zones = [z.name for z in backend.describe_availability_zones()]
            if az not in zones:  # moto would take any name
                raise ShimError("InvalidParameterValue", f"Value ({az}) for parameter availabilityZone is invalid. "
                                f"Subnets can currently only be created in: {', '.join(zones)}.")
            subnet = backend.create_subnet(vpc.id, body["cidr"], availability_zone=az)
            subnet.add_tags({str(k): str(v) for k, v in (body.get("tags") or {}).items()})
            if body.get("ipv6"):
                self._enable_ipv6(backend, vpc, subnet)
            reply = {"subnet_id": subnet.id, "cidr": subnet.cidr_block, "az": subnet.availability_zone,
                     "vpc_id": vpc.id, "vpc_cidrs": self._vpc_cidrs(vpc)}
            if subnet_ipv6_cidrs(subnet):
                reply.update(ipv6_cidr=subnet_ipv6_cidrs(subnet)[0], vpc_ipv6_cidrs=vpc_ipv6_cidrs(vpc))
            return reply

    def admin_security_group(self, body):
        with self.ec2_lock:
            _, backend, vpc = self._find_vpc(body["vpc_id"])
            group = self._security_group(backend, vpc.id, body["name"], body.get("description") or "ec2-shim")
            return {"group_id": group.id, "name": group.name, "vpc_id": vpc.id}

    # ---- state views ------------------------------------------------------

    @staticmethod
    def _vpc_cidrs(vpc) -> list[str]:
        return [a["cidr_block"] for a in vpc.get_cidr_block_association_set()
                if a.get("cidr_block_state", {}).get("state") == "associated"]

    def _eni_addresses(self, eni):
        secondaries = [i["PrivateIpAddress"] for i in eni.private_ip_addresses
                       if i["PrivateIpAddress"] != eni.private_ip_address]
        return eni.private_ip_address, secondaries, list(self.prefixes.get(eni.id, []))

    @staticmethod
    def _eni_network(eni, backend) -> dict:
        """What an ENI shows of its own network (custom networking makes it differ from the instance's)."""
        vpc = backend.get_vpc(eni.vpc_id)
        return {"subnet_id": eni.subnet.id, "subnet_cidr": eni.subnet.cidr_block, "vpc_id": eni.vpc_id,
                "vpc_cidrs": Shim._vpc_cidrs(vpc), "subnet_ipv6_cidrs": subnet_ipv6_cidrs(eni.subnet),
                "vpc_ipv6_cidrs": vpc_ipv6_cidrs(vpc),
                "security_group_ids": [g.id for g in eni._group_set], "interface_type": eni.interface_type}

    def _eni_ipv6(self, eni) -> dict:
        return {"ipv6s": list(eni.ipv6_addresses), "ipv6_prefixes": list(self.ipv6_prefixes.get(eni.id, []))}

    def imds_view(self, instance_id):
        with self.ec2_lock:
            for region in sorted(self.regions):
                backend = self.backend(region)
                instance = self._instance(backend, instance_id)
                if instance is not None:
                    break
            else:
                return None
            interfaces = []
            for device, eni in sorted(instance.nics.items()):
                primary, secondaries, prefixes = self._eni_addresses(eni)
                interfaces.append({
                    "mac": eni.mac_address, "device_number": device, "network_card": 0, "interface_id": eni.id,
                    **self._eni_network(eni, backend),
                    "local_ipv4s": ([primary] if primary else []) + secondaries, "ipv4_prefixes": prefixes,
                    **self._eni_ipv6(eni),
                })
            primary_eni = instance.nics.get(0)
            return {"instance_id": instance.id, "instance_type": instance.instance_type,
                    "az": instance.availability_zone, "region": region,
                    "local_ipv4": primary_eni.private_ip_address if primary_eni else None,
                    "ipv6": primary_eni.ipv6_addresses[0] if primary_eni and primary_eni.ipv6_addresses else None,
                    "mac": primary_eni.mac_address if primary_eni else None,
                    "state": instance._state.name, "interfaces": interfaces}

    def enis_view(self):
        with self.ec2_lock:
            out = []
            for region in sorted(self.regions):
                backend = self.backend(region)
                for eni in list(backend.enis.values()):
                    primary, secondaries, prefixes = self._eni_addresses(eni)
                    out.append({
                        "id": eni.id, "status": eni.status, "mac": eni.mac_address, "region": region,
                        **self._eni_network(eni, backend),
                        "instance_id": eni.instance.id if eni.instance else None,
                        "device_index": eni.device_index if eni.instance else None,
                        "primary_ip": primary, "secondary_ips": secondaries, "prefixes": prefixes,
                        **self._eni_ipv6(eni),
                        "tags": {t["key"]: t["value"] for t in eni.get_tags()},
                        "description": eni.description,
                    })
            return out


class QuietHandler(WSGIRequestHandler):
    def log_request(self, *args, **kwargs):  # the shim logs EC2 calls itself
        pass


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--latency-ms", type=int, default=0)
    parser.add_argument("--region", default="us-west-2", help="region for admin views and world setup")
    parser.add_argument("--ready-file")
    args = parser.parse_args(argv)
    logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="ec2-shim: %(message)s")
    logging.getLogger("werkzeug").setLevel(logging.WARNING)

    shim = Shim(latency_ms=args.latency_ms, region=args.region)
    server = make_server(args.host, args.port, shim, threaded=True, request_handler=QuietHandler)
    port = server.server_port
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    thread = threading.Thread(target=server.serve_forever, name="ec2-shim", daemon=True)
    thread.start()
    if args.ready_file:
        tmp = f"{args.ready_file}.tmp.{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(f"{port}\n")
        os.rename(tmp, args.ready_file)
    print(f"ec2-shim listening on http://{args.host}:{port}", flush=True)
    while not stop.wait(3600):
        pass
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
