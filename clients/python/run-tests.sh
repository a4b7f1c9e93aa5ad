#!/usr/bin/env bash
# Runs the Python client's tests: unit tests (framing, tags, errors, regions, the client
# against a scripted fake sidecar) and the end-to-end tests against real `kvtransfer serve`
# processes (node lib/cli.js serve), which are SKIPPED when the sidecar is not built.
#
#   clients/python/run-tests.sh [unittest args...]     e.g. -k transfer
#
# Environment: PYTHON (default python3), KVTRANSFER_NODE (the node binary),
# KVTRANSFER_CLI (the cli.js to serve from; default lib/cli.js of this repository).
# Exit status: unittest's (nonzero on a failure or error).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
python="${PYTHON:-python3}"
log="$(mktemp)"
trap 'rm -f "$log"' EXIT

"$python" -m unittest discover -s "$here/tests" -t "$here/tests" -v "$@" 2>&1 | tee "$log"
status=${PIPESTATUS[0]}

ran=$(grep -Eo '^Ran [0-9]+ tests?' "$log" | grep -Eo '[0-9]+' | tail -1)
skipped=$(grep -Ec ' \.\.\. skipped' "$log")
echo
echo "python client: ${ran:-0} tests, ${skipped} skipped, exit status ${status}"
if [ "$skipped" -gt 0 ]; then
  echo "skipped (count, reason):"
  grep -E ' \.\.\. skipped' "$log" | sed -E 's/.* \.\.\. skipped (.*)$/\1/' | sort | uniq -c
fi
exit "$status"
