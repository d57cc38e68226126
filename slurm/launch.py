"""The per-node launch command, built from the `SLURM_*` variables of one task.

One Slurm task runs on each node; each starts the Accelerate launcher for that node's
processes. Everything the launcher needs comes from the allocation itself, so no node ever
ssh-es into another:
- `--num_machines` = SLURM_JOB_NUM_NODES, `--machine_rank` = SLURM_NODEID,
- `--main_process_ip` = the first host of SLURM_JOB_NODELIST (expanded by `scontrol show
  hostnames` when it is there, else by `expand_nodelist` below),
- `--main_process_port` derived from the job id (the same on every node, and different for two
  jobs that share a node),
- `--deepspeed_multinode_launcher standard` when DeepSpeed is used: each node launches its own
  processes instead of DeepSpeed's pdsh/ssh launcher.

`python -m slurm.launch [--procs-per-node N] [--cpu] RECIPE [OVERRIDES...]` (or `--eval -- ARGS`)
runs that command for the node it is started on, e.g. from `srun` in a batch script of one's own,
or by hand on each node with that node's `SLURM_*` values; `--print` only prints it.
"""

from __future__ import annotations

import argparse
import os
import re
import shlex
import shutil
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path
from typing import Mapping, Sequence

from pipeline import yaml_safe
from pipeline.errors import UserError, run_cli

PROJECT_ROOT = Path(__file__).resolve().parents[1]
TRAIN_SCRIPT = PROJECT_ROOT / "pipeline" / "train.py"
# Ports below Linux's ephemeral range (32768-60999), so an outgoing connection never holds ours.
PORT_BASE, PORT_SPAN = 12000, 20000


class SlurmEnvError(UserError):
    """The `SLURM_*` variables do not describe a usable allocation."""


def expand_nodelist(nodelist: str) -> list[str]:
    """Expand Slurm's compressed host list: `gpu[001-004,010],cpu7` -> gpu001..gpu004, gpu010, cpu7.

    Zero padding is kept (the width of the range's first number), brackets may appear more
    than once in one name (`r[1-2]n[01-02]`), and groups are separated by commas outside brackets.
    """
    hosts: list[str] = []
    for group in _split_top_level(nodelist.strip()):
        names = [""]
        for literal, ranges in re.findall(r"([^\[\]]*)(?:\[([^\]]*)\])?", group):
            if not literal and not ranges:
                continue
            suffixes = _expand_ranges(ranges, nodelist) if ranges else [""]
            names = [n + literal + s for n in names for s in suffixes]
        hosts.extend(names)
    if not hosts:
        raise SlurmEnvError(f"empty node list {nodelist!r}")
    return hosts


