"""Commands of tokenizer training: `pretrain`, `export` (a checkpoint to the published layout), `plan` (memory and
step time on N GPUs, before any runs) and `profile` (the step time per objective)."""

from __future__ import annotations

import argparse
from pathlib import Path

from vtp_fast.cli.common import POSITIVE, TOKENIZER, Commands, ints
from vtp_fast.config import InputError


def cmd_pretrain(args: argparse.Namespace) -> int:
    from vtp_fast.config import load_config
    from vtp_fast.downstream.generative_probe import generative_probe
    from vtp_fast.eval.evaluate import held_out_scores
    from vtp_fast.train.config import PretrainConfig
    from vtp_fast.train.pretrain import pretrain

    overrides = list(args.overrides)
    if args.resume:
        overrides.append(f"run.resume={args.resume}")
    if args.init:
        overrides.append(f"model.init={args.init}")
    pretrain(load_config(PretrainConfig, args.config, overrides), held_out_scores, generative_probe)
    return 0


def cmd_export(args: argparse.Namespace) -> int:
    from vtp_fast.train.checkpoint import export, export_source, step_of

    out = Path(args.out)
    if out.is_dir() and any(out.iterdir()) and not args.force:
        raise InputError(f"--out {out}: a folder that is not empty; --force replaces it")
    source = export_source(args.checkpoint)
    step = step_of(source)
    export(source, out)
    print(f"tokenizer of {source} ({'step unknown: not a step_N folder' if step is None else f'step {step}'}) -> "
          f"{out} (the published layout: load_pretrained reads it)")
    return 0


def cmd_plan(args: argparse.Namespace) -> int:
    from vtp_fast.config import ConfigError, load_config
    from vtp_fast.io import atomic_write_text
    from vtp_fast.measure import plan_dit, planner
    from vtp_fast.train.config import PretrainConfig

    given = {flag: (key, value) for flag, key, value in (
        ("--sample-steps", "steps", args.sample_steps), ("--solver", "solver", args.solver),
        ("--shift", "shift", args.shift), ("--cfg-scale", "cfg_scale", args.cfg_scale),
        ("--cfg-interval", "cfg_interval", args.cfg_interval and tuple(args.cfg_interval)),
        ("--tokenizer", "tokenizer", args.tokenizer)) if value is not None}
    sampling = dict(given.values())
    job = args.job or plan_dit.job_of(args.config, args.overrides)
    if args.samples and job != "dit":
        raise ConfigError("--samples: sampling is planned for a DiT config (configs/dit/, or --job dit)")
    if given and not args.samples:
        raise ConfigError(f"{', '.join(given)}: options of the sampling plan, which needs --samples")
    if job == "dit":
        cfg = plan_dit.load_dit_config(args.config, args.overrides)
        plan = plan_dit.plan_dit(cfg, args.gpus, args.gpu)
        text = plan_dit.report_dit(plan)
        if args.samples:
            text += "\n" + plan_dit.report_sampling(plan_dit.plan_sampling(cfg, args.samples, args.gpus, args.gpu,
                                                                           **sampling))
    else:
        plan = planner.plan(load_config(PretrainConfig, args.config, args.overrides), args.gpus, args.gpu)
        text = planner.report(plan)
    print(text)
    if args.out:
        atomic_write_text(Path(args.out), text)
    planner.check(plan)
    return 0


def cmd_profile(args: argparse.Namespace) -> int:
    from vtp_fast.config import load_config
    from vtp_fast.measure.profile import profile
    from vtp_fast.train.config import PretrainConfig

    profile(load_config(PretrainConfig, args.config, args.overrides), steps=args.steps, warmup=args.warmup,
            out=args.out, trace=args.trace)
    return 0


def _add_plan(sub: Commands) -> None:
    p = sub.add_parser("plan", help="per-GPU memory and step time of a pretraining or DiT config on N GPUs, before "
                                    "any GPU runs it; recommends DDP or FSDP2, activation checkpointing and "
                                    "micro-batch; for a DiT, with --samples, the time to draw them")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--job", choices=("tokenizer", "dit"), help="what the config trains (default: dit when it sets "
                                                               "a DiT key such as preset or latents)")
    p.add_argument("--gpus", type=POSITIVE, required=True, help="number of GPUs (all nodes)")
    p.add_argument("--gpu", default="h200", choices=("h200", "h100", "a100"), help="GPU kind (default: h200)")
    p.add_argument("--out", help="also write the report (markdown) to this file")
    p.add_argument("--samples", type=POSITIVE, help="DiT: also the time of vtp-fast sample drawing this many images")
    p.add_argument("--sample-steps", type=POSITIVE, help="with --samples: ODE solver steps (default 50)")
    p.add_argument("--solver", choices=("euler", "heun"), help="with --samples: ODE solver (default euler)")
    p.add_argument("--shift", type=float, help="with --samples: timestep shift (default 1)")
    p.add_argument("--cfg-scale", type=float, help="with --samples: classifier-free guidance scale (default 1: none)")
    p.add_argument("--cfg-interval", type=float, nargs=2, metavar=("T_LO", "T_HI"),
                   help="with --samples: guidance only for t in [T_LO, T_HI] (default 0 1)")
    p.add_argument("--tokenizer", help="with --samples: the decoder, a preset (vtp-l), checkpoint directory or "
                                       "VTP-*-f16d64 id (default: the latent set's, else vtp-l)")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. batch.size=4096")
    p.set_defaults(func=cmd_plan)


def add_commands(sub: Commands) -> None:
    p = sub.add_parser("pretrain", help="the main job: VTP pretraining (reconstruction + CLIP + DINO/iBOT)")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--resume", help="'auto' (newest checkpoint of run.out_dir) or a checkpoint directory")
    p.add_argument("--init", help=f"continue from a published tokenizer (adds heads and teacher): {TOKENIZER}")
    p.add_argument("overrides", nargs="*", help="dotted overrides, e.g. run.steps=200 objective.clip=0")
    p.set_defaults(func=cmd_pretrain)

    p = sub.add_parser("export", help="a training checkpoint (whole or sharded) -> the published layout")
    p.add_argument("checkpoint", help="a checkpoint directory (<run>/checkpoints/step_N), or a run directory (its "
                                      "newest checkpoint)")
    p.add_argument("--out", required=True, help="output directory (config.json + model.safetensors)")
    p.add_argument("--force", action="store_true", help="replace --out when it is a folder that is not empty (all "
                                                         "it holds is removed)")
    p.set_defaults(func=cmd_export)

    _add_plan(sub)

    p = sub.add_parser("profile", help="per-objective step-time profile of a pretraining config")
    p.add_argument("--config", action="append", default=[], help="YAML file(s) of differences, in order")
    p.add_argument("--steps", type=POSITIVE, default=10, help="timed steps (median reported)")
    p.add_argument("--warmup", type=ints(0), default=3, help="untimed steps first")
    p.add_argument("--out", help="output directory (default: <run.out_dir>/profile)")
    p.add_argument("--trace", action="store_true", help="also write a torch.profiler chrome trace")
    p.add_argument("overrides", nargs="*", help="dotted overrides")
    p.set_defaults(func=cmd_profile)
