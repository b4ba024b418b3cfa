"""Two gloo processes on the CPU compute what one process computes on the same global batch: every loss term,
every gradient, the teacher targets' centres."""

import os

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

from tests.helpers import flickering_load, make_prepared_emoji
from tests.train.test_pretrain import small_config
from vtp_fast import distributed as vdist
from vtp_fast.data.pairs import emoji_pairs
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.train.trainer import build_trainer, forward_backward, schedules

WORLD = 2
EXTRA = ("batch.size=8", "batch.ssl=4", "batch.rec=4")  # per rank: 4 pairs, 2 SSL samples, 2 reconstructions
STEP = 1


def run_once(t, batch, sched):
    """Terms, gradients and the loss centres the teacher's batch moved them to, after the step's
    forward/backward."""
    out = forward_backward(t, [batch], sched)
    grads = {}
    for name, p in t.student.named_parameters():
        g = p.grad
        grads[name] = (g.full_tensor() if hasattr(g, "full_tensor") else g).detach().clone()
    assert set(out.centers) == {"dino", "ibot"}
    return {k: v.clone() for k, v in out.terms.items()}, grads, {k: v.clone() for k, v in out.centers.items()}


def _worker(rank, root, out_dir, result_file, mode):
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(WORLD))
    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous", rank=rank, world_size=WORLD)
    torch.set_num_threads(1)
    try:
        _step_on_rank(rank, root, out_dir, result_file, mode)
    finally:  # after the step's objects are gone (shutdown collects their cycles while the interpreter lives)
        vdist.shutdown()


def _step_on_rank(rank, root, out_dir, result_file, mode):
    cfg = small_config(root, out_dir / "run", *EXTRA, f"run.distributed={mode}")
    torch.manual_seed(0)
    t = build_trainer(cfg, torch.device("cpu"))
    pairs = emoji_pairs(root, cfg.data.emoji.train_styles, t.model.config.text_context_length)
    data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=cfg.run.seed, rank=rank, world=WORLD)
    logs, grads, centers = run_once(t, data[STEP], schedules(cfg, STEP))
    logs = {k: v / WORLD for k, v in logs.items()}
    for v in logs.values():
        dist.all_reduce(v)  # the global value is the mean over ranks of the local values
    if rank == 0:
        torch.save({"logs": logs, "grads": grads, "centers": centers}, result_file)


@pytest.fixture(scope="module")
def root(tmp_path_factory):
    return make_prepared_emoji(tmp_path_factory.mktemp("emoji") / "prepared", size=32)


def single_process_reference(root, tmp_path):
    """The same global batch in one process: the batch layout (BatchShape.groups) gives it the ranks' SSL and
    reconstruction subsets with no reordering here."""
    cfg = small_config(root, tmp_path / "single", "batch.size=8", "batch.ssl=4", "batch.rec=4")
    torch.manual_seed(0)
    t = build_trainer(cfg, torch.device("cpu"))
    pairs = emoji_pairs(root, cfg.data.emoji.train_styles, t.model.config.text_context_length)
    assert t.shape.groups == 4 and t.student.parts.rec == 4
    return run_once(t, StepBatches(pairs, t.shape, cfg.ssl.views, seed=cfg.run.seed)[STEP], schedules(cfg, STEP))


@pytest.mark.parametrize("mode", ["ddp", "fsdp"])
def test_two_processes_equal_one_process_on_the_global_batch(root, tmp_path, mode):
    result = tmp_path / "rank0.pt"
    mp.start_processes(_worker, args=(root, tmp_path, result, mode), nprocs=WORLD, start_method="spawn")
    got = torch.load(result, weights_only=True)
    logs, grads, centers = single_process_reference(root, tmp_path)
    assert set(got["logs"]) == set(logs) >= {"clip", "dino", "ibot", "koleo", "rec_l1", "total"}
    for k in logs:  # fp32 sums in another order: rounding-level agreement
        torch.testing.assert_close(got["logs"][k], logs[k], rtol=1e-5, atol=1e-6, msg=lambda m, k=k: f"{k}: {m}")
    assert set(got["grads"]) == set(grads)
    for k in grads:  # sums over ranks vs over one batch reassociate fp32 adds: errors of ~1e-6 on O(1e-2) grads
        scale = grads[k].abs().max().item()
        torch.testing.assert_close(got["grads"][k], grads[k], rtol=1e-4, atol=1e-4 * scale + 1e-7,
                                   msg=lambda m, k=k: f"{k}: {m}")
    for k in centers:
        torch.testing.assert_close(got["centers"][k], centers[k], rtol=1e-5, atol=1e-7)


