#!/usr/bin/env bash
# The local simulated node: a node network namespace running ipamd (standalone: its ENIs come
# from a node file, since the EC2/IMDS layer is not built yet), two pods wired by aws-cni through
# libcni with portmap chained after it, and pings between them. Cleans up on exit, even on error.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
root=$(pwd)
work=$(mktemp -d /tmp/aws-cni-demo.XXXXXX)
node=awscni-demo-node
pods=(awscni-demo-a awscni-demo-b)
ipamd_pid=

del_namespaces() { for ns in "${pods[@]}" "$node"; do ip netns del "$ns" 2>/dev/null || true; done; }
cleanup() {
  [[ -n $ipamd_pid ]] && kill "$ipamd_pid" 2>/dev/null && wait "$ipamd_pid" 2>/dev/null || true
  del_namespaces
  rm -rf "$work"
}
trap cleanup EXIT
del_namespaces # leftovers of a demo that was killed

echo "== building the libcni client"
mkdir -p target/cniclient-build
(cd tests/cniclient && GOPATH="$root/target/cniclient-build:/usr/share/gocode" GO111MODULE=off \
  GOCACHE="$root/target/cniclient-build/cache" go build -o "$root/target/cniclient-build/cniclient" .)

ip netns add "$node"
ip -n "$node" link set lo up
ip -n "$node" addr add 10.0.1.10/32 dev lo
ip netns exec "$node" sysctl -qw net.ipv4.ip_forward=1
for p in "${pods[@]}"; do ip netns add "$p"; ip -n "$p" link set lo up; done

cat > "$work/node.json" <<JSON
{"instanceId":"i-0demo","instanceType":"t3.medium","vpcCidrs":["10.0.0.0/16"],
 "enis":[{"id":"eni-primary","deviceNumber":0,"subnetCidr":"10.0.1.0/24","primaryIp":"10.0.1.10",
          "ips":["10.0.1.11","10.0.1.12","10.0.1.13","10.0.1.14","10.0.1.15"]},
         {"id":"eni-second","deviceNumber":1,"subnetCidr":"10.0.1.0/24","primaryIp":"10.0.1.20",
          "ips":["10.0.1.21","10.0.1.22","10.0.1.23","10.0.1.24","10.0.1.25"]}]}
JSON
echo "== starting ipamd in $node"
ip netns exec "$node" env IPAMD_NODE_FILE="$work/node.json" IPAMD_SOCKET_PATH="$work/ipamd.sock" \
  AWS_VPC_K8S_CNI_BACKING_STORE="$work/ipam.json" AWS_VPC_K8S_CNI_LOG_FILE="$work/ipamd.log" \
  target/debug/ipamd &
ipamd_pid=$!
for _ in $(seq 100); do [[ -S $work/ipamd.sock ]] && break; sleep 0.05; done

mkdir -p "$work/bin"
ln -s "$root/target/debug/aws-cni" "$work/bin/aws-cni"
ln -s /usr/lib/cni/portmap "$work/bin/portmap"
cat > "$work/10-aws.conflist" <<JSON
{"cniVersion":"1.0.0","name":"aws-cni","plugins":[
 {"name":"aws-cni","type":"aws-cni","vethPrefix":"eni","mtu":"9001","pluginLogFile":"$work/plugin.log",
  "pluginLogLevel":"DEBUG","ipamdSocket":"$work/ipamd.sock","stateDir":"$work/state"},
 {"type":"portmap","capabilities":{"portMappings":true},"snat":true}]}
JSON

client() { ip netns exec "$node" target/cniclient-build/cniclient "$@"; }
declare -A ips
ports='[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]'
for p in "${pods[@]}"; do
  out=$(client add "$work/10-aws.conflist" "$work/bin" "$work/cache" "cid-$p" "/var/run/netns/$p" eth0 default "$p" "$ports")
  ports=
  ips[$p]=$(python3 -c 'import json,sys; print(json.load(sys.stdin)["ips"][0]["address"].split("/")[0])' <<<"$out")
done

echo
echo "== report"
echo "node $node (t3.medium, standalone ipamd)"
python3 - "$work/ipam.json" <<'PY'
import json, sys
d = json.load(open(sys.argv[1]))
for a in d["allocations"]:
    print(f"  pod {a['metadata']['k8sPodNamespace']}/{a['metadata']['k8sPodName']}: {a['ipv4']}")
PY
a=${pods[0]} b=${pods[1]}
if ip netns exec "$a" ping -c 2 -W 1 "${ips[$b]}" >/dev/null; then r=ok; else r=FAILED; fi
echo "  ping $a (${ips[$a]}) -> $b (${ips[$b]}): $r"
if ip netns exec "$node" ping -c 1 -W 1 "${ips[$a]}" >/dev/null; then r2=ok; else r2=FAILED; fi
echo "  ping node -> $a: $r2"
echo "  portmap: $(ip netns exec "$node" iptables-save -t nat | grep -o -m1 'to-destination [0-9.:]*' || echo none) (hostPort 8080 of $a)"
echo "  not yet simulated: EC2/IMDS (moto), the VPC router, a second node, SNAT to the internet"

ports='[{"hostPort":8080,"containerPort":80,"protocol":"tcp"}]'
for p in "${pods[@]}"; do
  client del "$work/10-aws.conflist" "$work/bin" "$work/cache" "cid-$p" "/var/run/netns/$p" eth0 default "$p" "$ports"
  ports=''
done
[[ $r == ok && $r2 == ok ]]
