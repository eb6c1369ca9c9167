#!/usr/bin/env bash
# The test suite, as CI runs it: installs libtorch if missing, then `cargo test --release`.
# Extra arguments go to cargo test (e.g. `scripts/test.sh resume`).
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
source "$root/scripts/env.sh"
cd "$root"
cargo test --release "$@"
