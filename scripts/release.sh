#!/usr/bin/env bash
# Builds what a GPU box installs, into target/dist/:
#   llmesh                  stripped release binary for x86_64 Linux, glibc >= 2.28
#                           (Ubuntu 20.04, RHEL 8, Debian 10 and newer)
#   llmesh.toml             the example config with a service's paths
#   completions/, man/      shell completions (bash, zsh, fish), man pages
#   llmesh_<ver>_amd64.deb  all of the above with the systemd unit
#   llmesh-<ver>-x86_64-linux.tar.gz  the same for scripts/install.sh
#
# It builds with cargo-zigbuild (crates.io) and Zig from PyPI (ziglang), so
# the glibc floor does not depend on this machine's; both are installed on
# first use (into ~/.cargo/bin and .venv-release). Then it prints the
# binary's size and highest GLIBC_ symbol version.
#
# usage: scripts/release.sh [--no-deb]
set -euo pipefail
cd "$(dirname "$0")/.."

GLIBC=2.28
TARGET=x86_64-unknown-linux-gnu
DIST=target/dist
MAKE_DEB=1
[ "${1:-}" = --no-deb ] && MAKE_DEB=0

step() { printf '\n==> %s\n' "$*"; }
export PATH="$HOME/.cargo/bin:$PATH"

if ! command -v cargo-zigbuild >/dev/null; then
  step "installing cargo-zigbuild (cargo install; a few minutes, once)"
  cargo install --locked --quiet cargo-zigbuild
fi
if [ ! -x .venv-release/bin/python ]; then
  step "installing Zig from PyPI (ziglang) into .venv-release"
  python3 -m venv .venv-release
fi
.venv-release/bin/python -m pip install -q --disable-pip-version-check 'ziglang==0.13.0'
# cargo-zigbuild finds Zig through `python -m ziglang` when zig is not on PATH.
export PATH="$PWD/.venv-release/bin:$PATH"

step "cargo zigbuild --profile dist --target $TARGET.$GLIBC"
cargo zigbuild --locked --profile dist -p llmesh --bin llmesh --target "$TARGET.$GLIBC"
rm -rf "$DIST"
mkdir -p "$DIST/completions" "$DIST/man"
cp "target/$TARGET/dist/llmesh" "$DIST/llmesh"

step "config, completions and man pages"
# The example config, with the paths a service uses.
sed -e 's|^listen = "127.0.0.1:11440"|listen = "0.0.0.0:11440"|' \
  -e 's|^# data_dir = "/var/lib/llmesh"|data_dir = "/var/lib/llmesh"|' \
  -e 's|^# join = "lmj1...."|# join = "lmj2...." (prefer join_file)\njoin_file = "/etc/llmesh/join.token"|' \
  llmesh.example.toml >"$DIST/llmesh.toml"
grep -q '^join_file = "/etc/llmesh/join.token"' "$DIST/llmesh.toml"
grep -q '^data_dir = "/var/lib/llmesh"' "$DIST/llmesh.toml"
"$DIST/llmesh" completions bash >"$DIST/completions/llmesh.bash"
"$DIST/llmesh" completions zsh >"$DIST/completions/_llmesh"
"$DIST/llmesh" completions fish >"$DIST/completions/llmesh.fish"
"$DIST/llmesh" man --dir "$DIST/man"
cp packaging/llmesh.service "$DIST/"

VERSION=$("$DIST/llmesh" --version | awk '{print $2}')
step "tarball for scripts/install.sh"
tarball="$DIST/llmesh-$VERSION-x86_64-linux.tar.gz"
cp scripts/install.sh "$DIST/"
tar -C "$DIST" -czf "$tarball.tmp" llmesh llmesh.toml llmesh.service install.sh completions man
mv "$tarball.tmp" "$tarball"

if [ "$MAKE_DEB" = 1 ]; then
  step "Debian package (dpkg-deb)"
  root=$(mktemp -d)
  trap 'rm -rf "$root"' EXIT
  install -D -m 755 "$DIST/llmesh" "$root/usr/bin/llmesh"
  install -D -m 644 packaging/llmesh.service "$root/lib/systemd/system/llmesh.service"
  install -D -m 644 "$DIST/llmesh.toml" "$root/etc/llmesh/llmesh.toml"
  install -D -m 644 "$DIST/completions/llmesh.bash" "$root/usr/share/bash-completion/completions/llmesh"
  install -D -m 644 "$DIST/completions/_llmesh" "$root/usr/share/zsh/vendor-completions/_llmesh"
  install -D -m 644 "$DIST/completions/llmesh.fish" "$root/usr/share/fish/vendor_completions.d/llmesh.fish"
  mkdir -p "$root/usr/share/man/man1" "$root/DEBIAN"
  for page in "$DIST"/man/*.1; do gzip -9n <"$page" >"$root/usr/share/man/man1/$(basename "$page").gz"; done
  install -D -m 644 README.md "$root/usr/share/doc/llmesh/README.md"
  install -m 755 packaging/debian/postinst packaging/debian/prerm packaging/debian/postrm "$root/DEBIAN/"
  echo /etc/llmesh/llmesh.toml >"$root/DEBIAN/conffiles"
  cat >"$root/DEBIAN/control" <<CONTROL
Package: llmesh
Version: $VERSION
Architecture: amd64
Maintainer: llmesh developers <llmesh@localhost>
Depends: libc6 (>= $GLIBC), adduser
Recommends: ollama | llama.cpp
Section: net
Priority: optional
Installed-Size: $(du -sk "$root" | cut -f1)
Description: one inference endpoint over a fleet of GPU boxes
 An agent beside each Ollama (or llama.cpp, vLLM) host: the agents find
 each other, share load and models, and forward each OpenAI- or
 Ollama-API request to the best box, or to a cloud aggregator.
CONTROL
  dpkg-deb --root-owner-group -Zxz --build "$root" "$DIST/llmesh_${VERSION}_amd64.deb" >/dev/null
fi

step "result"
size=$(stat -c %s "$DIST/llmesh")
floor=$(objdump -T "$DIST/llmesh" | grep -o 'GLIBC_[0-9.]*' | sort -t. -k1,1 -k2,2n -k3,3n -V | tail -1)
echo "binary: $DIST/llmesh, $((size / 1024 / 1024)) MiB stripped, needs $floor"
ls -la "$DIST"
