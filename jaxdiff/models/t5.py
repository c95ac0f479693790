"""T5 and UMT5 text encoders (Raffel et al. 2020; Chung et al. 2023), as transformers'
`T5EncoderModel` and `UMT5EncoderModel`: the text encoders of SD3 and Flux (T5 v1.1 XXL) and Wan (UMT5-XXL).

A pre-norm transformer encoder with T5's own choices:
- T5 LayerNorm is RMSNorm: a learnt scale, no mean subtraction and no bias (`layers.rms_norm`);
- no absolute positions: each head adds a learnt scalar per *relative position bucket* to its
  attention logits (`relative_position_bucket`: exact offsets near zero, log-spaced ones up to
  `relative_attention_max_distance`, one bucket beyond); T5 computes that bias in the first layer
  and shares it with every layer, UMT5 learns one per layer;
- no 1/sqrt(d_kv) logit scaling (T5 folds it into the initialisation of q);
- feed-forward `wo(relu(wi(x)))` (`feed_forward_proj='relu'`, the original T5) or the gated-GELU
  `wo(gelu_tanh(wi_0(x)) * wi_1(x))` ('gated-gelu', T5 v1.1 / flan / UMT5).

Submodule names are transformers' (`encoder/block_0/layer_0/SelfAttention/q`), so a Flax path
spells the torch key (`jaxdiff.convert.transformers`).

Call: `module.apply({'params': p}, input_ids, attention_mask)` with input_ids [B, L] int and an
optional attention_mask [B, L] (1 = real token, 0 = padding: padded keys are not attended to).
Returns the last hidden state [B, L, d_model], after the final norm. Dropout is not run: these
modules serve as (frozen) text encoders; `dropout_rate` is kept only so configs round-trip.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any, Mapping

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff.models.attention import dot_product_attention
from jaxdiff.models.checks import CheckpointError, check_supported
from jaxdiff.models.layers import constrain_tokens, dense
from jaxdiff.models.transformer_layers import rms_norm

Dtype = Any

# feed_forward_proj -> (activation, gated). transformers maps 'gated-gelu' to its 'gelu_new'
# (the tanh approximation); a plain 'gelu' would be the exact erf form, which no T5 checkpoint uses.
FEED_FORWARD_PROJ = {
    "relu": (jax.nn.relu, False),
    "gated-gelu": (lambda x: jax.nn.gelu(x, approximate=True), True),
}


# --------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class T5Config:
    """Encoder hyper-parameters; field names and defaults are transformers' `T5Config` (t5-small)."""

    vocab_size: int = 32128
    d_model: int = 512
    d_kv: int = 64
    d_ff: int = 2048
    num_layers: int = 6
    num_heads: int = 8
    relative_attention_num_buckets: int = 32
    relative_attention_max_distance: int = 128
    layer_norm_epsilon: float = 1e-6
    feed_forward_proj: str = "relu"
    dropout_rate: float = 0.1  # not run (see the module docstring); kept for the round trip
    pad_token_id: int = 0
    eos_token_id: int = 1

    model_type = "t5"  # a class attribute, not a field: the config class says which model it describes

    def __post_init__(self):
        what = self.model_type.upper()
        for field in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_heads",
                      "relative_attention_num_buckets", "relative_attention_max_distance"):
            value = getattr(self, field)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                raise CheckpointError(f"{what} config field {field}={value!r} is not supported; "
                                      "supported: a positive int")
        if self.feed_forward_proj not in FEED_FORWARD_PROJ:
            raise CheckpointError(f"{what} config field feed_forward_proj={self.feed_forward_proj!r} is not "
                                  f"supported; supported: {', '.join(map(repr, FEED_FORWARD_PROJ))}")
        if not (isinstance(self.layer_norm_epsilon, (int, float)) and self.layer_norm_epsilon > 0):
            raise CheckpointError(f"{what} config field layer_norm_epsilon={self.layer_norm_epsilon!r} is not "
                                  "supported; supported: a positive float")
        # Bidirectional buckets: half per direction, of which half are exact offsets [0, max_exact).
        if self.relative_attention_num_buckets < 4:
            raise CheckpointError(f"{what} config field relative_attention_num_buckets="
                                  f"{self.relative_attention_num_buckets} is not supported; supported: >= 4 "
                                  "(half per direction, half of those exact offsets)")
        max_exact = self.relative_attention_num_buckets // 4
        if self.relative_attention_max_distance <= max_exact:
            raise CheckpointError(f"{what} config field relative_attention_max_distance="
                                  f"{self.relative_attention_max_distance} is not supported; supported: more than "
                                  f"relative_attention_num_buckets // 4 = {max_exact} (the exact offsets)")

    @property
    def inner_dim(self) -> int:
        """Width of q, k and v: num_heads * d_kv (need not equal d_model)."""
        return self.num_heads * self.d_kv

    @classmethod
    def from_transformers_config(cls, d: Mapping) -> "T5Config":
        """From a transformers config.json dict; missing fields take this class's (transformers') defaults."""
        what = cls.model_type.upper()
        if "model_type" in d and d["model_type"] != cls.model_type:
            raise CheckpointError(f"{what} config field model_type={d['model_type']!r} is not supported; "
                                  f"supported: {cls.model_type!r}")
        check_supported(d, {"is_decoder": {False}, "feed_forward_proj": set(FEED_FORWARD_PROJ)}, what)
        names = {f.name for f in dataclasses.fields(cls)}
        return cls(**{k: v for k, v in d.items() if k in names})

    def to_transformers_config(self) -> dict:
        return {"model_type": self.model_type, **dataclasses.asdict(self), "num_decoder_layers": self.num_layers,
                "is_encoder_decoder": True}


