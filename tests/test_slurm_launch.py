"""Fast tests of slurm/ (no cluster needed): per-node launch commands from real `SLURM_*`
values, the submit CLI (dry run, errors) and the job's pieces (requeue count, signal forwarding).

The environments below are what Slurm sets in the task of each node of an
`sbatch --nodes N --ntasks-per-node 1` job; node lists use Slurm's compressed form.
The real-cluster tests are in test_slurm_cluster.py.
"""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from submitit.slurm.slurm import _parse_node_list  # an independent parser, as a reference

from slurm.job import descendants, interruption_kind, read_requeues, record_requeue, signal_tree
from slurm.launch import (
    NodeLaunch,
    SlurmEnvError,
    expand_nodelist,
    launch_command,
    node_launch_from_env,
    port_for_job,
)
from slurm.launch import main as launch_main
from slurm.submit import SubmitError, parse_time
from slurm.submit import main as submit_main
from support.datasets import make_shards

ROOT = Path(__file__).resolve().parents[1]

NODELIST_16 = "gpu[001-004,010],dgx-a[07-09],r1n[1-2],login5,h100-[0998-1002]"
HOSTS_16 = (["gpu001", "gpu002", "gpu003", "gpu004", "gpu010", "dgx-a07", "dgx-a08", "dgx-a09",
             "r1n1", "r1n2", "login5", "h100-0998", "h100-0999", "h100-1000", "h100-1001",
             "h100-1002"])


def slurm_env(job_id, nodelist, num_nodes, node_id, gpus=8):
    """The variables of one task (one per node) as Slurm 22.05 sets them."""
    return {
        "SLURM_JOB_ID": str(job_id),
        "SLURM_JOBID": str(job_id),
        "SLURM_JOB_NODELIST": nodelist,
        "SLURM_NODELIST": nodelist,
        "SLURM_JOB_NUM_NODES": str(num_nodes),
        "SLURM_NNODES": str(num_nodes),
        "SLURM_NTASKS": str(num_nodes),
        "SLURM_TASKS_PER_NODE": f"1(x{num_nodes})" if num_nodes > 1 else "1",
        "SLURM_NODEID": str(node_id),
        "SLURM_PROCID": str(node_id),
        "SLURM_LOCALID": "0",
        "SLURM_GPUS_ON_NODE": str(gpus),
        "SLURM_JOB_PARTITION": "gpu",
    }


@pytest.mark.parametrize(
    "nodelist, hosts",
    [
        ("gpu[001-004,010]", ["gpu001", "gpu002", "gpu003", "gpu004", "gpu010"]),
        ("node7", ["node7"]),
        ("a[1-3],b2", ["a1", "a2", "a3", "b2"]),
        ("r[1-2]n[01-02]", ["r1n01", "r1n02", "r2n01", "r2n02"]),
        ("gpu[8-11]", ["gpu8", "gpu9", "gpu10", "gpu11"]),  # no padding: width of "8"
        ("gpu[098-101]", ["gpu098", "gpu099", "gpu100", "gpu101"]),
        ("x-1,x-[3-4]", ["x-1", "x-3", "x-4"]),
    ],
)
def test_expand_nodelist(nodelist, hosts):
    assert expand_nodelist(nodelist) == hosts


def test_expand_nodelist_agrees_with_submitit_parser():
    for nodelist in ["gpu[001-004,010]", NODELIST_16, "a[1-3],b2", "gpu[098-101]"]:
        assert expand_nodelist(nodelist) == _parse_node_list(nodelist)


