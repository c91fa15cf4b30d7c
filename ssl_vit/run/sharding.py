"""How the trained model is spread over the processes (`train.sharding`).

    ddp   every rank holds the whole model; Accelerate's DDP all-reduces the gradients (the default)
    fsdp  torch's FSDP2 (`fully_shard`): each transformer block, then the rest, is sharded over the
          ranks and gathered only for its own forward and backward (Zhao et al. 2023, "PyTorch
          FSDP"); parameters, gradients and optimizer state take 1/N of the memory each. With bf16
          the blocks compute in bf16 and gradients are reduced in fp32 (MixedPrecisionPolicy).

Both give the training loop the same few verbs (prepare, accumulate, backward, clip, save, load,
full weights for exports), so the loop has one code path. FSDP runs on GPUs (NCCL) and on CPUs
(gloo), where the tests run it with 2 processes; one process forms a group of one, so the sharded
path is the same code. Checkpoints under FSDP are torch's distributed checkpoints (each rank writes
its shards, loaded back onto the same sharding); exports gather the full weights on rank 0 and are
what DDP would write for the same weights. Frozen modules held outside the module tree (DeiT's
teacher) are never sharded.
"""
from __future__ import annotations

import contextlib
import os
import random
import tempfile
from pathlib import Path
from typing import Optional

import numpy as np
import torch
import torch.nn as nn

SHARDINGS = ("ddp", "fsdp")
EVALUATION_METHODS = ("predict", "features", "pictures", "reconstruct")  # Task methods called outside forward


def strategy(cfg, accelerator):
    return FullySharded(cfg, accelerator) if cfg.train.sharding == "fsdp" else DataParallel(cfg, accelerator)


