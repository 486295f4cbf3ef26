#!/usr/bin/env bash
# Installs llmesh on a box without the Debian package: the binary, the
# systemd unit, the config (kept if already there), shell completions, man
# pages and the `llmesh` system user. Safe to run again (an upgrade: the
# binary and unit are replaced, the config and data are kept).
#
#   sudo ./install.sh                            # from the release tarball's directory
#   sudo ./install.sh --join-file join.token     # and install the join token
#   sudo ./install.sh --uninstall [--purge]      # --purge also removes config and data
#   ./install.sh --destdir /tmp/stage --no-user  # stage a tree (packaging, tests)
#
# Options: --from DIR (where llmesh, llmesh.toml, llmesh.service, completions/
# and man/ are; default: this script's directory, else target/dist),
# --prefix DIR (default /usr/local), --destdir DIR, --join-file FILE,
# --no-user, --uninstall, --purge.
set -euo pipefail

here=$(cd "$(dirname "$0")" && pwd)
FROM=$here
[ -x "$FROM/llmesh" ] || FROM=$here/../target/dist
PREFIX=/usr/local
DESTDIR=
JOIN_FILE=
MAKE_USER=1
UNINSTALL=0
PURGE=0
while [ $# -gt 0 ]; do
  case "$1" in
    --from) FROM=$2; shift 2 ;;
    --prefix) PREFIX=$2; shift 2 ;;
    --destdir) DESTDIR=$2; shift 2 ;;
    --join-file) JOIN_FILE=$2; shift 2 ;;
    --no-user) MAKE_USER=0; shift ;;
    --uninstall) UNINSTALL=1; shift ;;
    --purge) PURGE=1; shift ;;
    -h | --help) sed -n '2,16p' "$0"; exit 0 ;;
    *) echo "install.sh: unknown option $1 (see --help)" >&2; exit 2 ;;
  esac
done

BIN=$DESTDIR$PREFIX/bin/llmesh
UNIT=$DESTDIR/etc/systemd/system/llmesh.service
ETC=$DESTDIR/etc/llmesh
SHARE=$DESTDIR$PREFIX/share
STATE=$DESTDIR/var/lib/llmesh
systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ]; }

if [ "$UNINSTALL" = 1 ]; then
  if systemd_running; then systemctl disable --now llmesh.service >/dev/null 2>&1 || true; fi
  rm -f "$BIN" "$UNIT" "$SHARE/bash-completion/completions/llmesh" "$SHARE/zsh/site-functions/_llmesh" \
    "$SHARE/fish/vendor_completions.d/llmesh.fish" "$SHARE"/man/man1/llmesh*.1
  if [ "$PURGE" = 1 ]; then
    rm -rf "$ETC" "$STATE"
    if [ -z "$DESTDIR" ] && getent passwd llmesh >/dev/null; then userdel llmesh 2>/dev/null || true; fi
    echo "llmesh removed, with its config, data and user"
  else
    echo "llmesh removed; kept $ETC and $STATE (--purge removes them)"
  fi
  if systemd_running; then systemctl daemon-reload; fi
  exit 0
fi

[ -x "$FROM/llmesh" ] || { echo "install.sh: no llmesh binary in $FROM (use --from, or run scripts/release.sh)" >&2; exit 1; }

if [ "$MAKE_USER" = 1 ] && [ -z "$DESTDIR" ] && ! getent passwd llmesh >/dev/null; then
  useradd --system --user-group --home-dir /var/lib/llmesh --no-create-home --shell /usr/sbin/nologin llmesh
  echo "created the llmesh system user"
fi
group=llmesh
getent group llmesh >/dev/null || group=root
if [ -z "$DESTDIR" ] && [ "$group" = llmesh ] && [ ! -d "$STATE" ]; then
  install -d -o llmesh -g llmesh -m 700 "$STATE"
fi

install -D -m 755 "$FROM/llmesh" "$BIN"
install -d -m 755 "$(dirname "$UNIT")"
sed "s|^ExecStart=/usr/bin/llmesh |ExecStart=$PREFIX/bin/llmesh |" "$FROM/llmesh.service" >"$UNIT.tmp"
chmod 644 "$UNIT.tmp"
mv "$UNIT.tmp" "$UNIT"
install -d -m 755 "$ETC"
if [ -e "$ETC/llmesh.toml" ]; then
  echo "kept $ETC/llmesh.toml"
else
  install -m 644 "$FROM/llmesh.toml" "$ETC/llmesh.toml"
fi
if [ -n "$JOIN_FILE" ]; then
  install -m 640 -g "$group" "$JOIN_FILE" "$ETC/join.token"
  echo "installed the join token as $ETC/join.token (0640, group $group)"
fi
install -D -m 644 "$FROM/completions/llmesh.bash" "$SHARE/bash-completion/completions/llmesh"
install -D -m 644 "$FROM/completions/_llmesh" "$SHARE/zsh/site-functions/_llmesh"
install -D -m 644 "$FROM/completions/llmesh.fish" "$SHARE/fish/vendor_completions.d/llmesh.fish"
install -d -m 755 "$SHARE/man/man1"
install -m 644 "$FROM"/man/*.1 "$SHARE/man/man1/"
if systemd_running; then systemctl daemon-reload; fi

echo "installed $("$BIN" --version) as $BIN"
cat <<NEXT
next:
  edit $ETC/llmesh.toml (backend.url, api.listen)
  first box:    sudo -u llmesh $PREFIX/bin/llmesh init --data-dir /var/lib/llmesh
  other boxes:  put the token in $ETC/join.token (or rerun with --join-file)
  then:         sudo systemctl enable --now llmesh && llmesh status
NEXT
