#!/usr/bin/env bash
# `make test-image`: build the CPU image from docker/Dockerfile with podman and run the quickstart
# (`dvc repro`) in it, offline (--network none), on a fresh clone of this repository's HEAD.
# Needs root (podman as root with runc). No registry is reachable here, so the base image is a
# Debian bookworm minbase made by debootstrap and `podman import`ed.
set -euo pipefail
cd "$(dirname "$0")/.."
export CONTAINERS_CONF="$PWD/docker/containers.conf"
BASE_IMAGE=${BASE_IMAGE:-localhost/debian-bookworm-minbase:latest}
IMAGE=${IMAGE:-localhost/finetune-recipes:cpu}
MIRROR=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
WORK=${TEST_IMAGE_DIR:-}
if [[ -z "$WORK" ]]; then  # a scratch folder of our own: removed after a passing run (kept after a failure)
  WORK=$(mktemp -d /var/tmp/finetune-test-image.XXXXXX)
  OWN_WORK=1
fi
log() { printf '[test-image %s] %s\n' "$(date +%T)" "$*"; }

if ! command -v podman >/dev/null || ! command -v debootstrap >/dev/null || ! command -v runc >/dev/null; then
  log "installing podman buildah runc debootstrap (apt)"
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq podman buildah runc debootstrap >/dev/null
fi

if ! podman image exists "$BASE_IMAGE"; then
  log "base image: debootstrap --variant=minbase bookworm"
  debootstrap --variant=minbase bookworm "$WORK/rootfs" "$MIRROR" >"$WORK/debootstrap.log" 2>&1 \
    || { tail -20 "$WORK/debootstrap.log"; exit 1; }
  tar -C "$WORK/rootfs" -c . | podman import - "$BASE_IMAGE" >/dev/null
  rm -rf "$WORK/rootfs"
fi

# pip's cache (the llama-cpp-python wheel built by `make install`) and the CPU torch wheel folder
# are mounted into the build; neither ends up in the image.
PIP_CACHE=$(.venv/bin/pip cache dir 2>/dev/null || echo "$HOME/.cache/pip")
mounts=(-v "$PIP_CACHE:/root/.cache/pip")
build_args=(--build-arg "BASE=$BASE_IMAGE" --build-arg "BUILD_BASE=$BASE_IMAGE"
            --build-arg LOCK=requirements/cpu.lock --build-arg GGML_CUDA=off --build-arg "SOURCE_COMMIT=$(git rev-parse HEAD)")
if [[ -d "${TORCH_WHEELS:-/opt/wheels}" ]]; then
  mounts+=(-v "${TORCH_WHEELS:-/opt/wheels}:/wheels:ro")
  build_args+=(--build-arg PIP_FIND_LINKS=/wheels)
fi
[[ -n "${TORCH_INDEX:-}" ]] && build_args+=(--build-arg "PIP_EXTRA_INDEX_URL=$TORCH_INDEX")
# the host's CA bundle, for machines whose route to PyPI re-signs TLS (as pip here is told by PIP_CERT)
if [[ -n "${PIP_CERT:-}" && -f "$PIP_CERT" ]]; then
  mounts+=(-v "$PIP_CERT:/etc/ssl/host-ca.crt:ro")
  build_args+=(--build-arg PIP_CERT=/etc/ssl/host-ca.crt)
fi

log "podman build -> $IMAGE"
podman build --network host "${mounts[@]}" "${build_args[@]}" -f docker/Dockerfile -t "$IMAGE" . \
  >"$WORK/build.log" 2>&1 || { tail -40 "$WORK/build.log"; exit 1; }
IMAGE_ID=$(podman image inspect --format '{{.Id}}' "$IMAGE")
DIGEST=$(podman image inspect --format '{{.Digest}}' "$IMAGE")
log "built $IMAGE@$DIGEST (id sha256:$IMAGE_ID)"

log "the quickstart in the image, offline, on a fresh clone of $(git rev-parse --short HEAD)"
rm -rf "$WORK/workspace"
git clone -q . "$WORK/workspace"
chown -R 1000:1000 "$WORK/workspace"
# only the clone is mounted: the quickstart's eval data ships in the repository (eval/data)
run_mounts=(-v "$WORK/workspace:/workspace")
# The sandbox for model-written code, as users run the image: its default user (uid 1000) under
# podman's default security settings, then with the usual hardening flags; the level must be the
# strong one (tests/test_sandbox.py asserts bubblewrap+userns) and every hostile program contained.
for flags in "" "--cap-drop=ALL --security-opt=no-new-privileges"; do
  log "sandbox suite in the image as uid 1000 ${flags:-(podman defaults)}"
  # shellcheck disable=SC2086  # $flags is a list of flags
  podman run --rm --network none $flags -e HF_TOKEN=hf_sandbox_canary_3f9c2e71 "${run_mounts[@]}" "$IMAGE" \
    python -m pytest -q -p no:cacheprovider tests/test_sandbox.py >"$WORK/sandbox.log" 2>&1 \
    || { tail -40 "$WORK/sandbox.log"; log "the sandbox suite failed in the image"; exit 1; }
  tail -1 "$WORK/sandbox.log"
done
start=$(date +%s)
# IMAGE_QUICKSTART_OVERRIDES, else QUICKSTART_OVERRIDES (e.g. "train.max_steps=10 eval.task_limit=20"): the
# quickstart composed with these overrides (`finetune use`), so CI runs every stage in the image within its time
# budget (the native run in .ci/newcomer.sh has measured the quickstart already: here the point is the image)
overrides=${IMAGE_QUICKSTART_OVERRIDES:-${QUICKSTART_OVERRIDES:-}}
cmd=(repro)
if [[ -n "$overrides" ]]; then
  log "overrides: $overrides"
  cmd=(bash -c "python -m finetune use quickstart $overrides >/dev/null && exec finetune-entrypoint repro")
fi
# the image's identity goes into every result's provenance (a container cannot read its own digest)
# the pipeline's status is podman's (pipefail; grep may find nothing): a failed stage fails this script
if ! podman run --rm --network none -e "FINETUNE_IMAGE=$IMAGE@$DIGEST" "${run_mounts[@]}" "$IMAGE" "${cmd[@]}" 2>&1 \
    | tee "$WORK/repro.log" | { grep -E "Running stage|Stage .* didn't change|ERROR|error:" || true; }; then
  tail -40 "$WORK/repro.log"; log "quickstart failed in the image"; exit 1
fi
log "quickstart passed in $(( $(date +%s) - start )) s"
for f in metrics/heldout.json metrics/train.json eval/metrics/finetuned.json models/quickstart-q4_k_m.gguf; do
  [[ -s "$WORK/workspace/$f" ]] || { log "missing output: $f"; exit 1; }
done
python3 - "$WORK/workspace" <<'PY'
import json, sys
ws = sys.argv[1]
block = json.load(open(f"{ws}/eval/metrics/finetuned.json"))["provenance"]
assert block["image"] and "sha256:" in block["image"], block
print("heldout:", json.load(open(f"{ws}/metrics/heldout.json")))
print("provenance:", block["image"], "|", block["hardware"])
PY
log "ok: $IMAGE@$DIGEST"
if [[ -n "${OWN_WORK:-}" ]]; then rm -rf "$WORK"; fi
