#!/usr/bin/env bash
# Rebuild the shipped quickstart backbone: timm test_resnet trained from scratch on Fashion-MNIST
# classes 0-4 by transfer-cli itself, then exported (body + its preprocessing) as safetensors.
# About 1.5 minutes on a 2-core CPU. Needs Fashion-MNIST (apt-get install dataset-fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
run_dir="runs/source/fmnist_source_seed${SEED:-0}"
transfer-cli train experiment=fmnist_source seed="${SEED:-0}" hydra.run.dir="$run_dir"
transfer-cli export run="$run_dir" out=transfer_cli/assets/fmnist_test_resnet.safetensors
