"""The extra rows of bench/peers.py: plain PyTorch DDP (keep everything) and DeepSpeed ZeRO-3
with plain per-layer activation checkpointing and full-sequence logits. Same model, batches
and AdamW settings as every peer (`cfg`: shape, seed, lr, betas, eps, global batch, clip)."""

from __future__ import annotations

import os
import time

import torch
import torch.distributed as dist
import torch.nn.functional as F


def _batches(cfg: dict, seq_len: int):
    from disttrain.data import build_batches

    return build_batches("synthetic", None, vocab_size=cfg["shape"]["vocab_size"],
                         seq_len=seq_len, micro_batch_size=1, seed=cfg["seed"])


def _model(cfg: dict):
    from disttrain.model import build_model
    from planner.shapes import ModelShape

    return build_model(ModelShape(**cfg["shape"]), seed=cfg["seed"])


def _global_mean(value: float) -> float:
    t = torch.tensor([value], dtype=torch.float64)
    dist.all_reduce(t)
    return t.item() / dist.get_world_size()


def _result(losses, norms, times) -> dict:
    from disttrain.metrics import peak_rss_bytes

    return {"losses": losses, "grad_norms": norms, "step_times": times,
            "peak_rss": peak_rss_bytes()}


def plain_worker(rank: int, world: int, seq_len: int, steps: int, cfg: dict) -> dict:
    """PyTorch DDP, keep everything; rank r takes global sequence r of each step."""
    from torch.nn.parallel import DistributedDataParallel

    model = DistributedDataParallel(_model(cfg))
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=cfg["betas"],
                                  eps=cfg["eps"], weight_decay=0.0)
    batches, losses, norms, times = _batches(cfg, seq_len), [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        tokens, targets = batches.get(step, rank)
        loss = F.cross_entropy(model(tokens).float().flatten(0, 1), targets.flatten())
        loss.backward()
        norm = torch.nn.utils.clip_grad_norm_(model.parameters(), cfg["grad_clip"])
        optimizer.step(), optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t0)
        losses.append(_global_mean(loss.item()))
        norms.append(float(norm))
    return _result(losses, norms, times)


class _Checkpointed(torch.nn.Module):
    """A decoder layer whose activations DeepSpeed drops and recomputes in backward."""

    def __init__(self, layer: torch.nn.Module):
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        import deepspeed

        return deepspeed.checkpointing.checkpoint(self.layer, x, cos, sin)


def deepspeed_config(cfg: dict) -> dict:
    """ZeRO-3 without offload, fp32, torch AdamW (no JIT-built CPU Adam), clipping."""
    return {"train_batch_size": cfg["global_batch"], "train_micro_batch_size_per_gpu": 1,
            "gradient_accumulation_steps": 1, "gradient_clipping": cfg["grad_clip"],
            "zero_optimization": {"stage": 3}, "zero_force_ds_cpu_optimizer": False,
            "activation_checkpointing": {"partition_activations": False, "cpu_checkpointing": False,
                                         "contiguous_memory_optimization": False},
            "steps_per_print": 10**9, "wall_clock_breakdown": False}


def deepspeed_worker(rank: int, world: int, seq_len: int, steps: int, cfg: dict) -> dict:
    """DeepSpeed ZeRO-3 + per-layer activation checkpointing on gloo (no shm op build)."""
    os.environ.update(DS_ACCELERATOR="cpu", LOCAL_RANK=str(rank), RANK=str(rank),
                      WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world))
    import deepspeed
    import deepspeed.ops

    deepspeed.ops.__compatible_ops__["deepspeed_shm_comm"] = False
    config = deepspeed_config(cfg)
    model = _model(cfg)
    for index in range(len(model.layers)):
        model.layers[index] = _Checkpointed(model.layers[index])
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg["lr"], betas=cfg["betas"],
                                  eps=cfg["eps"], weight_decay=0.0)
    engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    deepspeed.checkpointing.configure(None, deepspeed_config=config)
    batches, losses, norms, times = _batches(cfg, seq_len), [], [], []
    for step in range(steps):
        t0 = time.perf_counter()
        tokens, targets = batches.get(step, rank)
        loss = F.cross_entropy(engine(tokens).float().flatten(0, 1), targets.flatten())
        engine.backward(loss), engine.step()
        times.append(time.perf_counter() - t0)
        losses.append(_global_mean(loss.item()))
        norms.append(float(engine.get_global_grad_norm()))
    return _result(losses, norms, times)