def test_torchrun_fsdp_run_checkpoints_and_resumes_exactly(root, tmp_path):
    """The whole job under torchrun with FSDP2: sharded state gathered into the published layout, and a resume
    from the gathered checkpoint continues the same loss trajectory. Beside a load that comes and goes, every rank
    exits cleanly (no abort from a process group left alive at exit) and says nothing but its output (no
    deprecation or FSDP warnings)."""
    import json
    import shutil
    import subprocess
    import sys

    from tests.train.test_pretrain import SMALL

    args = [*SMALL, f"data.emoji.root={root}", *EXTRA, "run.steps=4", "run.checkpoint_every=2",
            "run.keep_checkpoints=3", "run.distributed=fsdp"]
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
              "-m", "vtp_fast.cli", "pretrain"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    full = tmp_path / "full"
    with flickering_load():
        r = subprocess.run([*launch, *args, f"run.out_dir={full}"], capture_output=True, text=True, env=env,
                           timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr and "terminate called" not in r.stderr, r.stderr[-3000:]
    from vtp_fast import load_pretrained

    load_pretrained(full / "checkpoints" / "step_00000004" / "model")  # whole tensors, published layout
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000004")
    r = subprocess.run([*launch, *args, f"run.out_dir={part}", "--resume", "auto"], capture_output=True, text=True,
                       env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    rows = lambda d: [(x["step"], x["loss/total"]) for x in map(json.loads, (d / "metrics.jsonl").read_text()  # noqa: E731
                                                                 .splitlines()) if "loss/total" in x]
    assert rows(part) == rows(full) and len(rows(full)) == 4


def _sinkhorn_worker(rank, out_dir, logits, result_file):
    from vtp_fast.losses.dino import sinkhorn_knopp

    dist.init_process_group("gloo", init_method=f"file://{out_dir}/rendezvous-sk", rank=rank, world_size=WORLD)
    try:
        results = []
        for split in ((12, 12), (24, 0)):  # even, and every row on rank 0 (rank 1 has none, as iBOT may)
            mine = logits.split(split)[rank]
            q = sinkhorn_knopp(mine, 0.05)
            parts = [None] * WORLD
            dist.all_gather_object(parts, q)  # gloo's all_gather needs equal sizes
            results.append(torch.cat(parts))
        if rank == 0:
            torch.save(results, result_file)
    finally:
        dist.destroy_process_group()


def test_sinkhorn_over_two_processes_equals_one_process_at_overflowing_scale(tmp_path):
    from vtp_fast.losses.dino import sinkhorn_knopp

    logits = torch.randn(24, 40, generator=torch.Generator().manual_seed(3)) * 5  # exp(logit / 0.05) overflows fp32
    result = tmp_path / "sk.pt"
    mp.start_processes(_sinkhorn_worker, args=(tmp_path, logits, result), nprocs=WORLD, start_method="spawn")
    whole = sinkhorn_knopp(logits, 0.05)
    assert torch.isfinite(whole).all()
    for got in torch.load(result, weights_only=True):
        torch.testing.assert_close(got, whole, rtol=1e-5, atol=1e-7)


def test_two_nodes_on_one_machine_train_as_one_two_process_run(root, tmp_path):
    """Issue 13: two torchrun invocations, one process each, meeting at a c10d rendezvous on 127.0.0.1 (the
    multi-node launch, as scripts/slurm_pretrain.sbatch does it) train exactly as one 2-process torchrun."""
    import json
    import socket
    import subprocess
    import sys

    from tests.train.test_pretrain import SMALL

    args = [*SMALL, f"data.emoji.root={root}", *EXTRA, "run.steps=3", "run.checkpoint_every=3"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = [sys.executable, "-m", "torch.distributed.run"]
    job = ["-m", "vtp_fast.cli", "pretrain", *args]
    one = tmp_path / "one-node"
    r = subprocess.run([*run, "--standalone", "--nproc_per_node", "2", *job, f"run.out_dir={one}"],
                       capture_output=True, text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    with socket.socket() as s:  # a free port for the rendezvous
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    two = tmp_path / "two-nodes"
    nodes = [subprocess.Popen([*run, "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d",
                               "--rdzv-endpoint", f"127.0.0.1:{port}", "--rdzv-id", "two-nodes", *job,
                               f"run.out_dir={two}"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env=env) for _ in range(2)]
    outs = [n.communicate(timeout=600) for n in nodes]
    assert all(n.returncode == 0 for n in nodes), "\n".join(err[-2000:] for _, err in outs)
    losses = lambda d: [{k: v for k, v in x.items() if k.startswith("loss/")}  # noqa: E731
                        for x in map(json.loads, (d / "metrics.jsonl").read_text().splitlines()) if "loss/total" in x]
    assert len(losses(one)) == 3 and losses(two) == losses(one)


def _pretrain(root, world: int, out, *extra) -> None:
    """The CLI's pretraining of the 12-pair test config (4 steps, a checkpoint every 2) on `world` processes."""
    import subprocess
    import sys

    from tests.train.test_pretrain import SMALL

    args = [*SMALL, f"data.emoji.root={root}", "batch.size=12", "batch.ssl=6", "batch.rec=6", "run.steps=4",
            "run.checkpoint_every=2", "run.keep_checkpoints=3", "run.eval_every=100"]
    runner = ([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(world)]
              if world > 1 else [sys.executable])
    r = subprocess.run([*runner, "-m", "vtp_fast.cli", "pretrain", *args, f"run.out_dir={out}", *extra],
                       capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    assert "Warning" not in r.stderr, r.stderr[-3000:]  # DDP's and the collectives' deprecations fixed at the cause


def _resumes_match(root, tmp_path, full, resumes) -> None:
    """Each (world, extra) of `resumes` continues the 2-process run `full` from its step-2 checkpoint with its
    losses at steps 3 and 4 (to 1e-3: floats summed in another order)."""
    import json
    import shutil

    def losses(out) -> dict[int, float]:
        rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
        return {r["step"]: r["loss/total"] for r in rows if "loss/total" in r}

    for world, extra in resumes:
        part = tmp_path / f"resumed-on-{world}"
        shutil.copytree(full, part)
        shutil.rmtree(part / "checkpoints" / "step_00000004")
        _pretrain(root, world, part, *extra, "--resume", "auto")
        got, want = losses(part), losses(full)
        assert sorted(got) == [1, 2, 3, 4]
        for step in (3, 4):
            assert got[step] == pytest.approx(want[step], rel=1e-3), (world, step, got[step], want[step])


def test_a_run_resumed_on_another_world_size_continues_the_same_trajectory(root, tmp_path):
    """Issue 13, item 1: the global batch, its SSL and reconstruction subsets (BatchShape.groups) and every loss
    statistic do not depend on the number of ranks, so a 2-process run resumed on 1 or on 3 processes continues
    with the losses of the uninterrupted 2-process run (up to the order of float reductions)."""
    _pretrain(root, 2, tmp_path / "world2")
    _resumes_match(root, tmp_path, tmp_path / "world2", [(1, ()), (3, ())])


def test_sharded_checkpoints_reshard_onto_any_world_size_and_wrapper_and_export(root, tmp_path):
    """Issue 13, item 2: a 2-process FSDP2 run writes sharded checkpoints (DCP, every rank its shards, nothing
    gathered); resumed on 1 process and on 3 DDP processes it continues the uninterrupted run's losses, and
    `vtp-fast export` consolidates the shards into the published layout with the weights the run ended with."""
    import subprocess
    import sys

    from vtp_fast import load_pretrained

    sharded = "run.checkpoint_format=sharded"
    full = tmp_path / "fsdp2"
    _pretrain(root, 2, full, "run.distributed=fsdp", sharded)
    ckpt = full / "checkpoints" / "step_00000002"
    assert (ckpt / "state" / ".metadata").is_file() and not (ckpt / "model").exists()
    assert len(list((ckpt / "state").glob("*.distcp"))) == 2  # one file of shards per rank
    _resumes_match(root, tmp_path, full, [(1, (sharded,)), (3, (sharded, "run.distributed=ddp"))])
    r = subprocess.run([sys.executable, "-m", "vtp_fast.cli", "export", str(full), "--out", str(tmp_path / "pub")],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    exported = load_pretrained(tmp_path / "pub")
    final = load_pretrained(full / "checkpoint")  # the run's own export at its end (gathered whole)
    for k, v in final.state_dict().items():
        assert torch.equal(exported.state_dict()[k], v), k


@pytest.mark.parametrize("outcome", ["returns", "user error", "interrupted"])
def test_the_command_line_leaves_its_process_groups_on_every_exit_path(tmp_path, monkeypatch, outcome):
    """Issue 20, item 3: a process that exits with a live process group (the default one, or the background
    checkpoints' gloo group) can abort in its C++ threads after a finished run; the command line destroys every
    group whether the command returns, fails on the user's input or is interrupted (Ctrl-C, SIGTERM)."""
    from vtp_fast import cli
    from vtp_fast.cli import codec
    from vtp_fast.config import ConfigError

    ran = []

    def command(args):
        ran.append(True)
        dist.init_process_group("gloo", init_method=f"file://{tmp_path}/rendezvous", rank=0, world_size=1)
        dist.new_group(backend="gloo")  # as the background checkpoints make one
        assert vdist.is_distributed()
        if outcome == "user error":
            raise ConfigError("run.steps: bad")
        if outcome == "interrupted":
            raise KeyboardInterrupt
        return 0

    monkeypatch.setattr(codec, "cmd_info", command)
    try:
        assert cli.main(["info"]) == (0 if outcome == "returns" else 2)
        assert ran and not dist.is_initialized()
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
