#!/usr/bin/env bash
# Multi-node pre-training under SLURM: one `accelerate launch` per node, one process per GPU.
#
#   sbatch --nodes=4 tools/slurm_pretrain.sh recipe=mae_base data.train='shards/in1k-train-{000000..001281}.tar'
#
# The recipe fixes the global batch (optim.batch_size); with N nodes x G GPUs the gradient
# accumulation becomes optim.batch_size / (data.batch_size x N x G), so the schedule is the same on
# 1 or N nodes. Time limit: SLURM sends SIGUSR1 to this script 3 minutes before the end; it creates
# OUTPUT_DIR/STOP, the training processes see it, write a checkpoint and exit 0, and this script
# requeues the job, which resumes from that checkpoint. (A file, because `accelerate launch` and
# torchrun do not pass SIGUSR1 on to the training processes.) Preemption by the scheduler sends
# SIGTERM, which the training processes also answer with a checkpoint; SLURM requeues such jobs
# itself. A run that failed is not requeued.
#
# Settings (environment): GPUS_PER_NODE (default: SLURM_GPUS_ON_NODE or 8), MAIN_PORT (29500),
# OUTPUT_DIR (default runs/<recipe>, passed as train.output_dir).
#SBATCH --job-name=ssl_vit
#SBATCH --nodes=1
#SBATCH --ntasks-per-node=1
#SBATCH --gpus-per-node=8
#SBATCH --cpus-per-task=64
#SBATCH --time=48:00:00
#SBATCH --signal=B:USR1@180
#SBATCH --requeue
#SBATCH --open-mode=append
#SBATCH --output=slurm-%x-%j.out
set -euo pipefail

recipe=""
for arg in "$@"; do
  case "$arg" in recipe=*) recipe="${arg#recipe=}" ;; esac
done
if [ -z "$recipe" ]; then
  echo "usage: sbatch [--nodes=N] tools/slurm_pretrain.sh recipe=NAME [key=value ...]" >&2
  exit 2
fi
output_dir="${OUTPUT_DIR:-runs/$(basename "${recipe%.yaml}")}"
gpus_per_node="${GPUS_PER_NODE:-${SLURM_GPUS_ON_NODE:-8}}"
nodes="${SLURM_NNODES:-1}"
main_addr="$(scontrol show hostnames "${SLURM_JOB_NODELIST:-localhost}" | head -n 1)"
main_port="${MAIN_PORT:-29500}"
export OMP_NUM_THREADS="${OMP_NUM_THREADS:-8}"

echo "$(date -Is) job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0}): ${nodes} node(s) x ${gpus_per_node} GPU(s), main ${main_addr}:${main_port}, output ${output_dir}"

trap 'echo "$(date -Is) SLURM warned of the time limit: asking the run to checkpoint"; mkdir -p "$output_dir"; touch "$output_dir/STOP"' USR1

# The quoted program runs once per node. srun runs in the background so that the trap above can
# run while we wait for it.
srun --kill-on-bad-exit=1 bash -c '
  exec accelerate launch --multi_gpu --num_machines "$1" --machine_rank "$SLURM_NODEID" \
       --num_processes "$2" --main_process_ip "$3" --main_process_port "$4" \
       --mixed_precision no --dynamo_backend no \
       pretrain.py "${@:6}" train.output_dir="$5"
' launcher "$nodes" "$((nodes * gpus_per_node))" "$main_addr" "$main_port" "$output_dir" "$@" &
srun_pid=$!
while true; do
  status=0
  wait "$srun_pid" || status=$?
  kill -0 "$srun_pid" 2>/dev/null || break  # otherwise the trap interrupted the wait: keep waiting
done

if [ "$status" -ne 0 ]; then
  echo "$(date -Is) training failed with exit code $status: not requeued" >&2
  exit "$status"
fi
if [ ! -f "$output_dir/backbone.safetensors" ] && [ -n "${SLURM_JOB_ID:-}" ]; then
  echo "$(date -Is) stopped before the end (preempted or out of time): requeueing ${SLURM_JOB_ID}"
  scontrol requeue "$SLURM_JOB_ID"
fi
