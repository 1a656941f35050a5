"""`disttrain` command line: check, plan, train, profile, report, export, bench.

Exit codes: 0 success, 2 a user error (bad spec, path, size; one line on stderr, no
traceback), 3 no feasible plan, 130 interrupted.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
from pathlib import Path

from rich.console import Console

from disttrain.spec import SpecError, load_job

EXIT_USER_ERROR = 2
EXIT_INFEASIBLE = 3


class NotBuiltYet(Exception):
    """A verb (or launcher) whose implementation has not landed yet."""


def _cmd_check(args: argparse.Namespace, console: Console) -> int:
    job = load_job(args.spec)
    hw = job.hardware
    print(f"{args.spec}: ok — model {job.shape.num_params() / 1e6:,.1f}M params "
                  f"({job.spec.model.preset or (f'hf {job.hf.family}' if job.hf else 'custom')}, {job.dtype}), seq_len "
                  f"{job.spec.train.seq_len}, cluster {hw.name}: {hw.nodes}x"
                  f"{hw.devices_per_node} {hw.device_name}")
    return 0


def _cmd_plan(args: argparse.Namespace, console: Console) -> int:
    job = load_job(args.spec)
    from planner.report import render_summary, write_report  # an ImportError here is a bug or
    from planner.search import plan_job                      # a broken install: reported as such
    profile = None
    if args.profile:
        from disttrain.profiling import load_profile

        if not Path(args.profile).is_file():
            raise SpecError(f"--profile: {args.profile} does not exist")
        profile = load_profile(Path(args.profile))
    elif args.launcher == "ray":  # profile on a worker of the cluster (the training devices)
        from launch.ray import profile_on_ray

        profile = profile_on_ray(job, args.address or job.spec.launch.ray_address)
    elif args.address is not None:
        raise SpecError("--address: only used with --launcher ray")
    if args.trial < 0:
        raise SpecError(f"--trial: must be >= 0 (plans to measure), got {args.trial}")
    if args.trial_steps < 1:
        raise SpecError(f"--trial-steps: must be >= 1, got {args.trial_steps}")
    out = Path(args.out) if args.out else job.output_dir / "plan"
    from planner.trial import corrections_path, layout_key, load_corrections

    corrections_file = corrections_path(args.profile, out)
    corrections = load_corrections(corrections_file)  # measured by earlier --trial runs
    plan = plan_job(job.plan_request(), profile, corrections=corrections)
    if args.trial and plan.feasible:
        from disttrain.trial import trial_and_rerank

        outcome: list = []
        plan, rows = trial_and_rerank(
            job, plan, args.trial, steps=args.trial_steps, corrections_file=corrections_file,
            applied=corrections, outcome=outcome,
            plan_fn=lambda r, c: plan_job(r, profile, corrections=c, with_layout=False))
        for row in rows:
            print(f"trial {row['layout']}: predicted {row['predicted_s']:.3f} s, measured "
                  f"{row['measured_s']:.3f} s ({row['error']:+.0%})", file=sys.stderr)
        done = outcome[0]
        refined = sum(t.round == "refine" for t in done.trials)
        noise = ""
        if done.remeasured:
            noise = (f"; {' and '.join(done.remeasured)} within it, re-measured alternately: "
                     + ", ".join(f"{t.key} runs " + "/".join(f"{r.step_s:.3f}" for r in t.runs)
                                 for t in done.trials if t.key in done.remeasured))
            if done.run_spread is not None:
                noise += f" (run-to-run spread {done.run_spread:.1%})"
        print(f"trial: {len(done.trials) - refined} in the family round, {refined} refining "
              f"({done.stopped}); step-time spread {done.spread:.1%}{noise}", file=sys.stderr)
        print(f"trial: chose {layout_key(plan.parallel)}; corrections in {corrections_file}",
              file=sys.stderr)
    paths = write_report(plan, out)
    if args.json:
        print(plan.to_json())
    else:
        console.print(render_summary(plan))
        console.print("wrote " + ", ".join(str(p) for p in paths))
    if args.emit and plan.feasible:
        from planner.export import export_plan, summary_lines

        try:
            result = export_plan(plan, args.emit, out)
        except ValueError as exc:
            raise SpecError(f"--emit {args.emit}: {exc}") from None
        stream = sys.stderr if args.json else sys.stdout
        print("\n".join(summary_lines(result)) + f"\nwrote {result.path}", file=stream)
    elif args.emit:
        print(f"--emit {args.emit}: nothing written, the plan is infeasible", file=sys.stderr)
    return 0 if plan.feasible else EXIT_INFEASIBLE


def _torchrun(args: argparse.Namespace, nproc: int) -> int:
    from disttrain.parallel.spawn import free_port

    cmd = [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1",
           "--nproc-per-node", str(nproc), "--master-addr", "127.0.0.1",
           "--master-port", str(free_port()), "-m", "launch.torchrun", args.spec]
    cmd += ["--plan", args.plan] if args.plan else []
    cmd += ["--no-planner"] if args.no_planner else []
    cmd += ["--resume"] if args.resume else []
    cmd += ["--max-steps", str(args.max_steps)] if args.max_steps is not None else []
    env = dict(os.environ)
    env.setdefault("OMP_NUM_THREADS", str(max(1, (os.cpu_count() or 1) // nproc)))
    code = subprocess.call(cmd, env=env)
    return code if code in (0, EXIT_USER_ERROR) else 1


def _cmd_train(args: argparse.Namespace, console: Console) -> int:
    from disttrain.device import require_local_gpus
    from disttrain.spec import LaunchContext

    job = load_job(args.spec)
    launcher = args.launcher or job.spec.launch.launcher
    if launcher != job.spec.launch.launcher or (args.nproc and launcher != "local"):
        # the command line decides the launcher and (--nproc) the processes per node
        job = load_job(args.spec, launch=LaunchContext(
            launcher, devices_per_node=args.nproc if launcher != "local" else 1))
    world = job.hardware.world_size
    if args.address is not None and launcher != "ray":
        raise SpecError("--address: only used with --launcher ray")
    if launcher == "ray":
        from launch.ray import run_ray

        return run_ray(job, args)
    if launcher == "torchrun":
        if job.hardware.nodes > 1:
            raise SpecError(f"cluster.nodes: {job.hardware.nodes} nodes: start `torchrun "
                            f"--nnodes {job.hardware.nodes} --nproc-per-node "
                            f"{job.hardware.devices_per_node} -m launch.torchrun {args.spec}` "
                            f"on every node (this command starts one node)")
        require_local_gpus(job.hardware, args.nproc or world)  # before any process starts
        return _torchrun(args, args.nproc or world)
    if launcher != "local":
        raise NotBuiltYet(f"train: the {launcher} launcher is not built yet; use local or "
                          f"torchrun")
    from disttrain.device import job_device
    from disttrain.planning import resolve_plan
    from disttrain.trainer import Trainer  # torch import is slow: only when training

    device = job_device(job.hardware, local_rank=0)  # a GPU job without a GPU stops here
    device.set_current()
    plan = resolve_plan(job, 1, args.plan, use_planner=not args.no_planner)
    trainer = Trainer(job, plan, console=console, device=device)
    result = trainer.run(resume=args.resume, max_steps=args.max_steps)
    if result.losses:
        print(f"first loss {result.losses[0]:.4f} (step {result.first_step}), last loss "
              f"{result.losses[-1]:.4f} (step {result.first_step + len(result.losses) - 1})")
    return 0


def _cmd_profile(args: argparse.Namespace, console: Console) -> int:
    if args.hardware:
        from planner.hardware import probe

        nvme = "/tmp/disttrain-nvme"
        if args.spec:
            job = load_job(args.spec)
            nvme = job.hardware.nvme_path or nvme
        hw = probe(nvme_path=nvme)
        for key, value in hw.to_dict().items():
            print(f"{key}: {value}")
        return 0
    if not args.spec:
        raise SpecError("profile: give a job spec, or --hardware")
    job = load_job(args.spec)
    from disttrain.profiling import describe, profile_batch, profile_job_layer, save_profile

    try:
        lens = tuple(int(x) for x in args.seq_lens.split(",")) if args.seq_lens else None
    except ValueError:
        raise SpecError(f"--seq-lens: comma-separated integers, got {args.seq_lens!r}") from None
    if lens and min(lens) <= 0:
        raise SpecError(f"--seq-lens: must be positive, got {args.seq_lens}")
    profile = profile_job_layer(job, lens)
    out = Path(args.out) if args.out else job.output_dir / "profile.json"
    save_profile(profile, out)
    print(describe(profile, job.spec.train.seq_len, profile_batch(job)))
    console.print(f"wrote {out}; plan with it: disttrain plan {args.spec} --profile {out}")
    return 0


def _cmd_report(args: argparse.Namespace, console: Console) -> int:
    from disttrain.report import write_run_report

    text, path = write_run_report(args.run_dir)
    print(text)
    console.print(f"wrote {path}")
    return 0


def _cmd_export(args: argparse.Namespace, console: Console) -> int:
    from disttrain.hf_export import export_hf  # torch import is slow: only when exporting

    result = export_hf(Path(args.run_dir), Path(args.hf), step=args.step, dtype=args.dtype)
    copied = f" + {', '.join(result.copied)}" if result.copied else ""
    print(f"exported {result.step_dir} to {result.out}: model.safetensors, config.json{copied}")
    if result.note:
        print(f"note: {result.note}", file=sys.stderr)
    return 0


BENCHES = ("peers", "fidelity", "estimators", "long_sequence", "overlap", "comm_volume",
           "activation_bytes", "copy_engine", "cpu_optimizer_overlap", "published")
"""bench/run_all.py's names (bench/ is not part of the installed package)."""