@pytest.mark.skipif(shutil.which("scontrol") is None, reason="scontrol (slurm-client) is not installed")
def test_expand_nodelist_agrees_with_scontrol(tmp_path):
    # `scontrol show hostnames` needs only a configuration file, not a running controller.
    conf = tmp_path / "slurm.conf"
    conf.write_text("ClusterName=test\nSlurmctldHost=localhost\nNodeName=localhost\nPartitionName=p Nodes=localhost\n")
    env = {**os.environ, "SLURM_CONF": str(conf)}
    for nodelist in ["gpu[001-004,010]", NODELIST_16, "r[1-2]n[01-02]", "gpu[8-11]"]:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True, env=env)
        if out.returncode != 0:
            pytest.skip(f"scontrol cannot run here: {out.stderr.strip()}")
        assert expand_nodelist(nodelist) == out.stdout.split()


@pytest.mark.parametrize("bad", ["gpu[001-004", "gpu001-004]", "gpu[a-b]", "gpu[5-3]", ""])
def test_expand_nodelist_rejects_malformed(bad):
    with pytest.raises(SlurmEnvError):
        expand_nodelist(bad)


def test_port_is_shared_within_a_job_and_differs_across_jobs():
    assert port_for_job("4242") == port_for_job(4242)
    ports = {port_for_job(j) for j in range(1000, 1100)}
    assert len(ports) == 100
    assert all(12000 <= p < 32000 for p in ports)  # below the ephemeral range
    with pytest.raises(SlurmEnvError):
        port_for_job("abc")


def _flag(cmd, name):
    return cmd[cmd.index(name) + 1]


def test_single_node_single_process():
    env = slurm_env(17, "node7", 1, 0, gpus=1)
    node = node_launch_from_env(env, procs_per_node=1, use_scontrol=False)
    assert node == NodeLaunch(1, 0, "node7", port_for_job(17), 1)
    cmd = launch_command(node, "recipes/cifar10.yaml", ["train.lr=1e-4"], script="train.py", python="py")
    assert cmd[:3] == ["py", "-m", "accelerate.commands.launch"]
    assert _flag(cmd, "--num_processes") == "1" and _flag(cmd, "--num_machines") == "1"
    assert "--multi_gpu" not in cmd and "--machine_rank" not in cmd
    assert cmd[-3:] == ["train.py", "recipes/cifar10.yaml", "train.lr=1e-4"]


def test_single_node_eight_gpus():
    node = node_launch_from_env(slurm_env(123456, "gpu042", 1, 0), procs_per_node=8, use_scontrol=False)
    cmd = launch_command(node, "r.yaml", script="t.py")
    assert "--multi_gpu" in cmd
    assert _flag(cmd, "--num_processes") == "8"
    assert _flag(cmd, "--main_process_ip") == "gpu042"
    assert "--rdzv_backend" not in cmd  # one machine: nothing to rendezvous across


def test_two_nodes_each_task_gets_its_rank():
    cmds = []
    for node_id in range(2):
        env = slurm_env(987654, "gpu[001-002]", 2, node_id)
        node = node_launch_from_env(env, procs_per_node=8, use_scontrol=False)
        cmds.append(launch_command(node, "r.yaml", script="t.py"))
    for rank, cmd in enumerate(cmds):
        assert _flag(cmd, "--num_machines") == "2"
        assert _flag(cmd, "--num_processes") == "16"  # total over all machines (Accelerate's meaning)
        assert _flag(cmd, "--machine_rank") == str(rank)
        assert _flag(cmd, "--main_process_ip") == "gpu001"
        assert _flag(cmd, "--main_process_port") == str(port_for_job(987654))
        assert _flag(cmd, "--rdzv_backend") == "static"
    # Identical except for the machine rank.
    strip = lambda c: [a for i, a in enumerate(c) if i != c.index("--machine_rank") + 1]
    assert strip(cmds[0]) == strip(cmds[1])


