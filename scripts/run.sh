#!/usr/bin/env bash
# Set up (first time) and run softpbx on the shipped sip_profiles/ in the foreground.
# Extra arguments go to `softpbx run`, e.g. --set crm.webhook_url=http://127.0.0.1:8099/hook
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/softpbx run --profiles sip_profiles "$@"
