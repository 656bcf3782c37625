"""Tests for ec2_shim.py through boto3, against a shim started as a subprocess.

    .venv/bin/python -m unittest discover -s tests/rig -p 'test_*.py'
"""
import ipaddress
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import unittest
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor

import boto3
from botocore.config import Config
from botocore.exceptions import ClientError

HERE = os.path.dirname(os.path.abspath(__file__))
SHIM = None  # (process, port)


def start_shim(*extra):
    ready = os.path.join(tempfile.mkdtemp(prefix="ec2-shim-"), "port")
    proc = subprocess.Popen(
        [sys.executable, os.path.join(HERE, "ec2_shim.py"), "--port", "0", "--ready-file", ready, *extra],
        stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    deadline = time.monotonic() + 30
    while not os.path.exists(ready):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError("ec2 shim did not start")
        time.sleep(0.05)
    with open(ready) as f:
        port = int(f.read())
    shutil.rmtree(os.path.dirname(ready))
    return proc, port


def setUpModule():
    global SHIM
    SHIM = start_shim()


def tearDownModule():
    proc, _ = SHIM
    proc.send_signal(signal.SIGTERM)
    proc.wait(timeout=10)


def admin(method, path, body=None, port=None):
    port = port or SHIM[1]
    data = json.dumps(body).encode() if body is not None else None
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", data=data, method=method)
    with urllib.request.urlopen(req, timeout=10) as resp:
        return json.load(resp)


def ec2_client(port=None):
    return boto3.client(
        "ec2", region_name="us-west-2", endpoint_url=f"http://127.0.0.1:{port or SHIM[1]}",
        aws_access_key_id="testing", aws_secret_access_key="testing",
        config=Config(retries={"total_max_attempts": 1}))  # max_attempts=1 would still retry once


class ShimTest(unittest.TestCase):
    def setUp(self):
        admin("POST", "/_shim/reset")
        self.ec2 = ec2_client()

    def world(self, **kw):
        return admin("POST", "/_shim/instance", kw)

    def create_eni(self, world, **kw):
        return self.ec2.create_network_interface(
            SubnetId=world["subnet_id"], Groups=world["security_group_ids"], **kw)["NetworkInterface"]

    def attach(self, world, eni, index):
        return self.ec2.attach_network_interface(
            NetworkInterfaceId=eni["NetworkInterfaceId"], InstanceId=world["instance_id"], DeviceIndex=index)

    def describe(self, eni_id):
        return self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]

    def assertEc2Error(self, code, fn, *args, **kw):
        with self.assertRaises(ClientError) as ctx:
            fn(*args, **kw)
        self.assertEqual(ctx.exception.response["Error"]["Code"], code, ctx.exception)
        return ctx.exception


class Limits(ShimTest):
    def test_attachment_limit_of_the_instance_type(self):
        w = self.world(instance_type="t3.medium")  # 3 ENIs, 6 IPv4 addresses each
        self.attach(w, self.create_eni(w), 1)
        self.attach(w, self.create_eni(w), 2)
        fourth = self.create_eni(w)
        err = self.assertEc2Error("AttachmentLimitExceeded", self.attach, w, fourth, 3)
        self.assertEqual(err.response["ResponseMetadata"]["HTTPStatusCode"], 400)
        self.assertEqual(self.describe(fourth["NetworkInterfaceId"])["Status"], "available")

    def test_duplicate_device_index(self):
        w = self.world()
        self.attach(w, self.create_eni(w), 1)
        err = self.assertEc2Error("InvalidParameterValue", self.attach, w, self.create_eni(w), 1)
        self.assertIn("device index '1'", str(err))

    def test_attaching_an_attached_eni(self):
        w = self.world()
        eni = self.create_eni(w)
        self.attach(w, eni, 1)
        self.assertEc2Error("InvalidNetworkInterface.InUse", self.attach, w, eni, 2)

    def test_ip_limit_per_eni(self):
        w = self.world(instance_type="t3.medium")
        eni = self.create_eni(w)
        self.attach(w, eni, 1)
        eni_id = eni["NetworkInterfaceId"]
        for _ in range(5):  # primary + 5 secondaries = 6
            self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=1)
        err = self.assertEc2Error("PrivateIpAddressLimitExceeded", self.ec2.assign_private_ip_addresses,
                                  NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=1)
        self.assertIn("6", str(err))
        self.assertEqual(len(self.describe(eni_id)["PrivateIpAddresses"]), 6)

    def test_primary_eni_limit_and_unattached_cap(self):
        w = self.world(instance_type="t3.medium")
        self.assertEc2Error("PrivateIpAddressLimitExceeded", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=w["primary_eni"], SecondaryPrivateIpAddressCount=6)
        eni = self.create_eni(w)  # unattached: only the cap of 50
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                             SecondaryPrivateIpAddressCount=20)
        self.assertEc2Error("PrivateIpAddressLimitExceeded", self.create_eni, w,
                            SecondaryPrivateIpAddressCount=50)

    def test_delete_attached_eni_refused_detach_leaves_available(self):
        w = self.world()
        eni = self.create_eni(w)
        attachment = self.attach(w, eni, 1)["AttachmentId"]
        err = self.assertEc2Error("InvalidNetworkInterface.InUse", self.ec2.delete_network_interface,
                                  NetworkInterfaceId=eni["NetworkInterfaceId"])
        self.assertIn("is currently in use", str(err))
        self.ec2.detach_network_interface(AttachmentId=attachment)
        got = self.describe(eni["NetworkInterfaceId"])
        self.assertEqual(got["Status"], "available")
        self.assertNotIn("Attachment", got)
        self.ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])
        self.assertEqual(len(admin("GET", "/_shim/enis")), 1)

    def test_delete_on_termination_and_attachment_fields(self):
        w = self.world()
        eni = self.create_eni(w, Description="aws-K8S-i-x", TagSpecifications=[
            {"ResourceType": "network-interface", "Tags": [{"Key": "node.k8s.amazonaws.com/instance_id",
                                                            "Value": w["instance_id"]}]}])
        attachment = self.attach(w, eni, 1)["AttachmentId"]
        self.assertFalse(self.describe(eni["NetworkInterfaceId"])["Attachment"]["DeleteOnTermination"])
        self.ec2.modify_network_interface_attribute(
            NetworkInterfaceId=eni["NetworkInterfaceId"],
            Attachment={"AttachmentId": attachment, "DeleteOnTermination": True})
        got = self.describe(eni["NetworkInterfaceId"])
        self.assertEqual(got["Attachment"], {**got["Attachment"], "AttachmentId": attachment, "DeviceIndex": 1,
                                             "NetworkCardIndex": 0, "InstanceId": w["instance_id"],
                                             "Status": "attached", "DeleteOnTermination": True})
        self.assertEqual(got["Status"], "in-use")
        self.assertEqual(got["Description"], "aws-K8S-i-x")
        self.assertEqual(got["TagSet"], [{"Key": "node.k8s.amazonaws.com/instance_id", "Value": w["instance_id"]}])
        self.assertEqual([g["GroupId"] for g in got["Groups"]], w["security_group_ids"])
        self.assertEqual([p["Primary"] for p in got["PrivateIpAddresses"]], [True])
        macs = {e["mac"] for e in admin("GET", "/_shim/enis")}
        self.assertEqual(len(macs), 2)


