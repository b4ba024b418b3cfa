"""Pretraining: batches, views and masks, one step, non-finite steps, resume bit for bit (also after SIGKILL),
continuing from a published checkpoint."""

import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import time

import pytest
import torch

from tests.helpers import assert_batches_equal, flickering_load, make_prepared_emoji
from vtp_fast.config import ConfigError, load_config
from vtp_fast.data.batch import BatchShape
from vtp_fast.data.pairs import emoji_pairs
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.data.views import ViewConfig, block_mask
from vtp_fast.eval.evaluate import held_out_scores
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.loop import TrainingDiverged
from vtp_fast.train.pretrain import pretrain
from vtp_fast.train.trainer import build_trainer, schedules, train_step

SMALL = ["model.preset=vtp-nano", "data.image_size=32", "data.eval_images=24", "batch.size=8", "batch.ssl=4",
         "batch.rec=4", "ssl.views.global_size=32", "ssl.views.local_size=16", "ssl.views.local_crops=2",
         "ssl.prototypes=64", "ssl.hidden=32", "ssl.bottleneck=16", "objective.perceptual=0", "run.log_every=1",
         "run.eval_every=3", "run.tensorboard=false", "run.threads=1"]


@pytest.fixture(scope="module")
def emoji_root(tmp_path_factory):
    return make_prepared_emoji(tmp_path_factory.mktemp("emoji") / "prepared", size=32)


def small_config(root, out, *extra) -> PretrainConfig:
    return load_config(PretrainConfig, [], [*SMALL, f"data.emoji.root={root}", f"run.out_dir={out}", *extra])


def loss_rows(out):
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if "loss/total" in r]


def test_batches_are_deterministic_and_split_ranks(emoji_root):
    pairs = emoji_pairs(emoji_root, ("google", "twitter"), 16)
    shape = BatchShape(size=4, ssl=2, rec=2, patch=16)
    views = ViewConfig(global_size=32, local_size=16, local_crops=2)
    single = StepBatches(pairs, BatchShape(size=8, ssl=2, rec=2, patch=16), views, seed=3)
    ranks = [StepBatches(pairs, shape, views, seed=3, rank=r, world=2) for r in range(2)]
    for step in range(6):
        ids = [rb.positions(step)[0] for rb in ranks]
        assert torch.equal(torch.cat(ids), single.positions(step)[0]), "ranks slice the global batch"
    assert_batches_equal(ranks[0][1], ranks[0][1])
    # every sample exactly once per epoch (24 pairs, 8 per global step)
    seen = torch.cat([single.positions(s)[0] for s in range(3)])
    assert sorted(seen.tolist()) == list(range(24))
    batch = ranks[1][0]
    assert batch.images.shape == (4, 3, 32, 32) and batch.tokens.shape == (4, 16)
    assert batch.global_crops.shape == (4, 3, 32, 32) and batch.local_crops.shape == (4, 3, 16, 16)
    assert batch.masks.shape == (4, 4) and batch.mask_index.numel() == batch.masks.sum()


def test_views_do_not_depend_on_the_batch_a_sample_lands_in(emoji_root):
    """Per-sample seeding: a sample's crops are the same whether it is on rank 0 or in a one-process batch."""
    pairs = emoji_pairs(emoji_root, ("google",), 16)
    views = ViewConfig(global_size=32, local_size=16, local_crops=1)
    single = StepBatches(pairs, BatchShape(size=4, ssl=4, rec=1, patch=16), views, seed=1)
    rank1 = StepBatches(pairs, BatchShape(size=2, ssl=2, rec=1, patch=16), views, seed=1, rank=1, world=2)
    full, half = single[0], rank1[0]
    assert torch.equal(full.ids[2:], half.ids)
    # view 0 of samples 2, 3 in the single batch == view 0 of rank 1's samples 0, 1
    assert torch.equal(full.global_crops[2:4], half.global_crops[0:2])
    assert torch.equal(full.masks[6:8], half.masks[2:4])


