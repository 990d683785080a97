#!/usr/bin/env bash
# Every paper setting (docs/method.md#paper-settings) over the 5 seeds of its config, then a
# report per run and one comparison table against the paper's numbers.
#
# Extra arguments are passed to every run as overrides, e.g.
#   experiments/run_paper.sh data.root=/data train.device=cuda:0
# Each config sets its own output_dir (runs/<setting>), so do not override it here.
# Paths are relative to the repository root (the script runs from there). A stopped
# script resumes where it stopped when started again with the same arguments: finished
# tasks are kept in runs/<setting>/.
set -euo pipefail
cd "$(dirname "$0")/.."

smope run configs/cifar100_10tasks.yaml "$@"
smope run configs/imagenet-r_5tasks.yaml "$@"
smope run configs/imagenet-r_10tasks.yaml "$@"
smope run configs/imagenet-r_20tasks.yaml "$@"
smope run configs/cub200_10tasks.yaml "$@"

for setting in cifar100_10tasks imagenet-r_5tasks imagenet-r_10tasks imagenet-r_20tasks cub200_10tasks; do
  smope report "runs/$setting"
done
python experiments/collect.py runs
