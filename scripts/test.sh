#!/usr/bin/env bash
# The test suite, as CI runs it: installs libtorch if missing, then `cargo test --release`.
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
cargo test --release "$@"
