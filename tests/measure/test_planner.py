"""Issue 13, item 5: activation checkpointing changes memory, not gradients; `vtp-fast plan`'s traced memory matches
real CPU steps at tiny shapes; the plan recommends what fits and refuses what cannot. Issue 20, item 1: the trace
allocates nothing of batch size on the host, and says what it traces. Issue 21, item 7: the same for the DiT's
training step, and the sampling model's FLOPs are the flop counter's over what `vtp-fast sample` runs."""

import dataclasses
import json
import os
import subprocess
import sys

import pytest
import torch
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.utils._pytree import tree_leaves

from vtp_fast import cli
from vtp_fast.compile import transform_blocks
from vtp_fast.config import ConfigError, load_config
from vtp_fast.data.pairs import synthetic_pairs
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.downstream.sample import SampleSpec
from vtp_fast.measure import plan_dit, planner, trace
from vtp_fast.models.dit import DiT
from vtp_fast.models.presets import vtp_config
from vtp_fast.models.vtp import VTP
from vtp_fast.ops.registry import building_for
from vtp_fast.train.config import DiTTrainConfig, PretrainConfig
from vtp_fast.train.dit import dit_loss, dit_model_config, generate
from vtp_fast.train.flops import _deterministic_masks, flops_of, meta_step
from vtp_fast.train.flow import time_grid
from vtp_fast.train.optim import make_adamw, param_groups
from vtp_fast.train.trainer import _build_trainer, forward_backward, schedules

TINY = ["objective.perceptual=0", "data.synthetic=true", "run.precision=fp32", "batch.size=32", "batch.ssl=8",
        "batch.rec=16"]


def tiny(*extra) -> PretrainConfig:
    return load_config(PretrainConfig, ["configs/tokenizer/tiny.yaml"], [*TINY, *extra])


def real_batch(cfg: PretrainConfig, t):
    """StepBatches' first batch of synthetic pairs for the trainer `t`, iBOT masks at their expected count (what the
    planner traces)."""
    pairs = synthetic_pairs(max(2 * cfg.batch.size, 8), cfg.data.image_size, t.model.config.text_context_length)
    batch = StepBatches(pairs, t.shape, cfg.ssl.views, seed=0, trim_text=False)[0]
    _deterministic_masks(batch, cfg.ssl.views)
    return batch


def real_step(cfg: PretrainConfig, autocast: bool = False):
    """One forward + backward of `cfg` on the CPU, on the batch the planner traces: (live-bytes peak, gradients)."""
    torch.manual_seed(0)
    with building_for("cpu"):
        t = _build_trainer(cfg, torch.device("cpu"), local=True)
    batch = real_batch(cfg, t)
    for p in t.student.parameters():
        if p.requires_grad:
            p.grad = torch.zeros_like(p)
    existing = [*trace.LiveBytes.state_of(t.student, t.teacher), *tree_leaves(vars(batch))]
    live = trace.LiveBytes([x for x in existing if isinstance(x, torch.Tensor)])
    with live, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        forward_backward(t, [batch], schedules(cfg, 0))
    return live.peak, {n: p.grad.clone() for n, p in t.student.named_parameters() if p.grad is not None}


def test_activation_checkpointing_keeps_the_gradients_and_saves_memory():
    peaks, grads = {}, {}
    for mode in ("none", "selective", "per_block"):
        peaks[mode], grads[mode] = real_step(tiny(f"run.activation_checkpointing={mode}"))
    for mode in ("selective", "per_block"):
        assert grads[mode].keys() == grads["none"].keys()
        for k, g in grads["none"].items():  # the recomputation replays the same fp32 ops
            torch.testing.assert_close(grads[mode][k], g, rtol=1e-6, atol=1e-7,
                                       msg=lambda m, k=k, mode=mode: f"{mode} {k}: {m}")
    assert peaks["per_block"] < 0.5 * peaks["none"] and peaks["per_block"] < peaks["selective"] < peaks["none"]


