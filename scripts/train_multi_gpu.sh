#!/usr/bin/env bash
# Stage-2 training of OmniMamba on the GPUs of one host with accelerate (docs/MULTI_GPU.md).
#
#   bash scripts/train_multi_gpu.sh --config run.yaml [--any_training_field value ...]
#   NPROC=4 STRATEGY=fsdp bash scripts/train_multi_gpu.sh --config run.yaml --max_steps 30
#   DRY_RUN=1 bash scripts/train_multi_gpu.sh --config run.yaml        # print the command, run nothing
#
# It runs exactly
#   accelerate launch --config_file configs/accelerate/$STRATEGY.yaml --num_processes $NPROC \
#       -m omnimamba_hf.cli train --stage $STAGE [--activation_checkpointing true] "$@"
# Everything after the script name goes to `omnimamba-hf train` (docs/TRAINING.md §6): --config FILE.yaml and/or any
# field of ModelArguments / DataArguments / OmniMambaTrainingArguments; the stage preset supplies the original's
# hyper-parameters (3 MMU + 48 T2I per GPU, lr 1e-4, bf16, ...) for whatever is not set.
#
# NPROC     processes = GPUs (default: every visible GPU; CUDA_VISIBLE_DEVICES picks them)
# STRATEGY  ddp (default) or fsdp: configs/accelerate/ddp.yaml or fsdp.yaml
# STAGE     stage2 (default), stage1_mmu, stage1_t2i
# AC        1 (default): activation checkpointing (the 48 + 3 batch does not fit in 80 GB without it): the Trainer's
#           under DDP (--activation_checkpointing true), FSDP's checkpoint wrapper under FSDP (fsdp.yaml); 0: off
# NVLink multicast (NVLS) stays off: NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1.
set -euo pipefail
cd "$(dirname "$0")/.."
STRATEGY=${STRATEGY:-ddp}
STAGE=${STAGE:-stage2}
CONFIG_FILE=configs/accelerate/${STRATEGY}.yaml
if [ ! -f "$CONFIG_FILE" ]; then
  echo "train_multi_gpu.sh: no $CONFIG_FILE (STRATEGY is ddp or fsdp)" >&2
  exit 2
fi
if [ -z "${NPROC:-}" ]; then
  NPROC=$(python3 -c "import torch; print(torch.cuda.device_count())")
fi
if [ "$NPROC" -lt 1 ]; then
  echo "train_multi_gpu.sh: no GPU visible; set NPROC" >&2
  exit 2
fi
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}"  # a checkout without `pip install -e .` works too
launcher=()
train=()
if [ "${AC:-1}" != 0 ] && [ "$STRATEGY" = ddp ]; then
  train+=(--activation_checkpointing true)
elif [ "${AC:-1}" = 0 ] && [ "$STRATEGY" = fsdp ]; then
  launcher+=(--fsdp_activation_checkpointing false)
fi
cmd=(accelerate launch --config_file "$CONFIG_FILE" --num_processes "$NPROC" ${launcher[@]+"${launcher[@]}"}
     -m omnimamba_hf.cli train --stage "$STAGE" ${train[@]+"${train[@]}"} "$@")
echo "${cmd[*]}"
if [ -n "${DRY_RUN:-}" ]; then
  exit 0
fi
exec "${cmd[@]}"
