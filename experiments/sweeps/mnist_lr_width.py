"""Learning rate x CNN width x 3 seeds on MNIST: configs/mnist_cnn.py (the TensorFlow-tutorial CNN) for 300 steps.

    python -m bigmodel_jax.sweep experiments/sweeps/mnist_lr_width.py --workdir=sweeps/lr_width --parallel=2
    python -m bigmodel_jax.sweep experiments/sweeps/mnist_lr_width.py --sweep=small --workdir=sweeps/lr_width_small

27 trials (3 learning rates x 3 widths of the conv stack x 3 seeds), each ~30-60 s on a 2-core CPU at --parallel=2;
small: 2 x 2 x 2 seeds = 8 trials. Selection on validation accuracy (the 10% validation slice of MNIST's training
split); test accuracy is reported beside it. Measured here (small variant, 2-core CPU, 2.5 min; README's sweep
section): validation accuracy 0.899-0.963 after 300 steps, lr 3e-3 with the config's own width (32, 64, 64) best
(0.963 ± 0.009 over 2 seeds; test 0.968), the narrow (8, 16, 16) stack at lr 1e-3 last.
"""

from bigmodel_jax.sweeps import product, seeds

base = "configs/mnist_cnn.py"
# 300 steps of batch 32 (a sixth of an epoch) with the config's cosine decay over them: a CPU-sized budget
overrides = {"train.num_steps": 300, "train.log_every": 50, "evals.validation.every": 100}
WIDTHS = [(8, 16, 16), (16, 32, 32), (32, 64, 64)]  # model.conv_features; (32, 64, 64) is the config's own


def sweep():
  yield from product({"optimizer.learning_rate": [3e-4, 1e-3, 3e-3], "model.conv_features": WIDTHS}, seeds(3))


def sweep_small():
  yield from product({"optimizer.learning_rate": [1e-3, 3e-3], "model.conv_features": WIDTHS[::2]}, seeds(2))
