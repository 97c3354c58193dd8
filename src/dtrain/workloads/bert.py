"""BERT text classification (Hugging Face transformers + datasets). See issue 3."""

from dtrain.errors import UserError


def build(cfg, env):
    raise UserError("workload=bert is not available yet")
