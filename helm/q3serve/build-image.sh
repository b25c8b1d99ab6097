#!/usr/bin/env bash
# Builds the q3serve serving image (the repository's Dockerfile) with whichever builder this
# machine has: docker (when its daemon answers), else podman, else buildah.
#
#   IMAGE     name:tag to build            (default q3serve/q3serve:0.1.0, the chart's values.yaml)
#   PUSH=1    also push it, as REGISTRY/IMAGE
#   REGISTRY  registry (and optional path) to push to; required with PUSH=1
#   BUILDER   force one builder (docker, podman or buildah)
# Extra arguments go to the builder, e.g. --build-arg RAY_IMAGE_TAG=2.60.0-py311-cu128.
set -euo pipefail

IMAGE="${IMAGE:-q3serve/q3serve:0.1.0}"
PUSH="${PUSH:-0}"
REGISTRY="${REGISTRY:-}"
ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"   # the repository root: the build context

if [[ -n "${BUILDER:-}" ]]; then
  command -v "$BUILDER" >/dev/null || { echo "build-image.sh: BUILDER=$BUILDER not found" >&2; exit 1; }
else
  BUILDER=""
  for candidate in docker podman buildah; do
    command -v "$candidate" >/dev/null || continue
    # A docker client without a reachable daemon cannot build: try the next builder then.
    if [[ "$candidate" == docker ]] && ! docker info >/dev/null 2>&1; then
      echo "build-image.sh: docker is installed but its daemon does not answer; trying podman/buildah" >&2
      continue
    fi
    BUILDER="$candidate"; break
  done
  [[ -n "$BUILDER" ]] || { echo "build-image.sh: no usable docker, podman or buildah on PATH" >&2; exit 1; }
fi

if [[ "$PUSH" == "1" && -z "$REGISTRY" ]]; then
  echo "build-image.sh: PUSH=1 needs REGISTRY (REGISTRY=<registry host>[/<path>])" >&2
  exit 1
fi

echo "build-image.sh: building $IMAGE with $BUILDER from $ROOT"
case "$BUILDER" in
  buildah) buildah bud --layers -f "$ROOT/Dockerfile" -t "$IMAGE" "$@" "$ROOT" ;;
  *)       "$BUILDER" build -f "$ROOT/Dockerfile" -t "$IMAGE" "$@" "$ROOT" ;;
esac

if [[ "$PUSH" == "1" ]]; then
  TARGET="${REGISTRY%/}/$IMAGE"
  echo "build-image.sh: pushing $TARGET"
  "$BUILDER" tag "$IMAGE" "$TARGET"
  "$BUILDER" push "$TARGET"
fi
