"""Denoising diffusion and flow matching, in pixel space or in a frozen VAE's latent space, with a
U-Net or a DiT, optionally conditioned on a frozen CLIP text encoder (latent diffusion,
Rombach et al. 2022) with caption dropout for classifier-free guidance (Ho & Salimans 2022);
or text-to-video / image-to-video latent diffusion with a TemporalUNet (ModelScope, Wang et al. 2023).

config.model:
  backbone: unet | dit | temporal_unet;  unet / dit / temporal_unet: the backbone's config fields
  space: pixel | latent; vae: AutoencoderKLConfig fields + checkpoint (a vae run's workdir, or a model
    folder that jaxdiff.training.export wrote, such as jaxdiff/assets/shapes: its vae/)
  text_encoder: CLIPTextConfig fields + checkpoint (a clip run's workdir, or a model folder: its
    text_encoder/); absent: unconditional;
    trainable (default False; backbone unet): the text encoder starts from that checkpoint and trains
    with the U-Net (GLIDE, Nichol et al. 2022, trains its text transformer with the diffusion loss);
    the run's params are then {'unet': ..., 'text': ...} and its export carries the trained encoder
  schedule, num_train_timesteps, prediction_type (epsilon | v_prediction | sample | flow),
  weighting (simple | snr | min_snr | edm), min_snr_gamma, timestep_distribution (uniform |
  logit_normal, with timestep_logit_mean / timestep_logit_std: a positive mean favours noisy steps), caption_dropout,
  rescale_zero_terminal_snr (beta schedules ending at SNR 0; v_prediction or sample),
  sample_method, sample_steps, guidance_scale
  emphasis_words, emphasis_weight (text): examples whose caption holds one of these words weigh
    emphasis_weight times the others in the loss (e.g. place words, which the loss rewards faintly)
  grounding_weight (backbone unet with a text encoder; default 0): adds that times `losses.grounding_loss`
    (TokenCompose, Wang et al. 2024) of every cross-attention map: each caption token's attention is pulled
    into the pixels its words describe, given by the batches' 'token_masks' (config.data.token_masks = the
    latent side, with the shapes data). A direct gradient for place and relation words, which the
    denoising loss rewards only faintly (README, "Why positions fail").
  terminal_mean_share (with a text encoder and rescale_zero_terminal_snr; default 0): that share of each
    batch, drawn per example, is trained at the last timestep (pure noise) against the mean latent (video:
    latent clip) of its caption's examples instead of its own (the empty caption of caption dropout: the
    mean of all). At SNR 0 the best prediction is exactly that mean, E[x_0 | caption], the layout (and
    motion) prior sampling starts from; the usual loss teaches it through one noisy example at a time and
    rarely, since few draws land at the last step. Image-to-video examples that keep their conditioning
    frame are left out (their best prediction depends on that frame). The means are averaged over the first
    terminal_mean_examples (default 50000) training examples when the task is built; a caption seen there
    once gives no less noisy a target. The table is kept in terminal_mean_cache (a folder; default
    $XDG_CACHE_HOME/jaxdiff/caption_means, i.e. ~/.cache/...; '' keeps none) under a name hashed from the
    data's config, the example count and the VAE (config and weights), so a resumed or a second run with the
    same data and VAE reads it instead of encoding the examples again (minutes for 50000 shapes).
  mirror_pairs (with a text encoder; default ''): 'flip' (images) or 'reverse' (videos): the second half of each
    batch is the mirror image of its first half (`mirrored`: flipped, or played backwards), its caption's
    place, relation or direction words swapped ("left" <-> "right", "above" <-> "below", "up" <-> "down"),
    with the same timesteps, noise and caption (and conditioning-frame) dropout as its twin. The two members of
    a pair differ only where those words act, so at high noise, where the layout is decided and the noisy
    input tells the pair apart barely or not at all, the only way to predict both is to read the words; in
    random batches that gradient is averaged with every other way two examples differ.
  init_from (backbone unet, latent, with a text encoder): the workdir of a latent text-to-image run, or
    a model folder, with the same U-Net config whose EMA U-Net is this run's starting point (fine-tuning,
    e.g. to another objective); its VAE and text encoder should be this run's. The one change allowed
    is adding jaxdiff-only parts to a U-Net without them (unet.input_coordinates: conv_in's two new
    input channels start at zero; unet.context_layers and unet.attention_positions: their gates and gains
    start at zero), so the fine-tune starts from the source U-Net's exact function.
A frozen part without a checkpoint is randomly initialised (for tests and smoke runs) and says so.

Video (backbone temporal_unet; latent space and a text encoder required; data: videos
batch["image"] [B, T, H, W, 3], e.g. source 'shapes' with a `moving_shapes/...` name):
  temporal_unet: TemporalUNetConfig fields (a video U-Net from scratch; in/out channels and
    sample_size come from the VAE and the data), or
  init_from: the workdir of a latent text-to-image run (backbone unet), or a model folder, whose EMA U-Net is inflated
    (`jaxdiff.models.temporal_unet.inflate`: before training the video U-Net is that U-Net on every
    frame); temporal: the video-only TemporalUNetConfig fields for it (frame_position_embedding,
    conditioning_frame_channels, ...). Building the task reads that run's config.json and EMA weights.
  conditioning_frame_channels > 0 (image-to-video): the clean latent of frame 0 is the U-Net's
    conditioning frame, dropped with probability image_dropout (default 0.1, independent of
    caption dropout) so the model also learns plain text-to-video.
  frame_noise_correlation (default 0): the fraction of the noise's variance shared by a video's frames
    (`jaxdiff.diffusion.frame_correlated_noise`, PYoCo's mixed noise prior), in training and in the
    preview; exported folders record it and TextToVideo samples with it.
  num_frames: frames of the preview videos (default: from a moving_shapes data name).
  Preview grids: text-to-video (no conditioning frame), each video's frames side by side.
"""
from __future__ import annotations

