"""The paper's scaling study: tokenizers pretrained with each objective mix at several compute budgets, judged by
what they reconstruct and by what a DiT trained on their latents generates (`vtp-fast study`)."""

from vtp_fast.study.config import MIXES, StudyConfig, dry_run, load_study
from vtp_fast.study.run import run_study

__all__ = ["MIXES", "StudyConfig", "dry_run", "load_study", "run_study"]
