#!/usr/bin/env bash
# Builds the amd64 .deb (packaging/deb.sh), installs it with dpkg on this machine, checks the
# binary, the files, the conffile, the user and the data directory, runs the packaged gateway as
# its user from its data directory, then removes and purges the package and checks what each
# leaves behind. Needs root. Run by .ci/run.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/../.."

fail() { echo "deb_install: FAIL: $*" >&2; exit 1; }
check() { local what="$1"; shift; "$@" >/dev/null || fail "$what"; echo "ok: $what"; }

[ "$(id -u)" = 0 ] || fail "needs root (dpkg -i)"
if dpkg-query -W tributary >/dev/null 2>&1; then
    fail "a tributary package is already installed here; this test would remove it (dpkg -P tributary first)"
fi

deb=$(bash packaging/deb.sh | tail -1)
[ -f "$deb" ] || fail "packaging/deb.sh made no package ($deb)"
echo "package: $deb ($(stat -c %s "$deb") bytes)"
version=$(dpkg-deb -f "$deb" Version)

work=$(mktemp -d)
gateway_pid=""
cleanup() {
    [ -n "$gateway_pid" ] && kill "$gateway_pid" 2>/dev/null || true
    if dpkg-query -W tributary >/dev/null 2>&1; then dpkg -P tributary >/dev/null 2>&1 || true; fi
    rm -rf "$work"
}
trap cleanup EXIT

# ---- install ----
dpkg -i "$deb"
check "installed at $version" [ "$(dpkg-query -W -f='${Status} ${Version}' tributary)" = "install ok installed $version" ]
check "tributary --version" [ "$(tributary --version)" = "tributary ${version%-*}" ]
for f in /usr/bin/tributary /lib/systemd/system/tributary.service /etc/tributary/gateway.toml \
    /usr/share/doc/tributary/copyright; do
    check "file $f" [ -f "$f" ]
done
check "the unit is the repository's" cmp -s /lib/systemd/system/tributary.service systemd/tributary.service
check "the config is the documented defaults" cmp -s /etc/tributary/gateway.toml config/gateway.toml
check "gateway.toml is a conffile" grep -q '^ /etc/tributary/gateway.toml ' \
    <(dpkg-query -W -f='${Conffiles}\n' tributary)
check "the shipped config checks" tributary config check /etc/tributary/gateway.toml
check "system user tributary" [ "$(getent passwd tributary | cut -d: -f6,7)" = "/var/lib/tributary:/usr/sbin/nologin" ]
uid=$(id -u tributary)
check "system uid ($uid)" [ "$uid" -lt 1000 ]
check "group tributary" getent group tributary
check "data dir owner and mode" [ "$(stat -c '%U:%G %a' /var/lib/tributary)" = "tributary:tributary 750" ]

# ---- the packaged gateway, as the unit runs it (user, working directory, umask), on free ports ----
sed -e 's/^listen = "127.0.0.1:9092"/listen = "127.0.0.1:0"/' -e 's/^listen = "127.0.0.1:1883"/listen = "127.0.0.1:0"/' \
    -e 's/^websocket_listen = "127.0.0.1:8083"/websocket_listen = "127.0.0.1:0"/' \
    -e 's/^listen = "127.0.0.1:9464"/listen = "127.0.0.1:0"/' /etc/tributary/gateway.toml > "$work/gateway.toml"
for port in 9092 1883 8083 9464; do
    if grep -q "127.0.0.1:$port" "$work/gateway.toml"; then fail "the test config still listens on the fixed port $port"; fi
done
chmod 644 "$work/gateway.toml"
chmod 755 "$work"
( cd /var/lib/tributary && umask 0077 && exec setpriv --reuid=tributary --regid=tributary --init-groups \
    /usr/bin/tributary serve --config "$work/gateway.toml" ) 2> "$work/gateway.log" &
gateway_pid=$!
timeout 60 grep -q -m1 "tributary gateway ready" <(tail -F --pid="$gateway_pid" "$work/gateway.log" 2>/dev/null) \
    || { cat "$work/gateway.log" >&2; fail "the packaged gateway did not become ready"; }
check "database in /var/lib/tributary/tributary-data, owned by tributary" \
    [ "$(stat -c %U /var/lib/tributary/tributary-data/tributary.redb)" = tributary ]
kill -TERM "$gateway_pid"
wait "$gateway_pid" || { cat "$work/gateway.log" >&2; fail "gateway exit status $?"; }
gateway_pid=""
check "clean shutdown" grep -q "shutdown complete" "$work/gateway.log"

# ---- reinstall keeps the administrator's change to the conffile ----
echo "# local change" >> /etc/tributary/gateway.toml
dpkg -i "$deb"
check "conffile change kept on reinstall" grep -q "^# local change" /etc/tributary/gateway.toml

# ---- remove: program gone; configuration, data and user kept ----
dpkg -r tributary
check "binary removed" [ ! -e /usr/bin/tributary ]
check "unit removed" [ ! -e /lib/systemd/system/tributary.service ]
check "conffile kept after remove" [ -f /etc/tributary/gateway.toml ]
check "data kept after remove" [ -f /var/lib/tributary/tributary-data/tributary.redb ]
check "user kept after remove" getent passwd tributary

# ---- purge: everything gone ----
dpkg -P tributary
check "conffile purged" [ ! -e /etc/tributary ]
check "data purged" [ ! -e /var/lib/tributary ]
check "user purged" bash -c '! getent passwd tributary'
check "group purged" bash -c '! getent group tributary'
check "package gone" bash -c '! dpkg-query -W -f="\${Status}" tributary 2>/dev/null | grep -q installed'
echo "deb_install: all checks passed"