@dataclasses.dataclass(frozen=True)
class UMT5Config(T5Config):
    """transformers' `UMT5Config` (umt5-small's defaults); the same fields as T5's."""

    vocab_size: int = 250112
    d_ff: int = 1024
    num_layers: int = 8
    num_heads: int = 6
    feed_forward_proj: str = "gated-gelu"

    model_type = "umt5"


# --------------------------------------------------------------------------- relative position bias


def relative_position_bucket(relative_position, num_buckets: int, max_distance: int) -> np.ndarray:
    """T5's bidirectional relative position buckets (Raffel et al. 2020, section 2.1; mesh-tensorflow).

    Half of the buckets serve keys after the query, half keys before it. In each half, offsets below
    max_exact = num_buckets // 4 get a bucket each; larger ones share log-spaced buckets up to
    max_distance, and every offset beyond falls into the last one. Computed in NumPy float32 in
    transformers' operation order, so that offsets on a bucket edge round as torch rounds them.

    relative_position: int array (key position - query position). Returns int32 buckets, same shape.
    """
    relative_position = np.asarray(relative_position, np.int64)
    num_buckets //= 2
    buckets = (relative_position > 0).astype(np.int64) * num_buckets
    distance = np.abs(relative_position)
    max_exact = num_buckets // 2
    # max(distance, max_exact) keeps log() finite where the exact bucket is taken anyway.
    log_ratio = (np.log(np.maximum(distance, max_exact).astype(np.float32) / np.float32(max_exact))
                 / np.float32(math.log(max_distance / max_exact)))
    large = max_exact + (log_ratio * np.float32(num_buckets - max_exact)).astype(np.int64)
    large = np.minimum(large, num_buckets - 1)
    return (buckets + np.where(distance < max_exact, distance, large)).astype(np.int32)


# --------------------------------------------------------------------------- layers


class T5Attention(nn.Module):
    """Multi-head self-attention without biases or logit scaling, plus the relative position bias.

    With `has_relative_attention_bias` the layer owns the bias table [num_buckets, num_heads] and
    computes the bias; otherwise it takes the one passed in (T5's layers after the first).
    """

    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        c, kw = self.config, dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        init = nn.initializers.normal((c.d_model * c.d_kv) ** -0.5)  # T5's q init (its 1/sqrt(d_kv) scaling)
        self.q = dense(c.inner_dim, ("embed", "heads"), kernel_init=init, name="q", **kw)
        self.k = dense(c.inner_dim, ("embed", "heads"), name="k", **kw)
        self.v = dense(c.inner_dim, ("embed", "heads"), name="v", **kw)
        self.o = dense(c.d_model, ("heads", "embed"), name="o", **kw)
        if self.has_relative_attention_bias:
            self.relative_attention_bias = nn.Embed(
                c.relative_attention_num_buckets, c.num_heads, dtype=self.dtype, param_dtype=self.param_dtype,
                embedding_init=nn.with_logical_partitioning(nn.initializers.normal(c.d_model ** -0.5),
                                                            (None, "heads")))

    def compute_bias(self, length: int):
        """The relative position bias [1, H, L, L] of a length-L sequence (query i, key j: bucket of j - i)."""
        c = self.config
        offsets = np.arange(length)[None, :] - np.arange(length)[:, None]
        buckets = relative_position_bucket(offsets, c.relative_attention_num_buckets,
                                           c.relative_attention_max_distance)
        return jnp.transpose(self.relative_attention_bias(jnp.asarray(buckets)), (2, 0, 1))[None]

    def __call__(self, x, mask=None, position_bias=None):
        """x: [B, L, D]; mask: boolean broadcastable to [B, H, L, L], True = attend; position_bias:
        [1, H, L, L] or None (then this layer computes it). Returns ([B, L, D], the bias used)."""
        if position_bias is None:
            position_bias = self.compute_bias(x.shape[1])
        split = lambda t: t.reshape(*t.shape[:2], self.config.num_heads, self.config.d_kv)  # [B, L, H, d_kv]
        out = dot_product_attention(split(self.q(x)), split(self.k(x)), split(self.v(x)), mask,
                                    bias=position_bias.astype(x.dtype), scale=1.0)
        return self.o(out.reshape(*x.shape[:2], self.config.inner_dim)), position_bias