class DataParallel:
    """Accelerate's way: DDP wrapping, its gradient-accumulation context and loss scaling, its
    save_state / load_state."""
    sharded = False

    def __init__(self, cfg, accelerator):
        self.cfg, self.accelerator = cfg, accelerator

    def shard(self, task: nn.Module) -> None:
        """Nothing to shard: every rank keeps the whole model."""

    def prepare(self, model: nn.Module, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def torch_optimizer(self, optimizer):
        return optimizer.optimizer  # Accelerate's wrapper holds it

    def accumulate(self, model: nn.Module, last: bool):
        return self.accelerator.accumulate(model)

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        self.accelerator.backward(loss)  # (divides by the accumulation steps)

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        return self.accelerator.clip_grad_norm_(parameters, max_norm)

    def save(self, folder: Path, model: nn.Module, optimizer) -> None:
        self.accelerator.save_state(str(folder))  # model, optimizer, every rank's RNG states

    def load(self, folder: Path, model: nn.Module, optimizer) -> None:
        self.accelerator.load_state(str(folder))

    def full_task(self, task: nn.Module, build) -> Optional[nn.Module]:
        """The task with its whole weights on the main process (for exports), None elsewhere."""
        return task if self.accelerator.is_main_process else None


class FullySharded:
    """torch's FSDP2 over all ranks; the optimizer is torch's own (built on the sharded parameters)."""
    sharded = True

    def __init__(self, cfg, accelerator):
        import torch.distributed as dist
        from torch.distributed.device_mesh import init_device_mesh

        self.cfg, self.accelerator = cfg, accelerator
        if not dist.is_initialized():  # one process: a group of one, so that the sharded code path runs
            store = dist.FileStore(os.path.join(tempfile.mkdtemp(prefix="ssl_vit_fsdp_"), "store"), 1)
            dist.init_process_group("nccl" if torch.cuda.is_available() else "gloo", store=store, rank=0,
                                    world_size=1)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        self.mesh = init_device_mesh(device, (dist.get_world_size(),))
        self.rank = dist.get_rank()

    def shard(self, task: nn.Module) -> list[str]:
        """fully_shard each transformer block (any module at a path ending in `blocks.N`: the
        encoder's, a decoder's, a Swin stage's), then the task itself for what is left (embeddings,
        norms, heads). Returns the names of the units."""
        import warnings

        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        # tasks return views (MAE's prediction without its class token) and never change them in place
        warnings.filterwarnings("ignore", message="FSDP2-wrapped module .* returned a view tensor")

        policy = MixedPrecisionPolicy()
        if self.accelerator.mixed_precision == "bf16":  # compute in bf16, reduce gradients in fp32
            policy = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
        from torch.distributed.fsdp import register_fsdp_forward_method

        import torch.distributed as dist

        # every rank initialised its copy from its own seed (MAE's masks differ per rank): rank 0's
        # weights are everyone's, as DDP's first broadcast makes them, before each keeps its shard
        if dist.get_world_size() > 1:
            for tensor in [*task.parameters(), *task.buffers()]:
                dist.broadcast(tensor.data, src=0)
        units = task.fsdp_units()  # its blocks, as its encoder's family and the task declare them
        for module in units:
            fully_shard(module, mesh=self.mesh, mp_policy=policy)
        fully_shard(task, mesh=self.mesh, mp_policy=policy)
        # the contract's entry points other than forward (evaluation, k-NN, pictures) gather the
        # task's own shards too; inside them each block gathers its own
        for method in EVALUATION_METHODS:
            register_fsdp_forward_method(task, method)
        return units

    def prepare(self, model: nn.Module, optimizer):
        return model, optimizer

    def torch_optimizer(self, optimizer):
        return optimizer

    @contextlib.contextmanager
    def accumulate(self, model: nn.Module, last: bool):
        """Gradients are reduce-scattered on the last micro-batch of a step only."""
        model.set_requires_gradient_sync(last)
        yield

    def backward(self, loss: torch.Tensor, micro_batches: int) -> None:
        (loss / self.accumulation).backward()

    @property
    def accumulation(self) -> int:
        return self.accelerator.gradient_accumulation_steps

    def clip_grad_norm_(self, parameters, max_norm: float) -> torch.Tensor:
        norm = torch.nn.utils.clip_grad_norm_(list(parameters), max_norm)
        return norm.full_tensor() if hasattr(norm, "full_tensor") else norm  # the global norm, on every rank

    # --- checkpoints: torch's distributed checkpoint, plus every rank's RNG ---------------------

    def _states(self, model: nn.Module, optimizer):
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model_state, optimizer_state = get_state_dict(model, optimizer)
        return {"model": model_state, "optimizer": optimizer_state}

    def save(self, folder: Path, model: nn.Module, optimizer) -> None:
        import torch.distributed.checkpoint as dcp

        dcp.save(self._states(model, optimizer), checkpoint_id=str(folder))
        torch.save(rng_states(), Path(folder) / f"random_states_{self.rank}.pkl")

    def load(self, folder: Path, model: nn.Module, optimizer) -> None:
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.state_dict import set_state_dict

        states = self._states(model, optimizer)
        dcp.load(states, checkpoint_id=str(folder))
        set_state_dict(model, optimizer, model_state_dict=states["model"], optim_state_dict=states["optimizer"])
        set_rng_states(torch.load(Path(folder) / f"random_states_{self.rank}.pkl", weights_only=True))

    def full_task(self, task: nn.Module, build) -> Optional[nn.Module]:
        """Gather the whole weights on rank 0 (a collective: every rank calls it) into a task built
        afresh on the CPU, which exports what DDP would for the same weights."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(task, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
        if self.rank != 0:
            return None
        replica = build()
        replica.load_state_dict(full)
        for key, value in vars(task).items():  # plain attributes a task keeps (a linear probe's best head)
            if not key.startswith("_") and isinstance(value, (bool, int, float, str)):
                setattr(replica, key, value)
        return replica.eval()


def rng_states() -> dict:
    """Every generator a run draws from, as tensors (read back with weights_only=True)."""
    state = {"torch": torch.get_rng_state(), "numpy": torch.from_numpy(np.random.get_state()[1].astype(np.int64)),
             "numpy_pos": torch.tensor(np.random.get_state()[2]),
             "python": torch.tensor(random.getstate()[1], dtype=torch.int64)}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_states(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    np.random.set_state(("MT19937", state["numpy"].numpy().astype(np.uint32), int(state["numpy_pos"]), 0, 0.0))
    random.setstate((3, tuple(int(v) for v in state["python"].tolist()), None))
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
