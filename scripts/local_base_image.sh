#!/usr/bin/env bash
# Build a base image from Debian's packages alone, for machines that cannot pull from a public image registry.
#
#   scripts/local_base_image.sh [TAG]          # default TAG: gpufleet-base:local
#
# The image is a Debian root file system made by debootstrap (the machine's own Debian mirror) holding Python
# in a virtual environment at /opt/venv (first on PATH, so `pip install` in docker/Dockerfile works as in the
# official python image) and redis-server, so the one image serves both build arguments of the compose smoke
# test: BASE_IMAGE for gpufleet's image and REDIS_IMAGE for the broker (scripts/compose_smoke.sh --local-base).
#
# Environment:
#   DEBIAN_SUITE      the Debian release to bootstrap (default: this machine's, else bookworm)
#   DEBIAN_MIRROR     the mirror (default http://deb.debian.org/debian)
#   GPUFLEET_TORCH    a pip requirement for torch to preinstall (default: none; the CPU build keeps the image
#                     small, e.g. GPUFLEET_TORCH='torch==2.13.0' where this machine's pip finds a CPU wheel).
#                     The wheel is fetched by the host's pip (its index and find-links settings), so a local
#                     wheel directory works.
# Needs root, debootstrap (installed if missing) and a running Docker engine.
set -euo pipefail

tag=${1:-gpufleet-base:local}
as_root() { if [ "$(id -u)" = 0 ]; then "$@"; else sudo "$@"; fi; }

if ! command -v debootstrap >/dev/null 2>&1; then
  as_root apt-get update -qq
  as_root env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq debootstrap >/dev/null
fi
# shellcheck disable=SC1091  # the machine's own release file
suite=${DEBIAN_SUITE:-$(. /etc/os-release 2>/dev/null && echo "${VERSION_CODENAME:-}")}
suite=${suite:-bookworm}
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}

work=$(mktemp -d)
# The root file system is owned by root: remove it as root whatever happens.
trap 'as_root rm -rf "$work"' EXIT
root="$work/rootfs"

echo "local_base_image: debootstrap $suite from $mirror" >&2
as_root debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates,redis-server,redis-tools \
  "$suite" "$root" "$mirror" >"$work/debootstrap.log" 2>&1 || { tail -30 "$work/debootstrap.log" >&2; exit 1; }

# Trust what the host trusts: behind a TLS-inspecting proxy the host's bundle holds the proxy's CA, and pip
# inside the image build must reach the package index through it.
as_root cp /etc/ssl/certs/ca-certificates.crt "$root/etc/ssl/certs/ca-certificates.crt"
# Commands inside the root file system get a clean environment: the host's PIP_* settings name host paths.
in_root() {
  as_root chroot "$root" /usr/bin/env -i PATH=/usr/sbin:/usr/bin:/sbin:/bin HOME=/root LANG=C.UTF-8 \
    ${http_proxy:+http_proxy=$http_proxy} ${https_proxy:+https_proxy=$https_proxy} ${no_proxy:+no_proxy=$no_proxy} \
    "$@"
}
in_root python3 -m venv /opt/venv
in_root /opt/venv/bin/python -m pip install -q --upgrade pip
if [ -n "${GPUFLEET_TORCH:-}" ]; then
  mkdir -p "$work/wheels"
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version "$(in_root python3 -c \
    'import sys; print(f"{sys.version_info[0]}{sys.version_info[1]}")')" -d "$work/wheels" "$GPUFLEET_TORCH"
  as_root cp "$work"/wheels/*.whl "$root/tmp/"
  in_root sh -c '/opt/venv/bin/python -m pip install -q /tmp/*.whl && rm -f /tmp/*.whl'
fi
in_root apt-get clean
as_root rm -rf "$root/var/lib/apt/lists"/* "$root/root/.cache"

# PATH puts the venv first; redis-server and redis-cli stay on /usr/bin for the broker service.
as_root tar -C "$root" -c . | docker import \
  --change 'ENV PATH=/opt/venv/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
  --change 'ENV LANG=C.UTF-8' \
  --change 'CMD ["python3"]' \
  - "$tag" >/dev/null
echo "local_base_image: built $tag" >&2
