"""The seed experiment: the TensorFlow-tutorial CNN on full MNIST (60k train / 10k test).

    python -m bigmodel_jax.main --config=configs/mnist_cnn.py --workdir=runs/mnist_cnn
    python -m bigmodel_jax.main --config=configs/mnist_cnn.py:smoke --workdir=runs/mnist_smoke   # seconds

Model: Conv32(3x3)-MaxPool-Conv64(3x3)-MaxPool-Conv64(3x3)-Flatten-Dense64-Dense10, 'VALID' padding,
Adam lr 1e-3 with cosine decay, batch 32, 5 epochs, inputs scaled to [0, 1]: the seed's Keras setup
(batch 32 is Keras' default), plus a cosine decay of ours (see get_config).
Expected: >= 99.0% test accuracy; the TensorFlow CNN tutorial (tensorflow.org/tutorials/images/cnn)
reports ~99% for this network. Measured with this codebase: 99.30% ± 0.01% over 3 seeds (2-core CPU, ~75 s a
seed; README table).
"""

from bigmodel_jax.config import apply_variant, base_config, model_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.name = "mnist"
  c.data.batch_size = 32
  c.data.on_device = True  # the training split kept on the device, no batch sent per step (benchmarks/NOTES.md)
  c.model = model_config("cnn", conv_features=(32, 64, 64), kernel_size=3, pool_after=2, dense_features=(64,))
  c.optimizer.name = "adam"
  c.optimizer.learning_rate = 1e-3
  # Keras' constant lr gave 98.70% after epoch 5 here (99.08% after epoch 4): the last epoch is noisy.
  # Cosine decay to 0 over the 5 epochs settles it.
  c.schedule.name = "cosine"
  c.train.num_epochs = 5
  c.train.log_every = 200
  c.train.checkpoint_every = 1000
  # smoke: a seconds-long check that the whole path works
  return apply_variant(c, variant, "mnist_cnn", smoke={"train.num_steps": 100, "train.log_every": 20})
