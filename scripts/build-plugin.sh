#!/usr/bin/env bash
# Usage: scripts/build-plugin.sh [aws-cni|egress-cni]   (default: aws-cni)
# Builds a shipped plugin (`aws-cni`, or `egress-cni`, chained after it): release, and
# statically linked, because the entrypoint copies it onto the host, whose C library is not the
# image's (upstream's Go plugins are static for the same reason). It is also not
# position-independent, as Go's binaries are not: with neither the dynamic loader nor start-up
# relocations, an exec costs about half the CPU (0.27 ms against 0.5 ms for a dynamic PIE,
# measured with perf stat), on every ADD and DEL. Built with an explicit --target so the flags
# reach only this build, not build scripts or the daemons.
# Prints the binary's path.
set -euo pipefail
cd "$(dirname "$0")/.."
plugin=${1:-aws-cni}
case "$plugin" in
  aws-cni|egress-cni) ;;
  *) echo "build-plugin.sh: no plugin $plugin (aws-cni or egress-cni)" >&2; exit 2 ;;
esac
triple=$(rustc -vV | sed -n 's/^host: //p')
RUSTFLAGS="-C target-feature=+crt-static -C relocation-model=static" \
  cargo build --release --locked -p "$plugin" --target "$triple" >&2
echo "target/$triple/release/$plugin"