class Addresses(ShimTest):
    def test_lowest_free_addresses_in_order(self):
        w = self.world(subnet_cidr="10.0.1.0/24")
        self.assertEqual(w["primary_ip"], "10.0.1.4")  # .0-.3 are reserved
        eni = self.create_eni(w, SecondaryPrivateIpAddressCount=2)
        self.assertEqual([p["PrivateIpAddress"] for p in eni["PrivateIpAddresses"]],
                         ["10.0.1.5", "10.0.1.6", "10.0.1.7"])
        self.attach(w, eni, 1)
        got = self.ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=2)
        # only the new ones, as real EC2 answers
        self.assertEqual(got["AssignedPrivateIpAddresses"],
                         [{"PrivateIpAddress": "10.0.1.8"}, {"PrivateIpAddress": "10.0.1.9"}])
        self.ec2.unassign_private_ip_addresses(
            NetworkInterfaceId=eni["NetworkInterfaceId"], PrivateIpAddresses=["10.0.1.6"])
        got = self.ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=1)
        self.assertEqual(got["AssignedPrivateIpAddresses"], [{"PrivateIpAddress": "10.0.1.6"}])
        ips = [p["PrivateIpAddress"] for p in self.describe(eni["NetworkInterfaceId"])["PrivateIpAddresses"]]
        self.assertEqual(ips, ["10.0.1.5", "10.0.1.7", "10.0.1.8", "10.0.1.9", "10.0.1.6"])

    def test_concurrent_allocations_do_not_collide(self):
        w = self.world()
        with ThreadPoolExecutor(max_workers=8) as pool:
            enis = list(pool.map(lambda _: self.create_eni(w, SecondaryPrivateIpAddressCount=2), range(16)))
        ips = [p["PrivateIpAddress"] for e in enis for p in e["PrivateIpAddresses"]]
        self.assertEqual(sorted(ips, key=ipaddress.ip_address), [f"10.0.1.{i}" for i in range(5, 5 + 48)])

    def test_explicit_addresses(self):
        w = self.world()
        eni = self.create_eni(w, PrivateIpAddress="10.0.1.100")
        self.assertEqual(eni["PrivateIpAddress"], "10.0.1.100")
        got = self.ec2.assign_private_ip_addresses(
            NetworkInterfaceId=eni["NetworkInterfaceId"], PrivateIpAddresses=["10.0.1.50"])
        self.assertEqual(got["AssignedPrivateIpAddresses"], [{"PrivateIpAddress": "10.0.1.50"}])
        self.assertEc2Error("InvalidIPAddress.InUse", self.create_eni, w, PrivateIpAddress="10.0.1.50")
        self.assertEc2Error("InvalidParameterValue", self.ec2.unassign_private_ip_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], PrivateIpAddresses=["10.0.1.51"])
        other = self.create_eni(w)
        self.assertEc2Error("InvalidIPAddress.InUse", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=other["NetworkInterfaceId"], PrivateIpAddresses=["10.0.1.50"])
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=other["NetworkInterfaceId"],
                                             PrivateIpAddresses=["10.0.1.50"], AllowReassignment=True)
        self.assertEqual([p["PrivateIpAddress"] for p in self.describe(eni["NetworkInterfaceId"])["PrivateIpAddresses"]],
                         ["10.0.1.100"])

    def test_subnet_exhaustion_changes_nothing(self):
        w = self.world(subnet_cidr="10.0.1.0/28")  # 11 usable, the instance holds one
        eni = self.create_eni(w, SecondaryPrivateIpAddressCount=8)  # 9 more: 1 left
        eni_id = eni["NetworkInterfaceId"]
        before = admin("GET", "/_shim/enis")
        err = self.assertEc2Error("InsufficientFreeAddressesInSubnet", self.ec2.assign_private_ip_addresses,
                                  NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=2)
        self.assertIn(w["subnet_id"], str(err))
        self.assertEc2Error("InsufficientFreeAddressesInSubnet", self.create_eni, w,
                            SecondaryPrivateIpAddressCount=1)
        self.assertEqual(admin("GET", "/_shim/enis"), before)
        subnet = self.ec2.describe_subnets(SubnetIds=[w["subnet_id"]])["Subnets"][0]
        self.assertEqual(subnet["AvailableIpAddressCount"], 1)
        got = self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=1)
        self.assertEqual(got["AssignedPrivateIpAddresses"], [{"PrivateIpAddress": "10.0.1.14"}])
        self.assertEc2Error("InsufficientFreeAddressesInSubnet", self.create_eni, w)

    def test_run_instances_takes_lowest_free_and_full_subnet_fails(self):
        w = self.world(subnet_cidr="10.0.1.0/28")
        self.create_eni(w, SecondaryPrivateIpAddressCount=8)  # 10.0.1.5-.13
        image = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        run = self.ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=w["subnet_id"],
                                     InstanceType="t3.medium")
        self.assertEqual(run["Instances"][0]["PrivateIpAddress"], "10.0.1.14")
        self.assertEc2Error("InsufficientFreeAddressesInSubnet", self.ec2.run_instances, ImageId=image,
                            MinCount=1, MaxCount=1, SubnetId=w["subnet_id"], InstanceType="t3.medium")

    def test_terminate_frees_addresses_and_detaches(self):
        w = self.world()
        eni = self.create_eni(w)
        self.attach(w, eni, 1)
        self.ec2.terminate_instances(InstanceIds=[w["instance_id"]])
        enis = admin("GET", "/_shim/enis")
        self.assertEqual([(e["id"], e["status"]) for e in enis], [(eni["NetworkInterfaceId"], "available")])
        self.assertEqual(self.create_eni(w)["PrivateIpAddress"], "10.0.1.4")


