"""`python -m slurm.submit`: submit training (or an eval stage) to Slurm through submitit.

    python -m slurm.submit recipes/lsun_bedroom.yaml train.lr=1e-5 --nodes 4 --gpus-per-node 8 \\
        --partition gpu --time 48:00:00
    python -m slurm.submit --eval --nodes 1 --gpus-per-node 8 -- sample runs/cifar10 --out samples/

One Slurm task per node; each starts `accelerate launch` for its node (see slurm/launch.py).
On a time limit or a preemption the job has training save and requeues itself; every start
resumes from the newest checkpoint (see slurm/job.py). The job folder (default
RUN/slurm/<time>/) holds the resolved recipe, the launch command, submitit's logs and the
requeue count.

submitit (and slurm.job, which imports it) is imported only inside the functions that build a
job or its sbatch script, so `--help` does not pay for it.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import shutil
import sys
import time
from pathlib import Path

from pipeline.atomic import write_text
from pipeline.config import check_paths, load_recipe, save_recipe
from pipeline.errors import UserError, run_cli
from pipeline.yaml_safe import short
from slurm.launch import PROJECT_ROOT, NodeLaunch, format_command, launch_command


class SubmitError(UserError):
    """A problem the user must fix; printed as one line, exit code 2."""


def parse_time(text: str) -> int:
    """Slurm's time formats (MM, MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS) -> whole minutes."""
    m = re.fullmatch(r"(?:(\d+)-)?(\d+)(?::(\d+))?(?::(\d+))?", text.strip())
    if not m:
        raise SubmitError(f"--time {short(text)}: expected HH:MM:SS, MM or D-HH:MM:SS")
    days, a, b, c = (int(g) if g else None for g in m.groups())
    if days is not None:  # D-HH[:MM[:SS]]
        seconds = days * 86400 + a * 3600 + (b or 0) * 60 + (c or 0)
    elif c is not None:  # HH:MM:SS
        seconds = a * 3600 + b * 60 + c
    elif b is not None:  # MM:SS
        seconds = a * 60 + b
    else:  # MM
        seconds = a * 60
    if seconds <= 0:
        raise SubmitError(f"--time {short(text)}: must be positive")
    return math.ceil(seconds / 60)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="python -m slurm.submit",
        description="Submit DDPM training (or, with --eval, an eval command) to Slurm through "
        "submitit: one task per node, each running `accelerate launch` for its node; saves and "
        "requeues on time limits and preemption; every start resumes from the newest checkpoint.",
        epilog="Arguments after `--` go to `python -m eval` (with --eval). Errors exit with code 2.",
    )
    p.add_argument("recipe", nargs="?", help="training recipe (YAML); not with --eval")
    p.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value")
    p.add_argument("--eval", action="store_true", help="run `accelerate launch -m eval ARGS` (ARGS after --)")
    g = p.add_argument_group("resources")
    g.add_argument("--nodes", type=int, default=1, help="nodes (one Slurm task each); default 1")
    g.add_argument("--gpus-per-node", type=int, default=1, help="GPUs (= processes) per node; default 1")
    g.add_argument("--cpu", action="store_true",
                   help="no GPUs: run --gpus-per-node CPU processes per node (ACCELERATE_USE_CPU=1)")
    g.add_argument("--cpus-per-task", type=int, help="CPU cores per node (default: Slurm's, or G with --cpu)")
    g.add_argument("--mem-gb", type=float, help="memory per node in GB")
    g.add_argument("--partition", help="Slurm partition")
    g.add_argument("--time", default="24:00:00", help="time limit per start, HH:MM:SS (default 24:00:00)")
    g.add_argument("--account", help="Slurm account")
    g.add_argument("--qos", help="Slurm QOS")
    g.add_argument("--constraint", help="Slurm node features, e.g. a100")
    g.add_argument("--job-name", help="default: the recipe's run.name")
    j = p.add_argument_group("job")
    j.add_argument("--job-dir", help="job folder (default: RUN/slurm/<date-time>, or slurm_jobs/ with --eval)")
    j.add_argument("--signal-delay-s", type=int, default=120,
                   help="signal this many seconds before the time limit so training can save (default 120)")
    j.add_argument("--max-requeues", type=int, default=20, help="cap on preemptions/timeouts/requeues (default 20)")
    j.add_argument("--script", help="training script (default pipeline/train.py)")
    j.add_argument("--accelerate-config", help="an `accelerate config` YAML to pass to the launcher")
    j.add_argument("--deepspeed-config", help="a DeepSpeed JSON: launch with DeepSpeed (multi-node: standard launcher)")
    j.add_argument("--dry-run", action="store_true", help="print the sbatch parameters and launch command; submit nothing")
    j.add_argument("--wait", action="store_true", help="block until the job ends; exit 0 only if it succeeded")
    return p