@pytest.mark.parametrize("mode", ["none", "selective", "per_block"])
def test_traced_activations_match_a_real_cpu_step(mode):
    """The meta-device trace against the same step run on the CPU: within 10% (the CPU's fused attention keeps
    less than the meta device's decomposed one)."""
    cfg = tiny(f"run.activation_checkpointing={mode}")
    traced = trace.trace_micro_step(cfg, bf16=False).activation_bytes
    real, _ = real_step(cfg)
    assert traced == pytest.approx(real, rel=0.10), (traced / 2**20, real / 2**20)


def test_emulated_autocast_matches_cpu_autocast():
    cfg = tiny()
    traced = trace.trace_micro_step(cfg, bf16=True).activation_bytes
    real, _ = real_step(cfg, autocast=True)
    assert traced == pytest.approx(real, rel=0.15), (traced / 2**20, real / 2**20)
    assert traced < 0.9 * trace.trace_micro_step(cfg, bf16=False).activation_bytes


_MEASURE = """
import json, sys, torch
from tests.measure.test_planner import tiny
from vtp_fast.data.pairs import synthetic_pairs
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.ops.registry import building_for
from vtp_fast.train.flops import _deterministic_masks, meta_step
from vtp_fast.train.trainer import _build_trainer, forward_backward, schedules
torch.set_num_threads(1)
cfg = tiny()
torch.manual_seed(0)
with building_for("cpu"):
    t = _build_trainer(cfg, torch.device("cpu"), local=True)
pairs = synthetic_pairs(2 * cfg.batch.size, cfg.data.image_size, t.model.config.text_context_length)
batch = StepBatches(pairs, t.shape, cfg.ssl.views, seed=0, trim_text=False)[0]
_deterministic_masks(batch, cfg.ssl.views)
def rss(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field)) * 1024
forward_backward(t, [batch], schedules(cfg, 0))  # warm-up: gradients and every lazy allocation exist
open("/proc/self/clear_refs", "w").write("5")  # reset the peak resident size (VmHWM)
base = rss("VmRSS:")
forward_backward(t, [batch], schedules(cfg, 0))
print(json.dumps({"peak": rss("VmHWM:") - base}))
"""


def test_traced_activations_match_the_resident_memory_of_a_real_step():
    """Independent of the tensor accounting: the rise of the process's peak resident memory over one step (glibc
    returns every large block at once with a fixed mmap threshold)."""
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"}
    r = subprocess.run([sys.executable, "-c", _MEASURE], capture_output=True, text=True, env=env, timeout=600,
                       cwd=os.getcwd())
    assert r.returncode == 0, r.stderr[-3000:]
    measured = json.loads(r.stdout.strip().splitlines()[-1])["peak"]
    traced = trace.trace_micro_step(tiny(), bf16=False).activation_bytes
    assert traced == pytest.approx(measured, rel=0.20), (traced / 2**20, measured / 2**20)


_TRACE_PEAK = """
import json, resource
from tests.measure.test_planner import tiny
from vtp_fast.measure import trace
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 - Linux: KiB
trace.trace_micro_step(tiny(), bf16=False)  # imports and every lazy allocation
before = peak()
trace.trace_micro_step(tiny("batch.size=8192", "batch.ssl=2048", "batch.rec=4096"), bf16=True)
print(json.dumps({"rise": peak() - before}))
"""