@pytest.mark.parametrize("count", [1, 3, 8, 16])
def test_block_mask_has_exactly_the_requested_tokens(count):
    g = torch.Generator().manual_seed(count)
    m = block_mask(4, 4, count, g)
    assert m.shape == (4, 4) and int(m.sum()) == count


def test_mask_ratio_and_probability(emoji_root):
    pairs = emoji_pairs(emoji_root, ("google", "twitter", "fluent", "openmoji"), 16)
    views = ViewConfig(global_size=64, local_size=16, local_crops=0, mask_ratio=(0.25, 0.5), mask_probability=0.5)
    data = StepBatches(pairs, BatchShape(size=48, ssl=48, rec=1, patch=16), views, seed=0)
    masks = torch.cat([data[s].masks for s in range(4)])  # 384 global crops of 16 tokens
    masked = masks.any(1)
    assert 0.4 < masked.float().mean().item() < 0.6
    ratios = masks[masked].float().mean(1)
    assert ratios.min() >= 0.25 - 1 / 16 and ratios.max() <= 0.5 + 1 / 32


def test_schedules_endpoints():
    cfg = load_config(PretrainConfig, [], ["run.steps=101", "optim.warmup_steps=10", "optim.weight_decay=0.04",
                                           "optim.weight_decay_end=0.2", "ssl.teacher_temp_warmup_steps=20"])
    first, last = schedules(cfg, 0), schedules(cfg, 100)
    assert first.momentum == pytest.approx(0.992) and last.momentum == pytest.approx(1.0)
    assert first.weight_decay == pytest.approx(0.04) and last.weight_decay == pytest.approx(0.2)
    assert first.teacher_temp == pytest.approx(0.04) and schedules(cfg, 20).teacher_temp == pytest.approx(0.07)
    assert first.lr == pytest.approx(1e-4) and last.lr == pytest.approx(1e-5)
    assert list(last.scalars()) == ["lr", "weight_decay", "momentum", "teacher_temp"]  # logged: all but the step


def test_bad_batch_config_names_the_key():
    with pytest.raises(ConfigError, match="batch.ssl: 80 must be between 0 and batch.size=64"):
        load_config(PretrainConfig, [], ["batch.ssl=80"])
    with pytest.raises(ConfigError, match="objective.rec"):
        load_config(PretrainConfig, [], ["objective.rec=-1"])
    with pytest.raises(ConfigError, match="batch.size: 10 is not divisible"):
        load_config(PretrainConfig, [], ["batch.size=10", "batch.accumulation=4", "batch.ssl=4", "batch.rec=4"]
                    ).batch.per_rank(1, 16)
    with pytest.raises(ConfigError, match="run.compile_scope=whole: not with run.distributed=fsdp"):
        load_config(PretrainConfig, [], ["run.compile=true", "run.compile_scope=whole", "run.distributed=fsdp"])
    with pytest.raises(ConfigError, match="run.compile_scope"):
        load_config(PretrainConfig, [], ["run.compile_scope=step"])


def _trainer(root, tmp_path, *extra):
    cfg = small_config(root, tmp_path / "run", *extra)
    torch.manual_seed(0)
    t = build_trainer(cfg, torch.device("cpu"))
    pairs = emoji_pairs(root, cfg.data.emoji.train_styles, t.model.config.text_context_length)
    data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=0)
    return t, cfg, data


