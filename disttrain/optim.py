"""Optimizer and learning-rate schedule."""

from __future__ import annotations

import math

import torch
from torch import nn


def build_optimizer(model: nn.Module | list[nn.Parameter], *, lr: float, weight_decay: float,
                    betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8
                    ) -> torch.optim.AdamW:
    """AdamW (torch's foreach implementation) over a model's (or a list of) parameters; no
    decay on norms (1-D parameters)."""
    params = list(model.parameters()) if isinstance(model, nn.Module) else list(model)
    decay = [p for p in params if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in params if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": weight_decay},
              {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=betas, eps=eps, foreach=True)


def lr_at(step: int, *, lr: float, min_lr: float, warmup_steps: int, total_steps: int) -> float:
    """Linear warmup to `lr` over `warmup_steps`, then cosine decay to `min_lr` at the end.

    `step` counts optimizer steps from 0; a pure function of the step, so resuming needs no
    scheduler state beyond the step itself.
    """
    if warmup_steps and step < warmup_steps:
        return lr * (step + 1) / warmup_steps
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    return min_lr + 0.5 * (lr - min_lr) * (1.0 + math.cos(math.pi * progress))


class TorchAdamWStates:
    """Model states of an unsharded single-process run: torch's AdamW.

    fp32: AdamW on the model's own parameters. Mixed precision (`compute_dtype` bf16): the
    model's parameters become bf16 compute copies; AdamW runs on fp32 masters (the fp32
    values the model was built with), each backward's bf16 gradients are added into the
    masters' fp32 gradients as they arrive (fp32 accumulation over microbatches), and
    `step` copies the updated masters back into the compute parameters.
    Same interface as `disttrain.parallel.zero.ZeroModelStates` (finish_backward,
    clip_grad_norm, step, bytes_by_place) so the trainer's loop does not care which it has.
    """

    def __init__(self, model: nn.Module, *, lr: float, weight_decay: float,
                 compute_dtype: torch.dtype = torch.float32,
                 betas: tuple[float, float] = (0.9, 0.95), eps: float = 1e-8):
        self.model = model
        self.mixed = compute_dtype != torch.float32
        self._masters: dict[str, nn.Parameter] = {}
        self._hooks = []
        for name, param in model.named_parameters():
            if not self.mixed:
                self._masters[name] = param
                continue
            master = nn.Parameter(param.detach().to(torch.float32, copy=True))
            self._masters[name] = master
            param.data = param.data.to(compute_dtype)
            self._hooks.append(param.register_post_accumulate_grad_hook(
                lambda p, m=master: self._accumulate(p, m)))
        self.optimizer = build_optimizer(list(self._masters.values()), lr=lr,
                                         weight_decay=weight_decay, betas=betas, eps=eps)

    @staticmethod
    def _accumulate(param: torch.Tensor, master: nn.Parameter) -> None:
        if master.grad is None:
            master.grad = param.grad.to(torch.float32)
        else:
            master.grad += param.grad
        param.grad = None

    def finish_backward(self) -> None:
        pass

    def clip_grad_norm(self, max_norm: float) -> float:
        limit = max_norm if max_norm > 0 else float("inf")
        return float(torch.nn.utils.clip_grad_norm_(self._masters.values(), limit))

    def step(self, lr: float) -> None:
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        self._refresh()

    def _refresh(self) -> None:
        """Copy (round) the fp32 masters into the compute parameters (mixed precision)."""
        if self.mixed:
            with torch.no_grad():
                for name, param in self.model.named_parameters():
                    param.copy_(self._masters[name])

    def bytes_by_place(self) -> dict[str, dict[str, int]]:
        """Bytes of the compute parameters, the fp32 gradients (of the masters) and the
        optimizer: moments, and the fp32 masters when they are separate copies."""
        params = sum(p.numel() * p.element_size() for p in self.model.parameters())
        grads = sum(m.numel() * 4 for m in self._masters.values())
        optim = sum(t.numel() * t.element_size() for s in self.optimizer.state.values()
                    for t in s.values() if torch.is_tensor(t) and t.dim() > 0)
        if self.mixed:
            optim += sum(m.numel() * m.element_size() for m in self._masters.values())
        return {"device": {"parameters": params, "gradients": grads, "optimizer": optim},
                "cpu": {"parameters": 0, "gradients": 0, "optimizer": 0}}

    def state_dict(self) -> dict:
        """Master parameters and AdamW moments by parameter name, and the step count, for a
        checkpoint (disttrain.checkpoint): the live tensors, so a checkpoint saves from and
        loads into them in place; moments the optimizer has not created yet are fresh zeros."""
        out: dict = {"optim.step": torch.tensor(0)}
        for name, master in self._masters.items():
            state = self.optimizer.state.get(master, {})
            out[f"model.{name}"] = master.detach()
            for moment in ("exp_avg", "exp_avg_sq"):
                out[f"optim.{name}.{moment}"] = state.get(moment, torch.zeros_like(master))
            if "step" in state:
                out["optim.step"] = torch.tensor(int(state["step"]))
        return out

    def load_state_dict(self, state: dict) -> None:
        """Take a `state_dict()` a checkpoint was loaded into; the moments are used as they are
        (as `torch.optim.Optimizer.load_state_dict` does)."""
        step = int(state["optim.step"])
        # torch's AdamW keeps `step` as a float32 scalar tensor (float64 when that is the default
        # dtype): the same dtype keeps its bias corrections bit for bit.
        dtype = torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32
        with torch.no_grad():
            for name, master in self._masters.items():
                saved = state[f"model.{name}"]
                if saved.data_ptr() != master.data_ptr():
                    master.copy_(saved)
                if step == 0:
                    self.optimizer.state.pop(master, None)
                    continue
                self.optimizer.state[master] = {
                    "step": torch.tensor(float(step), dtype=dtype),
                    **{m: state[f"optim.{name}.{m}"] for m in ("exp_avg", "exp_avg_sq")}}
        self._refresh()
