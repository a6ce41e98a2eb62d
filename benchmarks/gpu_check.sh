#!/usr/bin/env bash
# The GPU figures of issue 7 in one prepared run: Transformer-big in bf16 (bench: MFU,
# tokens/s, step time, memory, decoding) and the time for Transformer-base to reach
# BLEU 35 on the test split (trainer and eval worker side by side on the one GPU).
#
#   bash benchmarks/gpu_check.sh fetch   # here, with pip: .gpu/wheels (what the GPU
#                                        # image lacks, for its Python 3.12) + .gpu/data
#   bash benchmarks/gpu_check.sh run     # on the GPU machine, with .gpu/ in the checkout:
#                                        # figures in $OUT (about 10 minutes)
#
# $OUT gets env.txt (GPU, versions), big_bench.json/.log, base_train.log,
# base_eval.log, base_results.jsonl (BLEU per checkpoint), base_train_metrics.jsonl and
# summary.txt (time to BLEU 35). Budgets (seconds) are env knobs: BIG_S, BASE_S, WAIT_S
# (for the eval worker to score the last checkpoint).
# GPU_CHECK_QUICK=1 runs the same plumbing on a CPU with the tiny config (3.5 minutes
# on a 2-core VM).
set -uo pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = fetch ]; then
  mkdir -p .gpu/wheels .gpu/data
  python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
    --platform manylinux1_x86_64 -d .gpu/wheels \
    grain==0.2.18 array-record==0.8.6 portpicker==1.6.0 ml-collections==1.1.0 \
    tensorboardX==2.6.5 || exit 1
  cp "${JAXNMT_DATA_DIR:-../shared/data}/spa-eng.zip" .gpu/data/ || exit 1
  du -sh .gpu
  exit 0
fi
[ "${1:-}" = run ] || { echo "usage: $0 fetch|run" >&2; exit 2; }

OUT=${OUT:-/tmp/gpu_check}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
CACHE=--compilation_cache_dir=/tmp/jaxnmt_xla
export JAXNMT_DATA_DIR=${JAXNMT_DATA_DIR:-$PWD/.gpu/data}
if ! python3 -c 'import grain, ml_collections, tensorboardX' 2>/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .gpu/wheels/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}

if [ "${GPU_CHECK_QUICK:-0}" = 1 ]; then  # the plumbing, on a CPU
  BIG=configs/tiny.py; BASE=configs/tiny.py; FAST=''; ROWS=8; STEPS=3; DECODE=16
  BIG_S=${BIG_S:-120}; BASE_S=${BASE_S:-150}; WAIT_S=${WAIT_S:-180}
  EVAL_ARGS='--max_test_sentences=64'
  TRAIN_ARGS='--config.checkpoint_every_steps=10 --config.log_every_steps=5'
else
  BIG=configs/big.py; BASE=configs/base.py; ROWS=512; STEPS=30; DECODE=512
  # 10 s of wheels + 150 + 300 + 90 s: inside one 600 s device call.
  BIG_S=${BIG_S:-150}; BASE_S=${BASE_S:-300}; WAIT_S=${WAIT_S:-90}
  EVAL_ARGS='--batch_size=512'
  # bf16 compute, cuDNN flash attention (it has no attention dropout).
  FAST='--config.model.dtype=bfloat16 --config.model.attention=dot_product
        --config.model.attention_dropout_rate=0.0 --config.model.attention_implementation=cudnn'
  # ~30k real target tokens per update, a shorter warmup for it.
  TRAIN_ARGS='--config.data.batch_size=512 --config.optim.warmup_steps=1000
              --config.optim.learning_rate=1e-3 --config.checkpoint_every_steps=400
              --config.log_every_steps=50 --config.eval_every_steps=1000'
