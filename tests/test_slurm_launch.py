"""Per-node launch commands from real `SLURM_*` values (fast; no cluster needed).

The environments below are what Slurm sets in the task of each node of an
`sbatch --nodes N --ntasks-per-node 1` job; node lists use Slurm's compressed form.
"""

import shutil
import subprocess

import pytest
from submitit.slurm.slurm import _parse_node_list  # an independent parser, as a reference

from slurm.launch import (
    NodeLaunch,
    SlurmEnvError,
    expand_nodelist,
    launch_command,
    node_launch_from_env,
    port_for_job,
)

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
def test_expand_nodelist_agrees_with_scontrol():
    for nodelist in ["gpu[001-004,010]", NODELIST_16, "r[1-2]n[01-02]", "gpu[8-11]"]:
        out = subprocess.run(["scontrol", "show", "hostnames", nodelist], capture_output=True, text=True)
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