def test_sixteen_nodes_with_deepspeed():
    ranks = []
    for node_id in range(16):
        env = slurm_env(31337, NODELIST_16, 16, node_id)
        node = node_launch_from_env(env, procs_per_node=8, use_scontrol=False)
        cmd = launch_command(node, "r.yaml", script="t.py", deepspeed_config="ds.json")
        assert _flag(cmd, "--num_processes") == "128"
        assert _flag(cmd, "--num_machines") == "16"
        assert _flag(cmd, "--main_process_ip") == HOSTS_16[0] == "gpu001"
        assert len(HOSTS_16) == 16 and expand_nodelist(NODELIST_16) == HOSTS_16
        assert "--use_deepspeed" in cmd and _flag(cmd, "--deepspeed_config_file") == "ds.json"
        assert _flag(cmd, "--deepspeed_multinode_launcher") == "standard"  # no pdsh/ssh
        assert "--multi_gpu" not in cmd
        ranks.append(int(_flag(cmd, "--machine_rank")))
    assert ranks == list(range(16))


def test_deepspeed_single_node_needs_no_multinode_launcher():
    node = node_launch_from_env(slurm_env(5, "gpu001", 1, 0), procs_per_node=8, use_scontrol=False)
    cmd = launch_command(node, "r.yaml", script="t.py", deepspeed_config="ds.json")
    assert "--deepspeed_multinode_launcher" not in cmd


def test_accelerate_config_with_deepspeed_gets_the_standard_launcher():
    # The project's own ZeRO-2 launch config, on 2 nodes: DeepSpeed, not --multi_gpu, no pdsh.
    cfg = ROOT / "recipes" / "accelerate" / "deepspeed_zero2.yaml"
    if not cfg.is_file():
        pytest.skip("recipes/accelerate/deepspeed_zero2.yaml is not there")
    node = node_launch_from_env(slurm_env(9, "gpu[001-002]", 2, 1), procs_per_node=8, use_scontrol=False)
    cmd = launch_command(node, "r.yaml", script="t.py", accelerate_config=str(cfg))
    assert _flag(cmd, "--config_file") == str(cfg) and "--use_deepspeed" in cmd and "--multi_gpu" not in cmd
    assert _flag(cmd, "--deepspeed_multinode_launcher") == "standard" and _flag(cmd, "--machine_rank") == "1"
    ddp = launch_command(node, "r.yaml", script="t.py", accelerate_config=str(ROOT / "recipes/accelerate/multi_gpu_8.yaml"))
    assert "--multi_gpu" in ddp and "--use_deepspeed" not in ddp


def test_cpu_processes_per_node():
    # On CPU (ACCELERATE_USE_CPU=1) "GPUs per node" are processes per node.
    node = node_launch_from_env(slurm_env(8, "vm", 1, 0, gpus=0), procs_per_node=2, use_scontrol=False)
    cmd = launch_command(node, "recipes/quickstart.yaml", script="t.py")
    assert "--multi_gpu" in cmd and _flag(cmd, "--num_processes") == "2"


@pytest.mark.parametrize(
    "change, message",
    [
        ({"SLURM_NODEID": None}, "SLURM_NODEID is not set"),
        ({"SLURM_NODEID": "2"}, "outside 0..1"),
        ({"SLURM_JOB_NUM_NODES": "3"}, "has 2 hosts"),
        ({"SLURM_JOB_NODELIST": None, "SLURM_NODELIST": None}, "SLURM_NODELIST is not set"),
    ],
)
def test_bad_environment_is_reported(change, message):
    env = slurm_env(1, "gpu[001-002]", 2, 0)
    for k, v in change.items():
        if v is None:
            env.pop(k)
        else:
            env[k] = v
    with pytest.raises(SlurmEnvError, match=message):
        node_launch_from_env(env, procs_per_node=8, use_scontrol=False)


