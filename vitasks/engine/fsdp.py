"""Fully sharded data parallel training (``strategy: fsdp``) with PyTorch's FSDP2.

Each transformer block (and then the whole model) is wrapped by ``fully_shard``: parameters,
gradients and optimizer state are split over the ranks, a block's parameters are gathered just
before it runs and freed after. What stays as with DDP, by design:

- parameter names do not change (FSDP2 keeps the module tree), so the layer-wise lr decay and
  no-weight-decay groups of the optimizer constructor apply unchanged;
- checkpoints are ordinary full state dicts (gathered on save, ``full_state_dict=True``), which
  ``init_model``, ``tools/test.py``, the converters and a DDP or single-process run read; the
  optimizer state is gathered too and scattered back to the shards on resume, so a run may
  resume on another number of processes;
- mixed precision: ``--amp`` keeps its autocast and adds FSDP's policy (parameters gathered in
  bf16, gradients reduced in fp32); activation checkpointing is the backbone's own ``with_cp``.
- a multi-task model shards the same way (the shared backbone's blocks, then the root with the
  stem and every task's head): every rank trains the same task at an iteration (the schedule
  is a function of seed and iteration), the heads of the tasks not in the step get no gradient
  and the optimizer skips them; with ``accumulate`` each task's backward reduce-scatters its
  gradients into the shards, where they add up. A head never trained yet has no optimizer
  state in a checkpoint, and gets none on resume either.

Works with gloo on CPUs and NCCL on GPUs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.distributed as dist
from torch import nn

from vitasks.checks import one_of
from vitasks.errors import ConfigError

__all__ = ["STRATEGIES", "check_strategy", "shard_model", "full_state_dicts", "load_full_state", "is_sharded"]

STRATEGIES = ("ddp", "fsdp")


def check_strategy(strategy: Optional[str], distributed: bool) -> str:
    """The config's ``strategy`` ("ddp" when unset), checked."""
    strategy = one_of("ddp" if strategy is None else strategy, STRATEGIES, "strategy", listed=True)
    if strategy == "fsdp" and not distributed:
        raise ConfigError(
            "strategy: fsdp shards the model over the processes of a distributed launch; start "
            "training with `torchrun --nproc_per_node N tools/train.py CONFIG --launcher pytorch` "
            "(tools/dist_train.sh), or remove `strategy: fsdp` to train in one process"
        )
    return strategy


def _shard_units(model: nn.Module) -> list:
    """The modules sharded one by one: every transformer block (the backbone's repeated unit)."""
    from vitasks.models.layers.block import TransformerBlock

    return [m for m in model.modules() if isinstance(m, TransformerBlock)]


def shard_model(model: nn.Module, amp_dtype: Optional[torch.dtype] = None) -> Tuple[nn.Module, str]:
    """Apply ``fully_shard`` to each transformer block, then to the root; returns the model (the
    same object, now sharded) and a one-line description for the log."""
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    mesh = init_device_mesh(device, (dist.get_world_size(),))
    policy = MixedPrecisionPolicy(param_dtype=amp_dtype, reduce_dtype=torch.float32) if amp_dtype else MixedPrecisionPolicy()
    units = _shard_units(model)
    for unit in units:
        fully_shard(unit, mesh=mesh, mp_policy=policy)
    fully_shard(model, mesh=mesh, mp_policy=policy)
    total = sum(p.numel() for p in model.parameters())
    local = sum(p.to_local().numel() if hasattr(p, "to_local") else p.numel() for p in model.parameters())
    description = (
        f"FSDP (fully_shard) wraps the model: {len(units)} transformer blocks + the root sharded over "
        f"{dist.get_world_size()} ranks; {total:,} parameters, {local:,} on this rank"
        + (f"; parameters gathered in {amp_dtype}, gradients reduced in float32" if amp_dtype else "")
    )
    return model, description


def is_sharded(model: nn.Module) -> bool:
    """Whether ``fully_shard`` was applied to ``model``."""
    from torch.distributed.fsdp import FSDPModule

    return isinstance(model, FSDPModule)


def full_state_dicts(model: nn.Module, optimizer: Optional[torch.optim.Optimizer]) -> Tuple[dict, Optional[dict]]:
    """The full (unsharded) model state dict and optimizer state dict, on the CPU of rank 0 (the
    other ranks get empty dicts). A collective: every rank must call it."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        get_model_state_dict,
        get_optimizer_state_dict,
    )

    options = StateDictOptions(full_state_dict=True, cpu_offload=True)
    model_state = get_model_state_dict(model, options=options)
    optim_state = get_optimizer_state_dict(model, optimizer, options=options) if optimizer is not None else None
    return model_state, optim_state


def load_full_state(
    model: nn.Module, model_state: Optional[dict], optimizer: Optional[torch.optim.Optimizer] = None,
    optim_state: Optional[dict] = None, strict: bool = True,
) -> None:
    """Scatter full state dicts (read by every rank) into the shards; ``model_state=None`` loads
    only the optimizer's; ``strict`` is for the model's keys. A collective."""
    from torch.distributed.checkpoint.state_dict import (
        StateDictOptions,
        set_model_state_dict,
        set_optimizer_state_dict,
    )

    if model_state is not None:
        set_model_state_dict(model, model_state, options=StateDictOptions(full_state_dict=True, strict=strict))
    if optimizer is not None and optim_state is not None:
        # Not strict: a parameter that never had a gradient has no optimizer state, as in a plain
        # optimizer's state dict (the head of a task a multi-task run has not trained yet).
        options = StateDictOptions(full_state_dict=True, strict=False)
        set_optimizer_state_dict(model, optimizer, optim_state, options=options)
        # torch fills in every parameter's state first (a zero-gradient step at lr 0, which
        # counts as a step in Adam's bias correction): such a parameter must start from no
        # state at its first gradient, as it would have without the resume.
        saved = set(optim_state.get("state", {}))
        if all(isinstance(key, str) for key in saved):  # keyed by parameter name, as saved above
            for name, param in model.named_parameters():
                if name not in saved:
                    optimizer.state.pop(param, None)
