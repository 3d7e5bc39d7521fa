"""The seed's linear regression: SGD fits y = w x + b to 100 points of y = 3x + 4 + U(0, 1) noise.

    python -m bigmodel_jax.main --config=configs/linear_regression.py --workdir=runs/linreg

Full-batch gradient descent (lr 0.1, 1000 steps) on x ~ U(0, 2). The noise has mean 0.5, so the
expected fit is w ~ 3 and b ~ 4.5 (within 0.1); final_metrics.json reports them under
"coefficients", with test MSE ~ 1/12 (the noise variance) and R^2.
"""

from bigmodel_jax.config import apply_variant, base_config, model_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.name = "synthetic_linear"
  c.data.batch_size = 100  # all 100 points: plain gradient descent, as the seed
  c.data.eval_batch_size = 100
  c.data.normalize = "none"
  c.model = model_config("linear")
  c.task.name = "regression"
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.train.num_epochs = 1000
  c.train.log_every = 100
  c.evals.validation.every = 250
  c.train.checkpoint_every = 500
  c.train.best_metric = "mse"
  c.train.best_mode = "min"
  # smoke: a seconds-long check that the whole path works
  return apply_variant(c, variant, "linear_regression", smoke={"train.num_epochs": 200})
