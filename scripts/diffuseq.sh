# DiffuSeq and Tang et al.'s post-training; started by run_condition.sh (diffuseq | diffuseq_post).
#
#   diffuseq [TASK FOLDER]   train the Gaussian model from scratch, decode the full chain with MBR, metrics
#   diffuseq_post [RUN]      post-train RUN with the distance penalty, then decode full / uniform_20 / adp_20
#                            with the RUN and the post-trained checkpoints and print the comparison table
#
#   DECODE_SETS="uniform_20 adp_20" replaces the decoding settings (default: "full" for diffuseq,
#   "full uniform_20 adp_20" for diffuseq_post); the full chain is the slow one on a CPU.
set -euo pipefail
cd "$(dirname "$0")/.."
PRESET=$1
shift
. scripts/launch.sh
export TOKENIZERS_PARALLELISM=false

# decode one setting of one run into generation_results/<name> (kept if it is already there)
decode() {  # run name respacing
  local out=generation_results/$2
  if [ -f "$out/decode.json" ]; then
    echo "-- $2: reusing $out"
  else
    echo "-- $2: decoding with --decode_respacing $3"
    run "$PY" predict_downstream_condition.py --checkpoint "$1" --decode_respacing "$3" "${DECODE_ARGS[@]}" --name "$2"
  fi
}

demo_or_folder() {  # sets DATA_ARGS, MODEL_ARGS, TRAIN_ARGS, DECODE_ARGS, TAG from "bible" or TASK FOLDER
  if [ "${1:-bible}" = bible ]; then
    export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1
    TAG=demo
    DATA_ARGS=(--dataset bible)
    # a small transformer that trains in minutes on a CPU; the paper's is bert-base size with emb 128
    MODEL_ARGS=(--model_name_or_path minilm --max_len 80 --emb_dim 64 --hidden_size 128 --num_layers 2 --num_heads 2)
    TRAIN_ARGS=(--batch_size 32 --lr 1e-3 --warmup_steps 100 --max_steps 900 --eval_every 300 --eval_examples 128
                --save_every 300 --log_every 20)
    POST_ARGS=(--batch_size 32 --max_steps 300 --eval_every 150 --eval_examples 128 --save_every 150 --log_every 20)
    # the full 2000-step chain is the expensive part on a CPU: the first 24 test pairs, MBR over 3 seeds
    DECODE_ARGS=(--split test --num_examples 24 --mbr_size 3 --batch_size 24 --seed 42)
  else
    FOLDER=${2:?"usage: bash run_condition.sh diffuseq TASK path/to/folder (train.jsonl valid.jsonl test.jsonl)"}
    TAG=$1
    DATA_ARGS=(--dataset "$1" --data_files "$FOLDER")
    # DiffuSeq's released setup (scripts/train.sh, the README's line for each task, config.json): bert-base-uncased
    # vocabulary, emb 128, bert-base encoder, T = 2000, sqrt, lossaware, lr 1e-4 annealed linearly to 0, no
    # gradient clipping, EMA 0.9999, seed 102; --bsz 2048 with micro-batches of 64, which before DiffuSeq's
    # 82a2c40 (the paper's code) is 2048 distinct examples a step on any number of GPUs (every rank drew the same
    # batch): here 2048 a step at any NGPU. Steps per task as the README: qqp 50k, quasar_t (qg) 40k,
    # commonsense_conversation (dialogue) 140k, wiki_auto (ts) 80k; a folder: train.sh's 50k.
    ACC=$(( (2048 + 64 * NGPU - 1) / (64 * NGPU) ))
    case "$1" in quasar_t) STEPS=40000 ;; commonsense_conversation) STEPS=140000 ;; wiki_auto) STEPS=80000 ;; *) STEPS=50000 ;; esac
    MODEL_ARGS=(--model_name_or_path bert-base-uncased --max_len 128 --emb_dim 128 --hidden_size 768 --num_layers 12 --num_heads 12)
    TRAIN_ARGS=(--batch_size 64 --accumulation_steps $ACC --lr 1e-4 --warmup_steps 0 --decay linear --grad_clip 0
                --max_steps $STEPS --eval_every 2000 --eval_examples 1000 --save_every 2000 --log_every 50 --num_workers 4
                --seed 102)
    # Tang et al.'s post-training (their README): --bsz 100 --microbatch 100 on 4 GPUs, every rank drawing the same
    # batch (no DistributedSampler in their fork): 100 distinct examples a step; --learning_steps 320000 counted
    # from the checkpoint's step (run_loop: step + resume_step < learning_steps), so 320000 - BASE_STEP steps
    # (set in diffuseq_post); no gradient clipping, seed 109
    POST_ARGS=(--batch_size $(( (100 + NGPU - 1) / NGPU )) --accumulation_steps 1 --grad_clip 0 --eval_every 2500
               --eval_examples 1000 --save_every 2500 --log_every 50 --num_workers 4 --seed 109)
    DECODE_ARGS=(--split test --mbr_size 10 --batch_size 256 --seed 42)
  fi
}

