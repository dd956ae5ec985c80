#!/usr/bin/env bash
# Conditional DiffusionBERT (seq2seq): train, decode with MBR, evaluate.
#
#   bash run_condition.sh                      offline CPU demo: KJV -> WEB verse paraphrase (about 20 min on 2 cores)
#   bash run_condition.sh qqp path/to/QQP      a DiffuSeq-format folder (train/valid/test.jsonl); also wiki_auto,
#                                              quasar_t, commonsense_conversation, or `folder` for any such folder
#   NGPU=4 bash run_condition.sh qqp path/to/QQP   the same under torchrun (DDP)
#
#   bash run_condition.sh diffuseq             DiffuSeq (continuous, from scratch) offline demo, full-chain MBR decoding
#   bash run_condition.sh diffuseq qqp path/to/QQP       the same on a DiffuSeq folder (paper size, bert-base vocabulary)
#   bash run_condition.sh diffuseq_post [RUN]  Tang et al.'s post-training of a DiffuSeq run (default: the newest
#                                              outputs/diffuseq-*), then a table: full chain / uniform_20 / adp_20,
#                                              before and after post-training
#
#   DRY_RUN=1 bash run_condition.sh qqp path/to/QQP   print the commands a preset runs, run nothing
#
# Extra arguments after the preset (and folder) go to train.py.
set -euo pipefail
cd "$(dirname "$0")"

PRESET=${1:-demo}
shift || true
. scripts/launch.sh

case "$PRESET" in
  diffuseq|diffuseq_post)
    exec bash scripts/diffuseq.sh "$PRESET" "$@"
    ;;
esac

case "$PRESET" in
  demo)
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false
    RUN=outputs/cond-demo-$STAMP
    DATA_ARGS=(--dataset bible)
    # spindle off (mutual), as the original does for seq2seq
    TRAIN_ARGS=(--model_name_or_path minilm --task seq2seq --max_len 80 --num_steps 2000 --schedule mutual
                --batch_size 12 --lr 2e-4 --warmup_steps 50 --max_steps 800
                --eval_every 200 --eval_examples 48 --eval_steps 16 --save_every 200 --log_every 10)
    DECODE_ARGS=(--split test --num_examples 100 --steps 40 --mbr_size 3 --batch_size 50 --seed 42)
    ;;
  qqp|wiki_auto|quasar_t|commonsense_conversation|folder)
    FOLDER=${1:?"usage: bash run_condition.sh $PRESET path/to/folder (with train.jsonl valid.jsonl test.jsonl)"}
    shift
    RUN=outputs/cond-$PRESET-$STAMP
    DATA_ARGS=(--dataset "$PRESET" --data_files "$FOLDER")
    # DiffusionBERT's released seq2seq run (run_condition.sh: DDP_main_conditional.py on 4 GPUs, --lr 5e-5
    # --batch_size 64, its defaults for the rest): T = 2000, mutual, the released objective (summed, not divided by
    # the batch size) with hybrid lambda 3e-4; 64 a GPU x 4 GPUs x accumulation 4 = 1024 a step at any NGPU; LinearLR from lr/3 to lr over 10k
    # steps, then constant; value clipping at 5 after every micro-batch; AdamW's default weight decay 0.01;
    # 200 epochs (counted from the lines of train.jsonl as DistributedSampler and the accumulation count them).
    # Its decoding (predict_downstream_condition.py): top-k 15, temperature 1, T = 2000 in steps of 10 = 200
    # steps, the last step redrawn from p_hat, MBR 3. Its canvas (dataloader.py): [CLS] src trg [SEP] with the
    # task's prompt text, each batch padded to its longest row. Where we differ (backbone, ...): docs/differences.md.
    ACC=$(( (16 + NGPU - 1) / NGPU ))
    [ -f "$FOLDER/train.jsonl" ] || { echo "error: no $FOLDER/train.jsonl (a DiffuSeq folder has train.jsonl valid.jsonl test.jsonl)" >&2; exit 2; }
    ROWS=$(grep -c . "$FOLDER/train.jsonl" || true)
    MICRO=$(( ( (ROWS + 3) / 4 + 63) / 64 ))   # micro-batches per epoch on each of the 4 ranks
    MAX_STEPS=$(( 200 * MICRO / 4 ))
    TRAIN_ARGS=(--model_name_or_path bert-base-uncased --task seq2seq --max_len 128 --num_steps 2000 --schedule mutual
                --loss_weighting released_conditional --hybrid_lambda 3e-4
                --canvas released --pad_to longest --truncation ours
                --batch_size 64 --accumulation_steps $ACC --lr 5e-5 --lr_schedule ddp_main_conditional
                --warmup_steps 10000 --grad_clip 0 --grad_clip_value 5 --weight_decay 0.01 --max_steps $MAX_STEPS
                --eval_every 1000 --eval_examples 1000 --eval_steps 25 --save_every 1000 --log_every 50
                --num_workers 4 --seed 42)
    DECODE_ARGS=(--split test --sampler released --steps 200 --topk 15 --temperature 1 --mbr_size 3 --batch_size 128
                 --seed 42)
    ;;
  *)
    echo "error: unknown preset '$PRESET' (use: demo, qqp, wiki_auto, quasar_t, commonsense_conversation, folder, diffuseq, diffuseq_post)" >&2
    exit 2
    ;;
esac

START=$(date +%s)
echo "== 1/3 training -> $RUN"
run "${TRAIN[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" --out_dir "$RUN" "$@"

NAME=$(basename "$RUN")
OUT=generation_results/$NAME
echo "== 2/3 decoding with MBR -> $OUT"
run "$PY" predict_downstream_condition.py --checkpoint "$RUN" "${DECODE_ARGS[@]}" --name "$NAME"
[ -n "${DRY_RUN:-}" ] && exit 0

echo "== 3/3 metrics"
echo "-- MBR output"
"$PY" compute_metric.py --mode seq2seq --samples "$OUT/mbr.jsonl" --out "$OUT/metrics_mbr.json"
echo "-- diversity across the candidates of each source"
"$PY" compute_metric.py --mode seq2seq --samples "$OUT"/seed*.jsonl --bertscore_model none --out "$OUT/metrics_candidates.json"
echo "-- copy baseline (the source itself as the output)"
"$PY" compute_metric.py --mode seq2seq --samples "$OUT/copy_source.jsonl" --out "$OUT/metrics_copy_source.json"

SUMMARY=$("$PY" summarise.py --bleu "$OUT/metrics_mbr.json" --copy "$OUT/metrics_copy_source.json")
cat <<EOF

== done in $(( $(date +%s) - START ))s
checkpoints:   $RUN/checkpoints/{best,last}
training log:  $RUN/metrics.jsonl
plots:         $RUN/plots/train_loss.png, $RUN/plots/dev.png (dev NELBO and perplexity bound)
outputs:       $OUT/seed*.jsonl (candidates), $OUT/mbr.jsonl (MBR), $OUT/copy_source.jsonl, $OUT/decode.json (timings)
metrics:       $OUT/metrics_mbr.json, $OUT/metrics_candidates.json, $OUT/metrics_copy_source.json

$SUMMARY
EOF
