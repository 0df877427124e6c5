#!/bin/sh
# Build a local "python 3.11 slim" base image from Debian bookworm with debootstrap, for machines that reach
# Debian's mirror and PyPI but no container registry. Usage (root):
#   scripts/debian-base-image.sh [TAG]        # default tag: localhost/bookworm-python:3.11
# then: make image BASE=localhost/bookworm-python:3.11
set -eu
TAG=${1:-localhost/bookworm-python:3.11}
MIRROR=${MIRROR:-http://deb.debian.org/debian}
ROOT=$(mktemp -d /tmp/tlearn-rootfs.XXXXXX)
trap 'rm -rf "$ROOT"' EXIT

# python3-venv pulls pip's bundled wheel (ensurepip); ca-certificates lets pip reach PyPI over TLS.
debootstrap --variant=minbase --include=python3,python3-venv,ca-certificates bookworm "$ROOT" "$MIRROR"
chroot "$ROOT" sh -c 'apt-get clean && rm -rf /var/lib/apt/lists/* /usr/share/doc/* /usr/share/man/*'
# The Dockerfile calls `python`, as on the official python images.
ln -sf python3 "$ROOT/usr/bin/python"
tar -C "$ROOT" -c . | podman import --change 'CMD ["python3"]' - "$TAG"
podman image ls "$TAG"