START=$(date +%s)
case "$PRESET" in
  diffuseq)
    # diffuseq [bible] [train.py args] | diffuseq TASK FOLDER [train.py args]
    case "${1:-bible}" in
      bible) demo_or_folder bible; [ $# -ge 1 ] && shift ;;
      --*) demo_or_folder bible ;;
      *) demo_or_folder "$@"; shift 2 ;;
    esac
    RUN=outputs/diffuseq-$TAG-$STAMP
    echo "== 1/3 training DiffuSeq -> $RUN"
    # DiffuSeq's loss as released: MSE, L_T and rounding NLL averaged over every position (mean_flat)
    # and its canvas (text_datasets.py): every row --max_len long, a long pair cut from its longer side
    run "${TRAIN[@]}" --task seq2seq --process gaussian --schedule sqrt --timestep_sampler lossaware --num_steps 2000 \
      --loss_average all --pad_to max_len --truncation diffuseq "${MODEL_ARGS[@]}" "${TRAIN_ARGS[@]}" "${DATA_ARGS[@]}" --out_dir "$RUN" "$@"
    NAME=$(basename "$RUN")
    SETS=(${DECODE_SETS:-full})
    echo "== 2/3 decoding with MBR: ${SETS[*]}"
    DIRS=()
    for SET in "${SETS[@]}"; do decode "$RUN" "$NAME-$SET" "$SET"; DIRS+=("generation_results/$NAME-$SET"); done
    [ -n "${DRY_RUN:-}" ] && exit 0
    echo "== 3/3 metrics"
    "$PY" compute_metric.py --mode compare --samples "${DIRS[@]}" --out "${DIRS[0]}/compare_metrics.json" \
      --plot "${DIRS[0]}/compare.png"
    echo "-- copy baseline (the source itself as the output)"
    "$PY" compute_metric.py --mode seq2seq --samples "${DIRS[0]}/copy_source.jsonl" --out "${DIRS[0]}/metrics_copy_source.json"
    SUMMARY=$("$PY" summarise.py --bleu "${DIRS[0]}/compare_metrics.json" --copy "${DIRS[0]}/metrics_copy_source.json")
    cat <<EOF

== done in $(( $(date +%s) - START ))s
checkpoints:   $RUN/checkpoints/{best,last}
outputs:       ${DIRS[*]} (seed*.jsonl, mbr.jsonl, copy_source.jsonl, decode.json)
metrics:       ${DIRS[0]}/compare_metrics.json, ${DIRS[0]}/metrics_copy_source.json
plots:         $RUN/plots/train_loss.png, $RUN/plots/dev.png (dev loss); ${DIRS[0]}/compare.png (quality against steps)
next:          bash run_condition.sh diffuseq_post $RUN

$SUMMARY
EOF
    ;;
  diffuseq_post)
    BASE=${1:-$(ls -dt outputs/diffuseq-* 2>/dev/null | grep -v -- '-post-' | head -n 1 || true)}
    [ -n "$BASE" ] && [ -d "$BASE" ] || { echo "error: no DiffuSeq run to post-train (run: bash run_condition.sh diffuseq)" >&2; exit 2; }
    [ $# -ge 1 ] && shift
    BASE_NAME=$(basename "$BASE")
    case "$BASE_NAME" in diffuseq-demo-*) demo_or_folder bible ;; *) demo_or_folder "${BASE_NAME#diffuseq-}" _ ;; esac
    if [ "$TAG" != demo ]; then  # Tang's --learning_steps 320000 includes the steps of the checkpoint it starts from
      CONFIG=$BASE/checkpoints/best/run_config.json; [ -f "$BASE/run_config.json" ] && CONFIG=$BASE/run_config.json
      BASE_STEP=$("$PY" -c "import json, sys; print(json.load(open(sys.argv[1]))['step'])" "$CONFIG" 2>/dev/null) \
        || { echo "error: cannot read the step of $BASE from $CONFIG" >&2; exit 2; }
      [ "$BASE_STEP" -lt 320000 ] || { echo "error: $BASE is at step $BASE_STEP, past Tang et al.'s 320000" >&2; exit 2; }
      POST_ARGS+=(--max_steps $(( 320000 - BASE_STEP )))
    fi
    RUN=outputs/$BASE_NAME-post-$STAMP
    echo "== 1/3 post-training $BASE with the distance penalty (l2_noise_random, simi_lambda -2, simi_noise 0.05) -> $RUN"
    # Tang et al.'s release: loss (mse + mse' + 2 nll + 2 L_T + 2 * penalty) / 2 averaged over every position,
    # their fill_noise_map neighbourhoods, lr 1e-4 held constant (their train_util.py calls _anneal_lr only on
    # the fp16 path, which the release never takes)
    run "${TRAIN[@]}" --post_train "$BASE" --simi_penalty l2_noise_random --simi_lambda -2 --simi_noise 0.05 \
      --simi_maps released --loss_average all --lr 1e-4 --decay constant --warmup_steps 0 "${POST_ARGS[@]}" \
      --out_dir "$RUN" "$@"
    NAME=$(basename "$RUN")
    SETS=(${DECODE_SETS:-full uniform_20 adp_20})
    echo "== 2/3 decoding: ${SETS[*]}, before and after post-training"
    for SET in "${SETS[@]}"; do
      decode "$BASE" "$BASE_NAME-$SET" "$SET"
      decode "$RUN" "$NAME-$SET" "$SET"
    done
    [ -n "${DRY_RUN:-}" ] && exit 0
    echo "== 3/3 comparison (MBR metrics; self-BLEU across the seeds; wall time summed over the seeds)"
    DIRS=()
    for W in "$BASE_NAME" "$NAME"; do for SET in "${SETS[@]}"; do DIRS+=("generation_results/$W-$SET"); done; done
    "$PY" compute_metric.py --mode compare --samples "${DIRS[@]}" --out "generation_results/$NAME-compare.json" \
      --plot "generation_results/$NAME-compare.png"
    cat <<EOF

== done in $(( $(date +%s) - START ))s
checkpoints:   $RUN/checkpoints/{best,last}
comparison:    generation_results/$NAME-compare.json
plots:         $RUN/plots/train_loss.png, $RUN/plots/dev.png (dev loss of the post-training);
               generation_results/$NAME-compare.png (BLEU and exact match against decoding steps, before and after)
EOF
    ;;
esac