class T5DenseActDense(nn.Module):
    """wo(act(wi(x))), or with a gate wo(act(wi_0(x)) * wi_1(x)). [B, L, D] -> [B, L, D]."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        c, kw = self.config, dict(use_bias=False, dtype=self.dtype, param_dtype=self.param_dtype)
        act, gated = FEED_FORWARD_PROJ[c.feed_forward_proj]
        if gated:
            h = act(dense(c.d_ff, ("embed", "mlp"), name="wi_0", **kw)(x)) * dense(c.d_ff, ("embed", "mlp"),
                                                                                   name="wi_1", **kw)(x)
        else:
            h = act(dense(c.d_ff, ("embed", "mlp"), name="wi", **kw)(x))
        return dense(c.d_model, ("mlp", "embed"), name="wo", **kw)(h)


class T5LayerSelfAttention(nn.Module):
    """x + attention(norm(x))."""

    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x, mask=None, position_bias=None):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = rms_norm(self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        h, position_bias = T5Attention(self.config, self.has_relative_attention_bias, name="SelfAttention",
                                       **kw)(h, mask, position_bias)
        return x + h, position_bias


class T5LayerFF(nn.Module):
    """x + feed_forward(norm(x))."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    @nn.compact
    def __call__(self, x):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        h = rms_norm(self.config.layer_norm_epsilon, name="layer_norm", **kw)(x)
        return x + T5DenseActDense(self.config, name="DenseReluDense", **kw)(h)


class T5Block(nn.Module):
    """One encoder layer: `layer_0` self-attention, `layer_1` feed-forward (transformers' `layer` list)."""

    config: T5Config
    has_relative_attention_bias: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.layer = [T5LayerSelfAttention(self.config, self.has_relative_attention_bias, **kw),
                      T5LayerFF(self.config, **kw)]

    def __call__(self, x, mask=None, position_bias=None):
        x, position_bias = self.layer[0](x, mask, position_bias)
        return constrain_tokens(self.layer[1](x)), position_bias


class T5Stack(nn.Module):
    """The encoder stack on embedded tokens: blocks, then the final norm.

    `bias_per_layer=False` (T5): block 0 owns the relative attention bias and every block adds the
    same one. True (UMT5): every block owns and computes its own.
    """

    config: T5Config
    bias_per_layer: bool = False
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    def setup(self):
        kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
        self.block = [T5Block(self.config, self.bias_per_layer or i == 0, **kw) for i in range(self.config.num_layers)]
        self.final_layer_norm = rms_norm(self.config.layer_norm_epsilon, name="final_layer_norm", **kw)

    def __call__(self, x, mask=None):
        position_bias = None
        for block in self.block:
            x, position_bias = block(x, mask, None if self.bias_per_layer else position_bias)
        return self.final_layer_norm(x)


class T5EncoderModel(nn.Module):
    """T5's encoder (transformers' `T5EncoderModel`): token embedding `shared`, then the stack."""

    config: T5Config
    dtype: Dtype = jnp.float32
    param_dtype: Dtype = jnp.float32

    bias_per_layer = False  # a class attribute: UMT5 differs only in this

    def setup(self):
        c = self.config
        expected = UMT5Config if self.bias_per_layer else T5Config
        if type(c) is not expected:  # the config class names the model_type an export writes
            raise TypeError(f"{type(self).__name__} takes a {expected.__name__}, not a {type(c).__name__}")
        self.shared = nn.Embed(c.vocab_size, c.d_model, dtype=self.dtype, param_dtype=self.param_dtype,
                               embedding_init=nn.with_logical_partitioning(nn.initializers.normal(1.0),
                                                                           ("vocab", "embed")))
        self.encoder = T5Stack(c, self.bias_per_layer, dtype=self.dtype, param_dtype=self.param_dtype)

    def __call__(self, input_ids, attention_mask=None):
        """input_ids: [B, L] int; attention_mask: optional [B, L], 1 = real token. Returns [B, L, d_model]."""
        mask = None if attention_mask is None else attention_mask.astype(bool)[:, None, None, :]
        return self.encoder(constrain_tokens(self.shared(input_ids)), mask)

    def example_inputs(self) -> tuple[tuple, dict]:
        return (jnp.zeros((1, 8), jnp.int32),), {}


class UMT5EncoderModel(T5EncoderModel):
    """UMT5's encoder (transformers' `UMT5EncoderModel`): T5's, with a relative attention bias in every layer."""

    bias_per_layer = True
