"""Sharded full fine-tuning (`train.sharding=fsdp`): torch's FSDP2 over the transformer, each block its own unit,
so each of N processes holds 1/N of the weights, their gradients and the optimizer state, and gathers a block's
weights only while it runs. Here too is where the rest of the trainer meets a sharded weight (a DTensor): the
whole weight is gathered for checkpoints and outputs, the optimizer steps this process's shard, and the optimizer
state is saved and restored per process as plain tensors."""
from typing import Dict, List, Optional

import torch
from torch.distributed.tensor import DTensor, distribute_tensor


def shard(transformer, device: torch.device) -> List[torch.nn.Parameter]:
    """FSDP2 on each transformer block and on the whole (the embedders and the output layer), over every
    process, each shard on `device` (a block's whole weights pass through it on the way there, one block at a
    time); returns the trainable parameters, which sharding has replaced."""
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    for block in transformer.transformer_blocks:
        fully_shard(block, mesh=mesh)
    fully_shard(transformer, mesh=mesh)
    return [p for p in transformer.parameters() if p.requires_grad]


def local(t: torch.Tensor) -> torch.Tensor:
    """This process's shard of a sharded tensor (a view: writing it writes the weight); any other tensor itself."""
    return t.to_local() if isinstance(t, DTensor) else t


def whole(t: torch.Tensor) -> torch.Tensor:
    """The whole tensor (a collective: every process must ask, in the same order); any other tensor itself."""
    return t.full_tensor() if isinstance(t, DTensor) else t


@torch.no_grad()
def load_whole(p: torch.Tensor, value: torch.Tensor) -> None:
    """p ← value, the whole weight, which every process holds (each keeps its own shard; no communication)."""
    if isinstance(p, DTensor):
        mine = distribute_tensor(value.to(p.device, p.dtype), p.device_mesh, p.placements, src_data_rank=None)
        p.to_local().copy_(mine.to_local())
    else:
        p.copy_(value.to(p.dtype))


def local_optimizer_state(state: dict) -> dict:
    """An optimizer's state dict with each sharded tensor as this process's plain shard (what a rank file holds:
    loading it needs no process group)."""
    per_weight = {i: {k: v.to_local() if isinstance(v, DTensor) else v for k, v in s.items()}
                  for i, s in state["state"].items()}
    return {**state, "state": per_weight}


def restore_sharded_state(optimizer: torch.optim.Optimizer) -> None:
    """After `load_state_dict` of a `local_optimizer_state`: the moments of sharded weights become sharded
    tensors again, as the optimizer made them (torch's loader leaves them plain)."""
    for group in optimizer.param_groups:
        for p in group["params"]:
            if not isinstance(p, DTensor):
                continue
            shape = p.to_local().shape
            for k, v in optimizer.state.get(p, {}).items():
                if isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.shape == shape:
                    # The global shape and stride given, not inferred: FSDP2 shards like torch.chunk, unevenly
                    # where a dimension does not divide by the process count.
                    optimizer.state[p][k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                               shape=p.shape, stride=p.stride())


def gathered(transformer, model_class, main: bool) -> Optional[torch.nn.Module]:
    """The whole transformer on the host, as a plain (unsharded) module of `model_class`, for the main process
    (None for the others). A collective: every process gathers each weight in turn; the main process keeps them."""
    weights: Dict[str, torch.Tensor] = {}
    for name, value in transformer.state_dict().items():
        full = whole(value.detach())
        if main:  # the others drop each gathered weight at once
            weights[name] = full.cpu()
    if not main:
        return None
    with torch.device("meta"):
        plain = model_class.from_config(transformer.config)
    plain.load_state_dict(weights, assign=True, strict=False)
    for name, buf in transformer.named_buffers():  # buffers outside the state dict (the position grid)
        if name not in weights:
            owner, _, leaf = name.rpartition(".")
            plain.get_submodule(owner).register_buffer(leaf, buf.detach().cpu(), persistent=False)
    missing = [n for n, p in list(plain.named_parameters()) + list(plain.named_buffers()) if p.is_meta]
    if missing:
        raise RuntimeError(f"gathering the sharded transformer left {missing[:3]} unset")
    return plain
