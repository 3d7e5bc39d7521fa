"""The seed CNN on Fashion-MNIST (60k train / 10k test, 10 clothing classes).

    python -m bigmodel_jax.main --config=configs/fashion_mnist_cnn.py --workdir=runs/fashion_cnn

Same network, optimiser and cosine schedule as configs/mnist_cnn.py, 10 epochs. Expected: ~91% test accuracy
(Fashion-MNIST's benchmark table lists 2-3 layer CNNs at 90-92%; github.com/zalandoresearch/fashion-mnist).
Measured with this codebase: 91.69% (README results table).
"""

from bigmodel_jax.config import apply_variant, base_config, model_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.name = "fashion_mnist"
  c.data.batch_size = 32
  c.data.on_device = True  # the training split kept on the device, no batch sent per step (benchmarks/NOTES.md)
  c.model = model_config("cnn", conv_features=(32, 64, 64), kernel_size=3, pool_after=2, dense_features=(64,))
  c.schedule.name = "cosine"  # constant lr ended at 89.8% here (90.4% mid-run): the last epochs were noisy
  c.train.num_epochs = 10
  c.train.log_every = 200
  # smoke: a seconds-long check that the whole path works
  return apply_variant(c, variant, "fashion_mnist_cnn", smoke={"train.num_steps": 100, "train.log_every": 20})
