"""`vtp-fast plan`: whether a pretraining config fits on N GPUs of a kind, and how fast it will step, before any GPU
runs it; the recommended data-parallel wrapper, activation checkpointing and micro-batch.

Memory per GPU, for each option (DDP or FSDP2 x run.activation_checkpointing x micro-steps):
  parameters   the student (fp32 master weights) and the EMA teacher; FSDP2 keeps a 1/N shard of both and gathers
               two blocks at a time (the one running and the one prefetched) and the root's own parameters (patch
               and text embeddings, the DINO head: the parts outside the transformer blocks) in the compute dtype
  gradients    fp32, one per trainable parameter; DDP adds its bucket copy; FSDP2 keeps a 1/N shard and a block's
               whole gradient before its reduce-scatter
  optimizer    AdamW: two fp32 moments per trainable parameter (1/N under FSDP2)
  activations  the peak of the tensors alive during one micro-batch's forward and backward (gradients excluded),
               traced on the meta device at the per-rank micro-batch (the model and the batch are built there:
               nothing runs and host memory does not grow with either; a VTP-L step traces in seconds);
               bf16 runs are traced with autocast's casts emulated (matmul and attention inputs in bf16, norms,
               softmax and losses in fp32). The reference ops are traced: the fused kernels keep no (n, N) logits,
               so this errs high where they are used
  CLIP gather  (with CLIP) the global batch's image and text features gathered on every rank, and their gradients
Usable memory is USABLE of the GPU's (allocator fragmentation, the CUDA context, NCCL buffers). Checked against
real peaks at tiny shapes on the CPU in tests/measure/test_planner.py.

Step time: the traced FLOPs of the micro-steps (recomputation included) at STEP_EFFICIENCY of the GPU's measured
bf16 ceiling, against the collective traffic (DDP: all-reduce of the fp32 gradients; FSDP2: all-gather of the
parameters for the forward, again for the backward, and for the teacher, reduce-scatter of the gradients, per
micro-step) at the interconnect's bus bandwidth (NVLink within a node of 8, the network across nodes); the step
takes the longer of the two (communication overlapped with compute). A model, not a measurement: the efficiency and
bandwidths are stated assumptions until a GPU run measures them.

The DiT (configs/dit/: training and sampling) is planned by vtp_fast.measure.plan_dit with the same trace
(vtp_fast.measure.trace), memory parts, step model and table.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Callable
from dataclasses import dataclass

from vtp_fast.config import ConfigError, UserError
from vtp_fast.measure.perf_model import PEAK_FLOPS
from vtp_fast.measure.trace import MicroStep, trace_micro_step
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.flops import micro_config

GIB = 2**30
USABLE = 0.9
STEP_EFFICIENCY = 0.40  # of the measured matmul ceiling over a whole step: an assumption until a GPU run measures it
GPUS_PER_NODE = 8


@dataclass(frozen=True)
class GPU:
    name: str
    memory_gib: float
    peak_flops: float  # dense bf16 matmul, FLOP/s
    nvlink_busbw: float  # bytes/s, collectives within a node
    network_busbw: float  # bytes/s per GPU, collectives across nodes
    source: str


GPUS = {
    "h200": GPU("H200", 139.0, PEAK_FLOPS, 360e9, 45e9,
                "memory and matmul ceiling measured (GPU.md); bus bandwidths assumed: NVLink 4 at ~40% of 900 GB/s, "
                "one 400 Gb/s NIC per GPU at ~90%"),
    "h100": GPU("H100 80GB", 79.1, PEAK_FLOPS, 360e9, 45e9, "as the H200 (same SXM compute and NVLink), 80 GB"),
    "a100": GPU("A100 80GB", 79.1, 0.8 * 312e12, 180e9, 22e9,
                "80% of the 312 TFLOP/s specification; NVLink 3 and one 200 Gb/s NIC per GPU, assumed"),
}


@dataclass
class Option:
    strategy: str  # ddp | fsdp
    checkpointing: str  # none | selective | per_block
    accumulation: int
    micro: MicroStep
    memory: dict[str, float]  # GiB per GPU by part
    compute_s: float
    comm_s: float

    @property
    def total_gib(self) -> float:
        return sum(self.memory.values())

    @property
    def step_s(self) -> float:
        return max(self.compute_s, self.comm_s)


def compute_seconds(flops: float, gpu: GPU, gpus: int = 1) -> float:
    """The step model's time for `flops` spread over `gpus` GPUs: STEP_EFFICIENCY of the measured ceiling."""
    return flops / (gpus * gpu.peak_flops * STEP_EFFICIENCY)


