"""dist.py — train.py past one process: torchrun ranks, the deal of task groups, and the few collectives it needs.

The paper trained Qwen3-4B on several GPUs. `torchrun --nproc_per_node N train.py ...` runs train.py as N ranks: every
rank draws the same tasks and the same skills (same seeds, same bank), plays only its share of the task groups (a
task's G episodes stay on one rank, so group advantages are local), and the update's gradients are summed over all
ranks by the wrapper (DDP, or FSDP2 with --fsdp). What a single process would compute is computed: the same tasks, the
same per-episode random streams (train.py seeds one generator per episode from (seed, iteration, row)), the same
mini-batches, the same token-mean normalisers (summed over ranks), so rewards, skills and logs are identical and
losses and weights differ only by the order of float sums (tests/test_dist.py).

A plain `python train.py` gets `Single`, which does nothing and never imports torch.distributed's process group.

  Single / Ranks      the same interface: rank, world, main, mine(n), owner(g), gather(obj), sum(values), barrier(),
                      wrap(module), accumulate(wrapped, last), gathered(model), full_state / load_weights /
                      load_optimizer (checkpoints in the one-process format), close()
  from_env(...)       Ranks under torchrun (WORLD_SIZE > 1 in the environment), else Single

Rules that keep N ranks from hanging (each collective is called the same number of times on every rank):
  1. Every rank runs the same number of micro-batch forward/backward passes per optimizer step; a rank with fewer
     rows repeats one of its rows at weight 0 (train.ppo_update).
  2. Decisions that end a loop or skip a step (a non-finite loss, an empty mini-batch) are taken on summed values.
  3. Collectives time out (--dist-timeout), and torchrun stops every rank when one exits with an error.

Run: `torchrun --nproc_per_node 2 train.py --env sokoban` (CPU: gloo, one thread per rank; CUDA: nccl, one GPU per
rank); `python -m pytest -q tests/test_dist.py`.
"""
from __future__ import annotations

import os
from contextlib import nullcontext
from datetime import timedelta

import torch


class Single:
    """One process: every group is mine, every collective is the identity."""
    rank, world, main, local_rank = 0, 1, True, 0

    def mine(self, n: int) -> list[int]:
        return list(range(n))

    def owner(self, group: int) -> int:
        return 0

    def gather(self, obj) -> list:
        return [obj]

    def sum(self, values: list[float]) -> list[float]:
        return [float(v) for v in values]

    def barrier(self) -> None:
        pass

    def wrap(self, module: torch.nn.Module, fsdp: bool = False) -> torch.nn.Module:
        return module

    def accumulate(self, wrapped, last: bool):
        return nullcontext()

    # the model's state, in the format of one process (checkpoints resume under any number of ranks)
    def full_state(self, model, optimizer) -> tuple[dict | None, dict]:
        """(weights for save_pretrained, None = the model's own; the optimizer's state_dict)."""
        return None, optimizer.state_dict()

    def load_weights(self, model, state: dict) -> None:
        model.load_state_dict(state)

    def load_optimizer(self, model, optimizer, state: dict) -> None:
        optimizer.load_state_dict(state)

    def gathered(self, model):
        """The model whole, for the passes that differ in number between ranks (rollouts, scoring, evaluation):
        the model itself, except under FSDP2 (a full copy; Ranks.gathered)."""
        return model

    def close(self) -> None:
        pass