def test_launch_cli_prints_this_nodes_command(monkeypatch, tmp_path, capsys):
    # The node list is expanded by our parser: no scontrol (it would look for a controller).
    monkeypatch.setenv("PATH", str(tmp_path))
    for k, v in slurm_env(4242, "ddpm-node[1-2]", 2, 1).items():
        monkeypatch.setenv(k, v)
    assert launch_main(["--print", "--procs-per-node", "3", "r.yaml", "train.lr=1"]) == 0
    cmd = capsys.readouterr().out.split()
    assert _flag(cmd, "--machine_rank") == "1" and _flag(cmd, "--main_process_ip") == "ddpm-node1"
    assert _flag(cmd, "--num_processes") == "6" and _flag(cmd, "--main_process_port") == str(port_for_job(4242))
    assert cmd[-2:] == ["r.yaml", "train.lr=1"]
    assert launch_main(["--print", "--eval", "--", "sample", "RUN"]) == 0
    assert capsys.readouterr().out.split()[-4:] == ["-m", "eval", "sample", "RUN"]


@pytest.mark.parametrize("argv, env, message", [
    (["r.yaml"], {"SLURM_NODEID": "5"}, "SLURM_NODEID=5 is outside 0..1"),
    (["--eval"], {}, "give a RECIPE, or --eval with the eval command after `--`"),
    (["r.yaml", "--eval", "--", "sample"], {}, "give a RECIPE, or --eval"),
])
def test_launch_cli_errors_are_one_line(monkeypatch, tmp_path, capsys, argv, env, message):
    monkeypatch.setenv("PATH", str(tmp_path))
    for k, v in {**slurm_env(7, "a[1-2]", 2, 0), **env}.items():
        monkeypatch.setenv(k, v)
    assert launch_main(["--print", *argv]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1, err


# ---------------------------------------------------------------------------- the submit CLI



@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    return make_shards(tmp_path_factory.mktemp("slurm-cli") / "shards", n_train=8, n_test=2, resolution=8)


@pytest.mark.parametrize("text, minutes", [("00:10:00", 10), ("48:00:00", 2880), ("90", 90), ("1:30", 2),
                                           ("2-00:00:00", 2880), ("1-12", 2160), ("00:00:30", 1)])
def test_parse_time(text, minutes):
    assert parse_time(text) == minutes


@pytest.mark.parametrize("bad", ["", "ten", "1:2:3:4", "00:00:00", "-5"])
def test_parse_time_rejects(bad):
    with pytest.raises(SubmitError):
        parse_time(bad)


def test_dry_run_prints_sbatch_parameters_and_launch_command(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = submit_main([str(ROOT / "recipes" / "quickstart.yaml"), f"data.shards={shards}", "train.max_steps=7",
                      f"run.output_dir={tmp_path / 'run'}", "--nodes", "4", "--gpus-per-node", "8",
                      "--partition", "gpu", "--time", "02:00:00", "--account", "proj", "--qos", "high",
                      "--constraint", "a100", "--dry-run"])
    out = capsys.readouterr().out
    assert rc == 0
    params = json.loads(out.split("# sbatch parameters\n")[1].split("# sbatch script")[0])
    assert params["nodes"] == 4 and params["ntasks_per_node"] == 1 and params["gpus_per_node"] == 8
    assert params["time"] == 120 and params["partition"] == "gpu" and params["constraint"] == "a100"
    script = out.split("# sbatch script (submitit)\n")[1]
    for flag in ["--nodes=4", "--ntasks-per-node=1", "--gpus-per-node=8", "--time=120", "--account=proj",
                 "--qos=high", "--signal=USR2@120", "--requeue"]:
        assert f"#SBATCH {flag}" in script
    launch = out.strip().splitlines()[-1]
    assert "--num_processes 32" in launch and "--num_machines 4" in launch
    assert "--machine_rank $SLURM_NODEID" in launch and "--main_process_ip FIRST_HOST" in launch
    assert launch.endswith("recipe.yaml")  # the job trains from the resolved copy in its folder
    assert not (tmp_path / "run").exists()  # a dry run writes nothing


def test_recipe_error_exits_2_before_submission(shards, tmp_path, capsys):
    rc = submit_main([str(ROOT / "recipes" / "quickstart.yaml"), f"data.shards={shards}", "train.lrr=1",
                      f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "unknown key 'train.lrr'" in err and "did you mean 'train.lr'" in err
    assert not (tmp_path / "run").exists()


def test_missing_data_exits_2(tmp_path, capsys):
    rc = submit_main([str(ROOT / "recipes" / "quickstart.yaml"), f"data.shards={tmp_path / 'none'}", "--dry-run"])
    assert rc == 2 and "no manifest.json" in capsys.readouterr().err


def test_missing_sbatch_exits_2(shards, tmp_path, capsys, monkeypatch):
    monkeypatch.setenv("PATH", str(tmp_path))  # a PATH without any Slurm client
    rc = submit_main([str(ROOT / "recipes" / "quickstart.yaml"), f"data.shards={shards}",
                      f"run.output_dir={tmp_path / 'run'}"])
    err = capsys.readouterr().err
    assert rc == 2 and "sbatch is not on PATH" in err and "Traceback" not in err


def test_eval_submission_dry_run(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = submit_main(["--eval", "--gpus-per-node", "4", "--dry-run", "--", "sample", "runs/x", "--out", "s"])
    launch = capsys.readouterr().out.strip().splitlines()[-1]
    assert rc == 0 and launch.endswith("--multi_gpu --machine_rank $SLURM_NODEID --main_process_ip FIRST_HOST "
                                       "--main_process_port $((12000 + SLURM_JOB_ID % 20000)) -m eval sample runs/x --out s")
    assert submit_main(["--eval", "--dry-run"]) == 2


# ---------------------------------------------------------------------------- the job's pieces


def test_interruption_kind():
    now = 1_000_000.0
    assert interruption_kind(now, now + 90, signal_delay_s=120) == "timeout"  # at the time-limit signal
    assert interruption_kind(now, now + 3600, signal_delay_s=120) == "preemption"
    assert interruption_kind(now, None, signal_delay_s=120) == "timeout-or-preemption"


def test_requeue_count_persists_in_the_job_folder(tmp_path):
    assert read_requeues(str(tmp_path))["count"] == 0
    assert record_requeue(str(tmp_path), "preemption", "7") == 1
    assert record_requeue(str(tmp_path), "timeout", "7") == 2
    state = json.loads((tmp_path / "requeues.json").read_text())
    assert [e["kind"] for e in state["events"]] == ["preemption", "timeout"]
    assert [f.name for f in tmp_path.iterdir()] == ["requeues.json"]  # no temporary file left


def test_signal_tree_reaches_grandchildren_in_other_sessions(tmp_path):
    # Like torch elastic: the launcher's workers run in sessions of their own, so a process-group
    # kill would miss them. The launcher ignores SIGUSR1; the worker records it and exits 75.
    worker = (
        "import signal, sys, time, pathlib\n"
        "def h(*a):\n"
        f"    pathlib.Path({str(tmp_path / 'got')!r}).write_text('usr1'); sys.exit(75)\n"
        "signal.signal(signal.SIGUSR1, h)\n"
        f"pathlib.Path({str(tmp_path / 'ready')!r}).write_text('1')\n"
        "time.sleep(60)\n"
    )
    launcher = (
        "import signal, subprocess, sys\n"
        "signal.signal(signal.SIGUSR1, signal.SIG_IGN)\n"
        f"p = subprocess.Popen([sys.executable, '-c', {worker!r}], start_new_session=True)\n"
        "sys.exit(p.wait())\n"
    )
    proc = subprocess.Popen([sys.executable, "-c", launcher])
    try:
        end = time.monotonic() + 30
        while not (tmp_path / "ready").exists() and time.monotonic() < end:
            time.sleep(0.05)
        kids = descendants(proc.pid)
        assert len(kids) == 1 and os.getsid(kids[0]) != os.getsid(proc.pid)
        signal_tree(proc.pid, signal.SIGUSR1)
        assert proc.wait(timeout=30) == 75
        assert (tmp_path / "got").read_text() == "usr1"
    finally:
        proc.kill()
