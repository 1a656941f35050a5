"""The training loop: schedule, clipping, checkpoints, metrics, progress — on any number of ranks.

What runs on a rank (model, parallelism, memory policy, model states) comes from
`disttrain.engine.build_runtime(job, plan)`; this file only drives it. The loss of a step is
the mean over the global batch, so any split of that batch over microbatches and ranks trains
the same model. Batches are a pure function of (seed, step, microbatch), which makes
`--resume` bit-identical to an uninterrupted run.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch.distributed as dist
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn

from disttrain.checkpoint import (latest_checkpoint, load_checkpoint, read_checkpoint_meta,
                                  save_checkpoint)
from disttrain.data import build_batches
from disttrain.data.packing import build_document_batches
from disttrain.device import CPU, Device
from disttrain.engine import build_runtime
from disttrain.metrics import MetricsWriter, TensorBoardWriter, peak_rss_bytes
from disttrain.optim import lr_at
from disttrain.planning import fixed_plan
from disttrain.spec import Job, SpecError
from offload import StoreIOError
from planner.analytic import model_flops_per_token
from planner.plan import Plan


@dataclass
class TrainResult:
    losses: list[float] = field(default_factory=list)
    """Loss of every optimizer step run in this invocation, in order."""
    first_step: int = 1
    """Step number (1-based) of losses[0]."""
    output_dir: Path = Path(".")


class Trainer:
    def __init__(self, job: Job, plan: Plan | None = None, *, console: Console | None = None,
                 on_step: Callable[[dict], None] | None = None,
                 on_checkpoint: Callable[[int, Path], None] | None = None,
                 device: Device = CPU):
        """`on_step(record)` sees every metrics record; `on_checkpoint(step, dir)` runs on every
        rank after a checkpoint is complete (launchers use both, e.g. to report to Ray Train).
        `device` is this rank's (`disttrain.device`; the launcher picks it)."""
        self.job = job
        self.device = device
        self.on_step, self.on_checkpoint = on_step, on_checkpoint
        self.rank = dist.get_rank() if dist.is_initialized() else 0
        world = dist.get_world_size() if dist.is_initialized() else 1
        self.plan = plan or fixed_plan(job, world)
        self.runtime = build_runtime(job, self.plan, rank=self.rank, device=device)
        self.console = console or Console(stderr=True, soft_wrap=True, quiet=self.rank != 0)
        if self.runtime.copy_engine is not None:
            self.console.print(self.runtime.copy_engine)
        if (note := self.runtime.optimizer_note()) is not None:
            self.console.print(note)
        tr = job.spec.train
        if tr.eval_every and self.plan.parallel.pp > 1:
            raise SpecError("train.eval_every: validation is not supported with parallel.pp > 1")
        self.valid_batches = None
        if job.spec.data.kind == "documents":
            self.batches, self.valid_batches = build_document_batches(
                job, progress=self.rank == 0, micro_batch_size=self.plan.micro_batch_size)
        else:  # the plan's micro-batch size (the planner's choice under auto)
            self.batches = build_batches(job.spec.data.kind, job.data_path,
                                         vocab_size=job.shape.vocab_size, seq_len=tr.seq_len,
                                         micro_batch_size=self.plan.micro_batch_size,
                                         seed=tr.seed)

    @property
    def model(self):
        return self.runtime.model

    @property
    def ckpt_dir(self) -> Path:
        return self.job.output_dir / "checkpoints"

    @property
    def metrics_path(self) -> Path:
        name = "metrics.jsonl" if self.rank == 0 else f"metrics.rank{self.rank}.jsonl"
        return self.job.output_dir / name

    def _barrier(self) -> None:
        if dist.is_initialized():
            dist.barrier()

    def _start_step(self, resume: bool, resume_from: Path | None = None) -> int:
        latest = resume_from or latest_checkpoint(self.ckpt_dir)
        if not resume:
            if latest is not None:
                raise SpecError(f"output_dir: {self.job.output_dir} already holds a run "
                                f"(checkpoint {latest.name}); pass --resume to continue it or "
                                f"choose another output_dir")
            return 0
        if latest is None:
            raise SpecError(f"--resume: no checkpoint under {self.ckpt_dir}")
        try:
            meta = read_checkpoint_meta(latest)["meta"]
        except FileNotFoundError as exc:
            raise SpecError(f"--resume: {exc}") from None
        expected = json.loads(json.dumps(self._checkpoint_meta()))  # as meta.json holds it
        if meta.get("model") != expected["model"]:
            raise SpecError(f"--resume: checkpoint {latest} was written for another model shape")
        size = meta.get("micro_batch_size", expected["micro_batch_size"])
        if (meta.get("parallel") != expected["parallel"]  # keys are full-shaped: reshard
                or size != expected["micro_batch_size"]):
            self.console.print(f"resuming on another layout: checkpoint "
                               f"{_layout(meta.get('parallel') or {})} micro_batch_size={size} "
                               f"-> this run {_layout(expected['parallel'])} "
                               f"micro_batch_size={expected['micro_batch_size']}; parameters "
                               f"and optimizer state are resharded")
        t0 = time.perf_counter()
        state = self.runtime.checkpoint_state()
        step = load_checkpoint(latest, state, rank=self.rank)["step"]
        self.runtime.states.load_state_dict(state)
        self.console.print(f"resumed from {latest} (step {step}; loaded in "
                           f"{time.perf_counter() - t0:.2f} s)")
        return step

    def train_step(self, step: int) -> tuple[float, float]:
        """One optimizer step (0-based `step`); returns (loss, grad_norm)."""
        tr = self.job.spec.train
        lr = lr_at(step, lr=tr.lr, min_lr=tr.min_lr, warmup_steps=tr.warmup_steps,
                   total_steps=tr.steps)
        loss, grad_norm = self.runtime.train_step(step, self.batches, lr)
        self.lr = lr
        return loss, grad_norm

    def run(self, *, resume: bool = False, max_steps: int | None = None,
            resume_from: Path | None = None) -> TrainResult:
        """Train to `train.steps` (or stop after `max_steps` steps of this invocation).
        `resume_from` names a checkpoint directory to resume from instead of `latest`."""
        tr = self.job.spec.train
        out = self.job.output_dir
        start = self._start_step(resume or resume_from is not None, resume_from)
        self._barrier()
        out.mkdir(parents=True, exist_ok=True)
        if self.rank == 0:
            (out / "spec.json").write_text(self.job.spec.model_dump_json(indent=2))
            self.plan.save(out / "plan.json")
        metrics = MetricsWriter(self.metrics_path, start_step=start)
        board = (TensorBoardWriter(out / "tensorboard") if self.rank == 0
                 and "tensorboard" in tr.log_to else None)
        flops_per_s = self.job.hardware.flops(self.job.dtype) * self.job.hardware.world_size
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
                    result.losses.append(loss)
                    record = {"step": step + 1, "loss": loss, "lr": self.lr,
                              "grad_norm": grad_norm, "tokens_per_s": tokens_per_step / dt,
                              "step_time_s": dt, "peak_bytes": peak_rss_bytes(),
                              **self.device.memory_record(),
                              "mfu": model_flops_per_token(self.job.shape, tr.seq_len)
                              * tokens_per_step / dt / flops_per_s,
                              "rank": self.rank,
                              "model_state_bytes": self.runtime.states.bytes_by_place(),
                              "comm_bytes": self.runtime.communication_bytes()}
                    activations = self.runtime.activation_stats()
                    if activations is not None:
                        record["activations"] = activations
                    optimizer = self.runtime.optimizer_stats()
                    if optimizer is not None:  # seconds, overlapped with the backward or not
                        record["optimizer"] = optimizer
                    if tr.eval_every and (step + 1) % tr.eval_every == 0:
                        # the same held-out global batch every time: comparable values
                        record["valid_loss"] = self.runtime.eval_loss(self.valid_batches, 0)
                    metrics.write(record)
                    if board is not None:
                        board.write(record)
                    if self.on_step is not None:
                        self.on_step(record)
                    progress.update(task, advance=1, loss=loss, tps=tokens_per_step / dt,
                                    lr=self.lr)
                    if (step + 1) % tr.log_every == 0 and not self.console.is_terminal:
                        valid = (f" valid_loss {record['valid_loss']:.4f}"
                                 if "valid_loss" in record else "")
                        self.console.print(f"step {step + 1}/{tr.steps} loss {loss:.4f} "
                                           f"grad_norm {grad_norm:.3f} lr {self.lr:.2e} "
                                           f"{tokens_per_step / dt:,.0f} tok/s{valid}")
                    done = step + 1
                    if (tr.checkpoint_every and done % tr.checkpoint_every == 0) or done == tr.steps:
                        self.save(done)
        except KeyboardInterrupt:
            metrics.close()
            if board is not None:
                board.close()
            self.runtime.close()
            self.console.print(f"interrupted; last checkpoint: "
                               f"{latest_checkpoint(self.ckpt_dir) or 'none'}; continue with "
                               f"--resume")
            raise
        except StoreIOError as exc:  # e.g. the NVMe disk filled up under the run
            metrics.close()
            message = self._store_failure(exc)
            self.runtime.close()  # removes the swap files
            raise SpecError(message) from None
        metrics.close()
        if board is not None:
            board.close()
        self.runtime.close()
        if self.rank == 0:
            self._write_summary(result, step_times)
        return result

    def _store_failure(self, exc: StoreIOError) -> str:
        """One line for a swap read/write that failed mid-run: the store's path, the bytes the
        plan needs there and has, and the checkpoint a `--resume` continues from."""
        stores = self.runtime.activations.stores if self.runtime.activations else {}
        need = ""
        for store in stores.values():
            if store.tier == "nvme" and str(store.file) in str(exc):
                free = shutil.disk_usage(store.config.path).free
                need = (f"; the plan swaps up to {store.config.budget_bytes} bytes to "
                        f"{store.config.path} ({free} bytes free now)")
        return (f"activation swap failed: {str(exc).splitlines()[0]}{need}; swap files removed; "
                f"last checkpoint: {latest_checkpoint(self.ckpt_dir) or 'none'} (continue "
                f"with --resume once there is room)")

    def _checkpoint_meta(self) -> dict:
        # the layout is recorded (a resume on another one reshards); data order depends only
        # on the step, the seed and the global batch
        hf = self.job.hf  # for `disttrain export`: the source's config and tokenizer files
        return {"model": self.job.shape.to_dict(), "name": self.job.spec.name,
                "parallel": self.plan.to_dict()["parallel"],
                "micro_batch_size": self.plan.micro_batch_size,
                **({"hf": {"path": str(hf.path.resolve()), "config": hf.config}} if hf else {})}

    def save(self, step: int) -> Path:
        t0 = time.perf_counter()
        step_dir = save_checkpoint(self.ckpt_dir, step=step,
                                   state=self.runtime.checkpoint_state(),
                                   meta=self._checkpoint_meta(),
                                   rank=self.rank, barrier=self._barrier)
        self.console.print(f"checkpoint {step_dir} saved in {time.perf_counter() - t0:.2f} s")
        if self.on_checkpoint is not None:
            self.on_checkpoint(step, step_dir)
        return step_dir

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
                   "peak_bytes": peak_rss_bytes(), **self.device.memory_record(),
                   "device": str(self.device), "num_params": self.job.shape.num_params(),
                   "parallel": self.plan.to_dict()["parallel"],
                   "checkpoint": str(latest_checkpoint(self.ckpt_dir))}
        (self.job.output_dir / "summary.json").write_text(json.dumps(summary, indent=2))
        self.console.print(
            f"[bold]done[/]: steps {result.first_step}-{summary['steps']}, loss "
            f"{summary['first_loss']:.4f} -> {summary['last_loss']:.4f}, "
            f"{summary['tokens_per_s']:,.0f} tok/s (median step {median * 1e3:.0f} ms), "
            f"peak RSS {summary['peak_bytes'] / 2**20:.0f} MiB; metrics in {self.metrics_path}")


def _layout(parallel: dict) -> str:
    keys = ("dp", "tp", "sp", "sp_kind", "pp", "zero_stage")
    return " ".join(f"{k}={parallel[k]}" for k in keys if k in parallel)
