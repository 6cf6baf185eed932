#!/usr/bin/env bash
# The `rl-jax plan` figures of README.md and benchmarks/RESULTS.md, every one an ahead-of-time compilation for a TPU
# target with libtpu on this CPU host (pip install -e ".[tpu]"). Sequential: each 671B compile takes minutes and
# several GiB of host memory. Writes benchmarks/plans/<name>.{txt,json}; a name whose .json exists is skipped.
#   bash benchmarks/plan_tables.sh [name ...]      # default: all, in the order below
set -u
cd "$(dirname "$0")/.." || exit 2
OUT=benchmarks/plans
mkdir -p "$OUT"

run() {  # name, then the rl-jax plan arguments
  local name=$1
  shift
  if [ -f "$OUT/$name.json" ]; then echo "$name: done already"; return; fi
  echo "== $name: rl-jax plan $*"
  local t0=$SECONDS
  if rl-jax plan "$@" --json "$OUT/$name.json" > "$OUT/$name.txt" 2> "$OUT/$name.log"; then
    echo "   $((SECONDS - t0)) s"; tail -n +1 "$OUT/$name.txt" | head -n 4
  else
    echo "   FAILED after $((SECONDS - t0)) s (see $OUT/$name.log)"; tail -n 3 "$OUT/$name.log"
  fi
}

want() { [ -z "$SELECTED" ] || [[ " $SELECTED " == *" $1 "* ]]; }
SELECTED="$*"
V3=(--config plan/v3_671b_pretrain)

# tiny presets on v5e:2x2
want tiny_pretrain && run tiny_pretrain --config pretrain_tiny --topology v5e:2x2
want tiny_grpo && run tiny_grpo --config grpo_r1zero_tiny --stage grpo --topology v5e:2x2 model=tiny-moe
# TPU7x needs a newer libtpu than jax 0.10's (jax 0.12, Python 3.13); tiny_pretrain_tpu7x.{txt,json} came from
#   python3.13 -m venv v13 && v13/bin/pip install -e ".[tpu]" &&
#   v13/bin/rl-jax plan --config pretrain_tiny --topology tpu7x:2x2x1 --json benchmarks/plans/tiny_pretrain_tpu7x.json
# scanned compile time against depth, and the unrolled stack (same model, mesh and batch, v5p-256)
want v3_4l_scanned && run v3_4l_scanned "${V3[@]}" --topology v5p-256 model.num_hidden_layers=4
want v3_4l_unrolled && run v3_4l_unrolled "${V3[@]}" --topology v5p-256 model.num_hidden_layers=4 model.scan_layers=false
want v3_8l_unrolled && run v3_8l_unrolled "${V3[@]}" --topology v5p-256 model.num_hidden_layers=8 model.scan_layers=false
# the issue's first finding: 671B cut to 3 layers on v5p:4x4x4, fsdp=16 x expert=4 (AdamW moments were replicated)
want v3_3l_v5p128 && run v3_3l_v5p128 "${V3[@]}" --topology v5p:4x4x4 model.num_hidden_layers=3 mesh.expert=4 \
  train.batch_size=64
# DeepSeek-V3 671B pretraining at 4096 tokens: the full model; --search on the smaller slice
want v3_pretrain_v5p256 && run v3_pretrain_v5p256 "${V3[@]}" --topology v5p-256
want v3_search_v5p256 && run v3_search_v5p256 "${V3[@]}" --topology v5p-256 --search --top 3
want v3_search_v5p128 && run v3_search_v5p128 "${V3[@]}" --topology v5p-128 --search --top 2 train.batch_size=64
# DeepSeek-V3 671B GRPO, the sampler colocated
# (the config's mesh: fsdp=4 expert=8 sequence=4; then the pretraining mesh on v5p-256, and on v5p-512)
want v3_grpo_v5p256_seq4 && run v3_grpo_v5p256_seq4 --config plan/v3_671b_grpo --stage grpo --topology v5p-256
want v3_grpo_v5p256 && run v3_grpo_v5p256 --config plan/v3_671b_grpo --stage grpo --topology v5p-256 \
  mesh.fsdp=16 mesh.sequence=1 train.grad_accum=2
want v3_grpo_v5p512 && run v3_grpo_v5p512 --config plan/v3_671b_grpo --stage grpo --topology v5p-512 \
  mesh.fsdp=32 mesh.sequence=1 train.grad_accum=1
# R1-Distill-Qwen-7B-shaped GRPO on 8 chips of v6e and v5e
want qwen7b_grpo_v6e && run qwen7b_grpo_v6e --config plan/r1_distill_qwen_7b_grpo --stage grpo --topology v6e:2x4
want qwen7b_grpo_v5e && run qwen7b_grpo_v5e --config plan/r1_distill_qwen_7b_grpo --stage grpo --topology v5e:2x4
want qwen7b_grpo_v5e16 && run qwen7b_grpo_v5e16 --config plan/r1_distill_qwen_7b_grpo --stage grpo --topology v5e:4x4 \
  mesh.fsdp=16 train.grad_accum=4
# R1-Distill-Qwen-32B-shaped distillation SFT on v5p:4x4x4
want qwen32b_sft_v5p && run qwen32b_sft_v5p --config plan/r1_distill_qwen_32b_sft --stage distill --topology v5p:4x4x4
