#!/usr/bin/env bash
# Builds the local image toka-nats:<version> (FROM scratch, the static nats-server binary of the
# version in scripts/nats.version) that the container tests run. Nothing is pulled: no registry
# is reachable.
set -euo pipefail
cd "$(dirname "$0")/.."
IMAGE=toka-nats:$(tr -d '[:space:]' < scripts/nats.version)
bin=$(scripts/install-nats.sh)
ctx=$(mktemp -d)
trap 'rm -rf "$ctx"' EXIT
cp "$bin" "$ctx/nats-server"
cp tests/nats/Dockerfile "$ctx/Dockerfile"
docker build --quiet -t "$IMAGE" "$ctx" >/dev/null
echo "built $IMAGE"
