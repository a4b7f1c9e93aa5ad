#!/usr/bin/env bash
# Chaos run (scripts/chaos/): prefill and decode processes writing verifiable blocks while
# random ones are SIGKILLed and restarted; exits non-zero on a false success, a hang, an
# untyped failure or fd growth. Args pass through, e.g. `scripts/chaos.sh --seconds 60 --json out.json`.
# Transport and host from KVTRANSFER_TEST_TRANSPORT / KVTRANSFER_TEST_HOST (default tcp, 127.0.0.1).
set -euo pipefail
cd "$(dirname "$0")/.."
exec node --import @oxc-node/core/register scripts/chaos/main.ts "$@"