class Prefixes(ShimTest):
    def test_assign_describe_unassign(self):
        w = self.world(instance_type="m5.large")  # 10 addresses per ENI
        eni = self.create_eni(w, SecondaryPrivateIpAddressCount=1)  # 10.0.1.5, .6
        eni_id = eni["NetworkInterfaceId"]
        self.attach(w, eni, 1)
        got = self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=2)
        # 10.0.1.0/28 holds reserved and used addresses
        self.assertEqual(got["AssignedIpv4Prefixes"], [{"Ipv4Prefix": "10.0.1.16/28"}, {"Ipv4Prefix": "10.0.1.32/28"}])
        self.assertNotIn("AssignedPrivateIpAddresses", got)
        self.assertEqual(self.describe(eni_id)["Ipv4Prefixes"],
                         [{"Ipv4Prefix": "10.0.1.16/28"}, {"Ipv4Prefix": "10.0.1.32/28"}])
        instance = self.ec2.describe_instances(InstanceIds=[w["instance_id"]])["Reservations"][0]["Instances"][0]
        by_id = {n["NetworkInterfaceId"]: n for n in instance["NetworkInterfaces"]}
        self.assertEqual(len(by_id[eni_id]["Ipv4Prefixes"]), 2)
        # addresses skip what the prefixes hold
        got = self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=5)
        self.assertEqual([a["PrivateIpAddress"] for a in got["AssignedPrivateIpAddresses"]],
                         [f"10.0.1.{i}" for i in range(7, 12)])
        self.ec2.unassign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4Prefixes=["10.0.1.16/28"])
        self.assertEqual(self.describe(eni_id)["Ipv4Prefixes"], [{"Ipv4Prefix": "10.0.1.32/28"}])
        self.assertEc2Error("InvalidParameterValue", self.ec2.unassign_private_ip_addresses,
                            NetworkInterfaceId=eni_id, Ipv4Prefixes=["10.0.1.16/28"])
        got = self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4Prefixes=["10.0.1.64/28"])
        self.assertEqual(got["AssignedIpv4Prefixes"], [{"Ipv4Prefix": "10.0.1.64/28"}])
        self.assertEqual(admin("GET", f"/_shim/imds/{w['instance_id']}")["interfaces"][1]["ipv4_prefixes"],
                         ["10.0.1.32/28", "10.0.1.64/28"])

    def test_prefixes_are_aligned_and_avoid_used_addresses(self):
        w = self.world(instance_type="m5.large")
        eni = self.create_eni(w, PrivateIpAddress="10.0.1.20", Ipv4PrefixCount=3)
        prefixes = [p["Ipv4Prefix"] for p in eni["Ipv4Prefixes"]]
        self.assertEqual(prefixes, ["10.0.1.32/28", "10.0.1.48/28", "10.0.1.64/28"])
        for p in prefixes:
            self.assertEqual(int(ipaddress.ip_network(p).network_address) % 16, 0)
        got = self.create_eni(w, SecondaryPrivateIpAddressCount=12)
        ips = [p["PrivateIpAddress"] for p in got["PrivateIpAddresses"]]
        self.assertEqual(ips, [f"10.0.1.{i}" for i in [5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15, 16, 17]])
        for ip in ips:
            self.assertFalse(any(ipaddress.ip_address(ip) in ipaddress.ip_network(p) for p in prefixes))

    def test_prefixes_count_toward_the_eni_slot_limit(self):
        w = self.world(instance_type="t3.medium")  # 6 slots
        eni = self.create_eni(w, SecondaryPrivateIpAddressCount=2)
        self.attach(w, eni, 1)
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=3)
        self.assertEc2Error("PrivateIpAddressLimitExceeded", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=1)
        self.assertEc2Error("PrivateIpAddressLimitExceeded", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=1)

    def test_prefix_exhaustion(self):
        w = self.world(instance_type="m5.large", subnet_cidr="10.0.1.0/26")  # 4 blocks, the first is used
        eni = self.create_eni(w)
        self.attach(w, eni, 1)
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=2)
        before = admin("GET", "/_shim/enis")
        err = self.assertEc2Error("InsufficientCidrBlocks", self.ec2.assign_private_ip_addresses,
                                  NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=2)
        self.assertIn("free cidr blocks", str(err))
        self.assertEqual(admin("GET", "/_shim/enis"), before)
        # the last block contains the broadcast address
        self.assertEc2Error("InsufficientCidrBlocks", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=1)

    def test_deleting_the_eni_frees_its_prefixes(self):
        w = self.world()
        eni = self.create_eni(w, Ipv4PrefixCount=1)
        self.assertEqual(eni["Ipv4Prefixes"], [{"Ipv4Prefix": "10.0.1.16/28"}])
        self.ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])
        again = self.create_eni(w, Ipv4PrefixCount=1)
        self.assertEqual(again["Ipv4Prefixes"], [{"Ipv4Prefix": "10.0.1.16/28"}])


class Faults(ShimTest):
    def test_throttle(self):
        w = self.world()
        admin("POST", "/_shim/faults", {"action": "AssignPrivateIpAddresses", "kind": "throttle", "count": -1})
        err = self.assertEc2Error("RequestLimitExceeded", self.ec2.assign_private_ip_addresses,
                                  NetworkInterfaceId=w["primary_eni"], SecondaryPrivateIpAddressCount=1)
        self.assertEqual(err.response["ResponseMetadata"]["HTTPStatusCode"], 503)
        self.assertEqual(err.response["Error"]["Message"], "Request limit exceeded.")
        self.ec2.describe_network_interfaces()  # other actions pass
        self.assertEc2Error("RequestLimitExceeded", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=w["primary_eni"], SecondaryPrivateIpAddressCount=1)
        self.assertEqual(len(admin("GET", "/_shim/faults")), 1)
        admin("DELETE", "/_shim/faults")
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=w["primary_eni"], SecondaryPrivateIpAddressCount=1)
        self.assertEqual(admin("GET", "/_shim/calls")["throttled"], 2)

    def test_noop_accepts_and_does_nothing(self):
        w = self.world()
        admin("POST", "/_shim/faults", {"action": "AssignPrivateIpAddresses", "kind": "noop", "count": -1})
        eni_id = w["primary_eni"]
        before = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
        got = self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, Ipv4PrefixCount=1)
        self.assertEqual(got.get("AssignedIpv4Prefixes", []), [])
        self.assertEqual(got.get("AssignedPrivateIpAddresses", []), [])
        after = self.ec2.describe_network_interfaces(NetworkInterfaceIds=[eni_id])["NetworkInterfaces"][0]
        self.assertEqual(after["PrivateIpAddresses"], before["PrivateIpAddresses"])
        self.assertEqual(after.get("Ipv4Prefixes", []), before.get("Ipv4Prefixes", []))
        admin("DELETE", "/_shim/faults")
        got = self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=1)
        self.assertEqual(len(got["AssignedPrivateIpAddresses"]), 1)

    def test_account_limits_are_per_api_token_buckets(self):
        self.world()
        admin("POST", "/_shim/account-limits", {"mutating": {"burst": 3, "rate": 0.5},
                                                "describe": {"burst": 100, "rate": 20}})
        admin("POST", "/_shim/calls/reset")
        got = []
        for _ in range(5):
            try:
                self.ec2.delete_network_interface(NetworkInterfaceId="eni-00000000000000000")
                got.append("ok")
            except ClientError as e:
                got.append(e.response["Error"]["Code"])
        # Three tokens, then throttled: a different API has its own bucket.
        self.assertEqual(got[3:], ["RequestLimitExceeded"] * 2, got)
        self.assertNotIn("RequestLimitExceeded", got[:3])
        self.ec2.describe_network_interfaces()
        self.assertEqual(admin("GET", "/_shim/calls")["throttled"], 2)
        time.sleep(2.1)  # one token back at 0.5/s
        self.assertEc2Error("InvalidNetworkInterfaceID.NotFound", self.ec2.delete_network_interface,
                            NetworkInterfaceId="eni-00000000000000000")
        admin("DELETE", "/_shim/account-limits")

    def test_count_limited_faults_expire(self):
        admin("POST", "/_shim/faults", {"action": "*", "kind": "error", "count": 2,
                                        "code": "UnauthorizedOperation", "status": 403,
                                        "message": "You are not authorized to perform this operation."})
        admin("POST", "/_shim/faults", {"action": "DescribeVpcs", "kind": "error", "count": 1,
                                        "code": "InternalError", "status": 500})
        err = self.assertEc2Error("UnauthorizedOperation", self.ec2.describe_vpcs)
        self.assertEqual(err.response["ResponseMetadata"]["HTTPStatusCode"], 403)
        self.assertEc2Error("UnauthorizedOperation", self.ec2.describe_subnets)
        err = self.assertEc2Error("InternalError", self.ec2.describe_vpcs)
        self.assertEqual(err.response["ResponseMetadata"]["HTTPStatusCode"], 500)
        self.ec2.describe_vpcs()
        self.assertEqual(admin("GET", "/_shim/faults"), [])

    def test_latency(self):
        admin("POST", "/_shim/faults", {"action": "DescribeVpcs", "kind": "latency", "latency_ms": 300, "count": 1})
        started = time.monotonic()
        self.ec2.describe_vpcs()
        self.assertGreaterEqual(time.monotonic() - started, 0.3)
        admin("POST", "/_shim/latency", {"ms": 150})
        started = time.monotonic()
        self.ec2.describe_vpcs()
        elapsed = time.monotonic() - started
        self.assertGreaterEqual(elapsed, 0.15)
        self.assertLess(elapsed, 0.3 + 0.15)

    def test_call_counting(self):
        self.world()  # setup calls are not counted
        calls = admin("GET", "/_shim/calls")
        self.assertEqual({k: calls[k] for k in ("total", "by_action", "throttled")},
                         {"total": 0, "by_action": {}, "throttled": 0})
        admin("POST", "/_shim/faults", {"action": "DescribeVpcs", "kind": "throttle"})
        self.assertEc2Error("RequestLimitExceeded", self.ec2.describe_vpcs)
        self.ec2.describe_vpcs()
        self.ec2.describe_subnets()
        calls = admin("GET", "/_shim/calls")
        self.assertEqual({k: calls[k] for k in ("total", "by_action", "throttled")},
                         {"total": 3, "by_action": {"DescribeVpcs": 2, "DescribeSubnets": 1}, "throttled": 1})
        # Who called: boto3 says so in its user agent.
        self.assertTrue(any("Boto3" in a for a in calls["user_agents"]), calls["user_agents"])
        admin("POST", "/_shim/calls/reset")
        self.assertEqual(admin("GET", "/_shim/calls")["total"], 0)


