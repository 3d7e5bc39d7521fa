"""DCGAN (Radford et al. 2016) for small images: a generator and a discriminator in one module.

Generator: z -> Dense -> (H/4 x W/4 x 2f) -> BN-ReLU -> ConvTranspose(f, 4x4, stride 2) -> BN-ReLU ->
ConvTranspose(C, 4x4, stride 2) -> tanh, images in [-1, 1]. Discriminator: Conv(f, 4x4, stride 2) ->
LeakyReLU(0.2) -> Conv(2f, 4x4, stride 2) -> BN -> LeakyReLU -> Dense(1), a real/fake logit. BatchNorm
where the paper has it (not on the generator's output nor the discriminator's input), weights drawn
from N(0, 0.02) as the paper does. Calling the module on images is the discriminator; `generate(z)`
is the generator. The two are separate sub-modules (`generator.*`, `discriminator.*` parameters), so
each gets its own optimizer (config.optimizers.generator / .discriminator).
"""

import jax
import jax.numpy as jnp
from flax import nnx

from bigmodel_jax.errors import UserError
from bigmodel_jax.models import MODELS, require_positive
from bigmodel_jax.models.layers import BatchNorm, conv_general_dilated

_INIT = nnx.initializers.normal(0.02)


class Generator(nnx.Module):
  def __init__(self, latent_dim: int, height: int, width: int, channels: int, features: int, rngs: nnx.Rngs):
    self.latent_dim, self.start = latent_dim, (height // 4, width // 4, 2 * features)
    h, w, c = self.start
    self.dense = nnx.Linear(latent_dim, h * w * c, kernel_init=_INIT, rngs=rngs)
    self.bn0 = BatchNorm(c, rngs=rngs)  # per channel, after the reshape (as the paper's projection layer)
    self.up1 = nnx.ConvTranspose(c, features, (4, 4), strides=(2, 2), padding="SAME", kernel_init=_INIT, rngs=rngs)
    self.bn1 = BatchNorm(features, rngs=rngs)
    self.up2 = nnx.ConvTranspose(features, channels, (4, 4), strides=(2, 2), padding="SAME", kernel_init=_INIT,
                                 rngs=rngs)

  def __call__(self, z_BxZ, *, train: bool):
    x = self.dense(z_BxZ.astype(self.dense.kernel.dtype)).reshape(z_BxZ.shape[0], *self.start)
    x = nnx.relu(self.bn0(x, train=train))
    x = nnx.relu(self.bn1(self.up1(x), train=train))
    return jnp.tanh(self.up2(x))  # B x H x W x C in [-1, 1]


class Discriminator(nnx.Module):
  def __init__(self, height: int, width: int, channels: int, features: int, rngs: nnx.Rngs):
    self.conv1 = nnx.Conv(channels, features, (4, 4), strides=(2, 2), padding="SAME", kernel_init=_INIT, rngs=rngs,
                         conv_general_dilated=conv_general_dilated)
    self.conv2 = nnx.Conv(features, 2 * features, (4, 4), strides=(2, 2), padding="SAME", kernel_init=_INIT,
                          rngs=rngs)
    self.bn2 = BatchNorm(2 * features, rngs=rngs)
    self.head = nnx.Linear((height // 4) * (width // 4) * 2 * features, 1, kernel_init=_INIT, rngs=rngs)

  def __call__(self, x_BxHxWxC, *, train: bool):
    x = nnx.leaky_relu(self.conv1(x_BxHxWxC), 0.2)
    x = nnx.leaky_relu(self.bn2(self.conv2(x), train=train), 0.2)
    return self.head(x.reshape(x.shape[0], -1))  # B x 1 logits: real vs generated


@MODELS.register("dcgan")
class DCGAN(nnx.Module):

  def __init__(self, *, input_shape, num_outputs: int, rngs: nnx.Rngs, latent_dim: int = 100,
               generator_features: int = 64, discriminator_features: int = 64):
    require_positive(latent_dim=latent_dim, generator_features=generator_features,
                     discriminator_features=discriminator_features)
    if len(input_shape) != 3:
      raise UserError(f"config.model.name: 'dcgan' generates images (H x W x C); the dataset's inputs have shape "
                      f"{tuple(input_shape)}")
    h, w, c = input_shape
    if h % 4 or w % 4:
      raise UserError(f"config.model.name: 'dcgan' upsamples 4x from (H/4 x W/4); {h}x{w} images are not divisible "
                      "by 4 (28x28 MNIST and 8x8 digits are)")
    del num_outputs  # the discriminator's one logit
    self.latent_dim, self.image_shape = latent_dim, (h, w, c)
    self.generator = Generator(latent_dim, h, w, c, generator_features, rngs)
    self.discriminator = Discriminator(h, w, c, discriminator_features, rngs)

  def __call__(self, images_BxHxWxC, *, train: bool, rngs=None):
    """The discriminator's real/fake logit for images in [-1, 1]."""
    return self.discriminator(images_BxHxWxC, train=train)

  def generate(self, z_BxZ, *, train: bool = False):
    return self.generator(z_BxZ, train=train)

  def noise(self, keys_Bx2) -> jax.Array:
    """One latent vector per key: z ~ N(0, I)."""
    return jax.vmap(lambda k: jax.random.normal(k, (self.latent_dim,)))(keys_Bx2)
