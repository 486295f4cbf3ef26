#!/usr/bin/env bash
# Chaos drills against a real mesh on hosts in network namespaces (needs
# root, or sudo, and iproute2). Each drill prints its accounting table and
# the script exits non-zero when a promise broke.
#
#   scripts/chaos.sh all                      # every drill, 60 s each, soak 600 s
#   scripts/chaos.sh kill --duration 120      # one drill
#   scripts/chaos.sh soak --soak-duration 600 --nodes 3
#
# Drills: kill, kill-mid-stream, partition-leader, hang-backend, restart-all,
# add-nodes, rolling-upgrade, soak. --no-resume: clients turn stream resuming off.
# Flags: --nodes N (5), --duration S (60), --soak-duration S (600),
# --clients N (8), --every S (4), --hold S (6). See `llmesh-chaos --help`.
set -euo pipefail
cd "$(dirname "$0")/.."
cargo build --quiet --locked -p llmesh --bin llmesh -p llmesh-tests --bin llmesh-chaos
if [ "$(id -u)" = 0 ]; then
  exec target/debug/llmesh-chaos "$@"
else
  exec sudo --preserve-env=PATH target/debug/llmesh-chaos "$@"
fi
