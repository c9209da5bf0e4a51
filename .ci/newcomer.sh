#!/usr/bin/env bash
# The newcomer path (called by .ci/run): `git clone` this checkout's HEAD into a fresh folder under /tmp with
# nothing beside it (no ../shared), then the README's commands there:
#   make install, make test (the suite from a bare clone), make repro (the quickstart; QUICKSTART_OVERRIDES
#   shrink it as for `make test-image`), then checks that every stage ran, that eval read the shipped
#   eval/data, and that HumanEval ran in the strong (bubblewrap) sandbox; with no overrides also `make verify`
#   against the committed metrics. Arguments: further make targets to run in the clone afterwards (.ci/run
#   passes test-image, so one install serves all).
# FINETUNE_SHARED_DATA (optional) reaches `make test` only, for the real-data tests; the quickstart never sees it.
# NEWCOMER_SKIP_TESTS=1 leaves out `make test`; NEWCOMER_SKIP_REPRO=1 leaves out `make repro` and its checks. The folder is removed after a passing run, kept after a failure.
set -euo pipefail
cd "$(dirname "$0")/.."
WORK=$(mktemp -d /tmp/finetune-newcomer.XXXXXX)
CLONE=$WORK/finetune-recipes
failures=()
log() { printf '[newcomer %s] %s\n' "$(date +%T)" "$*"; }
fail() { log "FAIL: $*"; failures+=("$*"); }
# step NAME CMD...: run CMD in the clone with its output in $WORK/NAME.log; say how long it took or fail
step() {
  local name=$1 start rc=0
  shift
  start=$(date +%s)
  "$@" >"$WORK/$name.log" 2>&1 || rc=$?
  if [[ $rc -eq 0 ]]; then
    log "$name: ok in $(( $(date +%s) - start )) s"
  else
    tail -25 "$WORK/$name.log"
    fail "$name: exit $rc after $(( $(date +%s) - start )) s (log: $WORK/$name.log)"
  fi
  return $rc
}

git clone -q . "$CLONE"
cd "$CLONE"
[[ ! -e ../shared ]] || { log "error: $WORK/shared exists: the clone must have nothing beside it"; exit 2; }
log "clone of $(git rev-parse --short HEAD) in $CLONE, nothing beside it"

step install make install || exit 1
if [[ -z "${NEWCOMER_SKIP_TESTS:-}" ]]; then
  step test make test || true  # FINETUNE_SHARED_DATA, if the caller set it, reaches the suite's real-data tests
  log "make test: $(grep -E '^(=+ )?[0-9]+ (passed|failed)' "$WORK/test.log" | tail -1)"
fi

if [[ -n "${NEWCOMER_SKIP_REPRO:-}" ]]; then
  log "make repro: skipped (NEWCOMER_SKIP_REPRO)"
elif [[ -n "${QUICKSTART_OVERRIDES:-}" ]]; then
  log "quickstart overrides: $QUICKSTART_OVERRIDES"
  # shellcheck disable=SC2086  # the overrides are separate words
  .venv/bin/python -m finetune use quickstart $QUICKSTART_OVERRIDES >/dev/null
fi
if [[ -z "${NEWCOMER_SKIP_REPRO:-}" ]] && step repro env -u FINETUNE_SHARED_DATA make repro; then
  .venv/bin/python - "$CLONE" <<'PY' || fail "quickstart outputs (see the lines above)"
import json, subprocess, sys
from pathlib import Path
import yaml

clone = Path(sys.argv[1])
bad = []
stages = yaml.safe_load((clone / "dvc.yaml").read_text())["stages"]
locked = yaml.safe_load((clone / "dvc.lock").read_text())["stages"]
bad += [f"stage {name}: not in dvc.lock (did not run)" for name in stages if name not in locked]
status = subprocess.run([".venv/bin/dvc", "status", "--json"], cwd=clone, capture_output=True, text=True)
if status.returncode != 0 or json.loads(status.stdout or "{}"):
    bad.append(f"dvc status after make repro is not clean: {(status.stdout.strip() or status.stderr.strip())[:300]}")
for name, stage in stages.items():
    for entry in stage.get("metrics", []):
        path = clone / next(iter(entry))
        if not (path.is_file() and path.stat().st_size) and not (path.is_dir() and any(path.iterdir())):
            bad.append(f"stage {name}: metrics {path.relative_to(clone)} missing or empty")
data_dir = (clone / "eval" / "data").resolve()
read, weak = {}, {}  # data folder / sandbox level -> the eval variants that used it
for path in sorted((clone / "eval" / "metrics").glob("*.json")):
    entry = json.loads(path.read_text())
    used = entry.get("lm_eval", {}).get("config", {}).get("data_dir")
    if used is not None and Path(used) != data_dir:
        read.setdefault(used, []).append(path.stem)
    level = entry.get("humaneval", {}).get("isolation")
    if level is not None and not level.startswith("bubblewrap"):
        weak.setdefault(level, []).append(path.stem)
bad += [f"lm-eval read {used} (eval/metrics: {', '.join(names)}), not the shipped {data_dir}"
        for used, names in read.items()]
bad += [f"HumanEval sandbox level '{level}' (eval/metrics: {', '.join(names)}) is not the strong one (bubblewrap...)"
        for level, names in weak.items()]
for line in bad or [f"{len(stages)} stages ran; eval read {data_dir}"]:
    print(f"[newcomer] {line}")
sys.exit(1 if bad else 0)
PY
  if [[ -z "${QUICKSTART_OVERRIDES:-}" ]]; then
    step verify make verify || true
    grep -E '^(published|workspace):|must be equal|differ|metrics match' "$WORK/verify.log"
  else
    log "make verify: skipped (the overrides change what the published numbers measure)"
  fi
fi

for target in "$@"; do
  step "$target" make "$target" || true
done

if [[ ${#failures[@]} -gt 0 ]]; then
  log "${#failures[@]} failure(s), kept $WORK:"
  printf '  %s\n' "${failures[@]}"
  exit 1
fi
log "ok"
rm -rf "$WORK"
