#!/usr/bin/env bash
# Installs PyJWT and cryptography (from PyPI) into .tools/venv for the interop test, which
# checks that tokens issued by auth verify with an independent JWT library given only the
# published JWKS. Prints the venv's python.
set -euo pipefail
cd "$(dirname "$0")/.."
[ -x .tools/venv/bin/python ] || python3 -m venv .tools/venv >&2
if ! .tools/venv/bin/python -c "import jwt, cryptography" 2>/dev/null; then
    echo "installing PyJWT and cryptography from PyPI into .tools/venv" >&2
    .tools/venv/bin/pip install --quiet --disable-pip-version-check "PyJWT[crypto]>=2.8,<3" >&2
fi
echo "$PWD/.tools/venv/bin/python"
