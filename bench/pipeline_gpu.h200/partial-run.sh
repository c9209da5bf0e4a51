#!/bin/bash
# After the full run's quantize crash (torch + CUDA llama.cpp in one process): with the device time left,
# measure at 8B what does not need both in one process. A: HF eval + heldout stages (base = the random
# Llama-3-8B standing in for the merged model too) while llama.cpp builds with CUDA and the base is
# converted to f16 and q4_k_m GGUF beside; B: HumanEval generation on the q4_k_m GGUF, llama.cpp alone.
set -uo pipefail
G=$(cd "$(dirname "$0")" && pwd); R=/root/partial; H="bash $G/offline_gpu_host.sh"
export PY=python3
a() {
  mkdir -p $R /tmp/site /tmp/site-llama /tmp/bundle /tmp/lcp /root/gg
  $H unpack $G/site.tar.xz /tmp/site; $H unpack $G/bundle.tar.xz /tmp/bundle; $H unpack $G/llama-cpp-src.tar.xz /tmp/lcp
  export PYTHONPATH=/tmp/site HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false PYTHONUNBUFFERED=1
  L=/tmp/lcp/llama_cpp_python-0.3.36
  python3 -c "import sys; sys.path[:0]=['$G/project/bench','$G/project/src']
from pathlib import Path; from train_speed import build_checkpoint
build_checkpoint('llama3-8b', Path('/tmp/bundle'), Path('/dev/shm/base'), 32)" > $R/base.log 2>&1
  # beside: llama.cpp with CUDA (sm_90), then base -> f16 -> q4_k_m (no torch in those processes' llama.cpp part)
  (cd $L && t0=$(date +%s) && CMAKE_ARGS="-DGGML_NATIVE=OFF -DGGML_AVX=ON -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON -DGGML_BMI2=ON -DGGML_CUDA=on -DCMAKE_CUDA_ARCHITECTURES=90" CMAKE_BUILD_PARALLEL_LEVEL=12 \
     python3 -m pip install --no-deps --no-build-isolation --no-index --target /tmp/site-llama . > $R/llama-build.log 2>&1; echo "build rc=$? s=$(( $(date +%s)-t0 ))" > $R/gg.txt
   t0=$(date +%s); python3 $L/vendor/llama.cpp/convert_hf_to_gguf.py /dev/shm/base --outtype f16 --outfile /root/gg/f16.gguf > $R/convert.log 2>&1; echo "convert rc=$? s=$(( $(date +%s)-t0 ))" >> $R/gg.txt
   t0=$(date +%s); PYTHONPATH=/tmp/site-llama:/tmp/site python3 -c "
import llama_cpp
p = llama_cpp.llama_model_quantize_default_params(); p.ftype = llama_cpp.LLAMA_FTYPE_MOSTLY_Q4_K_M; p.nthread = 8
print(llama_cpp.llama_model_quantize(b'/root/gg/f16.gguf', b'/root/gg/q4_k_m.gguf', p))" > $R/q4.log 2>&1; echo "q4_k_m rc=$? s=$(( $(date +%s)-t0 ))" >> $R/gg.txt) &
  W=/root/w; rm -rf $W; mkdir -p $W/data && cp -r $G/project/{dvc.yaml,src,recipes,eval} $W/ && cp /tmp/bundle/data/alpaca/alpaca_data_1k.json $W/data/
  cd $W && export PYTHONPATH=$W/src:/tmp/site
  python3 -m finetune use llama3-alpaca model.id=/dev/shm/base data.id=null data.local_path=data/alpaca_data_1k.json eval.data_dir=/tmp/bundle/data "eval.gguf_types=[]" > /dev/null
  mkdir -p outputs && ln -s /dev/shm/base outputs/merged
  (nvidia-smi --query-gpu=memory.used --format=csv,noheader,nounits -lms 500 > $R/gpu.log &)
  for s in prepare eval heldout; do
    case $s in prepare) C="python3 -m finetune prepare --out outputs/prepared --metrics metrics/prepare.json";;
      eval) C="python3 -m finetune eval --merged outputs/merged --gguf models --data outputs/prepared --metrics eval/metrics --samples eval/samples";;
      heldout) C="python3 -m finetune heldout --data outputs/prepared --model outputs/merged --metrics metrics/heldout.json --samples outputs/heldout";; esac
    : > $R/gpu.log; t0=$(date +%s.%N); /usr/bin/time -v $C > $R/$s.log 2>&1; rc=$?
    echo "{\"stage\": \"$s\", \"rc\": $rc, \"seconds\": $(python3 -c "print(round($(date +%s.%N)-$t0,1))"), \"peak_rss_gib\": $(python3 -c "print(round($(grep 'Maximum resident' $R/$s.log | tr -dc 0-9)/2**20,2))"), \"peak_gpu_gib\": $(python3 -c "print(round(max([int(x) for x in open('$R/gpu.log') if x.strip()] or [0])/1024,2))")}" | tee -a $R/stages.jsonl
    grep -h "INFO eval\|error" $R/$s.log | tail -8
  done
  cat $R/gg.txt; collect; touch $R/a.done
}
go() {  # start A in its own session (it outlives one call), then wait up to $1 s; B after A when asked
  mkdir -p $R; [ -f $R/a.started ] || { touch $R/a.started; setsid nohup bash $G/partial.sh a > $R/a.log 2>&1 < /dev/null & }
  local t=0; while [ $t -lt $1 ] && [ ! -f $R/a.done ]; do sleep 10; t=$((t+10)); done
  tail -c 5000 $R/a.log; collect
  if [ -f $R/a.done ] && [ "${2:-}" = b ]; then b; fi
}
b() {
  export PYTHONPATH=/tmp/site-llama:/root/w/src:/tmp/site PYTHONUNBUFFERED=1
  while ! grep -q q4_k_m $R/gg.txt 2>/dev/null; do sleep 5; done; cat $R/gg.txt
  cd /root/w && python3 - <<'PY' 2>&1 | tee $R/humaneval-gguf.txt
import json, time
from finetune.benchmarks import humaneval  # no torch in this process: llama.cpp's CUDA build and torch crash together
from finetune.core import gguf
probs = humaneval.load_problems()
prompts = [p["prompt"] for p in probs.values()]  # the recipe's prompt style: completion
t = time.time(); llm = gguf.open_gguf("/root/gg/q4_k_m.gguf", 2048, seed=1234); load = time.time() - t
print("gpu_layers", gguf.gpu_layers(), "load s", round(load, 1), flush=True)
t = time.time(); one = gguf.complete(llm, prompts[:4], 384, seed=1234, parallel=1); seq = time.time() - t
t = time.time(); texts = gguf.complete(llm, prompts, 384, seed=1234); par = time.time() - t
same = [a == b for a, b in zip(one, texts[:4])]
print(json.dumps({"prompts": len(prompts), "max_new_tokens": 384, "parallel_s": round(par, 1), "sequential_4_prompts_s": round(seq, 1),
                  "parallel": gguf.GPU_PARALLEL, "first4_same_as_sequential": same}), flush=True)
PY
  collect
}
collect() { mkdir -p $OUT; cp $R/stages.jsonl $R/gg.txt $R/humaneval-gguf.txt $OUT/ 2>/dev/null; $H pack_dir /root partial $OUT/partial.tar.xz 2>/dev/null
  (cd /root/w && $H pack_dir /root/w eval/metrics $OUT/eval-metrics.tar.xz); }
"$@"
