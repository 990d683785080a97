#!/usr/bin/env bash
# The baselines of docs/results.md "Published numbers" in the paper settings: ViT-B/16 (augreg_in21k), 10 tasks
# of CIFAR-100, ImageNet-R and CUB-200, the same data, splits, seeds and metrics as SMoPE's runs
# (configs/<setting>.yaml). Each run goes to runs/<setting>_<method>; a stopped script resumes.
#
# Extra arguments are passed to every run, e.g.
#   experiments/run_baselines.sh data.root=/data train.device=cuda:0
# Only what a method's own publication sets differently from the setting's config is overridden:
#   ranpac     the prompt of SMoPE in dense mode trained on the first task (the harness's optimizer),
#              then a ridge head on a 10,000-wide random projection (method.rp_dim, RanPAC's M)
#   aper       the same first-task prompt; cosine prototypes on [frozen ; adapted] features
#   simplecil  cosine prototypes on frozen features (no training)
#   slca       SLCA's release (github.com/GengDavid/SLCA, exps/slca/*.json, models/slca.py): SGD,
#              head lr 0.01, backbone lr 1e-4, batch 128, 20 epochs on CIFAR-100 and 50 on ImageNet-R
#              and CUB-200; its own alignment (full covariance, 5 epochs, 256 samples per class, SGD at
#              0.01, logit normalisation 0.1: the defaults of method.slca_* and align_samples_per_class)
#              and its step decay (train.schedule=step: x0.1 from epoch 18 of 20, 40 of 50)
#   smope-ridge  SMoPE with the ridge head instead of the linear head and its alignment
#   vq-prompt  VQ-Prompt's release (github.com/jiaolifengmi/VQ-Prompt, experiments/*.sh, configs/*_prompt_vq.yaml,
#              trainer.py): head lr 0.0025 (prompts 5x) on every dataset, pool 10 x length 8 at blocks 0-4
#              (the method's defaults), temperature 1 (5 on CUB-200); alignment 10 epochs from 1e-5, one
#              batch of batch x ca_batch_size_ratio samples per old class (512 CIFAR-100, 256 ImageNet-R and
#              CUB-200); the setting's batch, schedule, backbone and the release's scheduler quirks as SMoPE's
set -euo pipefail
cd "$(dirname "$0")/.."

slca_epochs() { case "$1" in cifar100_10tasks) echo 20 ;; *) echo 50 ;; esac; }
slca_milestone() { case "$1" in cifar100_10tasks) echo 18 ;; *) echo 40 ;; esac; }
vq_temperature() { case "$1" in cub200_10tasks) echo 5 ;; *) echo 1 ;; esac; }
vq_align_samples() { case "$1" in cifar100_10tasks) echo 512 ;; *) echo 256 ;; esac; }

for setting in cifar100_10tasks imagenet-r_10tasks cub200_10tasks; do
  config="configs/$setting.yaml"
  smope run "$config" method.name=ranpac output_dir="runs/${setting}_ranpac" "$@"
  smope run "$config" method.name=aper output_dir="runs/${setting}_aper" "$@"
  smope run "$config" method.name=simplecil output_dir="runs/${setting}_simplecil" "$@"
  smope run "$config" method.name=slca train.batch_size=128 train.schedule=step train.milestones="[$(slca_milestone "$setting")]" \
    train.epochs="$(slca_epochs "$setting")" method.align_samples_per_class=256 \
    output_dir="runs/${setting}_slca" "$@"
  smope run "$config" method.head=ridge output_dir="runs/${setting}_smope-ridge" "$@"
  smope run "$config" method.name=vq-prompt train.lr=0.0025 method.vq_temperature="$(vq_temperature "$setting")" \
    method.align_epochs=10 method.align_lr=1e-5 method.align_samples_per_class="$(vq_align_samples "$setting")" \
    output_dir="runs/${setting}_vq-prompt" "$@"
done
python experiments/collect.py runs
