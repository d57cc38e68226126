"""Multi-node for real: a 2-node Slurm cluster on this one machine (`slurm/local_cluster.sh start
--nodes 2`: each node a network + UTS namespace with its own hostname and address on a private
bridge, running its own slurmd; see slurm/local_nodes.sh).

1. the nodes are hosts of their own (hostname, address, no route out) and `srun -N 2` spans them;
2. `python -m slurm.submit recipes/quickstart.yaml --nodes 2` (one CPU process per node, gloo)
   trains with a rank on each node, is preempted after its first checkpoint by a job of the
   higher-priority partition that needs both nodes whole, requeues itself and resumes; its final
   weights (model and EMA) equal, bit for bit, those of 1 node x 2 processes, uninterrupted;
3. `eval fid` on 2 nodes (samples and Inception features shared between the nodes) gives the
   same FID, from the same samples, as on 1 node with as many processes;
4. without Slurm: `python -m slurm.launch` started in each node's namespaces with that node's
   SLURM_* values; the two launchers meet and share the work;
5. starting again changes nothing; stopping leaves no daemon, namespace or link behind.
Run with `-s` to see what each test shows (nodes, ranks per node, preemption, resume, checks).
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from eval.inception import convert_fid_helper, fid_helper_file
from support.datasets import make_shards
from support.model import make_checkpoint, tiny_recipe
from support.slurm_jobs import (
    ROOT,
    SCRIPT,
    assert_same_weights,
    cluster_cmd,
    final_weights,
    job_info,
    latest_step,
    local_cluster,
    log_text,
    resumed_steps,
    submit,
    submit_training,
    wait_done,
    wait_until,
)

pytestmark = pytest.mark.slow

NODES = ["ddpm-node1", "ddpm-node2"]
STEPS, EVERY = 16, 4


@pytest.fixture(scope="module")
def cluster():
    was_up = cluster_cmd(2, "status").returncode == 0
    with local_cluster(nodes=2) as env:
        yield {**env, "DDPM_TEST_CLUSTER_WAS_UP": str(was_up)}


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    d = tmp_path_factory.mktemp("slurm2")
    make_shards(d / "shards", n_train=32, n_test=4)
    return d


def on_node(node: str, script: str) -> str:
    r = cluster_cmd(2, "exec", node, "sh", "-c", script, check=True)
    return r.stdout


def test_nodes_are_hosts_of_their_own(cluster):
    addrs = {}
    for node in NODES:
        out = on_node(node, "hostname; ip -4 -o addr show dev eth0; ip -4 route")
        host, addr_line, *routes = out.strip().splitlines()
        assert host == node
        addrs[node] = re.search(r"inet (\S+)/24", addr_line).group(1)
        # One route, to the bridge's /24: nothing a job does can leave the namespaces.
        assert len(routes) == 1 and routes[0].split()[:3] == [addrs[node].rsplit(".", 1)[0] + ".0/24", "dev", "eth0"]
    assert len(set(addrs.values())) == 2
    # Each node finds the other by name (the launcher's main address is a host name).
    assert on_node(NODES[0], f"getent hosts {NODES[1]}").split()[0] == addrs[NODES[1]]
    r = subprocess.run(["srun", "-N", "2", "--ntasks-per-node", "1", "sh", "-c", "echo $SLURM_NODEID $(hostname)"],
                       env=cluster, capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    assert sorted(r.stdout.split("\n")[:-1]) == ["0 ddpm-node1", "1 ddpm-node2"]
    print(f"\nnodes: {addrs}; srun -N 2: {sorted(r.stdout.split(chr(10))[:-1])}")


@pytest.fixture(scope="module")
def reference(cluster, workdir):
    """1 node x 2 CPU processes, uninterrupted."""
    job_id, job_dir = submit_training(cluster, workdir, "one", "--nodes", "1", "--gpus-per-node", "2",
                                      steps=STEPS, every=EVERY)
    wait_done(cluster, job_id, job_dir)
    return workdir / "one"


def ranks_by_node(job_dir: Path) -> dict:
    """node (the process's own hostname) -> global ranks of the job's training processes."""
    found = {}
    recipe = str(job_dir / "recipe.yaml")
    for pid in filter(str.isdigit, os.listdir("/proc")):
        try:
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")
            environ = dict(kv.split(b"=", 1) for kv in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0") if b"=" in kv)
        except OSError:
            continue
        if recipe.encode() not in cmd or any(b"accelerate" in c for c in cmd) or b"RANK" not in environ:
            continue
        host = subprocess.run(["nsenter", "-t", pid, "-u", "hostname"], capture_output=True, text=True).stdout.strip()
        found.setdefault(host, []).append(int(environ[b"RANK"]))
    return {h: sorted(r) for h, r in sorted(found.items())}


def test_two_node_job_preempted_requeues_and_resumes_bitwise(cluster, workdir, reference):
    job_id, job_dir = submit_training(cluster, workdir, "two", "--nodes", "2", "--gpus-per-node", "1",
                                      steps=STEPS, every=EVERY)
    run = workdir / "two"
    ranks = wait_until(lambda: (r := ranks_by_node(job_dir)) and sum(map(len, r.values())) == 2 and r, 180,
                       "a training process on each node")
    assert ranks == {"ddpm-node1": [0], "ddpm-node2": [1]}
    seen = wait_until(lambda: (s := latest_step(run)) >= EVERY and s, 180, "the first periodic checkpoint")
    assert job_info(cluster, job_id)["JobState"] == "RUNNING"
    # A job of the partition with the higher PriorityTier needs every core of both nodes.
    r = subprocess.run(["sbatch", "-p", "high", "-N", "2", "--ntasks-per-node", "1", "-c", "2",
                        "-o", str(workdir / "preemptor.out"), "--wrap", "sleep 1"], env=cluster, capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    info = wait_done(cluster, job_id, job_dir)
    logs = [log_text(job_dir, job_id, task) for task in (0, 1)]
    assert "hostname=ddpm-node1" in logs[0] and "hostname=ddpm-node2" in logs[1]
    assert f"training finished; newest checkpoint: {run}/checkpoints/step-{STEPS:08d}" in logs[0], logs[0][-3000:]
    assert int(info["Restarts"]) >= 1
    assert "preemption signal: asking training to save" in logs[0], logs[0][-3000:]
    # Node 2 asked its own processes to save: they stopped cleanly (its SIGUSR2, or rank 0's requeue's
    # SIGTERM when that came first), not as a failure.
    assert "training stopped after" in logs[1] and "training failed" not in logs[1], logs[1][-3000:]
    events = json.loads((job_dir / "requeues.json").read_text())["events"]
    assert [e["kind"] for e in events] == ["preemption"]
    resumed = [resumed_steps(log) for log in logs]
    assert resumed[0] == resumed[1] and len(resumed[0]) == 1 and resumed[0][0] >= EVERY, logs[0][-2000:]
    for node in (0, 1):  # every start launched both nodes with the same main address and port
        launch = (job_dir / f"{job_id}_node{node}_launch.sh").read_text()
        assert f"--num_machines 2 --multi_gpu --machine_rank {node} --main_process_ip ddpm-node1" in launch
    assert latest_step(run) == STEPS
    two, one = final_weights(run, STEPS), final_weights(reference, STEPS)
    assert_same_weights(two, one)
    print(f"\n2-node job {job_id}: nodes {info['NodeList']}, ranks per node {ranks}; preempted after step {seen} "
          f"was saved; requeued {info['Restarts']}x; both nodes resumed from step {resumed[0][0]}; "
          f"step {STEPS}: model ({len(two['model.safetensors'])} tensors) and EMA ({len(two['ema.safetensors'])}) "
          "bitwise equal to 1 node x 2 processes, uninterrupted")


@pytest.fixture(scope="module")
def inception(tmp_path_factory):
    return convert_fid_helper(fid_helper_file(), tmp_path_factory.mktemp("inception") / "inception.pth")


def fid_job(env, workdir: Path, run: Path, name: str, nodes: int, inception: Path) -> tuple[dict, dict, list[str]]:
    out = workdir / name
    job_id, job_dir = submit(env, workdir, [
        "--eval", "--cpu", "--nodes", str(nodes), "--gpus-per-node", str(2 // nodes), "--time", "00:10:00",
        "--job-dir", str(workdir / f"{name}-job"), "--", "fid", str(run), "--out", str(out),
        "--num-samples", "2", "--batch-size", "1", "--chunk-size", "1", "--sampler", "ddim", "--steps", "5",
        "--reference-count", "4", "--feature-batch-size", "2", "--inception-weights", str(inception),
        "--cache-dir", str(workdir / f"{name}-cache")])  # reference features computed by this job
    wait_done(env, job_id, job_dir)
    results = json.loads((out / "results.json").read_text())["evaluations"]["fid"]
    samples = json.loads((out / "samples.json").read_text())
    return results, samples, [log_text(job_dir, job_id, t).replace("\r", "\n") for t in range(nodes)]


def test_eval_across_two_nodes_gives_the_same_fid(cluster, workdir, reference, inception):
    two, two_samples, logs = fid_job(cluster, workdir, reference, "fid2", 2, inception)
    one, one_samples, _ = fid_job(cluster, workdir, reference, "fid1", 1, inception)
    assert "hostname=ddpm-node1" in logs[0] and "hostname=ddpm-node2" in logs[1]
    # An eval job writes no checkpoints: its log lines name the eval command and no "newest checkpoint".
    assert "eval fid finished" in logs[0] and "newest checkpoint" not in logs[0] + logs[1], logs[0][-3000:]
    # Each node drew one of the two chunks and extracted half of the features (rank 0 reports its share).
    assert two_samples["processes"] == 2 and "sampling [0]" in logs[0] and "sampling [1]" in logs[1]
    assert re.search(r"reference features \(train\): 100%.* 2/2", logs[0]) and re.search(r"sample features: 100%.* 1/1", logs[0])
    assert two_samples["checksums"] == one_samples["checksums"]  # the same images
    assert two["metrics"]["fid"] == one["metrics"]["fid"]
    print(f"\nFID on 2 nodes x 1 process: {two['metrics']['fid']!r}; on 1 node x 2: {one['metrics']['fid']!r}; "
          f"sample chunks {sorted(two_samples['checksums'])} identical")


def test_per_node_launchers_meet_without_slurm(cluster, tmp_path):
    ckpt = make_checkpoint(tmp_path / "ckpt", tiny_recipe(timesteps=20))
    out = tmp_path / "samples"
    procs = []
    for rank, node in enumerate(NODES):  # what Slurm would set in each node's task; no Slurm here
        env = {**cluster, "ACCELERATE_USE_CPU": "1", "SLURM_JOB_ID": "999027", "SLURM_JOB_NUM_NODES": "2",
               "SLURM_JOB_NODELIST": "ddpm-node[1-2]", "SLURM_NODEID": str(rank)}
        procs.append(subprocess.Popen(
            ["bash", str(SCRIPT), "exec", node, sys.executable, "-m", "slurm.launch", "--cpu", "--eval", "--",
             "sample", str(ckpt), "--out", str(out), "--num-samples", "2", "--batch-size", "1", "--chunk-size", "1",
             "--sampler", "ddim", "--steps", "2"],
            cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
    outputs = []
    for p in procs:
        try:
            outputs.append(p.communicate(timeout=180)[0].replace("\r", "\n"))
        finally:
            p.kill()
    assert [p.returncode for p in procs] == [0, 0], outputs
    samples = json.loads((out / "samples.json").read_text())
    assert samples["complete"] and samples["processes"] == 2 and len(samples["checksums"]) == 2
    assert "sampling [0]" in outputs[0] and "sampling [1]" in outputs[1]
    print(f"\nlaunchers on {NODES} met at ddpm-node1:31027; chunks {sorted(samples['checksums'])}, "
          f"processes {samples['processes']}")


def test_start_again_changes_nothing_and_stop_leaves_nothing(cluster):
    state = Path(cluster["SLURM_CONF"]).parent

    def pids():
        return {p.stem: p.read_text().strip() for p in (state / "run").glob("*.pid")}

    before = pids()
    assert len(before) == 4 + 2 * len(NODES)  # munged, mariadbd, slurmdbd, slurmctld; slurmd + holder per node
    assert cluster_cmd(2, "start").returncode == 0 and pids() == before
    assert cluster_cmd(2, "stop").returncode == 0
    assert not any(Path(f"/proc/{pid}").exists() for pid in before.values())
    assert not list((state / "run").glob("*.pid"))
    netns = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout
    links = subprocess.run(["ip", "-o", "link", "show"], capture_output=True, text=True).stdout
    assert "ddpm-" not in netns and "ddpm-" not in links, netns + links
    print(f"\nstart again: the same {len(before)} processes; stop: none left, no namespace, no link")
    if cluster["DDPM_TEST_CLUSTER_WAS_UP"] == "True":  # leave it as the fixture found it
        assert cluster_cmd(2, "start").returncode == 0
