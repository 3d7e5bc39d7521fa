"""SGD (momentum) / Adam / AdamW x 3 seeds on Fashion-MNIST: configs/fashion_mnist_cnn.py for 400 steps.

    python -m bigmodel_jax.sweep experiments/sweeps/optimizers.py --workdir=sweeps/optimizers --parallel=2
    python -m bigmodel_jax.sweep experiments/sweeps/optimizers.py --sweep=small --workdir=sweeps/optimizers_small

9 trials (small: one seed, 3 trials), each ~30-60 s on a 2-core CPU at --parallel=2. Each optimizer at a usual
learning rate for it (not tuned here: sweep optimizer.learning_rate per optimizer for that). Selection on
validation accuracy (a 10% slice of the training split); test accuracy reported beside it. Measured here (small,
one seed, 2-core CPU, 2 min): validation accuracy SGD+momentum 0.811, AdamW 0.780, Adam 0.776 after 400 steps (a
CPU-sized budget: 10 epochs of configs/fashion_mnist_cnn.py reach ~0.91 test accuracy).
"""

from bigmodel_jax.sweeps import product, seeds

base = "configs/fashion_mnist_cnn.py"
overrides = {"train.num_steps": 400, "train.log_every": 50, "evals.validation.every": 100}
OPTIMIZERS = [
    {"optimizer.name": "sgd", "optimizer.learning_rate": 0.05, "optimizer.momentum": 0.9},
    {"optimizer.name": "adam", "optimizer.learning_rate": 1e-3},
    {"optimizer.name": "adamw", "optimizer.learning_rate": 1e-3, "optimizer.weight_decay": 1e-2},
]


def sweep():
  yield from product(OPTIMIZERS, seeds(3))


def sweep_small():
  yield from product(OPTIMIZERS, seeds(1))