def option(bf16: bool, gpu: GPU, gpus: int, strategy: str, checkpointing: str, accumulation: int,
           micro: MicroStep) -> Option:
    """Memory per GPU and step time of `micro` (one rank's micro-batch) under `strategy` at `accumulation`
    micro-steps; `bf16`: the run computes in bf16 (FSDP2 gathers bf16 parameters)."""
    m, n = micro, gpus
    compute = 2 if bf16 else 4  # bytes per parameter gathered by FSDP2
    if strategy == "fsdp":
        memory = {"parameters": (m.student_params + m.teacher_params) * 4 / n
                  + (2 * m.block_params + m.root_params) * compute,
                  "gradients": m.trainable_params * 4 / n + m.block_params * 4,
                  "optimizer": m.trainable_params * 8 / n}
    else:
        memory = {"parameters": (m.student_params + m.teacher_params) * 4,
                  "gradients": m.trainable_params * 4 * (2 if n > 1 else 1),
                  "optimizer": m.trainable_params * 8}
    memory["activations"] = m.activation_bytes
    if m.clip_width:
        memory["clip gather"] = 2 * 2 * 4 * m.clip_width * m.pairs * (n - 1) if n > 1 else 0
    busbw = gpu.nvlink_busbw if n <= GPUS_PER_NODE else gpu.network_busbw
    share = (n - 1) / n
    if strategy == "fsdp":
        gathered = 2 * m.student_params + (m.teacher_params if m.teacher_runs else 0)
        traffic = accumulation * share * (gathered * compute + m.trainable_params * 4)
    else:
        traffic = 2 * share * m.trainable_params * 4
    return Option(strategy, checkpointing, accumulation, micro, {k: v / GIB for k, v in memory.items()},
                  compute_s=compute_seconds(m.flops * accumulation, gpu), comm_s=traffic / busbw)


@dataclass
class Plan:
    cfg: object  # a PretrainConfig or a DiTTrainConfig (vtp_fast.measure.plan_dit)
    gpu: GPU
    gpus: int
    options: list[Option]
    name: str = ""  # the model, as the report names it
    unit: str = "pairs"  # what the batch counts
    runnable: tuple[str, ...] = ("ddp", "fsdp")  # the wrappers the job can run (the others are only modelled)

    @property
    def best(self) -> Option | None:
        """The fastest runnable option that fits; ties go to DDP, fewer micro-steps, less recomputation."""
        fit = [o for o in self.options if o.total_gib <= USABLE * self.gpu.memory_gib and o.strategy in self.runnable]
        order = {"none": 0, "selective": 1, "per_block": 2}
        return min(fit, key=lambda o: (round(o.step_s, 4), o.strategy != "ddp", o.accumulation,
                                       order[o.checkpointing]), default=None)


