#!/usr/bin/env bash
# The image's entrypoint: pipeline verbs on the workspace mounted at /workspace (a git checkout of
# finetune-recipes), with the image's locked stack. HF_TOKEN, if needed, comes from the environment.
set -euo pipefail
export TOKENIZERS_PARALLELISM=false
cd /workspace
if [[ ! -f dvc.yaml ]]; then
  echo "finetune-entrypoint: /workspace has no dvc.yaml; mount a checkout: docker run -v \"\$PWD\":/workspace ..." >&2
  exit 2
fi
verb="${1:-repro}"
case "$verb" in
  repro|eval|test|test-fast|validate|data) shift; exec make "$verb" "$@" ;;
  exp) shift; exec dvc exp run "$@" ;;
  *) exec "$@" ;;
esac
