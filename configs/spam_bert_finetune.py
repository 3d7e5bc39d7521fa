"""Spam vs ham by a Transformer encoder pretrained as a masked LM (spam_bert_pretrain.py), or from scratch (:scratch).

BERT's recipe: pretrain a masked LM, add a classification head, fine-tune; `:scratch` is the same model, data and
budget from a fresh initialisation, to compare.

    python -m bigmodel_jax.main --config=configs/spam_bert_pretrain.py --workdir=runs/spam_bert_pretrain
    python -m bigmodel_jax.main --config=configs/spam_bert_finetune.py --workdir=runs/spam_bert_finetune
    python -m bigmodel_jax.main --config=configs/spam_bert_finetune.py:scratch --workdir=runs/spam_bert_scratch
    python -m bigmodel_jax.main --config=configs/spam_bert_finetune.py --workdir=runs/spam_bert_1pct \
        --config.data.train_fraction=0.01

Initialisation: config.init.workdir (default runs/spam_bert_pretrain, relative to where you launch) gives the
trunk and the [CLS] vector; the head is new (init.rules head.*=skip); the text is read with the pretraining run's
tokenizer. Labels: config.data.train_fraction keeps a fixed seeded share of the training emails (the same ones
for every seed and both arms). Budget: 300 steps whatever the share (batch 32, AdamW 3e-4, warmup + cosine;
the 1% run sees its ~44 emails ~200 times), the checkpoint kept by validation F1, test reported at it.
experiments/sweeps/spam_pretraining.py runs 1/10/100% x pretrained/scratch x 3 seeds. Measured: README.
"""

import importlib.util
from pathlib import Path

from bigmodel_jax.config import apply_variant, base_config, model_config


def _pretrain():
  spec = importlib.util.spec_from_file_location("spam_bert_pretrain", Path(__file__).with_name("spam_bert_pretrain.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config(variant: str = ""):
  pre = _pretrain()
  c = base_config()
  pre.data_fields(c)  # the same emails, split, tokenizer settings and window as the pretraining run
  c.model = model_config("encoder_classifier", **pre.ENCODER)
  c.task.name = "classification"
  c.init.workdir = "runs/spam_bert_pretrain"
  c.init.rules = ("head.*=skip",)  # the trunk and [CLS] from the masked LM; the classification head is new
  c.optimizer.name = "adamw"
  c.optimizer.learning_rate = 3e-4
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip_norm = 1.0
  c.schedule.name = "warmup_cosine"
  c.schedule.warmup_steps = 30
  c.train.num_steps = 300
  c.train.log_every = 50
  c.train.best_metric = "f1"
  c.evals.validation.every = 50
  smoke = {"data.tokenizer.vocab_size": 1000, "data.seq_len": 32, "model.max_len": 33, **pre.SMOKE_ENCODER,
           "train.num_steps": 20, "evals.validation.every": 10, "train.log_every": 10, "schedule.warmup_steps": 5}
  return apply_variant(c, variant, "spam_bert_finetune", scratch={"init.workdir": "", "init.rules": ()}, smoke=smoke)
