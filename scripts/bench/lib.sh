# Shared by the benchmarks: tools, ports, process cleanup, oha runs.
# Source it from a script that has cd'ed to the repository root.

OHA_VERSION=1.16.0

as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

# Installs oha (and nginx when asked) if missing, builds the release binary.
# `bench_setup no-oha`: a benchmark that sends no HTTP load skips oha.
bench_setup() {
  export PATH="$HOME/.cargo/bin:$PATH"
  if [ "${1:-}" = nginx ] && ! command -v nginx >/dev/null && [ ! -x /usr/sbin/nginx ]; then
    echo "==> installing nginx (apt-get)"
    as_root apt-get update -qq
    DEBIAN_FRONTEND=noninteractive as_root apt-get install -y -qq nginx-light >/dev/null
  fi
  if [ "${1:-}" != no-oha ] && ! command -v oha >/dev/null; then
    echo "==> installing oha $OHA_VERSION (cargo install; a few minutes, once)"
    cargo install --locked --quiet oha --version "$OHA_VERSION"
  fi
  if [ -n "${LLMESH_BIN:-}" ]; then
    # Another build (say, the previous commit's) measured on the same script.
    BIN=$LLMESH_BIN
    echo "==> using $BIN"
  else
    echo "==> building llmesh (release)"
    cargo build --release --quiet -p llmesh --bin llmesh
    BIN=$PWD/target/release/llmesh
  fi
  WORK=$(mktemp -d)
  PIDS=()
  trap bench_cleanup EXIT
}

bench_cleanup() {
  for pid in "${PIDS[@]}"; do kill "$pid" 2>/dev/null || true; done
  wait 2>/dev/null || true
  rm -rf "$WORK"
}

free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }

wait_http() {
  for _ in $(seq 1 150); do
    curl -sf -o /dev/null "$1" && return 0
    sleep 0.1
  done
  echo "no answer from $1" >&2
  exit 1
}

# oha_run NAME URL BODY RATE|max DURATION CONNECTIONS: one warm-up second,
# then the measured run, JSON into $WORK/NAME.json.
oha_run() {
  local name=$1 url=$2 body=$3 rate=$4 duration=$5 conns=$6
  local args=(-z "${duration}s" -c "$conns" --no-tui --output-format json -m POST
    -H 'content-type: application/json' -d "$body")
  [ "$rate" != max ] && args+=(-q "$rate" --latency-correction)
  oha -z 1s -c "$conns" --no-tui -m POST -H 'content-type: application/json' -d "$body" "$url" >/dev/null 2>&1 || true
  oha "${args[@]}" "$url" >"$WORK/$name.json"
}

# Rust routers a user would put in front of the boxes instead, from PyPI
# into .venv-bench. Pinned: the versions the README's figures came from.
SMG_VERSION=1.13.0
VLLM_ROUTER_VERSION=0.1.17

# install_router NAME PIP-SPEC EXECUTABLE: installs once; false (rows are
# then skipped) when it cannot be installed.
install_router() {
  [ -x .venv-bench/bin/python ] || python3 -m venv .venv-bench
  if [ ! -x ".venv-bench/bin/$3" ]; then
    echo "==> installing $2 into .venv-bench (once)"
    .venv-bench/bin/python -m pip install -q --disable-pip-version-check "$2" ||
      echo "==> $1 could not be installed: its rows are skipped"
  fi
  [ -x ".venv-bench/bin/$3" ]
}

# router_args PROGRAM POLICY PORT METRICS-PORT WORKER-URL...: the command
# line of SMG (`smg launch`) or vllm-router in front of those workers.
router_args() {
  local program=$1 policy=$2 port=$3 metrics=$4
  shift 4
  local args=(--host 127.0.0.1 --port "$port" --worker-urls "$@" --policy "$policy"
    --prometheus-host 127.0.0.1 --prometheus-port "$metrics")
  [ "$program" = smg ] && args=(launch "${args[@]}" --log-level warn)
  printf '%s\n' "${args[@]}"
}
