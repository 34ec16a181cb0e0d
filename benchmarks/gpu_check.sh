#!/usr/bin/env bash
# One prepared check for a machine with a GPU (at most 8 minutes there): the layer
# benchmark (dense, sparse, capacity, capacity under XLA; float32 and bfloat16; E = 8, 64,
# 512) and a 200-step run of the default language model, written to one Markdown file.
#
#   bash benchmarks/gpu_check.sh [--cpu] [OUTPUT]     # OUTPUT defaults to gpu_check.md
#
# --cpu: the same steps at sizes a 2-core CPU finishes in about a minute (E = 8 only, 256
# tokens, float32 only, a tiny language model), so that the script itself is tested where
# there is no GPU. Every step has its own time limit; a step that fails or runs out of time is
# reported in the file and the script goes on. PYTHON selects the interpreter.
set -uo pipefail
cd "$(dirname "$0")/.."

cpu=0
if [[ "${1:-}" == "--cpu" ]]; then
  cpu=1
  shift
fi
out="${1:-gpu_check.md}"
python="${PYTHON:-python}"
export TF_CPP_MIN_LOG_LEVEL="${TF_CPP_MIN_LOG_LEVEL:-2}"

if (( cpu )); then
  bench_sizes=(--experts 8 --tokens 256 --steps 2)
  dtypes=(float32)
  lm_flags=(--preset=tiny --train_steps=10)
  step_limit=300
else
  bench_sizes=(--experts 8 64 512 --steps 5)
  dtypes=(float32 bfloat16)
  lm_flags=(--train_steps=200 --eval_every=0 --max_eval_batches=20)
  step_limit=150
fi

# Runs one titled step under its time limit and appends its output to the report.
run_step() {
  local title="$1"
  shift
  {
    echo
    echo "## ${title}"
    echo
    echo '```'
    echo "\$ $*"
  } >> "${out}"
  local start=${SECONDS}
  timeout "${step_limit}" "$@" >> "${out}" 2>"${out}.stderr"
  local status=$?
  {
    if (( status != 0 )); then
      echo "FAILED with status ${status} (124: over ${step_limit} s); last lines of stderr:"
      tail -n 15 "${out}.stderr"
    fi
    echo '```'
    echo "(${title}: $((SECONDS - start)) s)"
  } >> "${out}"
  rm -f "${out}.stderr"
}

{
  echo "# moe_tf GPU check"
  echo
  echo "commit $(git rev-parse --short HEAD 2>/dev/null || echo unknown), $(date -u +%FT%TZ)"
  echo
  echo '```'
  "${python}" -c 'import tensorflow as tf; print("TensorFlow", tf.__version__); print("GPUs:", tf.config.list_physical_devices("GPU"))' 2>/dev/null
  nvidia-smi --query-gpu=name,memory.total --format=csv,noheader 2>/dev/null || echo "nvidia-smi: none"
  echo '```'
} > "${out}"

for dtype in "${dtypes[@]}"; do
  run_step "layer_bench, dense + sparse + capacity, ${dtype}" \
    "${python}" -m benchmarks.layer_bench --dispatch both --dtype "${dtype}" "${bench_sizes[@]}"
  run_step "layer_bench, capacity under XLA, ${dtype}" \
    "${python}" -m benchmarks.layer_bench --dispatch capacity --jit-compile --dtype "${dtype}" \
    "${bench_sizes[@]}"
done

model_dir="$(mktemp -d)"
run_step "default language model, ${lm_flags[*]}" \
  "${python}" -m train.lm --model_dir="${model_dir}" --export_dir= "${lm_flags[@]}"
if [[ -f "${model_dir}/metrics.json" ]]; then
  { echo; echo '```'; cat "${model_dir}/metrics.json"; echo '```'; } >> "${out}"
fi
rm -rf "${model_dir}"
echo "wrote ${out}"