import functools
import hashlib
import json
import logging
import os

import flax.linen as nn
from flax import traverse_util
import jax
import jax.numpy as jnp
import numpy as np

from jaxdiff import diffusion, guidance, losses, samplers, schedules
from jaxdiff.compilation_cache import CACHE_ROOT
from jaxdiff.convert.diffusers import param_template
from jaxdiff.data import render
from jaxdiff.models import AutoencoderKL, AutoencoderKLConfig, CLIPTextModel, DiT, DiTConfig, TemporalUNet, \
    TemporalUNetConfig, UNet2DCondition, UNetConfig, inflate
from jaxdiff.models.temporal_unet import inflated_config
from jaxdiff.models.vae import sample_posterior
from jaxdiff.training import sources
from jaxdiff.training.config import choice
from jaxdiff.training.recipes.clip import text_config_for
from jaxdiff.training.task import Task, init_boxed, rebox

BACKBONES = ("unet", "dit", "temporal_unet")
SPACES = ("pixel", "latent")
PREDICTIONS = ("epsilon", "v_prediction", "sample", "flow")
MIRROR_PAIRS = ("", "flip", "reverse")

log = logging.getLogger(__name__)


def schedule_for(m) -> schedules.Schedule:
    """The noise schedule; flow prediction and the flow_matching schedule go together.

    rescale_zero_terminal_snr (Lin et al. 2024): the beta schedule rescaled to end at SNR 0, so the
    last timestep is pure noise, as at sampling; with the usual end (SNR ~0.005 for scaled_linear)
    the low frequencies of x_0 survive at t = T and a model learns to read the layout off them,
    which pure-noise sampling then leaves to the noise. x_0 is not recoverable from an epsilon
    prediction at SNR 0: it needs v_prediction or sample."""
    zero_snr = bool(m.get("rescale_zero_terminal_snr", False))
    choice(m.prediction_type, PREDICTIONS, "model.prediction_type")
    if zero_snr and m.prediction_type not in ("v_prediction", "sample"):
        raise ValueError(f"config.model.rescale_zero_terminal_snr needs prediction_type 'v_prediction' or 'sample' "
                         f"(x_0 cannot be recovered from {m.prediction_type!r} at SNR 0)")
    schedule = schedules.get(m.schedule, m.num_train_timesteps, **({"rescale_zero_terminal_snr": True} if zero_snr
                                                                    else {}))
    if (schedule.kind == "flow") != (m.prediction_type == "flow"):
        raise ValueError(f"config.model.prediction_type={m.prediction_type!r} does not fit "
                         f"config.model.schedule={m.schedule!r}: use prediction_type='flow' with exactly the "
                         f"flow_matching schedule")
    return schedule


def denoising_loss(apply_fn, x0, key, schedule, m, context=None, example_weights=None, has_aux=False,
                   terminal=None, paired=False):
    """The denoising (or flow matching) loss of `apply_fn(x_t, timestep, context)` on clean data x0 [B, ...]:
    the mean over examples, or their `example_weights` [B]-weighted mean. With `has_aux`, apply_fn
    returns (output, aux) and this returns (loss, aux).

    Timesteps from `m.timestep_distribution`, except for the examples where `terminal` [B] (bool) holds,
    which are noised to the last timestep; the model sees the schedule's timestep value
    (i for discrete schedules, sigma * N for flow matching), as samplers give it. Videos [B, T, ...]
    are noised with `m.frame_noise_correlation` of the noise shared across frames. With `paired`, the second
    half of the batch gets the first half's timesteps and noise (config.model.mirror_pairs)."""
    k_t, k_noise = jax.random.split(key)
    t = losses.sample_timesteps(k_t, x0.shape[0], schedule, m.get("timestep_distribution", "uniform"),
                                logit_mean=m.get("timestep_logit_mean", 0.0), logit_std=m.get("timestep_logit_std", 1.0))
    noise = diffusion.frame_correlated_noise(k_noise, x0.shape, m.get("frame_noise_correlation", 0.0))
    if paired:
        t, noise = pair_halves(t), pair_halves(noise)
    if terminal is not None:
        t = jnp.where(terminal, schedule.num_train_timesteps - 1, t)
    x_t = diffusion.q_sample(schedule, x0, t, noise)
    out = apply_fn(x_t, schedule.table("timesteps", t), context)
    out, aux = out if has_aux else (out, None)
    loss, per_example = losses.diffusion_loss(out, x0, noise, t, schedule, prediction_type=m.prediction_type,
                                              weighting=m.weighting, min_snr_gamma=m.get("min_snr_gamma", 5.0))
    if example_weights is not None:
        loss = jnp.sum(example_weights * per_example) / jnp.sum(example_weights)
    return (loss, aux) if has_aux else loss


