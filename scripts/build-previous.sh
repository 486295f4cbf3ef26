#!/usr/bin/env bash
# Builds the llmesh binary of an earlier commit (default: the previous
# release, PREVIOUS_RELEASE below) into target/previous/llmesh, for the
# mixed-version rolling-upgrade drill:
#
#   scripts/build-previous.sh [REF]
#   scripts/chaos.sh rolling-upgrade --from-binary target/previous/llmesh
#
# It builds in a temporary git worktree with its own target directory
# (target/previous-build, kept for the next run): sharing this checkout's
# would mix the two versions' crates, which cargo names alike.
set -euo pipefail
cd "$(dirname "$0")/.."
# The last commit of the previous release: wire protocol 1, gossip topic
# llmesh/state/2, before traces and the mesh-wide dashboard figures.
PREVIOUS_RELEASE=81054d68abb5fb0c8e83fc8522af540b6c54bcd5
ref="${1:-$PREVIOUS_RELEASE}"
if ! git cat-file -e "$ref^{commit}" 2>/dev/null; then
  echo "build-previous: $ref is not in this clone's history (a shallow clone?); fetch it with git fetch --unshallow" >&2
  exit 1
fi
work="$(mktemp -d)/previous"
trap 'git worktree remove --force "$work" >/dev/null 2>&1 || true' EXIT
git worktree add --detach --quiet "$work" "$ref"
echo "build-previous: building $(git log -1 --format='%h %s' "$ref")"
# No debug info: a quicker build, and the drill needs none.
CARGO_TARGET_DIR="$PWD/target/previous-build" CARGO_PROFILE_DEV_DEBUG=0 CARGO_INCREMENTAL=0 \
  cargo build --quiet --locked --manifest-path "$work/Cargo.toml" -p llmesh --bin llmesh
mkdir -p target/previous
cp target/previous-build/debug/llmesh target/previous/llmesh
echo "build-previous: target/previous/llmesh ($ref)"
