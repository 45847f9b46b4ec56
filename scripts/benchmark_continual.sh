#!/usr/bin/env bash
# The continual-learning benchmark: Fashion-MNIST B0 Inc2 (5 stages of 2 classes, PILOT's class order with
# seed 1993) on the shipped source model (experiment=continual_fmnist: 32 px, 100 training images per class,
# 3 epochs per stage, each stage tested on the first 1,000 test images of the classes seen), every method x
# seeds 0, 1, 2, then `transfer-cli report` (Ā, last accuracy, forgetting; accuracy against the classes seen).
# BACKBONE=efficientnet_lite0 IMAGE_SIZE=48 runs it on the ImageNet EfficientNet-Lite0 (about 10x the time).
#
# Sized for well under 60 minutes on an idle 2-core CPU (two jobs at a time, one thread each). Runs go under $OUT
# (default runs/benchmark_continual)/sweep, one folder per method and seed; the report goes to $REPORT
# (default docs/benchmark/continual). Re-running the script runs only what is missing.
#
# Settings (environment variables):
#   METHODS=finetune,ewc,cil_lwf,simplecil,aper (aper adapts its first stage with SSF, its default)
#   SEEDS=0,1,2   JOBS=2   EPOCHS=3   BACKBONE=quickstart   IMAGE_SIZE=32
#   DATA_ROOT=/usr/share/datasets/fashion-mnist
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/benchmark_continual}"
report="${REPORT:-docs/benchmark/continual}"
started=$SECONDS
status=0
transfer-cli train -m hydra/launcher=local hydra.launcher.n_jobs="${JOBS:-2}" \
    experiment=continual_fmnist data.root="${DATA_ROOT:-/usr/share/datasets/fashion-mnist}" \
    backbone="${BACKBONE:-quickstart}" backbone.image_size="${IMAGE_SIZE:-32}" \
    strategy="${METHODS:-finetune,ewc,cil_lwf,simplecil,aper}" seed="${SEEDS:-0,1,2}" \
    trainer.max_epochs="${EPOCHS:-3}" \
    hydra.sweep.dir="$out/sweep" 'hydra.sweep.subdir=${strategy.name}_seed${seed}' \
    || status=$?  # a failed job is recorded in its failed.json; report the others, then exit non-zero
transfer-cli report "$out/sweep" --by strategy.name --out "$report"
echo "benchmark wall time: $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s" >&2
exit "$status"
