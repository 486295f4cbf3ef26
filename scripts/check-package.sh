#!/usr/bin/env bash
# Checks what scripts/release.sh built in target/dist (run it first; needs
# root, since it installs the package on this machine and removes it):
#   - the binary needs glibc 2.28 at most (objdump -T) and starts;
#   - the .deb installs with dpkg -i, its unit passes systemd-analyze
#     verify, the installed binary runs as the llmesh user with the
#     installed config against a sim backend and answers a chat; completions
#     and man pages are where shells and man look; dpkg --purge removes it;
#   - scripts/install.sh stages the same tree twice (idempotent) and
#     uninstalls it.
set -euo pipefail
cd "$(dirname "$0")/.."

DIST=target/dist
fail() { echo "check-package: $*" >&2; exit 1; }
step() { printf '\n==> %s\n' "$*"; }
[ "$(id -u)" = 0 ] || fail "run as root (it installs the package)"
deb=$(ls "$DIST"/llmesh_*_amd64.deb 2>/dev/null | head -1)
[ -n "$deb" ] || fail "no package in $DIST: run scripts/release.sh"

step "glibc floor"
floor=$(objdump -T "$DIST/llmesh" | grep -o 'GLIBC_[0-9.]*' | sed 's/GLIBC_//' | sort -V | tail -1)
echo "highest GLIBC_ symbol version: $floor"
[ "$(printf '%s\n2.28\n' "$floor" | sort -V | tail -1)" = 2.28 ] || fail "needs glibc $floor > 2.28"
"$DIST/llmesh" --version

work=$(mktemp -d)
sim_pid=
agent_pid=
cleanup() {
  [ -n "$agent_pid" ] && kill "$agent_pid" 2>/dev/null || true
  [ -n "$sim_pid" ] && kill "$sim_pid" 2>/dev/null || true
  dpkg --purge llmesh >/dev/null 2>&1 || true
  rm -rf "$work" /var/lib/llmesh
}
trap cleanup EXIT

step "dpkg -i $deb"
dpkg -i "$deb"
getent passwd llmesh >/dev/null || fail "no llmesh user after install"
dpkg -L llmesh | grep -qx /usr/share/bash-completion/completions/llmesh || fail "no bash completion"
[ -s /usr/share/zsh/vendor-completions/_llmesh ] && [ -s /usr/share/fish/vendor_completions.d/llmesh.fish ] ||
  fail "no zsh or fish completion"
zcat /usr/share/man/man1/llmesh-agent.1.gz | grep -q '^.TH' || fail "no man page"
grep -qx /etc/llmesh/llmesh.toml /var/lib/dpkg/info/llmesh.conffiles || fail "the config is not a conffile"

step "systemd-analyze verify"
systemd-analyze verify --man=no /lib/systemd/system/llmesh.service

step "the installed binary, as llmesh, with the installed config"
free_port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1]); s.close()'; }
sim_port=$(free_port)
api_port=$(free_port)
/usr/bin/llmesh sim-backend --listen "127.0.0.1:$sim_port" >"$work/sim.log" 2>&1 &
sim_pid=$!
[ "$(stat -c %U:%a /var/lib/llmesh)" = llmesh:700 ] || fail "postinst did not make /var/lib/llmesh for the llmesh user"
# The first box: init as the service user, then start without a token file.
runuser -u llmesh -- /usr/bin/llmesh init --data-dir /var/lib/llmesh >"$work/init.out"
grep -q '^lmj2\.' "$work/init.out" || fail "init printed no token"
# Another box's port layout must not collide with the tests': ports from the flags.
runuser -u llmesh -- /usr/bin/llmesh agent --config /etc/llmesh/llmesh.toml \
  --listen "127.0.0.1:$api_port" --backend "http://127.0.0.1:$sim_port" --no-mdns \
  --mesh-listen /ip4/127.0.0.1/tcp/0 --data-listen 127.0.0.1:0 --control-listen 127.0.0.1:0 \
  >"$work/agent.out" 2>"$work/agent.log" &
agent_pid=$!
ready=0
for _ in $(seq 1 150); do
  if curl -sf -o /dev/null "http://127.0.0.1:$api_port/readyz"; then ready=1; break; fi
  sleep 0.1
done
[ "$ready" = 1 ] || { cat "$work/agent.log" >&2; fail "the installed agent never became ready"; }
curl -sf -H 'content-type: application/json' \
  -d '{"model":"qwen2.5:7b","max_tokens":3,"messages":[{"role":"user","content":"hi"}]}' \
  "http://127.0.0.1:$api_port/v1/chat/completions" | grep -q '"choices"' || fail "no chat completion"
if grep -q $'\x1b\[' "$work/agent.log"; then fail "ANSI colour codes in a log that is not a terminal"; fi
kill "$agent_pid"
wait "$agent_pid" 2>/dev/null || true
agent_pid=

step "dpkg --purge"
dpkg --purge llmesh
[ ! -e /usr/bin/llmesh ] || fail "/usr/bin/llmesh left behind"
! getent passwd llmesh >/dev/null || fail "the llmesh user left behind"

step "scripts/install.sh into a staging tree, twice, then uninstall"
stage="$work/stage"
echo "lmj2.test-token" >"$work/join.token"
for _ in 1 2; do
  "$DIST/install.sh" --from "$DIST" --destdir "$stage" --prefix /usr/local --no-user --join-file "$work/join.token" >/dev/null
done
for path in usr/local/bin/llmesh etc/systemd/system/llmesh.service etc/llmesh/llmesh.toml etc/llmesh/join.token \
  usr/local/share/man/man1/llmesh.1 usr/local/share/bash-completion/completions/llmesh; do
  [ -e "$stage/$path" ] || fail "install.sh did not install $path"
done
grep -q '^ExecStart=/usr/local/bin/llmesh ' "$stage/etc/systemd/system/llmesh.service" || fail "unit not pointed at the prefix"
[ "$(stat -c %a "$stage/etc/llmesh/join.token")" = 640 ] || fail "join.token is not 0640"
"$DIST/install.sh" --destdir "$stage" --prefix /usr/local --uninstall >/dev/null
[ ! -e "$stage/usr/local/bin/llmesh" ] && [ -e "$stage/etc/llmesh/llmesh.toml" ] || fail "uninstall removed the wrong things"
"$DIST/install.sh" --destdir "$stage" --prefix /usr/local --uninstall --purge >/dev/null
[ ! -e "$stage/etc/llmesh" ] || fail "--purge kept the config"

echo
echo "package checks passed: $(basename "$deb"), binary $(($(stat -c %s "$DIST/llmesh") / 1024 / 1024)) MiB, glibc >= $floor"
