#!/usr/bin/env bash
# Rebuild a shipped source backbone, trained from scratch on Fashion-MNIST classes 0-4 by transfer-cli itself,
# then exported (body + its preprocessing) as safetensors:
#   scripts/build_source_model.sh            timm test_resnet (the quickstart backbone), about 1.5 minutes on a 2-core CPU
#   MODEL=vit scripts/build_source_model.sh  timm test_vit at 64 px (experiment=fmnist_fewshot_vit's backbone)
# Needs Fashion-MNIST (apt-get install dataset-fashion-mnist).
set -euo pipefail
cd "$(dirname "$0")/.."
case "${MODEL:-resnet}" in
  resnet) experiment=fmnist_source; asset=fmnist_test_resnet.safetensors ;;
  vit) experiment=fmnist_source_vit; asset=fmnist_test_vit.safetensors ;;
  *) echo "MODEL=${MODEL} is not resnet or vit" >&2; exit 2 ;;
esac
run_dir="runs/source/${experiment}_seed${SEED:-0}"
transfer-cli train experiment="$experiment" seed="${SEED:-0}" hydra.run.dir="$run_dir" ${EXTRA:-}
transfer-cli export run="$run_dir" out="transfer_cli/assets/$asset"
