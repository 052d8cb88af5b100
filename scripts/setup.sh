#!/bin/sh
# Installs the Debian packages tributary needs to build, run and test, and only
# those that are missing. Shared by `make run` and `make test`.
#
#   scripts/setup.sh            build and run dependencies, plus test tools (check;
#                               GNU time, for a test of peak memory)
#   scripts/setup.sh PKG...     additionally the named packages (e.g. valgrind)
set -eu

PACKAGES="gcc make pkg-config ca-certificates curl openssl python3 python3-minimal
liblua5.4-dev lua-cjson-dev libcurl4-openssl-dev libmicrohttpd-dev libgnutls28-dev
libsqlite3-dev libssl-dev check time $*"

missing=""
for p in $PACKAGES; do
    status=$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null || true)
    case "$status" in
        *" ok installed"*) ;; # "install", or "hold" (kept at its version)
        *) missing="$missing $p" ;;
    esac
done

if [ -z "$missing" ]; then
    exit 0
fi

if [ "$(id -u)" != 0 ]; then
    echo "setup: missing Debian packages:$missing" >&2
    echo "setup: run as root, or install them with: apt-get install$missing" >&2
    exit 1
fi

echo "setup: installing$missing" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
# shellcheck disable=SC2086
apt-get install -y -qq --no-install-recommends $missing >/dev/null
