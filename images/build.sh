#!/bin/bash
# `make images`: the Debian base (debootstrap from the host's apt mirror, imported into podman) and the
# pmoves-e2b image (all four services and nats-server; the service is the command). Each image carries
# the hash of its inputs as a label and is rebuilt only when they change, so tests and CI reuse it.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
export CONTAINERS_CONF=${CONTAINERS_CONF:-$PWD/deploy/containers.conf}
BASE=${PMOVES_BASE_IMAGE:-localhost/pmoves-e2b-base:bookworm}
IMAGE=${PMOVES_IMAGE:-localhost/pmoves-e2b:latest}
# python3 runs the services; the rest is what e2b-sandbox's ns backend runs (bwrap, nft, ip, mkfs.ext4, nsenter).
PACKAGES=python3,ca-certificates,bubblewrap,nftables,iproute2,e2fsprogs,util-linux,libseccomp2
WORK=build/images

inputs_of() { podman image inspect --format '{{index .Labels "org.pmoves.inputs"}}' "$1" 2>/dev/null || true; }

mirror=$($PY -c 'from pmoves_e2b.sandbox.templates.hostconfig import apt_mirror; print(apt_mirror())')
base_inputs=$( (sed -n '/^# --- base/,/^# --- end base/p' "$0"; echo "$PACKAGES $mirror") | sha256sum | cut -c1-32)
mkdir -p "$WORK"

# --- base
if [ "$(inputs_of "$BASE")" != "$base_inputs" ]; then
  root=$(mktemp -d "$PWD/$WORK/rootfs.XXXXXX")
  trap 'rm -rf --one-file-system "$root"' EXIT
  # Own mount namespace: debootstrap mounts /proc and /sys in the target; nothing outlives it.
  unshare --mount --propagation private debootstrap --variant=minbase --include="$PACKAGES" bookworm "$root" "$mirror"
  # The runtime user, and nothing a runtime does not need: no bash, perl, apt/dpkg, setuid bits, docs.
  # dash stays as /bin/sh: e2b-sandbox's launcher joins a sandbox's cgroups and lowers its rlimits with
  # `sh -c` between nsenter and setpriv (sandbox/backends/ns/backend.py); nothing else runs a shell.
  echo 'pmoves:x:65532:65532:pmoves-e2b:/nonexistent:/usr/sbin/nologin' >>"$root/etc/passwd"
  echo 'pmoves:x:65532:' >>"$root/etc/group"
  rm -rf "$root"/usr/share/{doc,man,info,locale,lintian}/* "$root"/var/lib/apt/lists/* "$root"/var/cache/apt/* \
    "$root"/var/cache/debconf/*-old "$root"/var/log/*
  rm -f "$root"/bin/{bash,rbash} "$root"/usr/bin/{bash,rbash} "$root"/usr/bin/perl* \
    "$root"/usr/bin/apt* "$root"/usr/bin/dpkg*
  find "$root" -xdev -perm /6000 -type f -exec chmod ug-s {} +
  tar -C "$root" --numeric-owner -c . | podman import \
    --change "LABEL org.pmoves.inputs=$base_inputs" --change 'CMD ["/usr/bin/python3"]' - "$BASE"
  rm -rf --one-file-system "$root"
  trap - EXIT
fi
# --- end base

# --- image: the package and its dependencies, installed on the host from its pip config (the registries),
# then copied in: the image gets no pip, no compiler and no network during the build.
site=$WORK/site
sources=$( (cd src && find pmoves_e2b -type f ! -name '*.pyc' ! -path '*/__pycache__/*' -print0 | sort -z | xargs -0 sha256sum) | sha256sum)
image_inputs=$( (echo "$base_inputs"; echo "$sources"; cat pyproject.toml images/Containerfile) | sha256sum | cut -c1-32)
if [ "$(inputs_of "$IMAGE")" != "$image_inputs" ]; then
  rm -rf "$site"
  $PY -m pip install -q --no-compile --no-warn-script-location --target "$site" . 2>&1 | grep -v "is ignored: it is neither" || true
  test -f "$site/pmoves_e2b/cli.py"
  # Console scripts carry the host's interpreter path; only nats-server (a Go binary) is kept.
  find "$site/bin" -type f ! -name nats-server -delete
  podman build --pull=never --label "org.pmoves.inputs=$image_inputs" -f images/Containerfile -t "$IMAGE" "$WORK"
fi
podman image ls --format '{{.Repository}}:{{.Tag}} {{.Size}}' | grep -E "^($BASE|$IMAGE) " || true
