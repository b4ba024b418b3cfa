"""`vtp-fast pretrain`: multi-objective VTP pretraining (reconstruction + CLIP + DINO/iBOT), the main job, and
stage 2 (the pixel decoder fine-tuned with a GAN loss).

Runs on one CPU or GPU, or under `torchrun` (DDP by default, FSDP2 as an option), through the loop every job
shares (vtp_fast.train.loop): atomic checkpoints and `run.resume=auto` that continues bit for bit, metrics to JSONL
and TensorBoard. At the end the run writes the tokenizer in the published layout, loss / zero-shot / PSNR curves
and a reconstruction grid.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch.utils.data import DataLoader

from vtp_fast import distributed as dist
from vtp_fast.config import ConfigError
from vtp_fast.data.batch import Batch
from vtp_fast.data.emoji import load_emoji
from vtp_fast.data.images import normalize_u8
from vtp_fast.data.labelled import probe_set
from vtp_fast.data.pairs import BadSampleCount
from vtp_fast.data.step_batches import StepBatches
from vtp_fast.models.pretrained import save_pretrained
from vtp_fast.models.vtp import VTP
from vtp_fast.plots import image_grid, plot_curves
from vtp_fast.train import loop
from vtp_fast.train.common import MetricsLog
from vtp_fast.train.config import PretrainConfig
from vtp_fast.train.flops import peak_tflops, step_flops
from vtp_fast.train.loop import Evaluation, Job, StepOutput, start_process
from vtp_fast.train.sources import describe_data, first_images, held_out_set, load_pairs, no_eval_note
from vtp_fast.train.trainer import build_trainer, schedules, train_step

# (tokenizer, held-out uint8 images, captions or None) -> the row to log: vtp_fast.eval.evaluate.held_out_scores
HeldOutEval = Callable[[VTP, torch.Tensor, list[str] | None], dict]
# (tokenizer, labelled images, work dir, dit_steps=, seed=) -> {"gen_probe_gfid", ...}: vtp_fast.downstream's
GenerativeProbe = Callable[..., dict]


class PretrainJob(Job[list[Batch]]):
    name = "pretrain"

    def __init__(self, cfg: PretrainConfig, held_out_eval: HeldOutEval | None = None,
                 generative_probe: GenerativeProbe | None = None):
        if cfg.run.generative_probe_every and generative_probe is None:
            raise ConfigError("run.generative_probe_every: the generative probe trains a DiT and scores it; run it "
                              "through `vtp-fast pretrain`, or pass vtp_fast.downstream.generative_probe")
        self.cfg, self.run = cfg, cfg.run
        self.held_out_eval, self.generative_probe = held_out_eval, generative_probe
        self.device, _, self.threads = start_process(cfg.run, cfg.data.num_workers, cfg.data.dali_threads)
        gpu = "decode on the GPU (data.decoder=dali or nvjpeg), " if self.device.type == "cuda" else ""
        self.data_hint = f"raise data.num_workers or data.dali_threads, {gpu}see vtp-fast bench data"
        self.t = build_trainer(cfg, self.device)
        self.checkpoint_model, self.samples_per_step = self.t.model, cfg.batch.size
        context = self.t.model.config.text_context_length
        with dist.main_first():  # rank 0 prepares the emoji set and its shards once
            self.pairs, self.root = load_pairs(cfg, context)
        self.eval_u8, self.eval_captions = held_out_set(cfg, self.root, context)
        self.bad_count = BadSampleCount()  # the distinct bad samples of the whole run

    def modules(self) -> dict[str, torch.nn.Module]:
        return self.t.modules()

    def optimizers(self) -> dict[str, torch.optim.Optimizer]:
        return self.t.optimizers()

    def state_dict(self) -> dict:
        self.bad_count.sync()
        return {"bad_samples": self.bad_count.state_dict()}

    def load_state_dict(self, state: dict) -> None:
        if "bad_samples" in state:
            self.bad_count.load_state_dict(state["bad_samples"])

    def metrics(self) -> dict:
        self.bad_count.sync()
        return self.bad_count.metrics()

    def begin(self, start: int, resumed_from: Path | None) -> dict:
        cfg, t, pairs = self.cfg, self.t, self.pairs
        data = StepBatches(pairs, t.shape, cfg.ssl.views, seed=cfg.run.seed, rank=dist.rank(),
                           world=dist.world_size(), steps=cfg.run.steps * cfg.batch.accumulation,
                           trim_text=t.causal_text, decoder=cfg.data.decoder, dali_threads=self.threads.dali_threads,
                           dali_device="gpu" if self.device.type == "cuda" else "cpu", sampling=cfg.data.sampling)
        on_gpu = data.decoder.on_gpu  # decodes in-process
        loader = DataLoader(data, batch_size=None, sampler=range(start * cfg.batch.accumulation, len(data)),
                            num_workers=0 if on_gpu else self.threads.loader_workers,
                            pin_memory=self.device.type == "cuda" and not on_gpu,  # GPU batches are on the device
                            generator=torch.Generator().manual_seed(cfg.run.seed))  # not from the global RNG
        self.batches = iter(loader)
        if peak_tflops(self.device):  # MFU in the logged rows (LPIPS not counted)
            self.flops_per_step = step_flops(cfg, t.model.config)
        if dist.rank() != 0:
            return {}
        self.probe_data = self._probe_images() if self.run.generative_probe_every else None
        n_params = sum(p.numel() for p in t.model.parameters())
        terms = ", ".join(f"{k}={w:g}" for k, w in t.objective.weights.items())
        decoder = "none" if pairs.in_memory else data.decoder.name
        print(f"vtp-fast pretrain: {cfg.model.preset} ({n_params / 1e6:.2f}M params) on {self.device} "
              f"x{dist.world_size()}; {pairs.describe()} ({describe_data(cfg)}; decoder {decoder}); batch "
              f"{cfg.batch.size} / ssl {cfg.batch.ssl} / rec {cfg.batch.rec}; objective {terms}; "
              f"{f'resuming at step {start} from {resumed_from}' if resumed_from else 'from scratch'}"
              f" -> {cfg.run.out_dir}")
        if self.eval_u8 is None:
            print(f"vtp-fast pretrain: {no_eval_note(cfg)}")
        return {f"skipped_{k}": v for k, v in pairs.skipped.items()} if any(pairs.skipped.values()) else {}

    def next_batch(self, step: int) -> list[Batch]:
        micro = [next(self.batches) for _ in range(self.cfg.batch.accumulation)]
        for b in micro:
            self.bad_count.update(b)
        return [b.to(self.device, non_blocking=True) for b in micro]

    def step(self, step: int, batch: list[Batch]) -> StepOutput:
        return train_step(self.t, batch, schedules(self.cfg, step))

    def evaluations(self) -> list[Evaluation]:
        evals = []
        if self.eval_u8 is not None and self.held_out_eval is not None:
            evals.append(Evaluation(self.run.eval_every, self._evaluate, at_start=True))
        if self.run.generative_probe_every:
            evals.append(Evaluation(self.run.generative_probe_every, self._probe, at_end=False))
        return evals

    def _evaluate(self, step: int) -> dict:
        model = self.t.plain_model()  # every rank: gathering FSDP shards is collective
        return self.held_out_eval(model, self.eval_u8, self.eval_captions) if model is not None else {}

    def _probe(self, step: int) -> dict:
        model = self.t.plain_model()
        if model is None:
            return {}
        return self.generative_probe(model, self.probe_data, Path(self.run.out_dir) / "gen_probe" / f"step_{step:08d}",
                                     dit_steps=self.run.probe_dit_steps, seed=self.run.seed)

    def _probe_images(self):
        """The generative probe's fixed images: the emoji training styles labelled by category, else the held-out
        (or first training) images unlabelled."""
        n = self.run.probe_images
        if self.root is not None:
            emoji = load_emoji(self.root, self.cfg.data.emoji.train_styles)
            pick = torch.randperm(len(emoji), generator=torch.Generator().manual_seed(1))
            return probe_set(emoji.images[pick], emoji.labels[pick], emoji.category_names, n)
        return probe_set(self.eval_u8 if self.eval_u8 is not None else first_images(self.pairs, n), None, None, n)

    def finish(self, log: MetricsLog | None) -> dict[str, Path]:
        model = self.t.plain_model()
        if model is None:
            return {}
        shown = self.eval_u8 if self.eval_u8 is not None else first_images(self.pairs, 12)
        return _finish(model, self.cfg, Path(self.run.out_dir), log, shown, self.device,
                       note=None if self.eval_u8 is not None else no_eval_note(self.cfg))


def pretrain(cfg: PretrainConfig, held_out_eval: HeldOutEval | None = None,
             generative_probe: GenerativeProbe | None = None) -> dict[str, Path]:
    """Pretrain (or resume) a tokenizer; the exported paths on the main rank ({} on the others). The evaluations
    come from the layers above (the CLI and the study pass them): held_out_eval, every run.eval_every steps on the
    held-out images (vtp_fast.eval.evaluate.held_out_scores; None: no held-out metrics), and generative_probe,
    needed when run.generative_probe_every > 0 (vtp_fast.downstream.generative_probe.generative_probe)."""
    return loop.run(PretrainJob(cfg, held_out_eval, generative_probe))


def _finish(model: VTP, cfg: PretrainConfig, out: Path, log: MetricsLog, shown_u8: torch.Tensor,
            device: torch.device, note: str | None = None) -> dict[str, Path]:
    """Export, plots and the summary. `shown_u8`: the images of the reconstruction grid (held-out ones, or training
    images when the run has no held-out set, which `note` then says)."""
    model.eval()
    shown = normalize_u8(shown_u8[:12]).to(device)
    with torch.no_grad():
        recon = model.denormalize(model.decode(model.encode(shown))).clamp(0, 1)
    loss_series = {k.removeprefix("loss/"): log.series(k) for k in sorted({k for r in log.read() for k in r})
                   if k.startswith("loss/")}
    paths = {
        "checkpoint": save_pretrained(model, out / "checkpoint"),
        "reconstructions": image_grid([model.denormalize(shown).clamp(0, 1), recon], out / "reconstructions.png"),
        "loss_curves": plot_curves(loss_series, out / "loss.png", title=f"pretrain {cfg.model.preset}: loss terms"),
        "metrics": log.path,
        "config": out / "config.yaml",
    }
    rows = [r for r in log.read() if "eval_psnr" in r]
    if rows:
        paths["psnr_curve"] = plot_curves({"held-out PSNR (dB)": log.series("eval_psnr")}, out / "psnr.png",
                                          title="held-out reconstruction PSNR", ylabel="dB", log_y=False)
    if log.series("zero_shot_top1")[0]:
        paths["zero_shot_curve"] = plot_curves(
            {"top-1": log.series("zero_shot_top1"), "top-5": log.series("zero_shot_top5"),
             "chance": log.series("zero_shot_chance")}, out / "zero_shot.png",
            title="zero-shot accuracy on the held-out style (emoji names)", ylabel="accuracy", log_y=False)
    if cfg.run.tensorboard and (out / "tb").exists():
        paths["tensorboard"] = out / "tb"
    if not rows:
        summary = note or "no held-out evaluation"
    else:
        summary = f"held-out PSNR {rows[0]['eval_psnr']:.2f} -> {rows[-1]['eval_psnr']:.2f} dB"
    if rows and "zero_shot_top1" in rows[-1]:
        summary += (f"; zero-shot top-1 {rows[0]['zero_shot_top1']:.3f} -> {rows[-1]['zero_shot_top1']:.3f} "
                    f"(chance {rows[-1]['zero_shot_chance']:.4f}), top-5 {rows[-1]['zero_shot_top5']:.3f}")
    print(summary)
    for name, path in paths.items():
        print(f"  {name:16s} {path}")
    return paths

