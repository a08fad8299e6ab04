#!/usr/bin/env bash
# Installs the independent clients the tests check Toka against, from PyPI into .tools/venv:
# PyJWT and cryptography (tokens issued by auth verify given only the published JWKS) and
# nats-py (the bus attacked from outside). Prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .tools/venv/bin/python ] || python3 -m venv .tools/venv >&2
if ! .tools/venv/bin/python -c "import jwt, cryptography, nats, nkeys" 2>/dev/null; then
    echo "installing PyJWT, cryptography and nats-py from PyPI into .tools/venv" >&2
    .tools/venv/bin/pip install --quiet --disable-pip-version-check "PyJWT[crypto]>=2.8,<3" "nats-py[nkeys]>=2.9,<3" >&2
fi
echo "$PWD/.tools/venv/bin/python"
