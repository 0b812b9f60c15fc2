#!/usr/bin/env bash
# ELPV demo, end to end: export, split, train, test evaluation, prediction report.
# Run through `make demo` (which sets up .venv first), or with PYTHON pointing at a Python that has the requirements.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-.venv/bin/python}
DATA=${DATA:-data/elpv}
OUT=${OUT:-output/demo}
EPOCHS=${EPOCHS:-15}
SIZE=${SIZE:-224}
BUDGET=${BUDGET:-12}  # wall minutes for the training run: fewer epochs where 15 would not fit
start=$(date +%s)
stamp() { echo "[demo] $1 ($(( $(date +%s) - start )) s since start)"; }

stamp "1/3 export ELPV into $DATA and split it 75/25 (validation from the 75%)"
$PY preprocess_data.py --source elpv --output "$DATA" --test_val_ratio 0.25 0.1 --seed 0

stamp "2/3 train convnext_atto (BatchNorm, max pooling, CLAHE input) from scratch, 2-class soft labels, $EPOCHS epochs at $SIZE px (as many as fit in $BUDGET minutes)"
# one run of configs/elpv_ensemble.yaml's recipe at 224 px instead of 288 (about 9 minutes on a 2-core AMD EPYC
# with bf16; on slower machines --time_budget cuts the epochs so that the demo ends within 15 minutes)
$PY main.py --data_path "$DATA" --test_val_ratio 0.25 0.1 --seed 0 --model convnext_atto --norm_layer batchnorm \
    --global_pool max --clahe 2 --nb_classes 2 --use_softlabel True --soft_label_ratio 0.7 --input_size "$SIZE" \
    --epochs "$EPOCHS" --warmup_epochs 1 --batch_size 16 --lr 1e-3 --drop_path 0 --weight_decay 0 --scale 1 1 \
    --hflip 0.5 --vflip 0.5 --rot90 0 --rotation 0 --best_metric last --output_dir "$OUT" --auto_resume True \
    --test False --time_budget "$BUDGET"

stamp "3/3 prediction report on the test split"
rm -rf "$OUT/report"  # the demo's own report, written again
$PY main.py --pred True --resume "$OUT/checkpoint-best.pth" --eval_data_path "$DATA" --eval_split test \
    --pred_save_path "$OUT/report" --pred_save True --pred_eval True --pred_eval_name elpv_test --tta True \
    | tee "$OUT/report.txt"
stamp "done"
