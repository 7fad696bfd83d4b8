"""Process-group setup for torchrun (DDP): gloo on CPU, nccl on GPU. Side effects go to rank 0.

torchrun (and Kubeflow's PyTorchJob) describe the job in RANK / WORLD_SIZE / LOCAL_RANK; a plain
`python` launch has none of them and runs as a world of one.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from trainer.errors import ConfigError


@dataclass
class Dist:
    rank: int = 0
    world: int = 1
    local_rank: int = 0
    device: torch.device = torch.device("cpu")

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def barrier(self) -> None:
        if self.enabled:
            dist.barrier()

    def all_reduce(self, tensor: torch.Tensor, op=dist.ReduceOp.SUM) -> torch.Tensor:
        if self.enabled:
            dist.all_reduce(tensor, op=op)
        return tensor


def pick_device(setting: str, local_rank: int = 0) -> torch.device:
    if setting == "auto":
        setting = "cuda" if torch.cuda.is_available() else "cpu"
    if setting == "cuda":
        setting = f"cuda:{local_rank}"
    if setting.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"device={setting!r} but no CUDA device is available")
    return torch.device(setting)


def setup(device_setting: str, env: dict[str, str] | None = None) -> Dist:
    env = os.environ if env is None else env
    if "RANK" not in env or int(env.get("WORLD_SIZE", "1")) <= 1:
        return Dist(device=pick_device(device_setting))
    rank, world, local_rank = (
        int(env["RANK"]),
        int(env["WORLD_SIZE"]),
        int(env.get("LOCAL_RANK", "0")),
    )
    device = pick_device(device_setting, local_rank)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend="nccl" if device.type == "cuda" else "gloo")
    return Dist(rank=rank, world=world, local_rank=local_rank, device=device)


def teardown(d: Dist) -> None:
    if d.enabled and dist.is_initialized():
        dist.destroy_process_group()
