"""A seconds-long sweep on scikit-learn's bundled digits (no download): learning rate x 2 seeds, 4 trials.

    python -m bigmodel_jax.sweep experiments/sweeps/digits_smoke.py --workdir=sweeps/digits_smoke --parallel=2

Each trial trains configs/digits_mlp.py for 150 steps (~10 s on one CPU core). Expected: the two learning rates
within a few points of each other, ~0.9 validation accuracy (measured here; README's sweep section).
"""

from bigmodel_jax.sweeps import product, seeds

base = "configs/digits_mlp.py"
overrides = {"train.num_steps": 150, "train.log_every": 25, "evals.validation.every": 50}


def sweep():
  yield from product({"optimizer.learning_rate": [1e-3, 3e-3]}, seeds(2))


# An Optuna search instead (--sweep=lr): 6 trials of learning rate and dropout, TPE, the study kept in the workdir
num_trials = 6


def search_lr(trial):
  return {"optimizer.learning_rate": trial.suggest_float("learning_rate", 1e-4, 1e-2, log=True),
          "model.dropout_rate": trial.suggest_float("dropout_rate", 0.0, 0.5)}