def test_one_step_trains_every_part_and_moves_the_teacher_by_ema(emoji_root, tmp_path):
    t, cfg, data = _trainer(emoji_root, tmp_path)
    with torch.no_grad():
        t.model.logit_scale.fill_(math.log(100) + 0.5)  # above open_clip's cap: clamped after the step
    before = {k: v.clone() for k, v in t.student.state_dict().items()}
    teacher_before = [p.clone() for p in t.teacher.parameters()]
    assert {k.split(".")[0] for k in t.teacher.state_dict()} == {"trunk", "head"}  # the loss centres are the student's
    sched = schedules(cfg, 5)
    centers = {n: getattr(t.student, n).center.clone() for n in ("dino_loss", "ibot_loss")}
    out = train_step(t, [data[0]], sched)
    assert out.finite and set(out.terms) == {"clip", "rec_l1", "dino", "ibot", "koleo", "total"}
    assert set(out.aux) == {"grad_norm"} and set(out.scalars) == {"lr", "weight_decay", "momentum", "teacher_temp"}
    assert all(not torch.equal(getattr(t.student, n).center, c) for n, c in centers.items())  # applied: taken
    changed = {k.split(".")[1] for k, v in t.student.state_dict().items()
               if v.is_floating_point() and not torch.equal(v, before[k])}
    assert {"trunk", "pixel_decoder", "text_transformer", "visual_proj"} <= changed  # model.<part>
    assert "head.mlp.0.weight" in {k for k, v in t.student.state_dict().items() if not torch.equal(v, before[k])}
    assert t.model.logit_scale.item() == pytest.approx(math.log(100))
    m = sched.momentum
    mine, theirs = t.teacher.pairs(t.student)
    for new, old, s in zip(mine, teacher_before, theirs, strict=True):
        torch.testing.assert_close(new, m * old + (1 - m) * s.detach())


def test_non_finite_step_changes_nothing_and_the_run_stops(emoji_root, tmp_path, monkeypatch):
    t, cfg, data = _trainer(emoji_root, tmp_path)
    before = {k: v.clone() for k, v in t.student.state_dict().items()}
    teacher_before = {k: v.clone() for k, v in t.teacher.state_dict().items()}
    original = type(t.student).forward

    def poisoned(self, batch, targets=None):
        terms, recon = original(self, batch, targets)
        terms["ibot"] = terms["ibot"] * float("nan")
        return terms, recon

    monkeypatch.setattr(type(t.student), "forward", poisoned)
    out = train_step(t, [data[0]], schedules(cfg, 0))
    assert not out.finite and out.bad_terms == ["ibot", "total"]
    for k, v in t.student.state_dict().items():
        assert torch.equal(v, before[k]), f"{k} changed on a skipped step"
    for k, v in t.teacher.state_dict().items():
        assert torch.equal(v, teacher_before[k]), k
    assert all(p.grad is None for p in t.student.parameters())

    out = tmp_path / "diverge"
    with pytest.raises(TrainingDiverged, match="3 consecutive steps with non-finite losses \\(ibot, total\\)"):
        pretrain(small_config(emoji_root, out, "run.steps=10", "run.max_bad_steps=3"), held_out_scores)
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if r.get("skipped")] == [1, 2, 3]


def saved_rng(run, step):
    return torch.load(run / "checkpoints" / f"step_{step:08d}" / "train_state.pt", weights_only=True)["rng"]


def test_resume_continues_bit_for_bit_down_to_the_saved_rng_state(emoji_root, tmp_path):
    full = tmp_path / "full"
    pretrain(small_config(emoji_root, full, "run.steps=6", "run.checkpoint_every=3", "run.keep_checkpoints=5"),
             held_out_scores)
    part = tmp_path / "part"
    shutil.copytree(full, part)
    shutil.rmtree(part / "checkpoints" / "step_00000006")
    pretrain(small_config(emoji_root, part, "run.steps=6", "run.checkpoint_every=3", "run.resume=auto"),
             held_out_scores)
    a, b = loss_rows(full), loss_rows(part)
    assert [r["step"] for r in b] == [1, 2, 3, 4, 5, 6]
    for ra, rb in zip(a, b, strict=True):
        assert {k: v for k, v in ra.items() if k.startswith("loss/")} == \
               {k: v for k, v in rb.items() if k.startswith("loss/")}, ra["step"]
    # the complete RNG state saved by the resumed run is the uninterrupted run's (nothing drew after the restore)
    a, b = saved_rng(full, 6), saved_rng(part, 6)
    assert set(a) == set(b) >= {"torch_cpu", "python", "numpy"}
    assert torch.equal(a["torch_cpu"], b["torch_cpu"])
    assert a["python"] == b["python"]
    assert all(torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y
               for x, y in zip(a["numpy"].values(), b["numpy"].values(), strict=True))