def to_stderr(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def plan(cfg: PretrainConfig, gpus: int, gpu: str = "h200", max_accumulation: int = 16,
         progress: Callable[[str], None] | None = to_stderr) -> Plan:
    """Every option up to the first micro-step count at which one fits without activation checkpointing (more
    micro-steps only add overhead), each micro-batch traced once per activation checkpointing mode; `progress` is
    told what is traced, as it starts (None: silent)."""
    g = gpu_kind(gpu, gpus)
    strategies = ("ddp", "fsdp") if gpus > 1 else ("ddp",)
    options: list[Option] = []
    start = time.perf_counter()

    def traced(accumulation: int, checkpointing: str) -> MicroStep:
        c = _with_checkpointing(micro_config(cfg, gpus, accumulation), checkpointing)
        if progress is not None:
            progress(f"plan: [{time.perf_counter() - start:5.1f} s] tracing {accumulation} micro-step(s) x "
                     f"{c.batch.size} pairs per GPU, activation checkpointing {checkpointing}, on the meta device")
        return trace_micro_step(c, gpu_bf16(cfg))

    accumulation, tried = 1, False
    while accumulation <= max_accumulation:
        try:
            micro_config(cfg, gpus, accumulation)
        except ConfigError:
            if not tried:
                raise
            break  # the batch does not split further
        tried = True
        for ac in ("none", "selective", "per_block"):
            micro = traced(accumulation, ac)
            options += [option(gpu_bf16(cfg), g, gpus, s, ac, accumulation, micro) for s in strategies]
        if any(o.total_gib <= USABLE * g.memory_gib and o.checkpointing == "none" and o.accumulation == accumulation
               for o in options):
            break
        accumulation *= 2
    if progress is not None:
        progress(f"plan: {len(options) // len(strategies)} micro-batches traced in {time.perf_counter() - start:.1f} s")
    return Plan(cfg, g, gpus, options, name=cfg.model.preset)


def gpu_kind(gpu: str, gpus: int) -> GPU:
    """The GPU named `gpu` (a key of GPUS); ConfigError for an unknown kind or a count below 1."""
    if gpu not in GPUS:
        raise ConfigError(f"--gpu {gpu}: known GPUs are {', '.join(GPUS)}")
    if gpus < 1:
        raise ConfigError(f"--gpus {gpus}: must be >= 1")
    return GPUS[gpu]


def gpu_bf16(cfg: PretrainConfig) -> bool:
    """Whether the run computes in bf16 on a GPU (run.precision auto means bf16 there)."""
    return cfg.run.precision in ("auto", "bf16")


def _with_checkpointing(cfg: PretrainConfig, mode: str) -> PretrainConfig:
    cfg.run.activation_checkpointing = mode
    return cfg


class DoesNotFit(UserError, RuntimeError):
    """No option fits in the GPU's memory."""


def report(p: Plan) -> str:
    """The options as a markdown table, the recommendation (or why nothing fits) and the assumptions."""
    c, usable = p.cfg, USABLE * p.gpu.memory_gib
    per_rank = c.batch.size // p.gpus
    head = (f"# plan: {c.model.preset} on {p.gpus} x {p.gpu.name}\n\nglobal batch {c.batch.size} pairs (SSL "
            f"{c.batch.ssl}, reconstruction {c.batch.rec}), {per_rank} per GPU, {c.data.image_size} px, "
            f"{c.ssl.prototypes} prototypes, precision {c.run.precision}; usable memory {usable:.0f} GiB of "
            f"{p.gpu.memory_gib:.0f}\n")
    rows, best = options_table(p, c.batch.size, "images/s"), p.best
    if best is not None:
        verdict = (recommendation(p, c.batch.size, "images/s") + f"\n  run.distributed={best.strategy} "
                   f"run.activation_checkpointing={best.checkpointing} batch.accumulation={best.accumulation}")
    else:
        verdict = "nothing fits: " + why_nothing_fits(p, usable)
    notes = (f"Modelled, not measured: activations traced on the meta device with the reference ops; step time at "
             f"{STEP_EFFICIENCY:.0%} of {p.gpu.peak_flops / 1e12:.0f} TFLOP/s; {p.gpu.source}."
             + (" LPIPS (VGG16) is not counted." if c.objective.perceptual > 0 else ""))
    return "\n".join([head, *rows, "", verdict, "", notes]) + "\n"


def _wrapper(o: Option) -> str:
    return o.strategy.upper().replace("FSDP", "FSDP2")


def options_table(p: Plan, batch: int, rate: str) -> list[str]:
    """The options of `p` as markdown table rows; `batch` samples per optimizer step, counted in `rate` per s."""
    usable, best = USABLE * p.gpu.memory_gib, p.best
    parts = list(p.options[0].memory)
    cols = ["wrapper", "act. checkpointing", f"micro-steps x {p.unit}", *parts, "total GiB", "fits", "step s", rate]
    rows = ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
    for o in p.options:
        mark = " **(recommended)**" if o is best else "" if o.strategy in p.runnable else " (not runnable)"
        rows.append("| " + " | ".join([
            _wrapper(o) + mark, o.checkpointing, f"{o.accumulation} x {o.micro.pairs}",
            *(f"{o.memory[k]:.1f}" for k in parts), f"{o.total_gib:.1f}",
            "yes" if o.total_gib <= usable else "no", f"{o.step_s:.2f}", f"{batch / o.step_s:,.0f}"]) + " |")
    return rows


def recommendation(p: Plan, batch: int, rate: str) -> str:
    """One line on the best option of `p` (which must exist)."""
    b = p.best
    return (f"recommended: {_wrapper(b)}, activation checkpointing {b.checkpointing}, {b.accumulation} micro-step(s) "
            f"of {b.micro.pairs} {p.unit} per GPU: {b.total_gib:.1f} GiB, about {b.step_s:.2f} s per step "
            f"({batch / b.step_s:,.0f} {rate}; compute {b.compute_s:.2f} s, communication {b.comm_s:.2f} s)")


def why_nothing_fits(p: Plan, usable: float) -> str:
    least = min((o for o in p.options if o.strategy in p.runnable), key=lambda o: o.total_gib)
    parts = ", ".join(f"{k} {v:.1f}" for k, v in least.memory.items())
    return (f"the smallest option ({least.strategy}, activation checkpointing {least.checkpointing}, "
            f"{least.accumulation} micro-step(s) of {least.micro.pairs} {p.unit}) needs {least.total_gib:.1f} GiB "
            f"({parts}) of {usable:.0f} usable; use more GPUs, a smaller batch or a smaller model")


def check(p: Plan) -> None:
    """Refuse a plan with no option that fits."""
    if p.best is None:
        raise DoesNotFit(f"{p.name} on {p.gpus} x {p.gpu.name}: " + why_nothing_fits(p, USABLE * p.gpu.memory_gib))
