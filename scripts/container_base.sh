#!/usr/bin/env bash
# A Debian bookworm base image with python3 (venv, headers) for `make test-container`, made with debootstrap since
# image registries are out of reach here. It carries this machine's CA bundle and pip's cert setting,
# so that pip inside the build reaches PyPI through the same proxy as the host.
#   scripts/container_base.sh IMAGE
set -euo pipefail
image=${1:?usage: container_base.sh IMAGE}
rootfs=$(mktemp -d)
trap 'rm -rf "$rootfs"' EXIT
debootstrap --variant=minbase --include=python3,python3-venv,python3-dev,ca-certificates bookworm "$rootfs" \
    http://deb.debian.org/debian > "$rootfs.log"
cp /etc/ssl/certs/ca-certificates.crt "$rootfs/etc/ssl/certs/ca-certificates.crt"
printf '[global]\ncert = /etc/ssl/certs/ca-certificates.crt\n' > "$rootfs/etc/pip.conf"
tar -C "$rootfs" -c . | podman import - "$image"