# Every value ends up on an `#SBATCH --key=value` line of a shell script: a newline in one
# would add lines (commands) to the script. Names are Slurm identifiers; constraints may also
# use Slurm's feature operators. Nothing else is accepted.
_NAME = re.compile(r"[A-Za-z0-9_.+@%:-]{1,128}")
_CONSTRAINT = re.compile(r"[A-Za-z0-9_.,&|!()\[\]*:-]{1,256}")


def check_parameters(args, job_name: str) -> None:
    """Refuse, in one line, any value that is not a positive number or a plain Slurm name."""
    for flag, value, lo in (("--nodes", args.nodes, 1), ("--gpus-per-node", args.gpus_per_node, 1),
                            ("--cpus-per-task", args.cpus_per_task, 1), ("--signal-delay-s", args.signal_delay_s, 0),
                            ("--max-requeues", args.max_requeues, 0)):
        if value is not None and value < lo:
            raise SubmitError(f"{flag} must be at least {lo}, got {value}")
    if args.mem_gb is not None and not (math.isfinite(args.mem_gb) and args.mem_gb > 0):
        raise SubmitError(f"--mem-gb must be a positive number, got {args.mem_gb}")
    for flag, value, pattern in (("--partition", args.partition, _NAME), ("--account", args.account, _NAME),
                                 ("--qos", args.qos, _NAME), ("--constraint", args.constraint, _CONSTRAINT),
                                 ("--job-name (or run.name)", job_name, _NAME)):
        if value is not None and not pattern.fullmatch(value):
            raise SubmitError(f"{flag} {short(value)}: not a Slurm name (letters, digits, _.+@%:-; "
                              "no spaces or newlines)")
    parse_time(args.time)


def sbatch_parameters(args, job_name: str) -> dict:
    check_parameters(args, job_name)
    params = {
        "job_name": job_name,
        "nodes": args.nodes,
        "ntasks_per_node": 1,  # one task per node; Accelerate starts that node's processes
        "time": parse_time(args.time),
        "signal_delay_s": args.signal_delay_s,
        "stderr_to_stdout": True,
        "additional_parameters": {"requeue": True},  # requeue on preemption even where JobRequeue=0
        "setup": [f"export PYTHONPATH={PROJECT_ROOT}${{PYTHONPATH:+:$PYTHONPATH}}"],
    }
    if not args.cpu:
        params["gpus_per_node"] = args.gpus_per_node
    cpus = args.cpus_per_task or (args.gpus_per_node if args.cpu else None)
    if args.mem_gb is not None:
        from submitit.slurm.slurm import _convert_mem  # submitit: see the module docstring

        params["mem"] = _convert_mem(args.mem_gb)
    for key, value in [("cpus_per_task", cpus), ("partition", args.partition),
                       ("account", args.account), ("qos", args.qos), ("constraint", args.constraint)]:
        if value is not None:
            params[key] = value
    return params


def prepare(args, workdir: Path):
    """Validate everything before anything is submitted; return (spec, params, recipe or None)."""
    from slurm.job import JobSpec  # submitit: see the module docstring

    stamp = time.strftime("%Y%m%d-%H%M%S")
    recipe = None
    if args.eval:
        if args.recipe or args.overrides:
            raise SubmitError("--eval takes its arguments after `--`, e.g. -- sample RUN --out DIR")
        if not args.eval_args:
            raise SubmitError("--eval needs the eval command after `--`, e.g. -- sample RUN --out DIR")
        job_dir = Path(args.job_dir or workdir / "slurm_jobs" / f"eval-{stamp}")
        output_dir = job_dir
        name = args.job_name or f"eval-{args.eval_args[0]}"
        program = ["-m", "eval", *args.eval_args]
    else:
        if not args.recipe:
            raise SubmitError("give a recipe (or --eval)")
        recipe = load_recipe(args.recipe, args.overrides)
        check_paths(recipe, args.recipe)
        output_dir = workdir / recipe.run.output_dir
        job_dir = Path(args.job_dir or output_dir / "slurm" / stamp)
        name = args.job_name or recipe.run.name
        program = None
    for path, flag in [(args.accelerate_config, "--accelerate-config"), (args.deepspeed_config, "--deepspeed-config"),
                       (args.script, "--script")]:
        if path and not Path(path).is_file():
            raise SubmitError(f"{flag}: no file at {path}")
    job_dir = job_dir.absolute()
    if any(c in str(job_dir) for c in "\n\r\0"):  # it is written into the sbatch script
        raise SubmitError(f"--job-dir / run.output_dir {short(str(job_dir))}: a path with a line break")
    spec = JobSpec(
        job_dir=str(job_dir), recipe=str(job_dir / "recipe.yaml"), output_dir=str(output_dir.absolute()),
        procs_per_node=args.gpus_per_node, workdir=str(workdir),
        script=str(Path(args.script).absolute()) if args.script else "",
        program=program,
        accelerate_config=str(Path(args.accelerate_config).absolute()) if args.accelerate_config else None,
        deepspeed_config=str(Path(args.deepspeed_config).absolute()) if args.deepspeed_config else None,
        env={"ACCELERATE_USE_CPU": "1"} if args.cpu else {},
        max_requeues=args.max_requeues, signal_delay_s=args.signal_delay_s,
        save_timeout_s=max(30, args.signal_delay_s - 15), time_limit_s=parse_time(args.time) * 60,
    )
    return spec, sbatch_parameters(args, name), recipe


