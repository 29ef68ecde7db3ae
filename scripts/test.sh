#!/usr/bin/env bash
# Install (idempotent) and run the whole test suite: tiny models for most tests, the bundled model for the slow ones.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
exec "${PYTHON:-python3}" -m pytest -q -p no:cacheprovider "$@"
