#!/usr/bin/env bash
# The benchmarks (not run in CI; `target/debug/bench --smoke` runs in the test command so they do
# not rot). Builds the shipped plugin (release, static), the daemons and rig without LTO (bench-build),
# runs the criterion datastore benchmark, then the end-to-end figures on the simulated VPC.
# Prints one table; JSON in target/bench/results.json; then the fleet simulation
# (target/bench/fleet.json).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
plugin=$(scripts/build-plugin.sh)
cargo build --profile bench-build --workspace --bins
cargo bench --profile bench-build -p ipamd --bench datastore -- --warm-up-time 1 --measurement-time 3
AWS_CNI_BIN_DIR=target/bench-build AWS_CNI_SHIPPED="$plugin" \
  target/bench-build/bench "$@"
# The fleet: 50 ipamd processes against one account-wide EC2 budget (target/bench/fleet.json).
AWS_CNI_BIN_DIR=target/bench-build exec target/bench-build/fleet "$@"