@pytest.mark.parametrize("fmt", [(), ("run.checkpoint_format=sharded",),
                                 ("run.checkpoint_format=sharded", "run.async_checkpoint=true")],
                         ids=["full", "sharded", "sharded-async"])
def test_sigkill_at_random_moments_under_a_changing_load_then_resume_matches(emoji_root, tmp_path, fmt):
    """A run killed with SIGKILL twice at random moments (after its first checkpoint exists: while it writes the next
    steps or the next checkpoint) and resumed produces the uninterrupted run's loss trajectory exactly, in either
    checkpoint format, also when checkpoints are written in the background, with the thread budget choosing torch's
    threads and a load coming and going on the cores (a thread count that followed the load changed the last bits)."""
    args = [*SMALL, f"data.emoji.root={emoji_root}", "run.steps=8", "run.checkpoint_every=2", "run.keep_checkpoints=3",
            "run.threads=0", *fmt]
    cmd = [sys.executable, "-m", "vtp_fast.cli", "pretrain"]
    ref, out = tmp_path / "ref", tmp_path / "killed"
    rng = random.Random(hash(fmt) % 1000)
    with flickering_load(seed=len(fmt)):
        subprocess.run([*cmd, *args, f"run.out_dir={ref}"], check=True, capture_output=True, timeout=600)
        for kill in range(2):
            proc = subprocess.Popen([*cmd, *args, f"run.out_dir={out}", "--resume", "auto"],
                                    stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            first = out / "checkpoints" / f"step_{2 * (kill + 1):08d}"
            deadline = time.time() + 300
            while not first.exists() and time.time() < deadline and proc.poll() is None:
                time.sleep(0.05)
            time.sleep(rng.uniform(0.0, 1.0))
            os.kill(proc.pid, signal.SIGKILL)
            proc.wait()
            assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed"
        r = subprocess.run([*cmd, *args, f"run.out_dir={out}", "--resume", "auto"], capture_output=True, text=True,
                           timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "resuming at step" in r.stdout
    strip = lambda rows: [{k: v for k, v in x.items() if k.startswith("loss/") or k in ("step", "grad_norm")}  # noqa: E731
                          for x in rows]
    assert strip(loss_rows(out)) == strip(loss_rows(ref))
    assert not list((out / "checkpoints").glob(".step_*")), "interrupted temp dirs are swept"


def test_init_from_a_published_checkpoint(emoji_root, tmp_path):
    from vtp_fast import VTP, load_pretrained, save_pretrained, vtp_config

    torch.manual_seed(1)
    published = save_pretrained(VTP(vtp_config("vtp-nano", image_size=32)), tmp_path / "published")
    cfg = small_config(emoji_root, tmp_path / "run", f"model.init={published}")
    t = build_trainer(cfg, torch.device("cpu"))
    ref = load_pretrained(published)
    for k, v in ref.state_dict().items():
        assert torch.equal(t.model.state_dict()[k], v), k
    assert t.teacher is not None and t.student.head is not None
    for (k, v), (k2, v2) in zip(t.teacher.trunk.state_dict().items(), ref.trunk.state_dict().items(), strict=True):
        assert k == k2 and torch.equal(v, v2), "the teacher starts as the published trunk"


def test_gradient_accumulation_equals_the_whole_batch(emoji_root, tmp_path):
    """Reconstruction only (a mean over images): two micro-batches accumulate the whole batch's gradient."""
    from vtp_fast.train.trainer import forward_backward

    rec_only = ["objective.clip=0", "objective.ssl=0", "batch.ssl=0", "batch.rec=8"]
    grads = {}
    for accumulation in (1, 2):
        cfg = small_config(emoji_root, tmp_path / f"acc{accumulation}", *rec_only, f"batch.accumulation={accumulation}")
        torch.manual_seed(0)
        t = build_trainer(cfg, torch.device("cpu"))
        pairs = emoji_pairs(emoji_root, cfg.data.emoji.train_styles, 16)
        data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=0)
        micro = [data[i] for i in range(accumulation)]  # optimizer step 0 = micro-steps 0..accumulation-1
        forward_backward(t, micro, schedules(cfg, 0))
        grads[accumulation] = {k: p.grad.clone() for k, p in t.student.named_parameters() if p.grad is not None}
    assert set(grads[1]) == set(grads[2]) and grads[1]
    for k in grads[1]:
        torch.testing.assert_close(grads[2][k], grads[1][k], rtol=1e-4, atol=1e-7)


def test_corrupt_images_from_preparation_are_counted(tmp_path):
    root = make_prepared_emoji(tmp_path / "prep", size=32)
    manifest = json.loads((root / "manifest.json").read_text())
    manifest["styles"] = {"google": {"corrupt": 2}, "twitter": {"corrupt": 1}}
    (root / "manifest.json").write_text(json.dumps(manifest))
    assert emoji_pairs(root, ("google", "twitter"), 16).skipped == {"empty_caption": 0, "corrupt_image": 3}


def test_metrics_log_resume_keeps_rows_up_to_the_checkpoint_and_skips_a_torn_line(tmp_path):
    from vtp_fast.train.common import MetricsLog

    path = tmp_path / "metrics.jsonl"
    log = MetricsLog(path)
    for step in (10, 20, 30):
        log.write(step=step, loss=1.0 / step)
    with open(path, "a") as f:
        f.write('{"step": 40, "lo')  # killed mid-write
    assert [r["step"] for r in MetricsLog(path, resume_at=20).read()] == [10, 20]  # 30 is redone after resume
    assert MetricsLog(path).read() == []  # a fresh run starts a fresh log


def test_checkpointer_sweeps_what_interrupted_saves_and_replaces_left(tmp_path):
    from vtp_fast.train.checkpoint import Checkpointer

    ckpt = Checkpointer(tmp_path, keep=2)
    left = [tmp_path / ".step_00000010.tmp-123", tmp_path / ".step_00000010.old-456"]
    for d in [*left, tmp_path / "step_00000005"]:
        d.mkdir()
    ckpt.sweep()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step_00000005"]


@pytest.mark.parametrize("source", ["synthetic", "own_shards"])
def test_without_held_out_images_nothing_is_measured_on_noise(source, emoji_root, tmp_path, capsys):
    from vtp_fast.train.sources import emoji_shards

    if source == "synthetic":
        extra = ["data.synthetic=true"]
    else:  # one's own shards (here: the emoji training styles written as shards) and no data.eval_shards
        extra = [f"data.shards={emoji_shards(emoji_root, ('google', 'twitter', 'fluent'))}", "data.num_workers=0"]
    out = tmp_path / "run"
    paths = pretrain(small_config(emoji_root, out, "run.steps=2", "run.eval_every=1", *extra), held_out_scores)
    text = capsys.readouterr().out
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert not [r for r in rows if "eval_psnr" in r or "zero_shot_top1" in r]  # no metric without real held-out
    assert "no held-out PSNR" in text and "held-out PSNR " not in text.replace("no held-out PSNR", "")
    assert "psnr_curve" not in paths and not (out / "psnr.png").exists()
    assert (out / "reconstructions.png").exists() and [r["step"] for r in loss_rows(out)] == [1, 2]


def test_export_turns_either_checkpoint_format_into_the_published_layout(emoji_root, tmp_path):
    from vtp_fast import load_pretrained
    from vtp_fast.models.pretrained import CheckpointError
    from vtp_fast.train.checkpoint import export

    for fmt in ("full", "sharded"):
        out = tmp_path / fmt
        pretrain(small_config(emoji_root, out, "run.steps=2", "run.checkpoint_every=2",
                              f"run.checkpoint_format={fmt}"))
        want = load_pretrained(out / "checkpoint").state_dict()  # the run's own export at its end
        for source in (out, out / "checkpoints" / "step_00000002"):  # a run directory: its newest checkpoint
            got = load_pretrained(export(source, tmp_path / "exported" / fmt)).state_dict()
            assert got.keys() == want.keys() and all(torch.equal(got[k], want[k]) for k in want)
    with pytest.raises(CheckpointError, match="not a checkpoint directory"):
        export(tmp_path / "missing", tmp_path / "x")
    # a sharded checkpoint refuses a run without its modules (here: no SSL head, teacher or centres)
    with pytest.raises(CheckpointError, match="holds modules this run does not have"):
        pretrain(small_config(emoji_root, tmp_path / "sharded", "run.steps=4", "run.resume=auto",
                              "objective.dino=0", "objective.ibot=0", "objective.koleo=0"))


def test_resampled_sampling_trains_and_resumes_exactly(emoji_root, tmp_path):
    """data.sampling=resampled (no epochs; groups drawn with replacement) keeps exact resume: its batches are a
    function of (seed, step) alone."""
    extra = ("run.steps=4", "run.checkpoint_every=2", "data.sampling=resampled", "run.eval_every=100")
    straight, split = tmp_path / "straight", tmp_path / "split"
    pretrain(small_config(emoji_root, straight, *extra))
    pretrain(small_config(emoji_root, split, *extra, "run.stop_at=2"))
    pretrain(small_config(emoji_root, split, *extra, "run.resume=auto"))
    strip = lambda rows: [{k: v for k, v in x.items() if k.startswith("loss/") or k == "step"} for x in rows]  # noqa: E731
    assert [r["step"] for r in loss_rows(split)] == [1, 2, 3, 4]
    assert strip(loss_rows(split)) == strip(loss_rows(straight))
    epochs = tmp_path / "epochs"  # the option reaches the batches: the epoch-shuffled run sees other samples
    pretrain(small_config(emoji_root, epochs, "run.steps=4", "run.stop_at=1", "run.eval_every=100"))
    assert loss_rows(epochs)[0]["loss/total"] != loss_rows(straight)[0]["loss/total"]


def test_the_data_wait_advice_fits_the_machine(emoji_root, tmp_path):
    """On a machine without a GPU, a data-bound run is not told to decode on one."""
    from vtp_fast.train.pretrain import PretrainJob

    hint = PretrainJob(small_config(emoji_root, tmp_path / "run")).data_hint
    assert "data.num_workers" in hint and "GPU" not in hint


def test_whole_forward_compiled_trains_as_eager_does(emoji_root, tmp_path):
    """run.compile_scope=whole: the student (heads and losses in its graph) and the teacher each one compiled graph;
    two steps, whose iBOT mask counts differ (a recompile with dynamic shapes), give the eager run's terms and
    weights up to compiled kernels' reordered sums."""
    runs = [_trainer(emoji_root, tmp_path / mode, *extra) for mode, extra in
            (("eager", ()), ("whole", ("run.compile=true", "run.compile_scope=whole", "optim.fused=true")))]
    (eager, cfg, data), (whole, _, _) = runs
    eager.optimizer = torch.optim.AdamW(eager.optimizer.param_groups, fused=True)  # the same update rule
    assert whole.student._compiled_call_impl is not None and whole.teacher._compiled_call_impl is not None
    assert not any(b._compiled_call_impl for b in whole.model.transformer_blocks())  # not also per block
    first = data[0]
    batches = [first, next(b for b in map(data.__getitem__, range(1, 20))
                           if b.mask_index.shape != first.mask_index.shape)]
    for i, batch in enumerate(batches):
        outs = [train_step(t, [batch], schedules(cfg, i)) for t in (eager, whole)]
        for k, v in outs[0].terms.items():
            torch.testing.assert_close(outs[1].terms[k], v, rtol=1e-4, atol=1e-5)
    # AdamW moves each weight by about the learning rate whatever its gradient's size: a gradient near zero whose
    # last bits differ can move it the other way
    atol = 2 * sum(schedules(cfg, i).lr for i in range(len(batches)))
    for (k, a), b in zip(eager.student.state_dict().items(), whole.student.state_dict().values(), strict=True):
        torch.testing.assert_close(b, a, rtol=0, atol=atol, msg=k)
