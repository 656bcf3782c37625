#!/usr/bin/env bash
# Run every test: unit, property, kernel (network namespaces), real-socket daemon tests and the
# libcni-driven chain. Needs root; installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# The cross-binary tests run target/debug/{aws-cni,ipamd}: build every binary first.
cargo build --workspace --bins --tests
cargo test --workspace --no-fail-fast