class Views(ShimTest):
    def test_imds_view_after_attach_and_assign(self):
        w = self.world(extra_vpc_cidrs=["100.64.0.0/16"])
        eni = self.create_eni(w)
        self.attach(w, eni, 1)
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                             SecondaryPrivateIpAddressCount=2)
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=w["primary_eni"], SecondaryPrivateIpAddressCount=1)
        view = admin("GET", f"/_shim/imds/{w['instance_id']}")
        self.assertEqual((view["instance_type"], view["az"], view["region"], view["local_ipv4"], view["mac"]),
                         ("t3.medium", "us-west-2a", "us-west-2", "10.0.1.4", w["mac"]))
        primary, second = view["interfaces"]
        self.assertEqual(primary["device_number"], 0)
        self.assertEqual(primary["local_ipv4s"], ["10.0.1.4", "10.0.1.8"])
        self.assertEqual(second, {
            "mac": eni["MacAddress"], "device_number": 1, "network_card": 0,
            "interface_id": eni["NetworkInterfaceId"], "subnet_id": w["subnet_id"], "subnet_cidr": "10.0.1.0/24",
            "vpc_id": w["vpc_id"], "vpc_cidrs": ["10.0.0.0/16", "100.64.0.0/16"],
            "local_ipv4s": ["10.0.1.5", "10.0.1.6", "10.0.1.7"], "ipv4_prefixes": [],
            "security_group_ids": w["security_group_ids"], "interface_type": "interface",
            "ipv6s": [], "ipv6_prefixes": [], "subnet_ipv6_cidrs": [], "vpc_ipv6_cidrs": []})
        self.assertIsNone(view["ipv6"])
        admin("POST", "/_shim/vpc-cidr", {"vpc_id": w["vpc_id"], "cidr": "100.65.0.0/16"})
        self.assertEqual(admin("GET", f"/_shim/imds/{w['instance_id']}")["interfaces"][0]["vpc_cidrs"][-1],
                         "100.65.0.0/16")
        with self.assertRaises(urllib.error.HTTPError) as ctx:
            admin("GET", "/_shim/imds/i-0000000000000000")
        self.assertEqual(ctx.exception.code, 404)

    def test_second_instance_reuses_the_subnet(self):
        w = self.world()
        w2 = self.world(vpc_id=w["vpc_id"], subnet_id=w["subnet_id"])
        self.assertEqual((w2["subnet_id"], w2["primary_ip"]), (w["subnet_id"], "10.0.1.5"))
        self.assertEqual(w2["security_group_ids"], w["security_group_ids"])

    def test_reset(self):
        w = self.world()
        eni = self.create_eni(w, Ipv4PrefixCount=1)
        admin("POST", "/_shim/faults", {"kind": "latency", "latency_ms": 10, "count": -1})
        admin("POST", "/_shim/reset")
        self.assertEqual(admin("GET", "/_shim/enis"), [])
        self.assertEqual(admin("GET", "/_shim/faults"), [])
        self.assertEqual(admin("GET", "/_shim/calls")["total"], 0)
        self.assertEqual(self.ec2.describe_network_interfaces()["NetworkInterfaces"], [])
        w = self.world()
        self.assertEqual(w["primary_ip"], "10.0.1.4")
        self.assertEqual(self.create_eni(w, Ipv4PrefixCount=1)["Ipv4Prefixes"], eni["Ipv4Prefixes"])
        # the Amazon-provided /56s start over too
        self.assertEqual(self.world(ipv6=True)["vpc_ipv6_cidr"], "2600:1f14:0:100::/56")