fi
{ nvidia-smi 2>&1; python3 -c 'import jax, flax, optax, orbax.checkpoint, grain
print("jax", jax.__version__, "flax", flax.__version__, "optax", optax.__version__,
      "grain", grain.__version__); print(jax.devices())'; } > "$OUT/env.txt" 2>&1
cat "$OUT/env.txt"

big() {  # big() SECONDS OVERRIDES LOGNAME
  timeout "$1" python3 -m jaxnmt.main --mode=bench $CACHE --config=$BIG $2 \
    --config.data.batch_size=$ROWS --workdir=/tmp/gc_big --bench_steps=$STEPS \
    --bench_decode_sentences=$DECODE > "$OUT/$3" 2>&1
  status=$?; echo "exit $status"; tail -n 30 "$OUT/$3"; return $status
}
echo "== big: bench ($BIG_S s)"
if ! big "$BIG_S" "$FAST" big_bench.log && [ -n "$FAST" ]; then
  # cuDNN's fused attention refused (library version, mask): XLA's attention instead.
  FAST=${FAST/--config.model.attention_implementation=cudnn/--config.model.attention_implementation=xla}
  echo "== big again with XLA attention"
  big 120 "$FAST" big_bench_xla.log
fi
cp /tmp/gc_big/bench.json "$OUT/big_bench.json" 2>/dev/null

echo "== base: train and eval worker side by side ($BASE_S s)"
started=$(date +%s.%N)
minutes=$(python3 -c "print(($BASE_S - 60) / 60)")
XLA_PYTHON_CLIENT_MEM_FRACTION=0.6 timeout "$BASE_S" python3 -m jaxnmt.main $CACHE --config=$BASE \
  $FAST $TRAIN_ARGS --config.keep_checkpoints=1000 \
  --config.train_time_limit_minutes=$minutes --workdir=/tmp/gc_base \
  > "$OUT/base_train.log" 2>&1 &
trainer=$!
# The worker starts once the trainer has written its run (config, splits).
for _ in $(seq 120); do [ -f /tmp/gc_base/config.json ] && break; sleep 1; done
XLA_PYTHON_CLIENT_MEM_FRACTION=0.3 python3 -m jaxnmt.main --mode=eval $CACHE \
  --workdir=/tmp/gc_base --poll_seconds=2 $EVAL_ARGS > "$OUT/base_eval.log" 2>&1 &
worker=$!
wait $trainer; echo "trainer exit $?"
# The worker ends by itself once it has scored the trainer's last checkpoint; a
# trainer that was cut off leaves it waiting, so it is stopped after WAIT_S seconds.
for _ in $(seq $((WAIT_S / 2))); do kill -0 $worker 2>/dev/null || break; sleep 2; done
kill $worker 2>/dev/null; wait $worker; echo "eval worker exit $?"
cp /tmp/gc_base/eval/results.jsonl "$OUT/base_results.jsonl" 2>/dev/null
cp /tmp/gc_base/train/metrics.jsonl "$OUT/base_train_metrics.jsonl" 2>/dev/null
tail -n 20 "$OUT/base_train.log"; tail -n 10 "$OUT/base_eval.log"

python3 - "$started" "$OUT" <<'EOF' | tee "$OUT/summary.txt"
import json, sys
started, out = float(sys.argv[1]), sys.argv[2]
def rows(name):
  try:
    return [json.loads(line) for line in open(f'{out}/{name}', encoding='utf-8')]
  except OSError:
    return []
train = [r for r in rows('base_train_metrics.jsonl') if 'time' in r]
results = sorted(rows('base_results.jsonl'), key=lambda r: r['step'])
def time_at(step):  # seconds from launch to the first training log at or after `step`
  later = [r['time'] for r in train if r['step'] >= step]
  return later[0] - started if later else None
first_log = train[0]['time'] - started if train else None
print(f'first training log {first_log} s after launch (tokenizer, compile included)')
for r in results:
  bleu = r.get('bleu')
  print(f"step {r['step']}: BLEU {bleu}, reached {time_at(r['step'])} s after launch")
hit = [r for r in results if (r.get('bleu') or 0) >= 35]
print('time to BLEU 35:', f"{time_at(hit[0]['step'])} s (step {hit[0]['step']})" if hit
      else 'not reached in this budget')
EOF
