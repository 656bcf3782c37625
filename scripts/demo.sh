#!/usr/bin/env bash
# The simulated cluster on this machine: the EC2 shim (moto), a VPC of network namespaces with a
# router and an "internet", two t3.medium nodes each running the real ipamd with its fake IMDS,
# pods created by libcni through aws-cni + portmap, and a report (ENIs and addresses per node,
# pod IPs, cross-node pings, the SNAT source the internet sees, a port mapping). Everything is
# removed at the end, pass or fail; `target/debug/sim down` clears what a killed run left.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
cargo build --workspace --bins
exec target/debug/sim run "$@"
