#!/bin/sh
# Build the fcpts image (`make image`): components/image.sh TAG [VARIANT] [PUSH]
# with the first container builder that works, docker or podman ($BUILDER: try only
# those named). VARIANT is cpu (default) or cuda; PUSH=1 pushes TAG after the build.
# Where none works it says which it tried, why each failed, and what to install or start,
# and exits 1.
set -eu
tag=${1:?usage: components/image.sh TAG [cpu|cuda] [PUSH]}
variant=${2:-cpu}
push=${3:-}
case "$variant" in
    cpu | cuda) ;;
    *) echo "make image: VARIANT must be cpu or cuda, got '$variant'" >&2; exit 2 ;;
esac
tried=""
for builder in ${BUILDER:-docker podman}; do
    command -v "$builder" >/dev/null 2>&1 || continue
    if out=$("$builder" info 2>&1); then
        echo "make image: building $tag ($variant) with $builder"
        "$builder" build -f components/Dockerfile --build-arg "VARIANT=$variant" -t "$tag" .
        if [ "$push" = 1 ]; then
            "$builder" push "$tag"
        fi
        exit 0
    fi
    reason=$(printf '%s\n' "$out" | grep -i -m 1 -E 'cannot|error|denied|refused' || true)
    [ -n "$reason" ] || reason=$(printf '%s\n' "$out" | tail -n 1)
    tried="$tried
  $builder is installed but cannot build: \`$builder info\` fails: $reason"
done
if [ -z "$tried" ]; then
    echo "make image: no container builder: neither docker nor podman is on PATH." >&2
    echo "  Install podman (no daemon needed) or docker (and start its daemon), then rerun make image." >&2
else
    echo "make image: no working container builder, $tag is not built:$tried" >&2
    echo "  Start the docker daemon (e.g. sudo systemctl start docker), or point DOCKER_HOST at one," >&2
    echo "  or install podman (no daemon needed), then rerun make image." >&2
fi
exit 1
