"""CIFAR ResNets of He et al. 2016 (arXiv:1512.03385, section 4.2): ResNet-(6n+2) with basic blocks.

A 3x3 conv stem with `width` (16) filters, then 3 stages of n basic blocks (conv3x3-BN-ReLU-conv3x3-BN, added
to the shortcut, then ReLU) with width, 2*width and 4*width filters; the first block of stages 2 and 3 has
stride 2. Global average pooling and a dense head. depth = 6n + 2: 20, 32, 44, 56, 110 are the paper's nets
(0.27M, 0.46M, 0.66M, 0.85M, 1.7M parameters). Where the shape changes the shortcut is option A (the paper's
CIFAR choice: subsample with stride 2 and pad the new channels with zeros, no parameters) or option B (a 1x1
conv projection + BN). Convs have no bias (BN follows every conv) and He (fan-out, normal) initialisation.

BatchNorm is layers.BatchNorm: batch statistics of the whole global batch in training on every layout,
running averages (nnx.BatchStat, in the train state's model_state) in eval.
"""

from typing import Sequence

import jax
import jax.numpy as jnp
from flax import nnx

from bigmodel_jax.errors import UserError
from bigmodel_jax.models import MODELS, require_positive
from bigmodel_jax.models.layers import BatchNorm, conv_general_dilated

SHORTCUTS = ("A", "B")
STEMS = ("cifar", "imagenet")  # cifar: 3x3 conv, stride 1; imagenet: 7x7 conv stride 2 + 3x3 max pool stride 2
he_normal = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")  # PyTorch's kaiming_normal_(fan_out)


def conv(in_features: int, out_features: int, kernel: int, stride: int, rngs: nnx.Rngs) -> nnx.Conv:
  # explicit symmetric padding (PyTorch's padding=k//2): a stride-2 output pixel i is centred on input 2i,
  # the pixel option A's x[::2] keeps ('SAME' would pad 0/1 and centre it on 2i+1 for even sizes)
  pad = kernel // 2
  return nnx.Conv(in_features, out_features, (kernel, kernel), strides=(stride, stride),
                  padding=((pad, pad), (pad, pad)), use_bias=False, kernel_init=he_normal, rngs=rngs,
                  conv_general_dilated=conv_general_dilated)


def check_image(model: str, input_shape: Sequence[int]) -> tuple[int, int, int]:
  if len(input_shape) != 3:
    raise UserError(f"config.data.name: model {model!r} needs images (H x W x C), but the inputs have shape "
                    f"{tuple(input_shape)}; use an image dataset (digits, mnist, fashion_mnist, tfds:cifar10)")
  return tuple(input_shape)


class BasicBlock(nnx.Module):
  """conv3x3(stride)-BN-ReLU-conv3x3-BN + shortcut, then ReLU."""

  def __init__(self, in_features: int, out_features: int, stride: int, shortcut: str, *, rngs: nnx.Rngs):
    self.conv1 = conv(in_features, out_features, 3, stride, rngs)
    self.bn1 = BatchNorm(out_features, rngs=rngs)
    self.conv2 = conv(out_features, out_features, 3, 1, rngs)
    self.bn2 = BatchNorm(out_features, rngs=rngs)
    self.stride, self.extra_channels = stride, out_features - in_features
    reshapes = stride != 1 or in_features != out_features
    self.proj = conv(in_features, out_features, 1, stride, rngs) if reshapes and shortcut == "B" else None
    self.proj_bn = BatchNorm(out_features, rngs=rngs) if self.proj is not None else None

  def shortcut(self, x, train: bool):
    if self.proj is not None:  # option B: a 1x1 projection
      return self.proj_bn(self.proj(x), train=train)
    if self.stride != 1:  # option A: subsample, then zero channels for the new filters (no parameters)
      x = x[:, ::self.stride, ::self.stride, :]
    if self.extra_channels:
      x = jnp.pad(x, ((0, 0), (0, 0), (0, 0), (0, self.extra_channels)))
    return x

  def __call__(self, x, *, train: bool):
    h = nnx.relu(self.bn1(self.conv1(x), train=train))
    h = self.bn2(self.conv2(h), train=train)
    return nnx.relu(h + self.shortcut(x, train))


@MODELS.register("resnet")
class ResNet(nnx.Module):
  """ResNet-(6n+2) for small images (CIFAR, MNIST-sized): see the module docstring."""

  def __init__(self, *, input_shape: Sequence[int], num_outputs: int, rngs: nnx.Rngs, depth: int = 20,
               width: int = 16, shortcut: str = "A", stem: str = "cifar"):
    require_positive(depth=depth, width=width)
    if (depth - 2) % 6 or depth < 8:
      raise UserError(f"config.model.depth: {depth} is not a CIFAR ResNet depth, which must be 6n+2 "
                      "(8, 20, 32, 44, 56, 110, ...)")
    if shortcut not in SHORTCUTS:
      raise UserError(f"config.model.shortcut: unknown {shortcut!r}; valid: A (zero-padded identity, the paper's "
                      "CIFAR nets), B (1x1 conv projection)")
    if stem not in STEMS:
      raise UserError(f"config.model.stem: unknown {stem!r}; valid: {', '.join(STEMS)}")
    h, w, c = check_image("resnet", input_shape)
    min_size = 4 if stem == "cifar" else 16  # two stride-2 stages (and the imagenet stem's /4) need room
    if min(h, w) < min_size:
      raise UserError(f"config.data.name: the {h}x{w} images are too small for a ResNet with stem={stem!r} "
                      f"(needs at least {min_size}x{min_size})")
    self.stem_kind = stem
    self.stem = conv(c, width, 3 if stem == "cifar" else 7, 1 if stem == "cifar" else 2, rngs)
    self.stem_bn = BatchNorm(width, rngs=rngs)
    n = (depth - 2) // 6
    blocks, features = [], width
    for stage in range(3):
      out = width * 2 ** stage
      for i in range(n):
        blocks.append(BasicBlock(features, out, 2 if stage > 0 and i == 0 else 1, shortcut, rngs=rngs))
        features = out
    self.blocks = nnx.List(blocks)
    self.num_features = features
    self.head = nnx.Linear(features, num_outputs, rngs=rngs)

  def features(self, x_BxHxWxC: jax.Array, *, train: bool = False, rngs=None) -> jax.Array:
    """The globally pooled activations of the last stage (B x 4*width): the head's input."""
    del rngs  # no dropout in the paper's nets
    x = nnx.relu(self.stem_bn(self.stem(x_BxHxWxC), train=train))
    if self.stem_kind == "imagenet":
      x = nnx.max_pool(x, window_shape=(3, 3), strides=(2, 2), padding=((1, 1), (1, 1)))
    for block in self.blocks:
      x = block(x, train=train)
    return x.mean(axis=(1, 2))

  def __call__(self, x_BxHxWxC: jax.Array, *, train: bool, rngs=None) -> jax.Array:
    return self.head(self.features(x_BxHxWxC, train=train, rngs=rngs))