def _cmd_bench(args: argparse.Namespace, console: Console) -> int:
    """Run bench/run_all.py of this source tree (the benchmarks are not part of the package)."""
    runner = Path(__file__).resolve().parents[1] / "bench" / "run_all.py"
    if not runner.is_file():
        console.print(f"[red]error[/]: bench: {runner} not found (run from a source checkout)")
        return 2
    argv = [sys.executable, str(runner)] + ["--quick"] * args.quick + ["--no-docs"] * args.no_docs
    argv += ["--only", *args.only] if args.only else []
    return subprocess.run(argv, check=False).returncode


def _not_built(verb: str, issue: str):
    def run(args: argparse.Namespace, console: Console) -> int:
        raise NotBuiltYet(f"{verb}: not built yet ({issue})")
    return run


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="disttrain", description="Plan and run training for long sequences and huge models.")
    verbs = parser.add_subparsers(dest="verb", metavar="VERB", required=True)

    p = verbs.add_parser("check", help="validate a job spec and print what it describes")
    p.add_argument("spec", help="job spec (YAML)")
    p.set_defaults(run=_cmd_check)

    p = verbs.add_parser("plan", help="dry-run the planner: plan.json + report, no GPU needed")
    p.add_argument("spec")
    p.add_argument("--out", help="directory for plan.json and the report "
                                 "(default: OUTPUT_DIR/plan)")
    p.add_argument("--json", action="store_true", help="print plan.json instead of a summary")
    p.add_argument("--profile", help="a layer profile from `disttrain profile` (replaces the "
                                     "analytic byte and time model)")
    p.add_argument("--emit", choices=("deepspeed", "megatron"),
                   help="also write the closest DeepSpeed config / Megatron-core arguments beside "
                        "plan.json and print what of the plan they cannot express")
    p.add_argument("--launcher", choices=("local", "ray"), default="local",
                   help="ray: profile one layer on a Ray worker first, then plan with it")
    p.add_argument("--trial", type=int, default=0, metavar="K",
                   help="measure up to K plans a few steps each on this machine: the planner's "
                        "choice and the best of each other layout family (K - K//3 at most); "
                        "then, one at a time, the best layout by the corrections fitted so far, "
                        "until K are measured or none is predicted faster than the best measured "
                        "(within the trials' step-time spread); the two fastest re-measured "
                        "alternately when within that spread; keep the fastest, store the "
                        "corrections beside the profile")
    p.add_argument("--trial-steps", type=int, default=3, metavar="N",
                   help="timed steps per trial (after one warm-up step)")
    p.add_argument("--address", help="Ray cluster to profile on with --launcher ray (default: "
                                     "launch.ray_address, else an embedded Ray on 127.0.0.1)")
    p.set_defaults(run=_cmd_plan)

    p = verbs.add_parser("train", help="train a job spec")
    p.add_argument("spec")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint")
    p.add_argument("--launcher", choices=("local", "torchrun", "ray"),
                   help="override launch.launcher")
    p.add_argument("--max-steps", type=int, default=None,
                   help="stop after this many steps of this invocation (resume later)")
    p.add_argument("--plan", help="execute this plan.json instead of running the planner")
    p.add_argument("--no-planner", action="store_true",
                   help="keep every activation and resolve `auto` trivially (dp = world)")
    p.add_argument("--nproc", type=int, help="torchrun ranks or Ray workers (default: the "
                                             "cluster's devices)")
    p.add_argument("--address", help="Ray cluster to join with --launcher ray (default: "
                                     "launch.ray_address, else an embedded Ray on 127.0.0.1)")
    p.set_defaults(run=_cmd_train)

    p = verbs.add_parser("profile", help="profile one layer of the model, or this machine")
    p.add_argument("spec", nargs="?")
    p.add_argument("--hardware", action="store_true", help="probe this machine's hardware")
    p.add_argument("--seq-lens", help="comma-separated sequence lengths to profile at")
    p.add_argument("--out", help="where to write the profile JSON "
                                 "(default: OUTPUT_DIR/profile.json)")
    p.set_defaults(run=_cmd_profile)

    p = verbs.add_parser("report", help="predicted vs measured for a run directory")
    p.add_argument("run_dir")
    p.set_defaults(run=_cmd_report)

    p = verbs.add_parser("export", help="write a run's checkpoint as a Hugging Face model "
                                        "directory (any dp/sp/pp/ZeRO layout)")
    p.add_argument("run_dir", help="the run's output_dir (holds checkpoints/)")
    p.add_argument("--step", type=int, help="checkpoint step to export (default: the latest)")
    p.add_argument("--hf", required=True, metavar="OUT",
                   help="directory to write model.safetensors + config.json (+ tokenizer) into")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32",
                   help="dtype of the exported weights")
    p.set_defaults(run=_cmd_export)

    p = verbs.add_parser("bench", help="run the benchmarks under bench/ and rewrite their "
                                       "docs sections")
    p.add_argument("--quick", action="store_true", help="smallest configuration of each")
    p.add_argument("--no-docs", action="store_true", help="print only, leave docs/ alone")
    p.add_argument("--only", nargs="+", choices=BENCHES)
    p.set_defaults(run=_cmd_bench)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    console = Console(stderr=True, soft_wrap=True)
    try:
        return args.run(args, console)
    except SpecError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except NotBuiltYet as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_USER_ERROR
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