class Ipv6(ShimTest):
    """What an EKS IPv6 cluster asks of EC2: a dual-stack VPC, /80 prefixes on the primary ENI."""

    def v6(self, eni_id):
        got = self.describe(eni_id)
        return ([a["Ipv6Address"] for a in got.get("Ipv6Addresses", [])],
                [p["Ipv6Prefix"] for p in got.get("Ipv6Prefixes", [])])

    def test_vpc_and_subnet_cidrs(self):
        w = self.world(ipv6=True)
        self.assertEqual((w["vpc_ipv6_cidr"], w["subnet_ipv6_cidr"], w["ipv6"]),
                         ("2600:1f14:0:100::/56", "2600:1f14:0:100::/64", "2600:1f14:0:100::4"))
        vpc = self.ec2.describe_vpcs(VpcIds=[w["vpc_id"]])["Vpcs"][0]
        self.assertEqual([(a["Ipv6CidrBlock"], a["Ipv6CidrBlockState"]["State"], a["Ipv6Pool"])
                          for a in vpc["Ipv6CidrBlockAssociationSet"]],
                         [("2600:1f14:0:100::/56", "associated", "Amazon")])
        self.assertEqual(vpc["CidrBlock"], "10.0.0.0/16")
        subnet = self.ec2.describe_subnets(SubnetIds=[w["subnet_id"]])["Subnets"][0]
        self.assertEqual([(a["Ipv6CidrBlock"], a["Ipv6CidrBlockState"]["State"])
                          for a in subnet["Ipv6CidrBlockAssociationSet"]],
                         [("2600:1f14:0:100::/64", "associated")])
        self.assertTrue(subnet["AssignIpv6AddressOnCreation"])
        self.assertEqual(subnet["AvailableIpAddressCount"], 250)  # IPv4 accounting is unchanged
        # the primary ENI's address, in both describes
        self.assertEqual(self.v6(w["primary_eni"]), (["2600:1f14:0:100::4"], []))
        instance = self.ec2.describe_instances(InstanceIds=[w["instance_id"]])["Reservations"][0]["Instances"][0]
        self.assertEqual([a["Ipv6Address"] for a in instance["NetworkInterfaces"][0]["Ipv6Addresses"]],
                         ["2600:1f14:0:100::4"])
        # another subnet of the VPC: the next /64; another instance in the subnet: the next address
        other = admin("POST", "/_shim/subnet", {"vpc_id": w["vpc_id"], "cidr": "10.0.2.0/24", "ipv6": True})
        self.assertEqual((other["ipv6_cidr"], other["vpc_ipv6_cidrs"]),
                         ("2600:1f14:0:101::/64", ["2600:1f14:0:100::/56"]))
        beside = self.world(vpc_id=w["vpc_id"], subnet_id=w["subnet_id"], ipv6=True)
        self.assertEqual((beside["ipv6"], beside["subnet_ipv6_cidr"]), ("2600:1f14:0:100::5", w["subnet_ipv6_cidr"]))
        # another VPC: the next /56, also through the EC2 API
        self.assertEqual(self.world(ipv6=True)["vpc_ipv6_cidr"], "2600:1f14:0:200::/56")
        api = self.ec2.create_vpc(CidrBlock="10.9.0.0/16", AmazonProvidedIpv6CidrBlock=True)["Vpc"]
        self.assertEqual(api["Ipv6CidrBlockAssociationSet"][0]["Ipv6CidrBlock"], "2600:1f14:0:300::/56")
        # IPv4 only unless asked
        plain = self.world()
        self.assertNotIn("ipv6", plain)
        self.assertEqual(self.ec2.describe_subnets(SubnetIds=[plain["subnet_id"]])["Subnets"][0]
                         .get("Ipv6CidrBlockAssociationSet", []), [])

    def test_prefixes_assign_describe_unassign(self):
        w = self.world(instance_type="m5.large", ipv6=True)  # 10 IPv6 slots per ENI
        eni_id = w["primary_eni"]
        got = self.ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=2)
        prefixes = got["AssignedIpv6Prefixes"]
        self.assertEqual(prefixes, ["2600:1f14:0:100:1::/80", "2600:1f14:0:100:2::/80"])
        self.assertNotIn("AssignedIpv6Addresses", got)
        subnet = ipaddress.ip_network(w["subnet_ipv6_cidr"])
        nets = [ipaddress.ip_network(p) for p in prefixes]
        self.assertTrue(all(n.subnet_of(subnet) and n.prefixlen == 80 for n in nets))
        self.assertFalse(nets[0].overlaps(nets[1]))
        self.assertFalse(any(ipaddress.ip_address(w["ipv6"]) in n for n in nets))
        self.assertEqual(self.v6(eni_id), ([w["ipv6"]], prefixes))
        # the filters ipamd uses still find the ENI
        found = self.ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.instance-id", "Values": [w["instance_id"]]}])["NetworkInterfaces"]
        self.assertEqual([p["Ipv6Prefix"] for p in found[0]["Ipv6Prefixes"]], prefixes)
        view = admin("GET", f"/_shim/imds/{w['instance_id']}")
        self.assertEqual(view["ipv6"], w["ipv6"])
        iface = view["interfaces"][0]
        self.assertEqual((iface["ipv6s"], iface["ipv6_prefixes"], iface["subnet_ipv6_cidrs"], iface["vpc_ipv6_cidrs"]),
                         ([w["ipv6"]], prefixes, [w["subnet_ipv6_cidr"]], [w["vpc_ipv6_cidr"]]))
        enis = {e["id"]: e for e in admin("GET", "/_shim/enis")}
        self.assertEqual((enis[eni_id]["ipv6s"], enis[eni_id]["ipv6_prefixes"]), ([w["ipv6"]], prefixes))

        # a second ENI never overlaps the first one's addresses or prefixes
        eni = self.create_eni(w, Ipv6PrefixCount=1)  # and one address: AssignIpv6AddressOnCreation
        self.assertEqual(([a["Ipv6Address"] for a in eni["Ipv6Addresses"]], eni["Ipv6Prefixes"]),
                         (["2600:1f14:0:100::5"], [{"Ipv6Prefix": "2600:1f14:0:100:3::/80"}]))
        self.attach(w, eni, 1)
        self.assertEc2Error("InvalidIPAddress.InUse", self.ec2.assign_ipv6_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv6Addresses=["2600:1f14:0:100:1::9"])
        self.assertEc2Error("InvalidParameterValue", self.ec2.assign_ipv6_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv6Prefixes=["2600:1f14:0:100:2::/80"])
        self.assertEc2Error("InvalidParameterValue", self.ec2.assign_ipv6_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv6Prefixes=["2600:1f14:0:101::/80"])
        self.assertEc2Error("InvalidParameterCombination", self.ec2.assign_ipv6_addresses,
                            NetworkInterfaceId=eni_id, Ipv6Prefixes=["2600:1f14:0:100:9::/80"], Ipv6PrefixCount=1)
        # addresses: only the new ones in the answer, from outside every prefix
        got = self.ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6AddressCount=2)
        self.assertEqual(got["AssignedIpv6Addresses"], ["2600:1f14:0:100::6", "2600:1f14:0:100::7"])
        got = self.ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Addresses=["2600:1f14:0:100:0:0:0:20"])
        self.assertEqual(got["AssignedIpv6Addresses"], ["2600:1f14:0:100::20"])

        # unassign a prefix and an address; the freed /80 is the next one handed out
        got = self.ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=[prefixes[0]],
                                               Ipv6Addresses=["2600:1f14:0:100::6"])
        self.assertEqual((got["UnassignedIpv6Prefixes"], got["UnassignedIpv6Addresses"]),
                         ([prefixes[0]], ["2600:1f14:0:100::6"]))
        self.assertEqual(self.v6(eni_id), ([w["ipv6"], "2600:1f14:0:100::7", "2600:1f14:0:100::20"], [prefixes[1]]))
        self.assertEqual(admin("GET", f"/_shim/imds/{w['instance_id']}")["interfaces"][0]["ipv6_prefixes"],
                         [prefixes[1]])
        self.assertEc2Error("InvalidParameterValue", self.ec2.unassign_ipv6_addresses,
                            NetworkInterfaceId=eni_id, Ipv6Prefixes=[prefixes[0]])
        self.assertEc2Error("InvalidParameterValue", self.ec2.unassign_ipv6_addresses,
                            NetworkInterfaceId=eni_id, Ipv6Addresses=["2600:1f14:0:100::6"])
        self.assertEqual(self.ec2.assign_ipv6_addresses(NetworkInterfaceId=eni["NetworkInterfaceId"],
                                                        Ipv6PrefixCount=1)["AssignedIpv6Prefixes"], [prefixes[0]])
        self.ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=[prefixes[1]])
        self.assertEqual(self.v6(eni_id)[1], [])
        self.assertNotIn("Ipv6Prefixes", self.describe(eni_id))

    def test_limit_counts_prefixes_and_addresses(self):
        w = self.world(instance_type="t3.medium", ipv6=True)  # 6 IPv6 slots; the primary address takes one
        eni_id = w["primary_eni"]
        self.ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=4)
        before = self.v6(eni_id)
        err = self.assertEc2Error("InvalidParameterValue", self.ec2.assign_ipv6_addresses,
                                  NetworkInterfaceId=eni_id, Ipv6PrefixCount=2)
        self.assertIn("limit of 6", str(err))
        self.assertEqual(self.v6(eni_id), before)  # a refusal changes nothing
        self.ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6AddressCount=1)
        self.assertEc2Error("InvalidParameterValue", self.ec2.assign_ipv6_addresses,
                            NetworkInterfaceId=eni_id, Ipv6AddressCount=1)
        self.assertEc2Error("InvalidParameterValue", self.ec2.assign_ipv6_addresses,
                            NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)
        self.assertEqual(len(self.v6(eni_id)[0]) + len(self.v6(eni_id)[1]), 6)
        # the IPv4 slots are separate
        self.ec2.assign_private_ip_addresses(NetworkInterfaceId=eni_id, SecondaryPrivateIpAddressCount=5)

    def test_ipv4_only_subnet_refuses(self):
        w = self.world()
        for kw in ({"Ipv6PrefixCount": 1}, {"Ipv6AddressCount": 1}, {"Ipv6Addresses": ["2600:1f14:0:100::4"]}):
            err = self.assertEc2Error("InvalidParameterValue", self.ec2.assign_ipv6_addresses,
                                      NetworkInterfaceId=w["primary_eni"], **kw)
            self.assertIn("no IPv6 CIDR block", str(err))
        self.assertEc2Error("InvalidParameterValue", self.create_eni, w, Ipv6AddressCount=1)
        self.assertEc2Error("InvalidParameterValue", self.create_eni, w, Ipv6PrefixCount=1)
        self.assertEqual(len(admin("GET", "/_shim/enis")), 1)
        self.assertEqual(self.v6(w["primary_eni"]), ([], []))
        view = admin("GET", f"/_shim/imds/{w['instance_id']}")
        self.assertIsNone(view["ipv6"])
        self.assertEqual([view["interfaces"][0][k] for k in ("ipv6s", "ipv6_prefixes", "subnet_ipv6_cidrs",
                                                              "vpc_ipv6_cidrs")], [[], [], [], []])
        self.assertEc2Error("MissingParameter", self.ec2.assign_ipv6_addresses, NetworkInterfaceId=w["primary_eni"])

    def test_create_delete_and_terminate_free_what_they_held(self):
        w = self.world(ipv6=True)
        eni = self.create_eni(w, Ipv6PrefixCount=1, Ipv6AddressCount=2)
        self.assertEqual([a["Ipv6Address"] for a in eni["Ipv6Addresses"]], ["2600:1f14:0:100::5", "2600:1f14:0:100::6"])
        self.assertEqual(eni["Ipv6Prefixes"], [{"Ipv6Prefix": "2600:1f14:0:100:1::/80"}])
        self.assertEc2Error("InvalidParameterCombination", self.create_eni, w,
                            Ipv6Addresses=[{"Ipv6Address": "2600:1f14:0:100::9"}], Ipv6AddressCount=1)
        explicit = self.create_eni(w, Ipv6Addresses=[{"Ipv6Address": "2600:1f14:0:100::9"}])
        self.assertEqual([a["Ipv6Address"] for a in explicit["Ipv6Addresses"]], ["2600:1f14:0:100::9"])
        self.ec2.delete_network_interface(NetworkInterfaceId=eni["NetworkInterfaceId"])
        again = self.create_eni(w, Ipv6PrefixCount=1)
        self.assertEqual(([a["Ipv6Address"] for a in again["Ipv6Addresses"]], again["Ipv6Prefixes"]),
                         (["2600:1f14:0:100::5"], [{"Ipv6Prefix": "2600:1f14:0:100:1::/80"}]))
        self.ec2.assign_ipv6_addresses(NetworkInterfaceId=w["primary_eni"], Ipv6PrefixCount=1)
        self.ec2.terminate_instances(InstanceIds=[w["instance_id"]])  # its primary ENI goes with it
        self.assertEqual(self.create_eni(w, Ipv6PrefixCount=1)["Ipv6Prefixes"],
                         [{"Ipv6Prefix": "2600:1f14:0:100:2::/80"}])
        image = self.ec2.describe_images(Owners=["amazon"])["Images"][0]["ImageId"]
        run = self.ec2.run_instances(ImageId=image, MinCount=1, MaxCount=1, SubnetId=w["subnet_id"],
                                     InstanceType="t3.medium", Ipv6AddressCount=2)["Instances"][0]
        self.assertEqual([a["Ipv6Address"] for a in run["NetworkInterfaces"][0]["Ipv6Addresses"]],
                         ["2600:1f14:0:100::6", "2600:1f14:0:100::7"])  # ::4, ::5 and ::9 are the ENIs'
        plain = self.world()
        self.assertEc2Error("InvalidParameterValue", self.ec2.run_instances, ImageId=image, MinCount=1, MaxCount=1,
                            SubnetId=plain["subnet_id"], InstanceType="t3.medium", Ipv6AddressCount=1)

    def test_calls_and_faults(self):
        w = self.world(ipv6=True)
        eni_id = w["primary_eni"]
        admin("POST", "/_shim/faults", {"action": "AssignIpv6Addresses", "kind": "throttle"})
        self.assertEc2Error("RequestLimitExceeded", self.ec2.assign_ipv6_addresses,
                            NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)
        admin("POST", "/_shim/faults", {"action": "AssignIpv6Addresses", "kind": "noop"})
        got = self.ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)
        self.assertEqual(got.get("AssignedIpv6Prefixes", []), [])
        self.assertEqual(self.v6(eni_id)[1], [])
        prefix = self.ec2.assign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6PrefixCount=1)["AssignedIpv6Prefixes"]
        admin("POST", "/_shim/faults", {"action": "UnassignIpv6Addresses", "kind": "error", "code": "InternalError"})
        err = self.assertEc2Error("InternalError", self.ec2.unassign_ipv6_addresses,
                                  NetworkInterfaceId=eni_id, Ipv6Prefixes=prefix)
        self.assertEqual(err.response["ResponseMetadata"]["HTTPStatusCode"], 500)
        self.assertEqual(self.v6(eni_id)[1], prefix)
        self.ec2.unassign_ipv6_addresses(NetworkInterfaceId=eni_id, Ipv6Prefixes=prefix)
        calls = admin("GET", "/_shim/calls")
        self.assertEqual({k: calls["by_action"][k] for k in ("AssignIpv6Addresses", "UnassignIpv6Addresses")},
                         {"AssignIpv6Addresses": 3, "UnassignIpv6Addresses": 2})
        self.assertEqual(calls["throttled"], 1)


