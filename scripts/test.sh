#!/usr/bin/env bash
# Run every test: unit, property, kernel (network namespaces), real-socket daemon tests and the
# libcni-driven chain. Needs root; installs what is missing first.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
# Lint gates: formatting and clippy (warnings are errors) before anything runs.
cargo fmt --all -- --check
cargo clippy --workspace --all-targets -- -D warnings
# The cross-binary tests run target/debug/{aws-cni,ipamd}: build every binary first.
cargo build --workspace --bins --tests
log=$(mktemp)
trap 'rm -f "$log"' EXIT
rc=0
cargo test --workspace --lib --bins --tests --no-fail-fast 2>&1 | tee "$log" || rc=$?
# The EC2 shim's own tests (moto behind our middleware), in the venv setup.sh made.
pylog=$(mktemp)
trap 'rm -f "$log" "$pylog"' EXIT
.venv/bin/python -m unittest discover -s tests/rig -p 'test_*.py' 2>&1 | tee "$pylog" || rc=$?
# The manifests, the Helm chart (rendered by Go's text/template) and the conflist template.
mlog=$(mktemp)
trap 'rm -f "$log" "$pylog" "$mlog"' EXIT
.venv/bin/python scripts/check-manifests.py 2>&1 | tee "$mlog" || rc=$?
# The benchmark in smoke mode (a few iterations of everything), so it does not rot.
if target/debug/bench --smoke --out target/bench/smoke.json > target/bench-smoke.log 2>&1; then
  echo "bench --smoke: ran"
else
  rc=1
  echo "FAIL bench --smoke (target/bench-smoke.log)" | tee -a "$mlog"
  tail -20 target/bench-smoke.log
fi
# The start-up comparison, one round, against the same binary (both paths of the mode run),
# with a short idle measure and a small burst.
if AWS_CNI_BASELINE_IPAMD=target/debug/ipamd target/debug/bench --startup 1 --idle 1 \
  --bursts 3 --out target/bench/startup-smoke.json > target/bench-startup-smoke.log 2>&1; then
  echo "bench --startup 1 --idle 1 --bursts 3: ran"
else
  rc=1
  echo "FAIL bench --startup 1 --idle 1 --bursts 3 (target/bench-startup-smoke.log)" | tee -a "$mlog"
  tail -20 target/bench-startup-smoke.log
fi
# The fleet simulation in smoke mode (4 nodes against an account-wide EC2 budget).
if target/debug/fleet --smoke --out target/bench/fleet-smoke.json > target/fleet-smoke.log 2>&1; then
  echo "fleet --smoke: ran"
else
  rc=1
  echo "FAIL fleet --smoke (target/fleet-smoke.log)" | tee -a "$mlog"
  tail -20 target/fleet-smoke.log
fi
# One closing line over all test binaries, the shim's suite and the manifest checks.
awk '/^test result:/ { p += $4; f += $6 } END { printf "%d %d\n", p, f }' "$log" | {
  read -r p f
  ran=$(sed -n 's/^Ran \([0-9]*\) tests\?.*/\1/p' "$pylog" | tail -1)
  pyfail=$(awk '/^FAILED \(/ { while (match($0, /[0-9]+/)) { n += substr($0, RSTART, RLENGTH); $0 = substr($0, RSTART + RLENGTH) } } END { print n + 0 }' "$pylog")
  ran=${ran:-0}; pyfail=${pyfail:-0}
  mok=$(sed -n 's/^manifests: \([0-9]*\) checks passed/\1/p' "$mlog")
  mfail=$(grep -c '^FAIL ' "$mlog" || true)
  echo "tests: $((p + ran - pyfail + ${mok:-0})) passed, $((f + pyfail + mfail)) failed"
}
exit "$rc"