def test_trace_allocates_nothing_of_batch_size():
    """The plan's trace at 256 times the tiny batch raises the process's peak resident memory by less than 64 MiB:
    the batch and the model live on the meta device. Building real CPU images and views first (the old meta_step)
    raises it by over 1 GiB (8192 images of 3 x 64 x 64 float32 alone are 384 MiB)."""
    r = subprocess.run([sys.executable, "-c", _TRACE_PEAK], capture_output=True, text=True, timeout=600,
                       cwd=os.getcwd(), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rise = json.loads(r.stdout.strip().splitlines()[-1])["rise"]
    assert rise < 64 * 2**20, rise / 2**20


def test_meta_batch_is_the_batch_the_pipeline_builds():
    """Shapes, dtypes and layouts of the meta batch against StepBatches' batch of synthetic pairs."""
    cfg = tiny()
    t, meta = meta_step(cfg)
    real = real_batch(cfg, t)
    for f in dataclasses.fields(real):
        a, b = getattr(real, f.name), getattr(meta, f.name)
        assert b.device.type == "meta" and (a.shape, a.dtype, a.stride()) == (b.shape, b.dtype, b.stride()), f.name


def test_static_memory_is_the_real_tensors():
    """Parameters and AdamW state as planned for one GPU are the bytes of the real tensors after a step."""
    cfg = tiny()
    p = planner.plan(cfg, 1)
    o = next(o for o in p.options if o.checkpointing == "none")
    torch.manual_seed(0)
    with building_for("cpu"):
        t = _build_trainer(cfg, torch.device("cpu"), local=True)
    for q in t.student.parameters():
        q.grad = torch.zeros_like(q) if q.requires_grad else None
    t.optimizer.step()
    nbytes = lambda ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    state = [v for s in t.optimizer.state.values() for k, v in s.items() if k != "step"]
    params = [*t.student.parameters(), *t.teacher.parameters()]
    grads = [q.grad for q in t.student.parameters() if q.grad is not None]
    for part, tensors in (("optimizer", state), ("parameters", params), ("gradients", grads)):
        assert o.memory[part] * planner.GIB == pytest.approx(nbytes(tensors), rel=1e-12), part


def test_plan_recommends_what_fits_and_refuses_what_cannot(monkeypatch):
    cfg = tiny()
    lines = []
    p = planner.plan(cfg, 2, progress=lines.append)
    assert {o.strategy for o in p.options} == {"ddp", "fsdp"} and p.best is not None
    assert len(lines) == len(p.options) // 2 + 1, lines  # one line per traced micro-batch, then the total
    assert "tracing 1 micro-step(s) x 16 pairs per GPU, activation checkpointing none" in lines[0]
    assert "recommended:" in planner.report(p)
    small = planner.GPU("small", 0.05, 1e12, 1e9, 1e9, "a test GPU")  # 51 MiB: nothing fits
    monkeypatch.setitem(planner.GPUS, "small", small)
    p = planner.plan(cfg, 2, "small", max_accumulation=2)
    assert p.best is None and "nothing fits" in planner.report(p)
    with pytest.raises(planner.DoesNotFit, match="needs .* GiB .* of 0 usable"):
        planner.check(p)


def test_plan_command_prints_the_table(tmp_path):
    out = tmp_path / "plan.md"
    r = subprocess.run([sys.executable, "-m", "vtp_fast.cli", "plan", "--config", "configs/tokenizer/tiny.yaml",
                        "--gpus", "2", "--out", str(out), *TINY], capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "| DDP **(recommended)**" in r.stdout and out.read_text() in r.stdout + "\n"
    assert "plan: [  0.0 s] tracing 1 micro-step(s) x 16 pairs per GPU" in r.stderr, r.stderr


# ---------------------------------------------------------------------------------------------- the DiT (issue 21, 7)
DIT_CONFIG = "configs/dit/study_tiny.yaml"  # dit-tiny: 64 x 8 x 8 latents, 1000 classes without a latent set


def tiny_dit(*extra) -> DiTTrainConfig:
    return plan_dit.load_dit_config([DIT_CONFIG], ["batch=16", "run.precision=fp32", *extra])


def real_dit_step(cfg: DiTTrainConfig, checkpointing: str, autocast: bool = False) -> tuple[int, DiT]:
    """One forward + backward of DiTJob's loss on the CPU at cfg.batch: (live-bytes peak, the model)."""
    config = dit_model_config(cfg, None)
    torch.manual_seed(0)
    with building_for("cpu"):
        model = transform_blocks(DiT(config), checkpointing).train()
    for p in model.parameters():
        p.grad = torch.zeros_like(p)
    s = config.input_size
    x0, y = torch.randn(cfg.batch, config.in_channels, s, s), torch.randint(0, config.num_classes, (cfg.batch,))
    live = trace.LiveBytes([*trace.LiveBytes.state_of(model), x0, y])
    with live, torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        dit_loss(cfg, model, x0, y, torch.Generator().manual_seed(0))["total"].backward()
    return live.peak, model


@pytest.mark.parametrize("mode", plan_dit.MODES)
def test_dit_traced_activations_match_a_real_cpu_step(mode):
    cfg = tiny_dit()
    traced = plan_dit.trace_dit_step(cfg, dit_model_config(cfg, None), cfg.batch, mode, bf16=False)
    real, model = real_dit_step(cfg, mode)
    assert traced.activation_bytes == pytest.approx(real, rel=0.10), (traced.activation_bytes / 2**20, real / 2**20)
    assert traced.student_params == sum(p.numel() for p in model.parameters())
    assert not traced.teacher_runs and traced.teacher_params == traced.student_params  # the EMA: held, not run


def test_dit_emulated_autocast_matches_cpu_autocast():
    cfg = tiny_dit()
    traced = plan_dit.trace_dit_step(cfg, dit_model_config(cfg, None), cfg.batch, "none", bf16=True)
    real, _ = real_dit_step(cfg, "none", autocast=True)
    assert traced.activation_bytes == pytest.approx(real, rel=0.15), (traced.activation_bytes / 2**20, real / 2**20)


def test_dit_static_memory_is_the_real_tensors():
    """Parameters (the DiT and its EMA), gradients and AdamW state as planned for one GPU are the bytes of DiTJob's
    tensors after a step."""
    cfg = tiny_dit()
    o = next(o for o in plan_dit.plan_dit(cfg, 1, progress=None).options if o.checkpointing == "none")
    _, model = real_dit_step(cfg, "none")
    with building_for("cpu"):
        ema = DiT(dit_model_config(cfg, None))
    opt = make_adamw(param_groups({"dit": model}, cfg.optim.weight_decay), cfg.optim.lr, cfg.optim.betas)
    opt.step()
    nbytes = lambda ts: sum(x.numel() * x.element_size() for x in ts)  # noqa: E731
    state = [v for s in opt.state.values() for k, v in s.items() if k != "step"]
    for part, tensors in (("optimizer", state), ("parameters", [*model.parameters(), *ema.parameters()]),
                          ("gradients", [p.grad for p in model.parameters()])):
        assert o.memory[part] * planner.GIB == pytest.approx(nbytes(tensors), rel=1e-12), part
    assert "clip gather" not in o.memory


def test_dit_trace_allocates_nothing_of_batch_size():
    """Host memory does not grow with the batch: the DiT and its batch live on the meta device."""
    r = subprocess.run([sys.executable, "-c", _DIT_TRACE_PEAK], capture_output=True, text=True, timeout=600,
                       cwd=os.getcwd(), env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    rise = json.loads(r.stdout.strip().splitlines()[-1])["rise"]
    assert rise < 64 * 2**20, rise / 2**20


_DIT_TRACE_PEAK = """
import json, resource
from tests.measure.test_planner import tiny_dit
from vtp_fast.measure import plan_dit
from vtp_fast.train.dit import dit_model_config
peak = lambda: resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # noqa: E731 - Linux: KiB
cfg = tiny_dit()
plan_dit.trace_dit_step(cfg, dit_model_config(cfg, None), 16, "none", True)  # imports and every lazy allocation
before = peak()
plan_dit.trace_dit_step(cfg, dit_model_config(cfg, None), 16 * 256, "none", True)
print(json.dumps({"rise": peak() - before}))
"""


def test_sampling_flops_are_the_flop_counters_count_of_the_sampler():
    """The model's FLOPs per sample against torch.utils.flop_counter over what `vtp-fast sample` runs (generate:
    the Euler steps, CFG doubling the batch inside the interval only, the tokenizer's decode) at a batch of 3, and
    one DiT forward's count times the steps, the guided ones twice. Attention runs PyTorch's math backend here:
    the flop counter has no formula for the CPU's fused kernel (it counts its FLOPs as 0; the meta device, like a
    GPU's flash and memory-efficient kernels, is counted at the math backend's 4 b h n^2 d)."""
    cfg, steps, interval = tiny_dit(), 7, (0.25, 0.6)
    s = plan_dit.plan_sampling(cfg, 12, 1, steps=steps, shift=1.5, cfg_scale=2.0, cfg_interval=interval,
                               tokenizer="vtp-nano")
    assert s.calls == steps and 0 < s.guided < steps
    grid = time_grid(steps, 1.5, dtype=torch.float64).tolist()[:-1]  # the times of the model calls
    assert s.guided == sum(interval[0] <= t <= interval[1] for t in grid)
    torch.manual_seed(0)
    with building_for("cpu"):
        dit, vtp = DiT(s.model).eval(), VTP(vtp_config("vtp-nano")).eval()
    c, g, b = s.model.in_channels, s.model.input_size, 3
    meta = {"grid": [g, g], "channels": c, "mean": [0.0] * c, "std": [1.0] * c}
    with sdpa_kernel(SDPBackend.MATH):
        forward = flops_of(lambda: dit(torch.randn(b, c, g, g), torch.rand(b), torch.arange(b), drop_labels=False))
        run = flops_of(lambda: generate(dit, meta, vtp, torch.arange(b), steps=steps, shift=1.5, cfg_scale=2.0,
                                        cfg_interval=interval, batch=b))
        decode = flops_of(lambda: vtp.decode(torch.randn(b, c, g, g)))
    assert forward == b * s.forward_flops
    assert run == forward * (steps + s.guided) + decode == b * s.flops_per_sample
    without = plan_dit.plan_sampling(cfg, 12, 1, steps=steps, tokenizer="vtp-nano")
    assert without.guided == 0 and without.flops_per_sample == s.forward_flops * steps + s.decode_flops


def test_the_busiest_rank_is_the_samplers():
    """vtp-fast sample deals chunks round-robin (rank r takes chunks r, r + world, ...); the time is the busiest's."""
    assert plan_dit.SAMPLE_CHUNK == SampleSpec(n=1, classes=(0,)).chunk
    for n, world, chunk in ((50_000, 8, 1000), (10, 3, 4), (7, 8, 1000), (9000, 4, 1000)):
        spec = SampleSpec(n=n, classes=(0,), chunk=chunk)
        dealt = [sum(spec.span(k)[1] - spec.span(k)[0] for k in list(range(spec.chunks))[r::world])
                 for r in range(world)]
        assert plan_dit.busiest_rank(n, world, chunk) == max(dealt), (n, world, chunk)
    assert plan_dit.busiest_rank(50_000, 8, 1000) == 7000


def test_dit_plan_refuses_what_cannot_fit_and_never_recommends_fsdp(monkeypatch):
    cfg = tiny_dit()
    p = plan_dit.plan_dit(cfg, 2, progress=None)
    assert p.best is not None and p.best.strategy == "ddp"
    ddp = min(o.total_gib for o in p.options if o.strategy == "ddp")
    fsdp = min(o.total_gib for o in p.options if o.strategy == "fsdp")
    assert fsdp < ddp
    between = planner.GPU("between", (fsdp + ddp) / 2 / planner.USABLE, 1e12, 1e9, 1e9, "a test GPU")
    monkeypatch.setitem(planner.GPUS, "between", between)  # only FSDP2, which train-dit cannot run, fits
    p = plan_dit.plan_dit(cfg, 2, "between", progress=None)
    assert p.best is None and "nothing fits" in plan_dit.report_dit(p)
    assert any(o.strategy == "fsdp" and o.total_gib <= planner.USABLE * between.memory_gib for o in p.options)
    with pytest.raises(planner.DoesNotFit, match=r"dit-tiny on 2 x between: .* \(ddp, .*needs .* GiB"):
        planner.check(p)


def test_plan_command_prints_the_dit_and_sampling_tables(tmp_path):
    out = tmp_path / "plan.md"
    r = subprocess.run([sys.executable, "-m", "vtp_fast.cli", "plan", "--config", DIT_CONFIG, "--gpus", "2",
                        "--samples", "90", "--sample-steps", "10", "--cfg-scale", "1.5", "--cfg-interval", "0", "0.5",
                        "--tokenizer", "vtp-nano", "--out", str(out), "batch=16"],
                       capture_output=True, text=True, timeout=600)
    assert r.returncode == 0, r.stderr[-2000:]
    text = r.stdout
    assert "# plan: dit-tiny" in text and "| DDP **(recommended)** | none | 1 x 8 |" in text, text
    assert "| FSDP2 (not runnable) |" in text and "run.activation_checkpointing=none" in text
    assert "# sampling: dit-tiny on 2 x H200" in text and "5 of 10 model calls per sample guided" in text, text
    assert "decoded by vtp-nano (--tokenizer) to 128 x 128 images" in text
    assert "the busiest rank draws 90" in text and text.count("Modelled, not measured") == 2
    assert out.read_text() in text + "\n"
    assert "plan: [  0.0 s] tracing 8 latents per GPU, activation checkpointing none" in r.stderr, r.stderr


def test_plan_command_refuses_sampling_options_it_would_ignore(capsys):
    assert cli.main(["plan", "--config", DIT_CONFIG, "--gpus", "1", "--sample-steps", "10"]) != 0
    assert "--sample-steps: options of the sampling plan, which needs --samples" in capsys.readouterr().err
    assert cli.main(["plan", "--config", "configs/tokenizer/tiny.yaml", "--gpus", "1", "--samples", "10"]) != 0
    assert "--samples: sampling is planned for a DiT config" in capsys.readouterr().err
    assert plan_dit.job_of(["configs/dit/lightningdit_xl.yaml"]) == "dit"
    assert plan_dit.job_of(["configs/tokenizer/tiny.yaml"], ["batch.size=8"]) == "tokenizer"
    assert plan_dit.job_of([], ["preset=dit-b/1"]) == "dit"


def test_a_named_latent_set_gives_the_shape_classes_and_tokenizer(tmp_path):
    """The latent set the config names (its meta.json) decides the DiT's input and classes and, unless --tokenizer
    names one, the decoder (a published Hub id here)."""
    (tmp_path / "meta.json").write_text(json.dumps({"channels": 64, "grid": [4, 4], "class_names": list("abcdefghi"),
                                                    "tokenizer": "MiniMaxAI/VTP-Base-f16d64@main"}))
    cfg = tiny_dit(f"latents={tmp_path}")
    p = plan_dit.plan_dit(cfg, 1, progress=None)
    assert (p.model.input_size, p.model.num_classes) == (4, 9) and str(tmp_path) in plan_dit.report_dit(p)
    s = plan_dit.plan_sampling(cfg, 10, 1, tokenizer=None)
    assert s.tokenizer.startswith("MiniMaxAI/VTP-Base-f16d64@main (the latent set")
    assert s.decode_flops == plan_dit.decode_flops(vtp_config("vtp-b"), 4)
    assert plan_dit.plan_sampling(cfg, 10, 1, tokenizer="vtp-nano").tokenizer == "vtp-nano (--tokenizer)"
    with pytest.raises(ConfigError, match="--tokenizer nope: not a preset"):
        plan_dit.plan_sampling(cfg, 10, 1, tokenizer="nope")
