"""ResNet-20 on CIFAR-10: the recipe of He et al. 2016, "Deep Residual Learning for Image Recognition"
(arXiv:1512.03385), section 4.2.

    python -m bigmodel_jax.main --config=configs/cifar10_resnet.py --workdir=runs/cifar10_resnet20
    python -m bigmodel_jax.main --config=configs/cifar10_resnet.py --config.model.depth=56 --workdir=runs/r56

Needs TFDS to build cifar10 once (network + TensorFlow: pip install 'bigmodel_jax[tfds]'; offline it stops
with a one-line error) and a GPU: on a 2-core CPU a ResNet-20 step on 28x28 inputs ran at ~1.1 steps/s,
so the 64k steps would take about a day; on one modern GPU it is minutes.
Paper: 3x3 conv stem, 3 stages of n basic blocks (16/32/64 filters), option-A (zero-padded identity)
shortcuts, BatchNorm after every conv, He init; SGD momentum 0.9, lr 0.1, weight decay 1e-4, batch 128,
4-pixel zero-padded random crops + horizontal flips, 64k iterations with the lr divided by 10 at 32k and
48k (on a 45k/5k train/val split). Expected: ~91.25% test accuracy for ResNet-20 (paper, table 6: 8.75%
error; ResNet-32 92.49%, -44 92.83%, -56 93.03%, -110 93.57%).
Differences from the paper, on purpose: the lr follows a cosine decay to 0 over the 64k steps instead of the
two /10 steps (this codebase has no step schedule; cosine matches or beats the step schedule on CIFAR in
common reproductions); inputs are standardised per channel instead of per-pixel mean subtraction; weight
decay applies to conv/dense kernels only, not to BatchNorm scales and biases; training uses all 50k images.
Not measured here yet (no TFDS network or GPU on our machines).
"""

from bigmodel_jax.config import apply_variant, base_config, model_config


def get_config(variant: str = ""):
  c = base_config()
  c.data.name = "tfds:cifar10"
  c.data.batch_size = 128
  c.data.normalize = "standardize"
  c.data.augment.random_crop_padding = 4
  c.data.augment.horizontal_flip = True
  c.model = model_config("resnet", depth=20, width=16, shortcut="A", stem="cifar")
  c.optimizer.name = "sgd"
  c.optimizer.learning_rate = 0.1
  c.optimizer.momentum = 0.9
  c.optimizer.nesterov = False
  c.optimizer.weight_decay = 1e-4
  c.schedule.name = "cosine"
  c.train.num_steps = 64_000
  c.evals.validation.every = 4_000
  c.train.log_every = 200
  c.train.checkpoint_every = 4_000
  # smoke: a ResNet-8 for 30 steps (still needs the TFDS dataset)
  return apply_variant(c, variant, "cifar10_resnet",
                       smoke={"model.depth": 8, "train.num_steps": 30, "train.log_every": 10,
                              "evals.validation.every": 30})
