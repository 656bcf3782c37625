#!/usr/bin/env bash
# Install what the build and the tests need on a fresh Debian machine (run as root).
# Idempotent: packages already present are not reinstalled.
set -euo pipefail

pkgs=(iproute2 iptables nftables conntrack iputils-ping procps python3 python3-venv
      containernetworking-plugins golang-go golang-github-appc-cni-dev
      protobuf-compiler libprotobuf-dev kubectl openssl curl util-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "setup: installing ${missing[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "${missing[@]}" >/dev/null
fi
command -v cargo >/dev/null || { echo "setup: cargo not found (rustup toolchain expected)" >&2; exit 1; }
for c in fmt clippy; do
  cargo "$c" --version >/dev/null 2>&1 || { echo "setup: cargo $c missing (rustup component add ${c/fmt/rustfmt})" >&2; exit 1; }
done
[[ $(id -u) == 0 ]] || { echo "setup: the tests create network namespaces and need root" >&2; exit 1; }

# The EC2 API for the tests is moto behind tests/rig/ec2_shim.py, in a venv of its own.
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if ! "$ROOT/.venv/bin/python" -c 'import moto, boto3' 2>/dev/null; then
  echo "setup: creating $ROOT/.venv (moto, boto3)"
  python3 -m venv "$ROOT/.venv"
  "$ROOT/.venv/bin/pip" install -q 'moto[server]==5.2.5' 'boto3==1.44.5'
fi
"$ROOT/.venv/bin/python" -c 'import moto, boto3'