def pair_halves(x):
    """x [B, ...] with its second half replaced by its first."""
    half = x.shape[0] // 2
    return jnp.concatenate([x[:half], x[:half]])


def caption_means(batches, encode, empty_tokens) -> tuple[np.ndarray, np.ndarray]:
    """(tokens int32 [K, L], means float32 [K, ...]): each distinct caption of `batches` (dicts of numpy
    'image' and 'tokens') with the mean of `encode(images)` over its examples, and the empty caption
    (`empty_tokens`) with the mean over all examples, the unconditional target."""
    sums, counts, total, n = {}, {}, 0.0, 0
    for batch in batches:
        z = np.asarray(encode(batch["image"]), np.float64)
        for row, zi in zip(np.asarray(batch["tokens"], np.int32), z):
            key = row.tobytes()
            sums[key] = sums.get(key, 0.0) + zi
            counts[key] = counts.get(key, 0) + 1
        total, n = total + z.sum(0), n + len(z)
    if not n:
        raise ValueError("caption_means: the data gave no examples")
    empty = np.asarray(empty_tokens, np.int32)
    sums[empty.tobytes()], counts[empty.tobytes()] = total, n     # the empty caption means "anything"
    tokens = np.stack([np.frombuffer(k, np.int32) for k in sums])
    means = np.stack([sums[k] / counts[k] for k in sums]).astype(np.float32)
    return tokens, means


CAPTION_MEANS_CACHE = os.path.join(CACHE_ROOT, "caption_means")


def vae_fingerprint(vae_cfg, vae_params) -> str:
    """sha256 of a VAE's config and weights (every leaf's path, dtype, shape and bytes)."""
    h = hashlib.sha256(repr(vae_cfg).encode())
    for path, leaf in jax.tree_util.tree_flatten_with_path(vae_params)[0]:
        leaf = np.asarray(leaf)
        h.update(f"{jax.tree_util.keystr(path)} {leaf.dtype} {leaf.shape}".encode())
        h.update(leaf.tobytes())
    return h.hexdigest()


def cached_arrays(folder: str, name: str, fingerprint: dict, compute) -> tuple[np.ndarray, ...]:
    """compute() (a tuple of numpy arrays), kept in `folder` as name-<sha256 of fingerprint>.npz and read from
    there when present ('' keeps nothing). The file is written whole to a temporary name and renamed, so an
    interrupted write never leaves a truncated table; an unreadable one is computed again and replaced."""
    if not folder:
        return compute()
    digest = hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:24]
    path = os.path.join(os.path.expanduser(folder), f"{name}-{digest}.npz")
    if os.path.exists(path):
        try:
            with np.load(path) as f:
                arrays = tuple(f[f"a{i}"] for i in range(len(f.files)))
            log.info("read %s", path)
            return arrays
        except (OSError, ValueError, KeyError) as e:
            log.warning("could not read %s (%s); computing it again", path, e)
    arrays = tuple(np.asarray(a) for a in compute())
    os.makedirs(os.path.dirname(path), exist_ok=True)
    tmp = f"{path}.tmp-{os.getpid()}"
    with open(tmp, "wb") as f:
        np.savez(f, **{f"a{i}": a for i, a in enumerate(arrays)})
    os.replace(tmp, path)
    log.info("wrote %s", path)
    return arrays


def caption_index(tokens, table):
    """(index [B] into table [K, L], found [B]): where each caption [B, L] sits in the table."""
    match = jnp.all(tokens[:, None, :] == table[None], axis=-1)
    return jnp.argmax(match, axis=-1), jnp.any(match, axis=-1)


def word_ids(spec, words, field: str) -> np.ndarray:
    """The token ids [N] of `words`, each of which must be one known word of the captions' vocabulary."""
    if spec.tokenize is None:
        raise ValueError(f"{field} needs captioned data (a tokenizer)")
    ids = spec.tokenize(list(words))
    if (ids[:, 2] != spec.eos_token_id).any() or (ids[:, 1] == spec.unk_token_id).any():
        bad = [w for w, row in zip(words, ids) if row[2] != spec.eos_token_id or row[1] == spec.unk_token_id]
        raise ValueError(f"{field}: {bad} are not single words of the captions' vocabulary")
    return np.asarray(ids[:, 1])


