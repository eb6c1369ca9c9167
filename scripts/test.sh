#!/usr/bin/env bash
# The test suite, as CI runs it: installs libtorch if missing, then `cargo test --release
# --no-fail-fast`, ending with one line of totals over every test binary.
# Extra arguments go to cargo test (e.g. `scripts/test.sh resume`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
if ! command -v chromium >/dev/null 2>&1; then
  if [ "${GMPQ_STRICT_TESTS:-}" = 1 ]; then
    echo "test: no chromium (apt-get install chromium), which the report's browser test needs" >&2
    exit 1
  fi
  echo "SKIPPED: the report's browser test (no chromium; apt-get install chromium, as .ci/run does)" >&2
fi
# --no-fail-fast: a failing test binary does not hide the others' results; the last line
# totals every binary's "test result" lines (cargo prints one per binary).
log="$(mktemp)"
trap 'rm -f "$log"' EXIT
set +e
cargo test --release --no-fail-fast "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}
set -e
awk -v status="$status" '
  /^test result:/ { passed += $4; failed += $6; ignored += $8; binaries++ }
  END {
    if (status != 0 && failed == 0) failed = 1  # a binary that did not build or run
    printf "%d test binaries, %d tests ignored\n", binaries, ignored
    printf "totals: %d passed, %d failed\n", passed, failed
  }' "$log"
exit "$status"
