"""DCGAN on MNIST: a generator and a discriminator, each with its own Adam (lr 2e-4, b1 0.5) as in the paper.

    python -m bigmodel_jax.main --config=configs/mnist_dcgan.py --workdir=runs/mnist_dcgan
    python -m bigmodel_jax.main --workdir=runs/mnist_dcgan --mode=predict    # PNG grid, fixed noise
    python -m bigmodel_jax.main --workdir=runs/mnist_dcgan --mode=sample     # 16 PNGs + images.npy
    python -m bigmodel_jax.main --config=configs/mnist_dcgan.py:smoke --workdir=runs/gan_smoke   # < 1 min, digits
    python -m bigmodel_jax.main --config=configs/mnist_dcgan.py:fashion --workdir=runs/fashion_dcgan

Model: Radford et al. 2016 (DCGAN) for 28x28: generator z(100) -> 7x7x128 -> 14x14x64 -> 28x28x1 (transposed
4x4 convs, BatchNorm + ReLU, tanh), discriminator 28x28 -> 14x14x64 -> 7x7x128 -> logit (4x4 convs stride 2,
LeakyReLU 0.2, BatchNorm on the second), non-saturating loss, one discriminator step per generator step,
batch 64.
Quality is measured every epoch with the project's own MNIST CNN (configs/mnist_cnn.py, trained once and
cached, or config.eval.classifier_workdir): classifier score exp E[KL(p(y|x) || p(y))] (10 at most; real
test images score ~9.9), the Frechet distance in its penultimate features (real vs real beside it), and
the share of samples per class.
Target: classifier score >= 9.0, every class between 5% and 15% of samples (measured: README results).
"""

from bigmodel_jax.config import apply_variant, base_config, model_config
from bigmodel_jax.optim import section_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.name = "mnist"
  c.data.batch_size = 64
  c.data.normalize = "unit"  # the task maps [0, 1] to the generator's [-1, 1]
  c.model = model_config("dcgan", latent_dim=100, generator_features=64, discriminator_features=64)
  c.task.name = "adversarial"
  c.task.d_steps = 1
  adam = dict(name="adam", learning_rate=2e-4, b1=0.5, b2=0.999)
  c.optimizers = dict(generator=section_config(params="generator", **adam),
                      discriminator=section_config(params="discriminator", **adam))
  c.eval.classifier_config = "configs/mnist_cnn.py"
  c.train.num_epochs = 5
  c.train.log_every = 100
  c.train.checkpoint_every = 1000
  c.train.best_metric, c.train.best_mode = "classifier_score", "max"
  c.predict.num_images = 64
  c.sample.num_samples = 16
  return apply_variant(
      c, variant, "mnist_dcgan",
      # seconds: sklearn's 8x8 digits, its quality classifier the digits MLP (trained once, ~15 s)
      smoke={"data.name": "digits", "data.batch_size": 32, "data.eval_batch_size": 400, "model.latent_dim": 16,
             "model.generator_features": 16, "model.discriminator_features": 16,
             "eval.classifier_config": "configs/digits_mlp.py", "train.num_epochs": 8, "train.log_every": 20,
             "train.checkpoint_every": 100},
      fashion={"data.name": "fashion_mnist", "eval.classifier_config": "configs/fashion_mnist_cnn.py"})
