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
#   hide-prompt  HiDe-Prompt's release (github.com/thu-ml/HiDe-Prompt, training_scripts/train_{cifar100,imr,cub}_vit.sh,
#              configs/*_hideprompt_5e.py, trainers/*_trainer.py): batch 24 on each of 8 GPUs (global 192) with every
#              lr scaled by 24/256 (--unscale_lr): task-identity MLP at 5e-4 x 24/256 (0.01 x 24/256 on CUB-200),
#              prompts at 0.03 x 24/256 with the head at a tenth (--larger_prompt_lr), weight decay 5e-4; prompt
#              length 5 (CIFAR-100) or 20 (ImageNet-R, CUB-200) keys and as many values, contrastive weight 0.1 /
#              0.5 / 0.01, 50 / 150 / 50 epochs, step decay x0.1 at epoch 30 (cosine on ImageNet-R)
#   norga      the same with NoRGa's scripts' differences (MoE_PromptCL, scripts/*NoRGa.sh): batch 128, covariance
#              statistics (its default), sigmoid gate (its default)
set -euo pipefail
cd "$(dirname "$0")/.."

slca_epochs() { case "$1" in cifar100_10tasks) echo 20 ;; *) echo 50 ;; esac; }
slca_milestone() { case "$1" in cifar100_10tasks) echo 18 ;; *) echo 40 ;; esac; }
vq_temperature() { case "$1" in cub200_10tasks) echo 5 ;; *) echo 1 ;; esac; }
hide_length() { case "$1" in cifar100_10tasks) echo 10 ;; *) echo 40 ;; esac; }
hide_reg() { case "$1" in cifar100_10tasks) echo 0.1 ;; imagenet-r_10tasks) echo 0.5 ;; *) echo 0.01 ;; esac; }
hide_epochs() { case "$1" in imagenet-r_10tasks) echo 150 ;; *) echo 50 ;; esac; }
hide_tii_lr() { case "$1" in cub200_10tasks) echo 9.375e-4 ;; *) echo 4.6875e-5 ;; esac; }
hide_schedule() { case "$1" in imagenet-r_10tasks) echo train.schedule=cosine ;; *) echo "train.schedule=step train.milestones=[30]" ;; esac; }
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
  for method in hide-prompt norga; do
    batch=192; [ "$method" = norga ] && batch=128
    # shellcheck disable=SC2046  # hide_schedule gives one or two key=value words
    smope run "$config" method.name="$method" train.batch_size="$batch" train.lr=2.8125e-4 train.prompt_lr_scale=10 \
      train.weight_decay=5e-4 train.epochs="$(hide_epochs "$setting")" $(hide_schedule "$setting") train.schedule_lag=false \
      method.prompt_length="$(hide_length "$setting")" method.hide_contrastive_weight="$(hide_reg "$setting")" \
      method.hide_tii_lr="$(hide_tii_lr "$setting")" output_dir="runs/${setting}_${method}" "$@"
  done
done
python experiments/collect.py runs
