"""The KL-regularised autoencoder of latent diffusion (Rombach et al. 2022), diffusers' AutoencoderKL.

    vae.apply({'params': p}, x, method=vae.encode) -> (mean, logvar)   x: [B, H, W, in_channels]
    vae.apply({'params': p}, z, method=vae.decode) -> x                z: [B, H/f, W/f, latent_channels]

with f = 2 ** (len(block_out_channels) - 1). The decoder (and post_quant_conv) always
computes in float32, whatever `dtype` says: its output is the image. The diffusion model
sees `(z - shift_factor) * scaling_factor`; both are config attributes.
"""
from __future__ import annotations

import dataclasses
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from jaxdiff.models.checks import CheckpointError, check_supported
from jaxdiff.models.layers import conv, constrain_image, group_norm
from jaxdiff.models.resolution_blocks import DownBlock, MidBlock, UpBlock

LOGVAR_RANGE = (-30.0, 20.0)

_UNSUPPORTED_DIFFUSERS_FIELDS = {
    "act_fn": {"silu", "swish"},
    "norm_type": {"group"},
}
_BLOCK_TYPES = {"down_block_types": "DownEncoderBlock2D", "up_block_types": "UpDecoderBlock2D"}


@dataclasses.dataclass(frozen=True)
class AutoencoderKLConfig:
    """AutoencoderKL hyper-parameters, named as in diffusers' config.

    `latents_mean`, `latents_std` and `force_upcast` are carried for pipelines and export;
    the module itself does not use them. `norm_eps` is fixed to 1e-6 in diffusers.
    """
    in_channels: int = 3
    out_channels: int = 3
    block_out_channels: tuple[int, ...] = (64,)
    layers_per_block: int = 1
    latent_channels: int = 4
    norm_num_groups: int = 32
    norm_eps: float = 1e-6
    sample_size: int = 32
    scaling_factor: float = 0.18215
    shift_factor: float | None = None
    latents_mean: tuple[float, ...] | None = None
    latents_std: tuple[float, ...] | None = None
    force_upcast: bool = True
    use_quant_conv: bool = True
    use_post_quant_conv: bool = True
    mid_block_add_attention: bool = True

    def __post_init__(self):
        for field in ("block_out_channels", "latents_mean", "latents_std"):
            value = getattr(self, field)
            if value is not None:
                object.__setattr__(self, field, tuple(value))
        for ch in self.block_out_channels:
            if ch % self.norm_num_groups:
                raise ValueError(f"AutoencoderKLConfig: block channels {ch} not divisible by "
                                 f"norm_num_groups={self.norm_num_groups}")

    @property
    def downsample_factor(self) -> int:
        return 2 ** (len(self.block_out_channels) - 1)

    @classmethod
    def from_diffusers_config(cls, config: dict) -> "AutoencoderKLConfig":
        """From a diffusers AutoencoderKL `config.json` dict; unsupported or unknown fields raise
        CheckpointError naming the field."""

        config = dict(config)
        check_supported(config, _UNSUPPORTED_DIFFUSERS_FIELDS, "AutoencoderKL")
        n = len(config.get("block_out_channels", cls.block_out_channels))
        for field, block in _BLOCK_TYPES.items():
            types = config.pop(field, [block])
            if any(t != block for t in types) or len(types) != n:
                raise CheckpointError(f"AutoencoderKL config field {field}={types!r} is not supported; "
                                      f"supported: [{block!r}] * len(block_out_channels)")
        known = {f.name for f in dataclasses.fields(cls)} - {"norm_eps"}
        kwargs = {}
        for field, value in config.items():
            if field.startswith("_") or field in _UNSUPPORTED_DIFFUSERS_FIELDS:
                continue
            if field not in known:
                raise CheckpointError(f"AutoencoderKL config field {field}={value!r} is unknown to jaxdiff")
            kwargs[field] = value
        try:
            return cls(**kwargs)
        except ValueError as e:
            raise CheckpointError(str(e)) from e

    def to_diffusers_config(self) -> dict:
        if self.norm_eps != 1e-6:
            raise ValueError(f"diffusers' AutoencoderKL fixes norm_eps=1e-6; this config has {self.norm_eps}")
        out = {"_class_name": "AutoencoderKL", "act_fn": "silu"}
        for f in dataclasses.fields(self):
            if f.name != "norm_eps":
                value = getattr(self, f.name)
                out[f.name] = list(value) if isinstance(value, tuple) else value
        n = len(self.block_out_channels)
        out.update({field: [block] * n for field, block in _BLOCK_TYPES.items()})
        return out