def preview_command(spec, nodes: int) -> str:
    """Node 0's launch command, with the values Slurm fills in at run time as placeholders."""
    node = NodeLaunch(nodes, 0, "FIRST_HOST", 1, spec.procs_per_node)
    kw = {"script": spec.script} if spec.script else {}
    cmd = launch_command(node, spec.recipe, accelerate_config=spec.accelerate_config,
                         deepspeed_config=spec.deepspeed_config, program=spec.program, **kw)
    text = format_command(cmd).replace("--main_process_port 1", "--main_process_port $((12000 + SLURM_JOB_ID % 20000))")
    text = text.replace("--machine_rank 0", "--machine_rank $SLURM_NODEID")
    env = " ".join(f"{k}={v}" for k, v in spec.env.items())
    return f"{env} {text}".strip()


def sbatch_script(params: dict, folder: str) -> str:
    from submitit.slurm.slurm import _make_sbatch_string  # submitit: see the module docstring

    return _make_sbatch_string(command=f"{sys.executable} -u -m submitit.core._submit {folder}", folder=folder, **params)


def submit(spec, params: dict, recipe=None):
    """Write the job folder, submit through submitit, return the submitit job."""
    # submitit: see the module docstring
    import submitit
    from submitit.core.utils import FailedJobError

    from slurm.job import TrainingJob

    if shutil.which("sbatch") is None:
        raise SubmitError("sbatch is not on PATH: no Slurm client on this machine (try --dry-run)")
    job_dir = Path(spec.job_dir)
    created = not job_dir.exists()
    job_dir.mkdir(parents=True, exist_ok=True)
    if recipe is not None:
        save_recipe(recipe, spec.recipe)
    write_text(job_dir / "launch_command.txt", preview_command(spec, params["nodes"]) + "\n")
    executor = submitit.SlurmExecutor(folder=job_dir, max_num_timeout=spec.max_requeues)
    executor.update_parameters(**params)
    try:
        job = executor.submit(TrainingJob(spec))
    except (FailedJobError, OSError) as e:
        if created:  # nothing was submitted: leave no job folder behind
            shutil.rmtree(job_dir, ignore_errors=True)
        raise SubmitError(f"Slurm refused the job: {_sbatch_reason(str(e))}") from None
    write_text(job_dir / "submission.json", json.dumps(
        {"job_id": job.job_id, "sbatch": params, "launch": preview_command(spec, params["nodes"]),
         "submitted": time.strftime("%Y-%m-%dT%H:%M:%S")}, indent=1, default=str) + "\n")
    return job


def _sbatch_reason(text: str) -> str:
    lines = [ln.strip() for ln in text.splitlines() if "error" in ln.lower() and ln.strip()]
    picked = [ln.split("error:", 1)[-1].strip() for ln in lines if "sbatch" in ln] or lines or [text.strip()]
    return "; ".join(dict.fromkeys(picked))[:500]


def run(argv: list[str]) -> int:
    eval_args = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    args = build_parser().parse_intermixed_args(argv)  # flags and overrides in any order
    args.eval_args = eval_args
    spec, params, recipe = prepare(args, Path.cwd())
    if args.dry_run:
        print("# sbatch parameters")
        print(json.dumps(params, indent=1, default=str))
        print("# sbatch script (submitit)")
        print(sbatch_script(params, spec.job_dir))
        print("# launch command (each node; Slurm fills in FIRST_HOST, SLURM_JOB_ID, SLURM_NODEID)")
        print(preview_command(spec, params["nodes"]))
        return 0
    job = submit(spec, params, recipe)
    print(f"submitted job {job.job_id}; job folder {spec.job_dir}")
    print(f"log: {job.paths.stdout}")
    if args.wait:
        try:
            result = job.results()[0]  # one result per node (task); result() refuses several
        except Exception as e:  # the job's own error, already in its log
            print(f"job {job.job_id} failed: {str(e).splitlines()[-1] if str(e) else e}", file=sys.stderr)
            return 1
        print(f"job {job.job_id} finished: {result}")
    return 0


def main(argv=None) -> int:
    return run_cli(run, list(sys.argv[1:] if argv is None else argv))


if __name__ == "__main__":
    sys.exit(main())
