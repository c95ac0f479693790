"""The KL autoencoder of latent diffusion (Rombach et al. 2022; Esser et al. 2021's recipe):
L1 reconstruction + a perceptual term + beta * KL, and a patch-GAN discriminator with the
hinge loss, switched on after `disc_start` steps.

Perceptual term: no pretrained LPIPS network can be downloaded here, so it is the Laplacian
pyramid L1 loss of Bojanowski et al. 2018 ("Optimizing the latent space of generative
networks", sec. 3.2): L1 between the band-pass levels of a Laplacian pyramid, weighted 4^-j
at level j... inverted so that fine levels (edges) count as much as coarse ones. It is fixed,
needs no weights, and penalises the blurred edges that a plain pixel loss tolerates.

Both players train in one step from one surrogate loss: the generator's terms see the
discriminator's parameters through `stop_gradient`, the discriminator's hinge loss sees the
reconstruction through `stop_gradient`, so each parameter set gets exactly its own gradient.

config.model: vae (AutoencoderKLConfig fields), kl_weight, perceptual_weight, pyramid_levels,
disc_channels, disc_layers, disc_weight, disc_start.
"""
from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models import AutoencoderKL, AutoencoderKLConfig
from jaxdiff.models.layers import conv
from jaxdiff.models.vae import posterior_kl, sample_posterior
from jaxdiff.training.evaluate import psnr, vae_reconstruction
from jaxdiff.training.task import Task, init_boxed


class PatchDiscriminator(nn.Module):
    """pix2pix's PatchGAN (Isola et al. 2017): strided 4x4 convolutions with leaky ReLU, one logit
    per overlapping patch. [B, H, W, 3] -> [B, H / 2^layers, W / 2^layers, 1]."""
    channels: int = 64
    layers: int = 3
    dtype: jnp.dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=jnp.float32)
        h = x
        for i in range(self.layers):
            h = conv(self.channels * 2 ** i, kernel=4, stride=2, padding=((1, 1), (1, 1)), **kw)(h)
            h = nn.leaky_relu(h, 0.2)
        return conv(1, kernel=3, **kw)(h).astype(jnp.float32)


def avg_pool2(x):
    return nn.avg_pool(x, (2, 2), (2, 2))


def laplacian_pyramid_l1(x, y, levels: int):
    """sum_j mean |L_j(x) - L_j(y)| over the band-pass levels L_j = G_j - up(G_{j+1}) and the
    coarsest Gaussian level; x, y: [B, H, W, C]. Returns [B]."""
    total = 0.0
    for _ in range(levels):
        if x.shape[1] < 2:
            break
        xs, ys = avg_pool2(x), avg_pool2(y)
        up = lambda a: jnp.repeat(jnp.repeat(a, 2, axis=1), 2, axis=2)
        total = total + jnp.mean(jnp.abs((x - up(xs)) - (y - up(ys))), axis=(1, 2, 3))
        x, y = xs, ys
    return total + jnp.mean(jnp.abs(x - y), axis=(1, 2, 3))


def build(c, spec) -> Task:
    m = c.model
    dtype = jnp.dtype(c.dtype)
    vae = AutoencoderKL(AutoencoderKLConfig(**{**m.vae.to_dict(), "sample_size": spec.image_size}), dtype=dtype)
    disc = PatchDiscriminator(m.disc_channels, m.disc_layers, dtype=dtype)
    image = jnp.zeros((1, spec.image_size, spec.image_size, 3))

    def init(key):
        k_vae, k_disc = jax.random.split(key)
        return {"vae": init_boxed(vae, k_vae, image), "disc": init_boxed(disc, k_disc, image)}

    def loss(params, frozen, batch, key, step):
        x = batch["image"]
        mean, logvar = vae.apply({"params": params["vae"]}, x, method=vae.encode)
        recon = vae.apply({"params": params["vae"]}, sample_posterior(key, mean, logvar), method=vae.decode)
        l1 = jnp.mean(jnp.abs(recon - x), axis=(1, 2, 3))
        perceptual = laplacian_pyramid_l1(recon, x, m.pyramid_levels)
        kl = posterior_kl(mean, logvar)
        gan_on = (step >= m.disc_start).astype(jnp.float32)
        frozen_disc = jax.lax.stop_gradient(params["disc"])
        g_loss = -jnp.mean(disc.apply({"params": frozen_disc}, recon))
        real = disc.apply({"params": params["disc"]}, x)
        fake = disc.apply({"params": params["disc"]}, jax.lax.stop_gradient(recon))
        d_loss = 0.5 * (jnp.mean(nn.relu(1.0 - real)) + jnp.mean(nn.relu(1.0 + fake)))  # hinge
        rec = jnp.mean(l1 + m.perceptual_weight * perceptual)
        total = rec + m.kl_weight * jnp.mean(kl) + gan_on * (m.disc_weight * g_loss + d_loss)
        return total, {"l1": jnp.mean(l1), "perceptual": jnp.mean(perceptual), "kl": jnp.mean(kl),
                       "g_loss": g_loss, "d_loss": d_loss, "psnr": jnp.mean(psnr(recon, x)),
                       "latent_std": jnp.std(mean)}

    evaluate = None
    if spec.source == "shapes":
        evaluate = lambda params, frozen: vae_reconstruction(vae, params["vae"], spec.image_size,
                                                             c.get("eval_examples", 1000))
    return Task(init=init, loss=loss, evaluate=evaluate)