class Ranks(Single):
    """N torchrun ranks over torch.distributed (gloo on CPU, nccl on CUDA)."""

    def __init__(self, timeout_s: float, device: torch.device):
        import torch.distributed as dist
        self.dist, self.device = dist, device
        backend = "nccl" if device.type == "cuda" else "gloo"
        if device.type == "cuda":
            torch.cuda.set_device(device)       # nccl's object collectives use the current device
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
        self.rank, self.world = dist.get_rank(), dist.get_world_size()
        self.local_rank = int(os.environ.get("LOCAL_RANK", 0))
        self.main = self.rank == 0
        self.fsdp = False

    def mine(self, n: int) -> list[int]:
        """The task groups of this rank: dealt round-robin, so shares differ by at most one group."""
        return [g for g in range(n) if g % self.world == self.rank]

    def owner(self, group: int) -> int:
        return group % self.world

    def gather(self, obj) -> list:
        """Every rank's obj, in rank order, on every rank (picklable objects: results, skills, diagnostics)."""
        out = [None] * self.world
        self.dist.all_gather_object(out, obj)
        return out

    def sum(self, values: list[float]) -> list[float]:
        """Element-wise sums over ranks, in float64 (token counts, loss sums, flags)."""
        t = torch.tensor([float(v) for v in values], dtype=torch.float64,
                         device=self.device if self.device.type == "cuda" else "cpu")
        self.dist.all_reduce(t)
        return t.tolist()

    def barrier(self) -> None:
        self.dist.barrier()

    def wrap(self, module: torch.nn.Module, fsdp: bool = False) -> torch.nn.Module:
        """DDP around the module (its gradients are averaged over ranks in backward), or with fsdp=True FSDP2:
        weights, gradients and AdamW state sharded over the ranks, one shard group per decoder layer."""
        if not fsdp:
            from torch.nn.parallel import DistributedDataParallel
            ids = [self.device.index] if self.device.type == "cuda" else None
            # buffers (RoPE tables) are equal on every rank: no broadcast before each forward
            return DistributedDataParallel(module, device_ids=ids, broadcast_buffers=False)
        import copy
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard
        self.replica = copy.deepcopy(module.model).eval()   # taken before sharding: buffers and config come along
        mesh = init_device_mesh(self.device.type, (self.world,))
        for layer in module.model.get_decoder().layers:
            fully_shard(layer, mesh=mesh)
        self.fsdp = True
        return fully_shard(module, mesh=mesh)

    def accumulate(self, wrapped, last: bool):
        """Gradient accumulation: sum locally, communicate on the last micro-batch of an optimizer step only."""
        if self.fsdp:
            wrapped.set_requires_gradient_sync(last)
            return nullcontext()
        return nullcontext() if last else wrapped.no_sync()

    def full_state(self, model, optimizer) -> tuple[dict | None, dict]:
        if not self.fsdp:
            return super().full_state(model, optimizer)
        from torch.distributed.checkpoint.state_dict import (StateDictOptions, get_model_state_dict,
                                                             get_optimizer_state_dict)
        full = StateDictOptions(full_state_dict=True, cpu_offload=True)   # a collective: every rank calls it
        weights = get_model_state_dict(model, options=full)
        by_name = get_optimizer_state_dict(model, optimizer, options=full)
        if not self.main:                                    # cpu_offload: the full state lands on rank 0 only
            return None, {}
        index = {n: i for i, (n, _) in enumerate(model.named_parameters())}  # optimizer order = parameters()
        return weights, {"state": {index[n]: v for n, v in by_name["state"].items()},
                         "param_groups": [{**g, "params": [index[n] for n in g["params"]]}
                                          for g in by_name["param_groups"]]}

    def load_weights(self, model, state: dict) -> None:
        if not self.fsdp:
            return super().load_weights(model, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
        set_model_state_dict(model, state, options=StateDictOptions(full_state_dict=True))

    def load_optimizer(self, model, optimizer, state: dict) -> None:
        if not self.fsdp:
            return super().load_optimizer(model, optimizer, state)
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_optimizer_state_dict
        names = [n for n, _ in model.named_parameters()]
        by_name = {"state": {names[i]: v for i, v in state["state"].items()},
                   "param_groups": [{**g, "params": [names[i] for i in g["params"]]} for g in state["param_groups"]]}
        set_optimizer_state_dict(model, optimizer, by_name, options=StateDictOptions(full_state_dict=True))

    def gathered(self, model):
        """Under FSDP2 every forward of a sharded layer is a collective, so a pass that runs a different number of
        forwards on each rank (a rollout) would hang: those run on a full copy, refreshed from the shards here
        (one all-gather; memory: one more copy of the weights per GPU, README)."""
        if not self.fsdp:
            return model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
        self.replica.load_state_dict(get_model_state_dict(model, options=StateDictOptions(full_state_dict=True)))
        return self.replica

    def close(self) -> None:
        import gc
        gc.collect()            # a wrapper's reducer still alive at destroy_process_group can hang gloo at exit
        if self.dist.is_initialized():
            self.dist.destroy_process_group()


def launched_by_torchrun() -> bool:
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def from_env(timeout_s: float, device: torch.device) -> Single:
    """Ranks under torchrun with more than one process, else Single (torch.distributed is not touched)."""
    return Ranks(timeout_s, device) if launched_by_torchrun() else Single()


def rank_device(device: torch.device) -> torch.device:
    """Under torchrun on CUDA, each rank takes the GPU of its LOCAL_RANK; anything else is unchanged."""
    if device.type == "cuda" and launched_by_torchrun():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", 0)))
    return device