def emphasis_ids(m, spec) -> jax.Array | None:
    """The token ids of config.model.emphasis_words (None without them)."""
    words = tuple(m.get("emphasis_words", ()))
    if not words:
        return None
    ids = word_ids(spec, words, "config.model.emphasis_words")
    if not m.get("emphasis_weight", 1.0) > 0:
        raise ValueError(f"config.model.emphasis_weight={m.get('emphasis_weight')!r}: need a positive weight")
    return jnp.asarray(ids)


def word_swaps(spec, pairs) -> jax.Array:
    """A permutation of the token ids [V] that exchanges the two words of each pair and keeps the rest."""
    ids = np.arange(spec.vocab_size, dtype=np.int32)
    found = word_ids(spec, [w for pair in pairs for w in pair], "config.model.mirror_pairs")
    ids[found[0::2]], ids[found[1::2]] = found[1::2], found[0::2]
    return jnp.asarray(ids)


def mirror_swaps(spec) -> dict:
    """What `mirrored` needs: a token permutation per kind of mirror image, and the ids of the upright shapes."""
    swaps = {kind: word_swaps(spec, pairs) for kind, pairs in render.MIRROR_WORDS.items()}
    upright = [w for s in render.UPRIGHT_SHAPES for w in (s, render.plural(s))]
    return {**swaps, "upright": jnp.asarray(word_ids(spec, upright, "config.model.mirror_pairs"))}


def mirrored(batch: dict, mode: str, swaps: dict) -> dict:
    """The batch with its second half replaced by mirror images of its first half, whose captions swap the
    words the mirror exchanges (`render.MIRROR_WORDS`): minimal pairs, alike in all but the words of place,
    relation or motion, for config.model.mirror_pairs.

    mode 'reverse' (videos [B, T, H, W, 3]): each clip played backwards, every direction word reversed.
    mode 'flip' (images [B, H, W, 3]): flipped upside down where the caption has a word that flip exchanges
    and no upright shape (a flipped triangle is no triangle), otherwise left to right. 'token_masks'
    [B, L, h, w], where present, are flipped with their images."""
    half = batch["image"].shape[0] // 2
    first = {k: v[:half] for k, v in batch.items() if k in ("image", "tokens", "token_masks")}
    tokens = first["tokens"]
    if mode == "reverse":
        out = {"image": first["image"][:, ::-1], "tokens": swaps["reverse"][tokens]}
    else:
        upside_down = swaps["vertical"][tokens]
        vertical = jnp.any(upside_down != tokens, axis=-1) & ~jnp.isin(tokens, swaps["upright"]).any(axis=-1)
        out = {"image": jnp.where(vertical[:, None, None, None], first["image"][:, ::-1], first["image"][:, :, ::-1]),
               "tokens": jnp.where(vertical[:, None], upside_down, swaps["horizontal"][tokens])}
        if "token_masks" in first:
            masks = first["token_masks"]
            out["token_masks"] = jnp.where(vertical[:, None, None, None], masks[..., ::-1, :], masks[..., ::-1])
    return {**batch, **{k: jnp.concatenate([first[k], v]) for k, v in out.items()}}


def _frozen(boxed_abstract, checkpoint: str, part: str, what: str):
    """`part`'s trained weights (EMA) from a run or model folder or, without one, a random init (warned)."""
    if not checkpoint:
        log.warning("%s: no checkpoint given, using a frozen random init", what)
        return None
    params = sources.ema_params(checkpoint, part)
    shapes = jax.tree.map(lambda a: a.shape, (params, nn.meta.unbox(boxed_abstract)))
    if jax.tree.structure(shapes[0]) != jax.tree.structure(shapes[1]) or shapes[0] != shapes[1]:
        raise ValueError(f"{what}: the weights in {checkpoint!r} do not fit this run's config of it (other "
                         f"sizes or layers); make the config's fields those of the run that trained them")
    return rebox(params, boxed_abstract)


def _vae_config(fields) -> AutoencoderKLConfig:
    return AutoencoderKLConfig(**{k: v for k, v in fields.items() if k != "checkpoint"})


def text_trainable(m) -> bool:
    """Whether a diffusion config's `model` trains its text encoder with the U-Net."""
    return "text_encoder" in m and bool(m.text_encoder.get("trainable", False))


def split_params(m, params):
    """(U-Net params, trained text encoder params or None) of a run's params / EMA tree."""
    return (params["unet"], params["text"]) if text_trainable(m) else (params, None)


def image_unet(m, channels: int, size: int, dtype) -> UNet2DCondition:
    """The 2-D U-Net of a diffusion config's `model` on `channels` x size x size inputs."""
    return UNet2DCondition(UNetConfig(**{**m.unet.to_dict(), "in_channels": channels, "out_channels": channels,
                                         "sample_size": size}), dtype=dtype)


