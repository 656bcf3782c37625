#!/usr/bin/env bash
# Run every test: unit, property, kernel (network namespaces), real-socket daemon tests and the
# libcni-driven chain. Needs root; installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The cross-binary tests run target/debug/{aws-cni,ipamd}: build every binary first.
cargo build --workspace --bins --tests
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
cargo test --workspace --lib --bins --tests --no-fail-fast 2>&1 | tee "$log" || rc=$?
# One closing line over all test binaries.
awk '/^test result:/ { p += $4; f += $6 } END { printf "tests: %d passed, %d failed\n", p, f }' "$log"
exit "$rc"
