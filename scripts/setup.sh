#!/usr/bin/env bash
# Shared set-up for scripts/run.sh and scripts/test.sh: Debian packages, the venv, the package.
#   scripts/setup.sh [debian packages...]   (python3-venv is always ensured)
set -euo pipefail
cd "$(dirname "$0")/.."
need=()
python3 -c 'import sys; sys.exit(sys.version_info < (3, 11))' || {
  echo "softpbx needs Python 3.11 or newer (Debian 12 ships it)" >&2; exit 1; }
python3 -c 'import ensurepip, venv' 2>/dev/null || need+=(python3-venv)
for pkg in "$@"; do
  case "$pkg" in
    sip-tester) command -v sipp >/dev/null || need+=(sip-tester) ;;
    *) dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg") ;;
  esac
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" = 0 ] || SUDO="sudo"
  echo "installing Debian packages: ${need[*]}" >&2
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}" >/dev/null
fi
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -e ".[test]"