def _check_video(c, spec, latent: bool, text: bool) -> None:
    """Names the first setting a temporal_unet run cannot have."""
    m, what = c.model, "config.model.backbone='temporal_unet'"
    if not latent:
        raise ValueError(f"{what} trains in a VAE's latent space only: config.model.space={m.space!r} must be "
                         f"'latent'")
    if not text:
        raise ValueError(f"{what} needs config.model.text_encoder (the video U-Net's cross-attention needs a text "
                         f"context)")
    if spec.source != "shapes":
        raise ValueError(f"{what} trains on videos: config.data.source={spec.source!r} has none; use 'shapes' "
                         f"with a video dataset name such as 'moving_shapes/32px-8f'")
    scratch, init_from = bool(m.get("temporal_unet")), bool(m.get("init_from"))
    if scratch == init_from:
        raise ValueError(f"{what} needs exactly one of config.model.temporal_unet (a video U-Net from scratch) and "
                         f"config.model.init_from (a latent text-to-image run to inflate); got "
                         f"{'both' if scratch else 'neither'}")
    if scratch and m.get("temporal"):
        raise ValueError("config.model.temporal (overrides of an inflated U-Net) goes with config.model.init_from; "
                         "from scratch put those fields into config.model.temporal_unet")
    p = m.get("image_dropout", 0.1)
    if not 0.0 <= p <= 1.0:
        raise ValueError(f"config.model.image_dropout={p!r}: need a probability in [0, 1]")
    r = m.get("frame_noise_correlation", 0.0)
    if not (isinstance(r, (int, float)) and 0.0 <= r < 1.0):
        raise ValueError(f"config.model.frame_noise_correlation={r!r}: need the fraction of the noise's variance "
                         f"shared across frames, in [0, 1)")


def num_frames_for(c) -> int:
    """config.model.num_frames, else the frames of a `moving_shapes/{R}px-{T}f...` data name."""
    from jaxdiff.data.moving_shapes import frames_of

    if c.model.get("num_frames"):
        return int(c.model.num_frames)
    name = c.data.get("name", "") or ""
    frames = frames_of(name)
    if frames is None:
        raise ValueError(f"config.data.name={name!r} is not a moving_shapes config: set config.model.num_frames (the "
                         f"frames of the preview videos)")
    return frames


def _source_unet(m, vae_cfg: AutoencoderKLConfig, size: int, dtype) -> UNet2DCondition:
    """The image U-Net of the latent text-to-image run `m.init_from` (from its config.json)."""
    path = m.init_from
    run = sources.run_config(path, "unet")
    r = run.model
    if run.get("recipe") != "diffusion" or r.get("backbone") != "unet" or r.get("space") != "latent" \
            or "text_encoder" not in r:
        raise ValueError(f"config.model.init_from={path!r}: need a latent text-to-image diffusion run with backbone "
                         f"'unet'; that run has recipe={run.get('recipe')!r}, backbone={r.get('backbone')!r}, "
                         f"space={r.get('space')!r}, text encoder: {'text_encoder' in r}")
    if text_trainable(r):
        raise ValueError(f"config.model.init_from={path!r}: that run trained its text encoder with its U-Net, whose "
                         f"U-Net only fits that encoder; starting from such a run is not supported")
    channels = _vae_config(r.vae).latent_channels
    if channels != vae_cfg.latent_channels:
        raise ValueError(f"config.model.init_from={path!r}: that run's VAE has {channels} latent channels, "
                         f"config.model.vae has {vae_cfg.latent_channels}")
    # A model folder carries its own VAE and text encoder; a run names theirs.
    differ = [f"{part}.checkpoint" for part in ("vae", "text_encoder")
              if m[part].get("checkpoint", "") not in ({path} if sources.is_model_folder(path)
                                                       else {r[part].get("checkpoint", "")})]
    differ += [f for f, default in (("schedule", None), ("prediction_type", None), ("rescale_zero_terminal_snr", False))
               if r.get(f, default) != m.get(f, default)]
    if differ:
        log.warning("U-Net initialised from %s, whose %s differ from this run's", path, ", ".join(differ))
    return image_unet(r, channels, size, dtype)


def grafted(fresh, source):
    """The source U-Net's params in the tree of a fresh init of the same U-Net with jaxdiff-only parts added:
    params the source lacks (context layers, position gains) keep their init; conv_in's kernel gets zero weights for
    the added coordinate channels. Both the same function of their input, before training."""
    fresh, source = traverse_util.flatten_dict(fresh), traverse_util.flatten_dict(source)
    missing = sorted("/".join(p) for p in source if p not in fresh)
    if missing:
        raise ValueError(f"the source U-Net has params this one lacks: {', '.join(missing)}")
    out = {}
    for path, init in fresh.items():
        value = source.get(path, init)
        if path == ("conv_in", "kernel") and value.shape != init.shape:     # [kh, kw, in, out]: two more inputs
            value = jnp.concatenate([value, jnp.zeros((*value.shape[:2], 2, value.shape[3]), value.dtype)], axis=2)
        out[path] = value
    return traverse_util.unflatten_dict(out)


