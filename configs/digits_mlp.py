"""MLP on scikit-learn's bundled 8x8 digits: seconds on a laptop CPU, no download at all.

    python -m bigmodel_jax.main --config=configs/digits_mlp.py --workdir=runs/digits_mlp

Expected: test accuracy ~0.97 on the fixed 360-image test split after 20 epochs (measured here on a
2-core CPU; this codebase's own result, no external reference).
"""

from bigmodel_jax.config import apply_variant, base_config, model_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.name = "digits"
  c.data.batch_size = 32
  c.data.on_device = True  # the training split kept on the device, no batch sent per step (benchmarks/NOTES.md)
  c.model = model_config("mlp", hidden_sizes=(128, 128), dropout_rate=0.1)
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  c.train.num_epochs = 20
  c.train.log_every = 20
  c.train.checkpoint_every = 200
  c.train.steps_per_call = 10  # steps per dispatch (benchmarks/NOTES.md: host overhead)
  # smoke: a seconds-long check that the whole path works (one compiled step: it starts faster)
  return apply_variant(c, variant, "digits_mlp", smoke={"train.num_epochs": 2, "train.steps_per_call": 1})
