#!/usr/bin/env bash
# Set up (first time, including SIPp from Debian's sip-tester) and run every test and the lint.
# Extra arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh sip-tester baresip-core linphone-cli openssl chromium
[ -d ../shared/testdata/rfc4475 ] || {
  echo "../shared/testdata/rfc4475 is missing: the tests read the RFC 4475 corpus from there" >&2; exit 1; }
.venv/bin/ruff check softpbx tests bench
exec .venv/bin/python -m pytest -q -p no:cacheprovider "$@"