def pruned(plain, params):
    """The inverse of `grafted`: `params` of a U-Net with jaxdiff-only parts, without them, in the tree of the U-Net
    `plain` (the same config without those parts). Its function is the source's with those parts at zero (no
    position gains, closed context gates, zero coordinate weights), which changes it by as much as they learned."""
    shapes = traverse_util.flatten_dict(param_template(plain))
    params = traverse_util.flatten_dict(params)
    out = {}
    for path, shape in shapes.items():
        value = params[path]
        if path == ("conv_in", "kernel"):     # [kh, kw, in, out]: drop the coordinate inputs
            value = value[:, :, :shape.shape[2]]
        out[path] = value
    return traverse_util.unflatten_dict(out)


def video_unet(m, channels: int, size: int, dtype) -> tuple[TemporalUNet, UNet2DCondition | None]:
    """The video U-Net of a temporal_unet config's `model` on `channels`-channel latents of size x size,
    and the image U-Net it inflates: None from scratch (config.model.temporal_unet), else that of run
    `config.model.init_from` (read from its config.json; no weights are loaded)."""
    if m.get("temporal_unet"):
        t = m.temporal_unet.to_dict()
        fields = {"in_channels": channels + t.get("conditioning_frame_channels", 0), "out_channels": channels,
                  "sample_size": size}
        return TemporalUNet(TemporalUNetConfig(**{**t, **fields}), dtype=dtype), None
    unet = _source_unet(m, _vae_config(m.vae), size, dtype)
    return TemporalUNet(inflated_config(unet.config, **_temporal_overrides(m)), dtype=dtype), unet


def _temporal_overrides(m) -> dict:
    return m.temporal.to_dict() if m.get("temporal") else {}


def backbone(m, channels: int, size: int, dtype):
    """(the denoising network for config.model, None or initial(key, fresh) -> its initial params (plain
    arrays), given a fresh random init `fresh`: the init_from run's EMA U-Net, as it is or with added
    jaxdiff-only parts (unet, `grafted`), or inflated (temporal_unet))."""
    fields = {"in_channels": channels, "out_channels": channels, "sample_size": size}
    if m.backbone == "unet":
        net = image_unet(m, channels, size, dtype)
        if not m.get("init_from"):
            return net, None
        source = _source_unet(m, _vae_config(m.vae), size, dtype)
        differ = sorted(k for k, v in vars(net.config).items() if getattr(source.config, k) != v)
        if source.config.jaxdiff_only() or not set(differ) <= set(net.config.jaxdiff_only()):
            raise ValueError(f"config.model.init_from={m.init_from!r}: that run's U-Net differs from "
                             f"config.model.unet in {', '.join(differ)}; fine-tuning keeps the architecture "
                             f"(it may only add input_coordinates or context_layers to a U-Net without them)")
        weights = sources.ema_params(m.init_from, "unet")
        return net, lambda key, fresh: grafted(fresh, weights)
    if m.backbone == "dit":
        return DiT(DiTConfig(**{**m.dit.to_dict(), **fields}), dtype=dtype), None
    net, unet = video_unet(m, channels, size, dtype)
    if unet is None:
        return net, None
    weights = sources.ema_params(m.init_from, "unet")   # host arrays (init runs under a trace, where orbax cannot load)
    return net, lambda key, fresh: inflate(unet, weights, key, **_temporal_overrides(m))[1]