class Encoder(nn.Module):
    """x [B, H, W, in_channels] -> posterior moments [B, H/f, W/f, 2 * latent_channels] (mean | logvar)."""
    config: AutoencoderKLConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, x):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(groups=c.norm_num_groups, eps=c.norm_eps, **kw)
        n = len(c.block_out_channels)
        h = conv(c.block_out_channels[0], name="conv_in", **kw)(x.astype(self.dtype))
        for i, ch in enumerate(c.block_out_channels):
            # diffusers' encoder pads its strided convs on the bottom/right only (downsample_padding=0).
            h, _ = DownBlock(ch, c.layers_per_block, add_downsample=i < n - 1, downsample_padding=0,
                             name=f"down_blocks_{i}", **block_kw)(h)
        h = MidBlock(c.block_out_channels[-1], self_attention=c.mid_block_add_attention, name="mid_block",
                     **block_kw)(h)
        h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(h))
        return conv(2 * c.latent_channels, name="conv_out", **kw)(h)


class Decoder(nn.Module):
    """z [B, h, w, latent_channels] -> x [B, h*f, w*f, out_channels]."""
    config: AutoencoderKLConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    @nn.compact
    def __call__(self, z):
        c = self.config
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        block_kw = dict(groups=c.norm_num_groups, eps=c.norm_eps, **kw)
        n = len(c.block_out_channels)
        h = conv(c.block_out_channels[-1], name="conv_in", **kw)(z.astype(self.dtype))
        h = MidBlock(c.block_out_channels[-1], self_attention=c.mid_block_add_attention, name="mid_block",
                     **block_kw)(h)
        for i, ch in enumerate(reversed(c.block_out_channels)):
            h = UpBlock(ch, c.layers_per_block + 1, add_upsample=i < n - 1, name=f"up_blocks_{i}", **block_kw)(h)
        h = nn.silu(group_norm(c.norm_num_groups, c.norm_eps, name="conv_norm_out", **kw)(h))
        return constrain_image(conv(c.out_channels, name="conv_out", **kw)(h))


class AutoencoderKL(nn.Module):
    """Encoder -> diagonal Gaussian posterior -> decoder. `__call__` reconstructs (used by init)."""
    config: AutoencoderKLConfig
    dtype: Any = jnp.float32
    param_dtype: Any = jnp.float32

    def setup(self):
        c = self.config
        self.encoder = Encoder(c, self.dtype, self.param_dtype)
        self.decoder = Decoder(c, jnp.float32, self.param_dtype)
        if c.use_quant_conv:
            self.quant_conv = conv(2 * c.latent_channels, kernel=1, dtype=self.dtype, param_dtype=self.param_dtype)
        if c.use_post_quant_conv:
            self.post_quant_conv = conv(c.latent_channels, kernel=1, dtype=jnp.float32, param_dtype=self.param_dtype)

    def example_inputs(self) -> tuple[tuple, dict]:
        """The smallest (args, kwargs) this VAE accepts, for tracing its init (`layers.param_shapes`)."""
        f = self.config.downsample_factor
        return (jnp.zeros((1, f, f, self.config.in_channels)),), {}

    def encode(self, x):
        """x: [B, H, W, C] -> (mean, logvar), each [B, H/f, W/f, latent_channels], logvar clamped to [-30, 20]."""
        moments = self.encoder(x)
        if self.config.use_quant_conv:
            moments = self.quant_conv(moments)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, *LOGVAR_RANGE)

    def decode(self, z):
        """z: [B, h, w, latent_channels] (unscaled latents) -> [B, h*f, w*f, out_channels] float32."""
        z = z.astype(jnp.float32)
        if self.config.use_post_quant_conv:
            z = self.post_quant_conv(z)
        return self.decoder(z)

    def __call__(self, x, key=None):
        """Reconstruction: decode the posterior mean, or a posterior sample when `key` is given."""
        mean, logvar = self.encode(x)
        return self.decode(mean if key is None else sample_posterior(key, mean, logvar))


def sample_posterior(key, mean, logvar):
    """z ~ N(mean, exp(logvar)), the reparameterised sample."""
    noise = jax.random.normal(key, mean.shape, jnp.float32)
    return (mean.astype(jnp.float32) + jnp.exp(0.5 * logvar.astype(jnp.float32)) * noise).astype(mean.dtype)


def posterior_kl(mean, logvar):
    """KL(N(mean, exp(logvar)) || N(0, I)) summed over all but the batch axis: [B]."""
    mean, logvar = mean.astype(jnp.float32), logvar.astype(jnp.float32)
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))
