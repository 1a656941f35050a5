"""Single-process trainer: AdamW, cosine schedule, accumulation, clipping, checkpoints, metrics.

The loss of an optimizer step is the mean over its microbatches of the mean token loss, so a
run with any split of the global batch into microbatches (or, later, ranks) trains the same
model. Batches are a pure function of (seed, step, microbatch), which makes `--resume`
bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import contextlib
import json
import time
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disttrain.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from disttrain.data import build_batches
from disttrain.metrics import MetricsWriter, peak_rss_bytes
from disttrain.model import Llama, build_model
from disttrain.optim import build_optimizer, lr_at
from disttrain.spec import Job, SpecError


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step run in this invocation, in order."""
    first_step: int = 1
    """Step number (1-based) of losses[0]."""
    output_dir: Path = Path(".")


def lm_loss(model: Llama, tokens_BS: torch.Tensor, targets_BS: torch.Tensor) -> torch.Tensor:
    """Mean next-token cross entropy, computed in fp32."""
    logits = model(tokens_BS)
    return F.cross_entropy(logits.float().flatten(0, 1), targets_BS.flatten())


class Trainer:
    def __init__(self, job: Job, *, console: Console | None = None):
        self.job = job
        tr = job.spec.train
        self.console = console or Console(stderr=True)
        torch.manual_seed(tr.seed)
        self.model = build_model(job.shape, seed=tr.seed)  # fp32 master weights
        self.optimizer = build_optimizer(self.model, lr=tr.lr, weight_decay=tr.weight_decay)
        self.batches = build_batches(job.spec.data.kind, job.data_path,
                                     vocab_size=job.shape.vocab_size, seq_len=tr.seq_len,
                                     micro_batch_size=tr.micro_batch_size, seed=tr.seed)
        self.accum_steps = tr.global_batch_size // tr.micro_batch_size
        self.autocast = (torch.autocast("cpu", dtype=torch.bfloat16) if job.dtype == "bf16"
                         else contextlib.nullcontext())

    @property
    def ckpt_dir(self) -> Path:
        return self.job.output_dir / "checkpoints"

    def _start_step(self, resume: bool) -> int:
        latest = latest_checkpoint(self.ckpt_dir)
        if not resume:
            if latest is not None:
                raise SpecError(f"output_dir: {self.job.output_dir} already holds a run "
                                f"(checkpoint {latest.name}); pass --resume to continue it or "
                                f"choose another output_dir")
            return 0
        if latest is None:
            raise SpecError(f"--resume: no checkpoint under {self.ckpt_dir}")
        state = load_checkpoint(latest, model=self.model, optimizer=self.optimizer)
        if state["meta"].get("model") != self.job.shape.to_dict():
            raise SpecError(f"--resume: checkpoint {latest} was written for another model shape")
        self.console.print(f"resumed from {latest} (step {state['step']})")
        return state["step"]

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (0-based `step`); returns (loss, grad_norm)."""
        tr = self.job.spec.train
        lr = lr_at(step, lr=tr.lr, min_lr=tr.min_lr, warmup_steps=tr.warmup_steps,
                   total_steps=tr.steps)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        loss_sum = 0.0
        for micro in range(self.accum_steps):
            tokens, targets = self.batches.get(step, micro)
            with self.autocast:
                loss = lm_loss(self.model, tokens, targets) / self.accum_steps
            loss.backward()
            loss_sum += loss.item()
        max_norm = tr.grad_clip if tr.grad_clip > 0 else float("inf")
        grad_norm = torch.nn.utils.clip_grad_norm_(self.model.parameters(), max_norm)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)
        return loss_sum, float(grad_norm)

    def run(self, *, resume: bool = False, max_steps: int | None = None) -> TrainResult:
        """Train to `train.steps` (or stop after `max_steps` steps of this invocation)."""
        tr = self.job.spec.train
        out = self.job.output_dir
        start = self._start_step(resume)
        out.mkdir(parents=True, exist_ok=True)
        (out / "spec.json").write_text(self.job.spec.model_dump_json(indent=2))
        metrics = MetricsWriter(out / "metrics.jsonl", start_step=start)
        end = tr.steps if max_steps is None else min(tr.steps, start + max_steps)
        tokens_per_step = tr.global_batch_size * tr.seq_len
        result = TrainResult(first_step=start + 1, output_dir=out)
        step_times: list[float] = []
        columns = (TextColumn("[bold]{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TextColumn("loss {task.fields[loss]:.4f}  {task.fields[tps]:,.0f} tok/s  "
                              "lr {task.fields[lr]:.2e}"), TimeElapsedColumn())
        try:
            with Progress(*columns, console=self.console) as progress:
                task = progress.add_task(self.job.spec.name, total=tr.steps, completed=start,
                                         loss=float("nan"), tps=0.0, lr=0.0)
                for step in range(start, end):
                    t0 = time.perf_counter()
                    loss, grad_norm = self.train_step(step)
                    dt = time.perf_counter() - t0
                    step_times.append(dt)
                    lr = self.optimizer.param_groups[0]["lr"]
                    result.losses.append(loss)
                    record = {"step": step + 1, "loss": loss, "lr": lr, "grad_norm": grad_norm,
                              "tokens_per_s": tokens_per_step / dt, "step_time_s": dt,
                              "peak_bytes": peak_rss_bytes(), "rank": 0}
                    metrics.write(record)
                    progress.update(task, advance=1, loss=loss, tps=tokens_per_step / dt, lr=lr)
                    if (step + 1) % tr.log_every == 0 and not self.console.is_terminal:
                        self.console.print(f"step {step + 1}/{tr.steps} loss {loss:.4f} "
                                           f"grad_norm {grad_norm:.3f} lr {lr:.2e} "
                                           f"{tokens_per_step / dt:,.0f} tok/s")
                    done = step + 1
                    if (tr.checkpoint_every and done % tr.checkpoint_every == 0) or done == tr.steps:
                        self.save(done)
        except KeyboardInterrupt:
            metrics.close()
            latest = latest_checkpoint(self.ckpt_dir)
            self.console.print(f"interrupted; last checkpoint: {latest or 'none'}; continue with "
                               f"--resume")
            raise
        metrics.close()
        self._write_summary(result, step_times)
        return result

    def save(self, step: int) -> Path:
        meta = {"model": self.job.shape.to_dict(), "name": self.job.spec.name}
        return save_checkpoint(self.ckpt_dir, step=step, model=self.model,
                               optimizer=self.optimizer, meta=meta)

    def _write_summary(self, result: TrainResult, step_times: list[float]) -> None:
        if not result.losses:
            return
        tr = self.job.spec.train
        steady = sorted(step_times[1:] or step_times)
        median = steady[len(steady) // 2]
        summary = {"name": self.job.spec.name, "steps": result.first_step + len(result.losses) - 1,
                   "first_loss": result.losses[0], "last_loss": result.losses[-1],
                   "median_step_time_s": median,
                   "tokens_per_s": tr.global_batch_size * tr.seq_len / median,
                   "peak_bytes": peak_rss_bytes(),
                   "num_params": self.job.shape.num_params(),
                   "checkpoint": str(latest_checkpoint(self.ckpt_dir))}
        (self.job.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.console.print(
            f"[bold]done[/]: steps {result.first_step}-{summary['steps']}, loss "
            f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tok/s (median step {median * 1e3:.0f} ms), "
            f"peak RSS {summary['peak_bytes'] / 2**20:.0f} MiB; metrics in "
            f"{self.job.output_dir / 'metrics.jsonl'}")