def build(c, spec) -> Task:
    m = c.model
    dtype = jnp.dtype(c.dtype)
    schedule = schedule_for(m)
    choice(m.backbone, BACKBONES, "model.backbone")
    latent = choice(m.space, SPACES, "model.space") == "latent"
    text = "text_encoder" in m
    video = m.backbone == "temporal_unet"
    if video:
        _check_video(c, spec, latent, text)
    elif m.get("frame_noise_correlation"):
        raise ValueError(f"config.model.frame_noise_correlation is for videos (backbone 'temporal_unet'), not "
                         f"backbone {m.backbone!r}")
    elif m.get("init_from") and not (m.backbone == "unet" and latent and text):
        raise ValueError(f"config.model.init_from={m.init_from!r} is for a latent text-conditioned backbone 'unet' "
                         f"(fine-tuning) or 'temporal_unet' (inflating an image U-Net), not {m.backbone!r} in "
                         f"{m.space!r} space{'' if text else ' without a text encoder'}")
    if text_trainable(m) and m.backbone != "unet":
        raise ValueError(f"config.model.text_encoder.trainable is for backbone 'unet', not {m.backbone!r}")
    size = spec.image_size

    vae = vae_cfg = None
    frozen_init = {}
    if latent:
        vae_cfg = _vae_config(m.vae)
        vae = AutoencoderKL(vae_cfg, dtype=dtype)
        frozen_init["vae"] = (vae, (jnp.zeros((1, size, size, vae_cfg.in_channels)),), m.vae.get("checkpoint", ""),
                              "vae")
        size //= vae_cfg.downsample_factor
    if text:
        text_cfg = text_config_for(m.text_encoder.to_dict(), spec)
        encoder = CLIPTextModel(text_cfg, dtype=dtype)
        frozen_init["text"] = (encoder, (jnp.zeros((1, spec.max_length), jnp.int32),),
                               m.text_encoder.get("checkpoint", ""), "text_encoder")
        empty = jnp.asarray(spec.empty_tokens, jnp.int32)

    frozen = {}
    for name, (module, args, ckpt, part) in frozen_init.items():
        key = jax.random.fold_in(jax.random.key(c.seed), len(frozen) + 1)
        abstract = jax.eval_shape(lambda k: init_boxed(module, k, *args), key)
        frozen[name] = _frozen(abstract, ckpt, part, f"{m.space} diffusion's {name}") or \
            init_boxed(module, key, *args)

    emphasized = emphasis_ids(m, spec) if text else None
    grounding = m.get("grounding_weight", 0.0)
    if not (isinstance(grounding, (int, float)) and grounding >= 0):
        raise ValueError(f"config.model.grounding_weight={grounding!r}: need a weight >= 0")
    if grounding and not (text and m.backbone == "unet"):
        raise ValueError(f"config.model.grounding_weight is for backbone 'unet' with a text encoder (its cross-attention "
                         f"maps), not backbone {m.backbone!r}{'' if text else ' without one'}")
    share = m.get("terminal_mean_share", 0.0)
    if not (isinstance(share, (int, float)) and 0 <= share <= 1):
        raise ValueError(f"config.model.terminal_mean_share={share!r}: need a share in [0, 1]")
    if share and not (text and m.get("rescale_zero_terminal_snr", False)):
        raise ValueError(f"config.model.terminal_mean_share={share} needs a text encoder"
                         f"{'' if text else ' (none configured)'} and rescale_zero_terminal_snr=True: "
                         f"only at SNR 0 is a caption's mean latent the best prediction")
    mirror = m.get("mirror_pairs", "")
    choice(mirror, MIRROR_PAIRS, "model.mirror_pairs")
    if mirror and (not text or mirror != ("reverse" if video else "flip") or c.batch_size % 2):
        raise ValueError(f"config.model.mirror_pairs={mirror!r} needs a text encoder, an even batch_size (got "
                         f"{c.batch_size}) and 'flip' for images or 'reverse' for videos (backbone {m.backbone!r}"
                         f"{'' if text else ', no text encoder'})")
    swaps = mirror_swaps(spec) if mirror else None
    text_start = frozen.pop("text") if text_trainable(m) else None   # the encoder's initial params (boxed)
    channels = vae_cfg.latent_channels if latent else 3
    net, initial = backbone(m, channels, size, dtype)
    ctx_dim = text_cfg.hidden_size if text else None
    # One example's shape: [h, w, C], or [T, h, w, C] for video (T only matters for previews).
    example = (num_frames_for(c), size, size, channels) if video else (size, size, channels)
    cond_channels = net.config.conditioning_frame_channels if video else 0

    def encode_text(params, frozen, tokens):
        text_params = split_params(m, params)[1] if text_start is not None else frozen["text"]
        return encoder.apply({"params": text_params}, tokens)[0]

    def per_frame(fn, x):
        """fn on images [N, H, W, C] applied to [..., H, W, C] (videos: every frame)."""
        y = fn(x.reshape(-1, *x.shape[-3:]))
        return y.reshape(*x.shape[:-3], *y.shape[1:])

    def to_latent(frozen, images, key=None):
        """Scaled latents of images (videos: per frame): posterior samples, or the posterior means without `key`."""
        def encode(x):
            mean, logvar = vae.apply({"params": frozen["vae"]}, x, method=vae.encode)
            return mean if key is None else sample_posterior(key, mean, logvar)
        return (per_frame(encode, images) - (vae_cfg.shift_factor or 0.0)) * vae_cfg.scaling_factor

    def from_latent(frozen, z):
        z = z / vae_cfg.scaling_factor + (vae_cfg.shift_factor or 0.0)
        return per_frame(lambda x: vae.apply({"params": frozen["vae"]}, x, method=vae.decode), z)

    if share:
        from jaxdiff.training.data import first_examples

        vae_frozen = {"vae": nn.meta.unbox(frozen["vae"])} if latent else None
        encode = jax.jit(lambda x: to_latent(vae_frozen, x)) if latent else np.asarray
        examples = m.get("terminal_mean_examples", 50_000)
        fingerprint = dict(data={k: c.data.get(k) for k in ("source", "name", "data_dir", "image_size", "max_length")},
                           examples=examples, empty=np.asarray(spec.empty_tokens).tolist(),
                           vae=vae_fingerprint(vae_cfg, vae_frozen["vae"]) if latent else None)
        table, means = cached_arrays(
            m.get("terminal_mean_cache", CAPTION_MEANS_CACHE), "caption_means", fingerprint,
            lambda: caption_means(first_examples(c.data, examples), encode, spec.empty_tokens))
        log.info("terminal mean targets: %d captions", len(table))
        frozen["caption_means"] = {"tokens": jnp.asarray(table), "means": jnp.asarray(means)}

    def init(key):
        x = jnp.zeros((1, *example))
        ctx = jnp.zeros((1, spec.max_length, ctx_dim)) if text else None
        boxed = lambda k: init_boxed(net, k, x, jnp.zeros((1,)), ctx)
        unet = boxed(key)
        if initial is not None:
            unet = rebox(initial(key, nn.meta.unbox(unet)), unet)
        return unet if text_start is None else {"unet": unet, "text": text_start}

    def loss(params, frozen, batch, key, step):
        k_post, k_drop, k_loss = jax.random.split(key, 3)
        if mirror:
            batch = mirrored(batch, mirror, swaps)
        x0 = batch["image"]
        if video and x0.ndim != 5:
            raise ValueError(f"config.model.backbone='temporal_unet' trains on videos [B, T, H, W, 3], but "
                             f"config.data (name={c.data.get('name')!r}) gives images of shape {x0.shape}")
        if latent:
            x0 = to_latent(frozen, x0, k_post)
        context = None
        if text:
            drop = jax.random.bernoulli(k_drop, m.caption_dropout, (x0.shape[0],))
            if mirror:   # a pair's captions are dropped together
                drop = pair_halves(drop)
            tokens = jnp.where(drop[:, None], empty[None], batch["tokens"])   # the captions the model sees
            context = encode_text(params, frozen, tokens)
        net_kwargs = {}
        if cond_channels:   # image-to-video: frame 0's clean latent, dropped independently of the caption
            keep = ~jax.random.bernoulli(jax.random.fold_in(k_drop, 1), m.get("image_dropout", 0.1), (x0.shape[0],))
            if mirror:   # and a pair's conditioning frames too
                keep = pair_halves(keep)
            net_kwargs = {"cond_frames": x0[:, 0], "cond_present": keep}
        unet_params = split_params(m, params)[0]
        apply_fn = lambda x, t, ctx: net.apply({"params": unet_params}, x, t, ctx, **net_kwargs)
        terminal = None
        if share:   # these examples: at pure noise, against their caption's mean latent
            index, found = caption_index(tokens, frozen["caption_means"]["tokens"])
            terminal = found & jax.random.bernoulli(jax.random.fold_in(k_drop, 2), share, found.shape)
            if cond_channels:
                terminal &= ~net_kwargs["cond_present"]
            x0 = jnp.where(terminal.reshape(-1, *[1] * (x0.ndim - 1)), frozen["caption_means"]["means"][index], x0)
        weights = None
        if emphasized is not None:   # captions holding an emphasis word count emphasis_weight times
            hit = jnp.isin(batch["tokens"], emphasized).any(axis=-1)
            weights = jnp.where(hit, float(m.emphasis_weight), 1.0)
        if not grounding:
            return denoising_loss(apply_fn, x0, k_loss, schedule, m, context, weights, terminal=terminal,
                                  paired=bool(mirror)), {}
        if "token_masks" not in batch:
            raise ValueError("config.model.grounding_weight needs batches with 'token_masks': set config.data.token_masks "
                             "to the latent side (the shapes data's objects give them)")
        sown = lambda x, t, ctx: net.apply({"params": unet_params}, x, t, ctx, mutable=["intermediates"])
        value, state = denoising_loss(sown, x0, k_loss, schedule, m, context, weights, has_aux=True, terminal=terminal,
                                      paired=bool(mirror))
        maps = jax.tree.leaves(state["intermediates"])     # every cross-attention's weights
        aligned = losses.grounding_loss(maps, batch["token_masks"], counted=~drop)
        return value + grounding * aligned, {"grounding": aligned}

    def sample(params, frozen, key):
        n = len(spec.preview_prompts) if text else 8
        correlation = m.get("frame_noise_correlation", 0.0)
        noise = diffusion.frame_correlated_noise(key, (n, *example), correlation)
        apply_fn = lambda x, t, ctx: net.apply({"params": split_params(m, params)[0]}, x, t, ctx)
        if text:
            context = encode_text(params, frozen, jnp.asarray(spec.tokenize(list(spec.preview_prompts))))
            uncond = encode_text(params, frozen, jnp.broadcast_to(empty, (n, empty.size)))
            model_fn = guidance.cfg(apply_fn, context, uncond, m.guidance_scale)
        else:
            model_fn = lambda x, t: apply_fn(x, t, None)
        x = samplers.sample(model_fn, schedule, noise, key=jax.random.fold_in(key, 1), method=m.sample_method,
                            steps=m.sample_steps, prediction_type=m.prediction_type,
                            noise_fn=functools.partial(diffusion.frame_correlated_noise, correlation=correlation,
                                                       axis=2))
        if latent:
            x = from_latent(frozen, x)
        x = jnp.clip(x / 2 + 0.5, 0.0, 1.0)
        if video:   # [N, T, H, W, 3] -> [N, H, T*W, 3]: each video's frames side by side
            x = x.transpose(0, 2, 1, 3, 4).reshape(n, x.shape[2], -1, x.shape[-1])
        return x

    return Task(init=init, loss=loss, frozen=frozen or None, sample=sample)