def _split_top_level(text: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in text:
        if c == "[":
            depth += 1
        elif c == "]":
            depth -= 1
            if depth < 0:
                raise SlurmEnvError(f"unbalanced ']' in node list {text!r}")
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    if depth != 0:
        raise SlurmEnvError(f"unbalanced '[' in node list {text!r}")
    parts.append("".join(cur))
    return [p for p in parts if p]


def _expand_ranges(ranges: str, whole: str) -> list[str]:
    out = []
    for item in ranges.split(","):
        m = re.fullmatch(r"(\d+)(?:-(\d+))?", item.strip())
        if not m:
            raise SlurmEnvError(f"bad range {item!r} in node list {whole!r}")
        lo, hi = m.group(1), m.group(2) or m.group(1)
        if int(hi) < int(lo):
            raise SlurmEnvError(f"descending range {item!r} in node list {whole!r}")
        width = len(lo)
        out.extend(f"{i:0{width}d}" for i in range(int(lo), int(hi) + 1))
    return out


def hostnames(nodelist: str, use_scontrol: bool = True) -> list[str]:
    """Slurm's own expansion when `scontrol` is on PATH (it knows every site's naming), else ours."""
    if use_scontrol and shutil.which("scontrol"):
        try:
            out = subprocess.run(
                ["scontrol", "show", "hostnames", nodelist],
                capture_output=True, text=True, timeout=30, check=True,
            ).stdout.split()
            if out:
                return out
        except (subprocess.SubprocessError, OSError):
            pass
    return expand_nodelist(nodelist)


def port_for_job(job_id: str | int) -> int:
    """A rendezvous port from the job id: equal on all nodes of one job, different across jobs."""
    digits = re.sub(r"\D", "", str(job_id))
    if not digits:
        raise SlurmEnvError(f"SLURM_JOB_ID {job_id!r} has no digits")
    return PORT_BASE + int(digits) % PORT_SPAN


@dataclass(frozen=True)
class NodeLaunch:
    num_machines: int
    machine_rank: int
    main_address: str
    main_port: int
    procs_per_node: int

    @property
    def num_processes(self) -> int:
        return self.num_machines * self.procs_per_node


def node_launch_from_env(env: Mapping[str, str], procs_per_node: int, use_scontrol: bool = True) -> NodeLaunch:
    """Read one task's `SLURM_*` variables (an sbatch allocation with one task per node)."""

    def need(name: str) -> str:
        value = env.get(name)
        if value is None or value == "":
            raise SlurmEnvError(f"{name} is not set: run inside a Slurm allocation")
        return value

    nodelist = env.get("SLURM_JOB_NODELIST") or need("SLURM_NODELIST")
    hosts = hostnames(nodelist, use_scontrol=use_scontrol)
    num_nodes = int(env.get("SLURM_JOB_NUM_NODES") or env.get("SLURM_NNODES") or len(hosts))
    if num_nodes != len(hosts):
        raise SlurmEnvError(f"SLURM_JOB_NUM_NODES={num_nodes} but the node list {nodelist!r} has {len(hosts)} hosts")
    rank = int(need("SLURM_NODEID"))
    if not 0 <= rank < num_nodes:
        raise SlurmEnvError(f"SLURM_NODEID={rank} is outside 0..{num_nodes - 1}")
    if procs_per_node < 1:
        raise SlurmEnvError(f"processes per node must be >= 1, got {procs_per_node}")
    return NodeLaunch(
        num_machines=num_nodes,
        machine_rank=rank,
        main_address=hosts[0],
        main_port=port_for_job(need("SLURM_JOB_ID")),
        procs_per_node=procs_per_node,
    )


def launch_command(
    node: NodeLaunch,
    recipe: str,
    overrides: Sequence[str] = (),
    *,
    script: str | Path = TRAIN_SCRIPT,
    accelerate_config: str | None = None,
    deepspeed_config: str | None = None,
    mixed_precision: str | None = None,
    python: str = sys.executable,
    program: Sequence[str] | None = None,
) -> list[str]:
    """`accelerate launch` for this node; the same list on every node but for `--machine_rank`.

    `program` replaces `SCRIPT RECIPE OVERRIDES...` at the end, e.g. `["-m", "eval", "sample", ...]`.
    """
    cmd = [python, "-m", "accelerate.commands.launch"]
    if accelerate_config:
        cmd += ["--config_file", str(accelerate_config)]
    cmd += ["--num_processes", str(node.num_processes), "--num_machines", str(node.num_machines)]
    deepspeed = bool(deepspeed_config) or _config_uses_deepspeed(accelerate_config)
    if deepspeed:
        cmd += ["--use_deepspeed"]
        if deepspeed_config:
            cmd += ["--deepspeed_config_file", str(deepspeed_config)]
        if node.num_machines > 1:
            # Each node's task starts its own ranks; DeepSpeed's default (pdsh) would ssh.
            cmd += ["--deepspeed_multinode_launcher", "standard"]
    elif node.num_processes > 1:
        cmd += ["--multi_gpu"]
    if mixed_precision:
        cmd += ["--mixed_precision", mixed_precision]
    if node.num_machines > 1 or node.num_processes > 1:
        cmd += [
            "--machine_rank", str(node.machine_rank),
            "--main_process_ip", node.main_address,
            "--main_process_port", str(node.main_port),
        ]
    if node.num_machines > 1:
        # Static rendezvous at the main host; every node is in the same Slurm allocation.
        cmd += ["--rdzv_backend", "static", "--same_network", "--max_restarts", "0"]
    if program is not None:
        return cmd + list(program)
    return cmd + [str(script), str(recipe), *overrides]


def _config_uses_deepspeed(path) -> bool:
    """Whether an `accelerate config` YAML selects DeepSpeed (then --multi_gpu must not be added)."""
    if not path:
        return False
    try:
        cfg = yaml_safe.load_file(path) or {}  # bounded: no alias bombs
    except (OSError, yaml_safe.YamlError):
        return False
    return isinstance(cfg, dict) and str(cfg.get("distributed_type", "")).upper() == "DEEPSPEED"


def format_command(cmd: Sequence[str]) -> str:
    return shlex.join(cmd)


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    rest = argv[argv.index("--") + 1:] if "--" in argv else []
    argv = argv[: argv.index("--")] if "--" in argv else argv
    p = argparse.ArgumentParser(
        prog="python -m slurm.launch",
        description="Start `accelerate launch` for this node of a Slurm allocation (from its SLURM_* "
        "variables): training with RECIPE, or with --eval `python -m eval ARGS` (ARGS after --).")
    p.add_argument("recipe", nargs="?", help="training recipe (YAML); not with --eval")
    p.add_argument("overrides", nargs="*", help="recipe overrides: section.key=value")
    p.add_argument("--eval", action="store_true", help="run `-m eval ARGS` (ARGS after --)")
    p.add_argument("--procs-per-node", type=int, default=1, help="processes (GPUs) on this node; default 1")
    p.add_argument("--cpu", action="store_true", help="CPU processes (ACCELERATE_USE_CPU=1, gloo)")
    p.add_argument("--print", action="store_true", help="print the command; run nothing")
    args = p.parse_intermixed_args(argv)
    return run_cli(_run, args, rest)


def _run(args, rest: list[str]) -> int:
    if args.eval == bool(args.recipe) or (args.eval and not rest):
        raise SlurmEnvError("give a RECIPE, or --eval with the eval command after `--`")
    node = node_launch_from_env(os.environ, args.procs_per_node)
    program = ["-m", "eval", *rest] if args.eval else None
    cmd = launch_command(node, args.recipe or "", args.overrides, program=program)
    if args.print:
        print(format_command(cmd))
        return 0
    env = {**os.environ, "ACCELERATE_USE_CPU": "1"} if args.cpu else None
    return subprocess.run(cmd, env=env).returncode


if __name__ == "__main__":
    sys.exit(main())