CNI_TAG = "kubernetes.io/role/cni"


class CustomNetworking(ShimTest):
    """What ipamd asks of EC2 for ENIConfig subnets and subnet discovery."""

    def subnet(self, w, cidr, **kw):
        return admin("POST", "/_shim/subnet", {"vpc_id": w["vpc_id"], "cidr": cidr, **kw})

    def admin_error(self, path, body):
        with self.assertRaises(urllib.error.HTTPError) as ctx:
            admin("POST", path, body)
        self.assertEqual(ctx.exception.code, 400)
        return json.load(ctx.exception)

    def subnet_ids(self, **kw):
        return {s["SubnetId"] for s in self.ec2.describe_subnets(**kw)["Subnets"]}

    def test_describe_subnets_filters_counts_and_faults(self):
        w = self.world()
        a = self.subnet(w, "100.64.0.0/24", vpc_cidr="100.64.0.0/16", tags={CNI_TAG: "1"})
        self.assertEqual((a["cidr"], a["az"], a["vpc_cidrs"]), ("100.64.0.0/24", "us-west-2a",
                                                               ["10.0.0.0/16", "100.64.0.0/16"]))
        b = self.subnet(w, "100.64.1.0/24", az="us-west-2b", tags={CNI_TAG: ""})
        admin("POST", "/_shim/calls/reset")
        vpc = {"Name": "vpc-id", "Values": [w["vpc_id"]]}
        self.assertEqual(self.subnet_ids(Filters=[vpc]), {w["subnet_id"], a["subnet_id"], b["subnet_id"]})
        self.assertEqual(self.subnet_ids(Filters=[vpc, {"Name": "availability-zone", "Values": ["us-west-2a"]}]),
                         {w["subnet_id"], a["subnet_id"]})
        self.assertEqual(self.subnet_ids(Filters=[vpc, {"Name": f"tag:{CNI_TAG}", "Values": ["1"]}]), {a["subnet_id"]})
        self.assertEqual(self.subnet_ids(Filters=[{"Name": f"tag:{CNI_TAG}", "Values": [""]}]), {b["subnet_id"]})
        self.assertEqual(self.subnet_ids(Filters=[{"Name": "tag-key", "Values": [CNI_TAG]}]),
                         {a["subnet_id"], b["subnet_id"]})
        got = self.ec2.describe_subnets(SubnetIds=[a["subnet_id"]])["Subnets"]
        self.assertEqual([(s["SubnetId"], s["CidrBlock"], s["AvailabilityZone"], s["VpcId"], s["Tags"],
                           s["AvailableIpAddressCount"], s.get("Ipv6CidrBlockAssociationSet", [])) for s in got],
                         [(a["subnet_id"], "100.64.0.0/24", "us-west-2a", w["vpc_id"], [{"Key": CNI_TAG, "Value": "1"}],
                           251, [])])
        # ENI addresses and every address of a /28 are taken
        self.ec2.create_network_interface(SubnetId=a["subnet_id"], SecondaryPrivateIpAddressCount=2, Ipv4PrefixCount=1)
        got = self.ec2.describe_subnets(SubnetIds=[a["subnet_id"]])["Subnets"][0]
        self.assertEqual(got["AvailableIpAddressCount"], 251 - 3 - 16)
        admin("POST", "/_shim/faults", {"action": "DescribeSubnets", "kind": "error", "code": "UnauthorizedOperation"})
        err = self.assertEc2Error("UnauthorizedOperation", self.ec2.describe_subnets, Filters=[vpc])
        self.assertEqual(err.response["ResponseMetadata"]["HTTPStatusCode"], 403)
        self.assertEqual(admin("GET", "/_shim/calls")["by_action"],
                         {"DescribeSubnets": 8, "CreateNetworkInterface": 1})

    def test_admin_subnet_and_security_group_refusals(self):
        w = self.world()
        self.assertEqual(self.admin_error("/_shim/subnet", {"vpc_id": w["vpc_id"], "cidr": "100.64.0.0/24"})["code"],
                         "InvalidSubnet.Range")  # outside the VPC: give vpc_cidr or call /_shim/vpc-cidr first
        admin("POST", "/_shim/vpc-cidr", {"vpc_id": w["vpc_id"], "cidr": "100.64.0.0/16"})
        self.subnet(w, "100.64.0.0/24")
        self.assertEqual(self.admin_error("/_shim/subnet", {"vpc_id": w["vpc_id"], "cidr": "100.64.0.0/25"})["code"],
                         "InvalidSubnet.Conflict")
        self.assertEqual(self.admin_error("/_shim/subnet", {"vpc_id": w["vpc_id"], "cidr": "100.64.1.0/24",
                                                            "az": "us-east-1a"})["code"], "InvalidParameterValue")
        self.assertEqual(self.admin_error("/_shim/subnet", {"vpc_id": "vpc-0000", "cidr": "10.0.2.0/24"})["code"],
                         "InvalidVpcID.NotFound")
        sg = admin("POST", "/_shim/security-group", {"vpc_id": w["vpc_id"], "name": "pods"})
        self.assertEqual(admin("POST", "/_shim/security-group", {"vpc_id": w["vpc_id"], "name": "pods"}), sg)
        node = admin("POST", "/_shim/security-group", {"vpc_id": w["vpc_id"], "name": "shim-node"})
        self.assertEqual([node["group_id"]], w["security_group_ids"])
        self.assertEqual(admin("GET", "/_shim/calls")["total"], 0)

    def test_eni_in_a_custom_subnet_has_its_own_subnet_and_groups(self):
        w = self.world(extra_vpc_cidrs=["100.64.0.0/16"])
        a = self.subnet(w, "100.64.0.0/24")
        pods = admin("POST", "/_shim/security-group", {"vpc_id": w["vpc_id"], "name": "pods"})["group_id"]
        eni = self.ec2.create_network_interface(SubnetId=a["subnet_id"], Groups=[pods],
                                                SecondaryPrivateIpAddressCount=1)["NetworkInterface"]
        self.attach(w, eni, 1)
        eni_id = eni["NetworkInterfaceId"]
        # moto would add the instance's group once attached
        self.assertEqual([g["GroupId"] for g in self.describe(eni_id)["Groups"]], [pods])
        self.assertEqual(self.ec2.describe_network_interfaces(
            Filters=[{"Name": "group-id", "Values": [pods]}])["NetworkInterfaces"][0]["NetworkInterfaceId"], eni_id)
        view = admin("GET", f"/_shim/imds/{w['instance_id']}")["interfaces"]
        self.assertEqual([(i["subnet_id"], i["subnet_cidr"], i["security_group_ids"], i["local_ipv4s"]) for i in view],
                         [(w["subnet_id"], "10.0.1.0/24", w["security_group_ids"], ["10.0.1.4"]),
                          (a["subnet_id"], "100.64.0.0/24", [pods], ["100.64.0.4", "100.64.0.5"])])
        self.assertEqual(view[1]["vpc_cidrs"], ["10.0.0.0/16", "100.64.0.0/16"])
        by_id = {e["id"]: e for e in admin("GET", "/_shim/enis")}
        mine = by_id[eni_id]
        self.assertEqual((mine["subnet_id"], mine["subnet_cidr"], mine["security_group_ids"], mine["interface_type"]),
                         (a["subnet_id"], "100.64.0.0/24", [pods], "interface"))
        # moto invents unknown groups and takes another VPC's
        self.assertEc2Error("InvalidGroup.NotFound", self.ec2.create_network_interface,
                            SubnetId=a["subnet_id"], Groups=["sg-0123456789abcdef0"])
        other_vpc = self.ec2.create_vpc(CidrBlock="10.1.0.0/16")["Vpc"]["VpcId"]
        other_sg = admin("POST", "/_shim/security-group", {"vpc_id": other_vpc, "name": "x"})["group_id"]
        err = self.assertEc2Error("InvalidParameter", self.ec2.create_network_interface,
                                  SubnetId=a["subnet_id"], Groups=[other_sg])
        self.assertIn("belong to different networks", str(err))
        # another AZ is refused; another VPC in the same AZ is a multi-VPC attachment, which EC2 allows
        b = self.subnet(w, "100.64.1.0/24", az="us-west-2b")
        far = self.ec2.create_network_interface(SubnetId=b["subnet_id"])["NetworkInterface"]
        err = self.assertEc2Error("InvalidParameterCombination", self.attach, w, far, 2)
        self.assertIn("same availability zone", str(err))
        c = admin("POST", "/_shim/subnet", {"vpc_id": other_vpc, "cidr": "10.1.0.0/24"})
        self.attach(w, self.ec2.create_network_interface(SubnetId=c["subnet_id"])["NetworkInterface"], 2)
        third = admin("GET", f"/_shim/imds/{w['instance_id']}")["interfaces"][2]
        self.assertEqual((third["vpc_id"], third["vpc_cidrs"], third["subnet_cidr"]),
                         (other_vpc, ["10.1.0.0/16"], "10.1.0.0/24"))

    def test_interface_types(self):
        w = self.world(instance_type="c5n.18xlarge")  # one EFA
        trunk = self.create_eni(w, InterfaceType="trunk")
        efa = self.create_eni(w, InterfaceType="efa")
        self.assertEqual((trunk["InterfaceType"], efa["InterfaceType"]), ("trunk", "efa"))
        self.attach(w, trunk, 1)
        self.attach(w, efa, 2)
        got = self.ec2.describe_network_interfaces(
            Filters=[{"Name": "attachment.instance-id", "Values": [w["instance_id"]]}])["NetworkInterfaces"]
        self.assertEqual(sorted((e["Attachment"]["DeviceIndex"], e["InterfaceType"]) for e in got),
                         [(0, "interface"), (1, "trunk"), (2, "efa")])
        self.assertEqual([i["interface_type"] for i in admin("GET", f"/_shim/imds/{w['instance_id']}")["interfaces"]],
                         ["interface", "trunk", "efa"])
        # EFA-only interfaces carry no IP address at all
        efa_only = self.create_eni(w, InterfaceType="efa-only")
        self.assertEqual((efa_only.get("PrivateIpAddress"), efa_only["PrivateIpAddresses"]), (None, []))
        self.assertEc2Error("InvalidParameterCombination", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=efa_only["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=1)
        self.assertEc2Error("InvalidParameterCombination", self.create_eni, w, InterfaceType="efa-only",
                            SecondaryPrivateIpAddressCount=1)
        err = self.assertEc2Error("InvalidParameterCombination", self.attach, w, efa_only, 3)
        self.assertIn("limit of 1", str(err))
        types = {e["id"]: e["interface_type"] for e in admin("GET", "/_shim/enis")}
        self.assertEqual(types[efa_only["NetworkInterfaceId"]], "efa-only")
        self.assertEc2Error("InvalidParameterValue", self.create_eni, w, InterfaceType="bogus")

    def test_small_subnet_fills_up(self):
        w = self.world()
        small = self.subnet(w, "10.0.2.0/28")  # 16 addresses, 5 reserved: 11 usable
        eni = self.ec2.create_network_interface(SubnetId=small["subnet_id"],
                                                SecondaryPrivateIpAddressCount=9)["NetworkInterface"]
        self.assertEqual(eni["PrivateIpAddress"], "10.0.2.4")

        def available():
            return self.ec2.describe_subnets(SubnetIds=[small["subnet_id"]])["Subnets"][0]["AvailableIpAddressCount"]
        self.assertEqual(available(), 1)
        last = self.ec2.create_network_interface(SubnetId=small["subnet_id"])["NetworkInterface"]
        self.assertEqual(last["PrivateIpAddress"], "10.0.2.14")
        self.assertEqual(available(), 0)
        self.assertEc2Error("InsufficientFreeAddressesInSubnet", self.ec2.create_network_interface,
                            SubnetId=small["subnet_id"])
        self.assertEc2Error("InsufficientFreeAddressesInSubnet", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], SecondaryPrivateIpAddressCount=1)
        self.assertEc2Error("InsufficientCidrBlocks", self.ec2.assign_private_ip_addresses,
                            NetworkInterfaceId=eni["NetworkInterfaceId"], Ipv4PrefixCount=1)
        self.ec2.delete_network_interface(NetworkInterfaceId=last["NetworkInterfaceId"])
        self.assertEqual(available(), 1)


class Process(unittest.TestCase):
    def test_sigterm_exits_cleanly(self):
        proc, port = start_shim("--latency-ms", "1")
        try:
            self.assertEqual(admin("GET", "/_shim/latency", port=port), {"ms": 1})
            self.assertIn(f"listening on http://127.0.0.1:{port}", proc.stdout.readline())
        finally:
            proc.send_signal(signal.SIGTERM)
            self.assertEqual(proc.wait(timeout=10), 0)
            proc.stdout.close()


if __name__ == "__main__":
    unittest.main()
