"""The text conditioning of pipelines that read several text encoders, each one Flax module.

Its params are `{"text_encoder": ..., "text_encoder_2": ..., "text_encoder_3": ...}`, the component names
of the diffusers folder (each the params `jaxdiff.convert.from_transformers` gives for that folder). It is
called on the tuple of token ids that the pipeline's `jaxdiff.tokenizers.MultiTokenizer` gives, one array
per tokenizer, and returns what the denoiser reads, (context [B, L, D], pooled [B, P]):

- `SD3TextEncoders` (diffusers' StableDiffusion3Pipeline.encode_prompt): CLIP-L's and CLIP-G's
  penultimate hidden states side by side, zero-padded to T5's width, then T5's states after them along
  the sequence (zeros where the folder has no T5); pooled: both CLIPs' projected pooled states side by side.
- `FluxTextEncoders` (FluxPipeline): T5's states; pooled: CLIP-L's pooled state (no projection).
- `SDXLTextEncoders` (StableDiffusionXLPipeline.encode_prompt): CLIP-L's and CLIP-G's penultimate hidden
  states side by side; pooled: CLIP-G's projected pooled state (`text_embeds`).

A pipeline with one CLIP (Stable Diffusion 1/2, jaxdiff's own MMDiT folders) uses the `CLIPTextModel`
itself, which returns (last hidden state, pooled) too. As in the reference pipelines, no attention mask
is passed: padding tokens are encoded like text.

Wan's pipelines (WanPipeline, WanImageToVideoPipeline) differ: `WanEncoders` takes (ids, attention mask) from
a `jaxdiff.tokenizers.WanTokenizer`, passes the mask to UMT5 and zeroes the states past each prompt's tokens;
pooled is None. Its params are `{"text_encoder": ...}`, plus `"image_encoder"` for image-to-video (CLIP vision's
penultimate states of the first frame, `encode_image`).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp

from jaxdiff.models.clip import CLIPImageProcessor, CLIPTextModel, CLIPTextModelWithProjection, CLIPVisionModel
from jaxdiff.models.t5 import T5EncoderModel

# SD3 and SDXL read CLIP's penultimate layer (hidden_states[-2], before the final LayerNorm).
PENULTIMATE = -2


class SD3TextEncoders(nn.Module):
    """SD3's three encoders: CLIP-L and CLIP-G (`CLIPTextModelWithProjection`) and T5 (None: zeros)."""

    text_encoder: CLIPTextModelWithProjection
    text_encoder_2: CLIPTextModelWithProjection
    text_encoder_3: T5EncoderModel | None
    joint_attention_dim: int  # the transformer's text width (T5's d_model)
    t5_length: int = 256  # T5's tokens (diffusers' max_sequence_length); the zeros' length without T5

    def __call__(self, ids):
        """ids: (CLIP-L ids [B, 77], CLIP-G ids [B, 77], T5 ids [B, t5_length] when there is a T5)."""
        clip = [encoder(i, output_hidden_states=True) for encoder, i in ((self.text_encoder, ids[0]),
                                                                         (self.text_encoder_2, ids[1]))]
        states = jnp.concatenate([out[3][PENULTIMATE] for out in clip], axis=-1)
        pooled = jnp.concatenate([out[2] for out in clip], axis=-1)
        width = self.joint_attention_dim
        # diffusers pads with F.pad(x, (0, width - x.shape[-1])), which cuts when CLIP is wider (tiny test configs)
        states = jnp.pad(states, ((0, 0), (0, 0), (0, max(width - states.shape[-1], 0))))[..., :width]
        if self.text_encoder_3 is None:
            t5 = jnp.zeros((states.shape[0], self.t5_length, width), states.dtype)
        else:
            t5 = self.text_encoder_3(ids[2]).astype(states.dtype)
        return jnp.concatenate([states, t5], axis=1), pooled


class WanEncoders(nn.Module):
    """Wan's conditioning: UMT5's states (diffusers' WanPipeline._get_t5_prompt_embeds) and, for image-to-video
    checkpoints, CLIP vision's penultimate states of the conditioning image (WanImageToVideoPipeline.encode_image).
    """

    text_encoder: T5EncoderModel
    image_encoder: CLIPVisionModel | None = None
    image_processor: CLIPImageProcessor | None = None

    def __call__(self, ids):
        """ids: (input_ids [B, L], attention_mask [B, L]) -> (states [B, L, D], zero past each prompt's tokens;
        None)."""
        input_ids, mask = ids
        states = self.text_encoder(input_ids, mask)
        return states * mask[..., None].astype(states.dtype), None

    def encode_image(self, images):
        """images [B, H, W, 3] in [0, 1] -> CLIP's hidden_states[-2] [B, 1 + patches, D]."""
        *_, states = self.image_encoder(self.image_processor(images), output_hidden_states=True)
        return states[PENULTIMATE]


class FluxTextEncoders(nn.Module):
    """Flux's two encoders: CLIP-L (`CLIPTextModel`, its pooled state) and T5 (its states)."""

    text_encoder: CLIPTextModel
    text_encoder_2: T5EncoderModel

    def __call__(self, ids):
        """ids: (CLIP ids [B, 77], T5 ids [B, L])."""
        _, pooled = self.text_encoder(ids[0])
        return self.text_encoder_2(ids[1]), pooled


class SDXLTextEncoders(nn.Module):
    """SDXL's two encoders: CLIP-L (`CLIPTextModel`) and CLIP-G (`CLIPTextModelWithProjection`).

    `force_zeros_for_empty_prompt` (the pipeline's model_index.json field, True unless it says otherwise): a
    request without negative prompts guides against zeros in place of the states and pooled embedding of "".
    """

    text_encoder: CLIPTextModel
    text_encoder_2: CLIPTextModelWithProjection
    force_zeros_for_empty_prompt: bool = True

    def __call__(self, ids):
        """ids: (CLIP-L ids [B, 77], CLIP-G ids [B, 77])."""
        *_, states_l = self.text_encoder(ids[0], output_hidden_states=True)
        _, _, pooled, states_g = self.text_encoder_2(ids[1], output_hidden_states=True)
        return jnp.concatenate([states_l[PENULTIMATE], states_g[PENULTIMATE]], axis=-1), pooled
