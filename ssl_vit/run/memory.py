"""What a recipe needs per GPU, counted from its model: parameters, gradients, AdamW state and
activations, data-parallel (every GPU holds everything) against sharded (FSDP2: the first three
divided by the GPUs, plus the blocks being gathered). `tools/benchmark.py memory` prints it.

The model is built on the meta device (shapes, no memory), so ViT-G's 1.8 B parameters cost nothing
to count. Activations are the tensors autograd saves for the backward pass of one image (hooks on
`saved_tensors_hooks`, parameters left out), in the precision the recipe computes in, with and
without activation checkpointing; attention is counted as PyTorch's reference kernel keeps it
(softmax probabilities), an upper bound where a flash kernel keeps only its log-sum-exp.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from ..models import family_of
from ..tasks import task_class

GIB = 2 ** 30


@dataclass
class ModelMemory:
    trainable: int            # parameters the optimizer updates
    frozen: int               # the rest (a frozen encoder, buffers are not counted)
    largest_unit: int         # parameters of the largest block FSDP gathers at once
    activations: float        # bytes saved for backward per image, without checkpointing
    activations_checkpointed: float  # with `train.grad_checkpointing`: block inputs + one block recomputed
    compute_bytes: int        # 2 (bf16 / fp16) or 4 (fp32)


def measure(cfg) -> ModelMemory:
    dtype = torch.float32 if cfg.train.precision == "no" else torch.bfloat16
    with torch.device("meta"):
        task = task_class(cfg.task.name).build(cfg, max(1, cfg.model.num_classes or 1000))
    task = task.to(dtype)
    trainable = sum(p.numel() for p in task.parameters() if p.requires_grad)
    frozen = sum(p.numel() for p in task.parameters() if not p.requires_grad)
    units = task.fsdp_units()
    largest = max((sum(p.numel() for p in m.parameters()) for m in units), default=trainable)
    plain = _saved_per_image(task, cfg, dtype, checkpointing=False)
    checkpointed = _saved_per_image(task, cfg, dtype, checkpointing=True)
    depth = max(1, len(family_of(task.encoder).fsdp_units(task.encoder)))
    # the recomputed block in the backward pass: one block's share of what checkpointing saved away
    recomputed = (plain - checkpointed) / depth
    return ModelMemory(trainable, frozen, largest, plain, checkpointed + recomputed, 2 if dtype != torch.float32 else 4)


def _saved_per_image(task, cfg, dtype, checkpointing: bool) -> float:
    """Bytes of the tensors autograd keeps for backward, one image, parameters left out."""
    parameters = {id(p) for p in task.parameters()}
    saved = []

    def pack(tensor):
        base = tensor._base if tensor._base is not None else tensor
        if id(base) not in parameters and id(tensor) not in parameters:
            saved.append(tensor.numel() * tensor.element_size())
        return tensor

    task.encoder.set_grad_checkpointing(checkpointing)
    size = cfg.model.img_size
    height, width = (size, size) if isinstance(size, int) else tuple(size)
    task.train()
    with torch.device("meta"), torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        images = torch.empty(1, cfg.model.in_chans, height, width, dtype=dtype)
        task({"images": images, "labels": torch.zeros(1, dtype=torch.long)})
    return float(sum(saved))


def per_gpu(memory: ModelMemory, batch: int, gpus: int, sharded: bool, checkpointing: bool) -> dict:
    """Bytes on one GPU: fp32 master weights (4 B a parameter), fp32 gradients (4), AdamW's two
    moments (8); sharded, each divided by the GPUs, plus the gathered blocks (the one computing and
    the one prefetched, in the compute precision) and one block's unsharded gradient (fp32) before
    its reduce-scatter; and the activations of the per-GPU batch."""
    share = gpus if sharded else 1
    out = {"parameters": 4 * (memory.trainable + memory.frozen) / share,
           "gradients": 4 * memory.trainable / share,
           "optimizer": 8 * memory.trainable / share,
           "gathered": (2 * memory.compute_bytes + 4) * memory.largest_unit if sharded else 0.0,
           "activations": batch * (memory.activations_checkpointed if checkpointing else memory.activations)}
    out["total"] = sum(out.values())
    return out


def table(cfg, gpu_counts=(8, 64), gpu_memory_gib: float = 80.0) -> tuple[str, dict]:
    """The markdown table of a recipe's memory per GPU, DDP vs FSDP, and its figures."""
    memory = measure(cfg)
    batch, checkpointing = cfg.data.batch_size, cfg.train.grad_checkpointing
    rows = ["| strategy | GPUs | parameters | gradients | AdamW state | gathered blocks | activations | total | fits "
            f"{gpu_memory_gib:.0f} GiB |", "| --- | --- | --- | --- | --- | --- | --- | --- | --- |"]
    figures = {"trainable_parameters": memory.trainable, "largest_unit_parameters": memory.largest_unit,
               "activations_per_image_gib": memory.activations / GIB,
               "activations_per_image_checkpointed_gib": memory.activations_checkpointed / GIB}
    for sharded in (False, True):
        for gpus in gpu_counts:
            row = per_gpu(memory, batch, gpus, sharded, checkpointing)
            name = "FSDP" if sharded else "DDP"
            fits = row["total"] <= gpu_memory_gib * GIB
            shown = gpus if sharded else " or ".join(map(str, gpu_counts))  # a whole copy on each, however many
            rows.append(f"| {name} | {shown} | " + " | ".join(f"{row[k] / GIB:.1f} GiB" for k in
                        ("parameters", "gradients", "optimizer", "gathered", "activations", "total"))
                        + f" | {'yes' if fits else 'no'} |")
            figures[f"{name.lower()}_{gpus}_total_gib"] = row["total"] / GIB
            if not sharded:
                break  # a data-parallel copy needs the same on 8 or 64 GPUs
    header = (f"recipe {cfg.recipe}: {memory.trainable / 1e9:.2f} B trainable parameters, per-GPU batch {batch}, "
              f"{'bf16' if memory.compute_bytes == 2 else 'fp32'} compute, activation checkpointing "
              f"{'on' if checkpointing else 'off'}; activations {memory.activations / 2 ** 20:.0f} MiB an image "
              f"({memory.activations_checkpointed / 2 ** 20:.0f} MiB checkpointed)")
    return header + "\n\n" + "\n".join(rows), figures
