"""The diffusion recipe's `config.model`, typed: every field and its default in one place.

A config file gets all fields from `model_fields(**overrides)` (so any of them is a command-line flag);
`ModelConfig.of(config.model)` reads them back, refusing unknown fields and impossible combinations
with one-line errors. The objective's fields (`Objective`) sit beside these, flat.
"""
from __future__ import annotations

import dataclasses

from jaxdiff.models.layers import REMAT_POLICIES
from jaxdiff.training.config import choice
from jaxdiff.training.recipes.diffusion.objective import Objective

BACKBONES = ("unet", "dit", "mmdit", "temporal_unet", "wan")
VIDEO_BACKBONES = ("temporal_unet", "wan")
SPACES = ("pixel", "latent")
TRANSFORMERS = ("dit", "mmdit", "wan")   # backbones of transformer blocks, which `remat` checkpoints
# sub-configs: a dict of the module config's fields, or absent
SUB_CONFIGS = ("unet", "dit", "mmdit", "temporal_unet", "wan", "temporal", "vae", "text_encoder", "t5")


@dataclasses.dataclass(frozen=True)
class ModelConfig:
    """backbone: unet | dit | mmdit | temporal_unet | wan, whose fields are in `unet` / `dit` / `mmdit` /
    `temporal_unet` / `wan` (UNetConfig, DiTConfig, SD3Config, TemporalUNetConfig, WanConfig; in/out channels and
    sample size come from the data and the VAE; an MMDiT's text widths from the text encoder, whose states are its
    text tokens and whose pooled state its pooled embedding; a Wan video transformer's text_dim from the text
    encoder's states, its context; it trains with flow matching, text-to-video only).
    space: pixel | latent; vae: AutoencoderKLConfig fields + `checkpoint` (a vae run's workdir or a model
    folder that jaxdiff.training.export wrote, such as jaxdiff/assets/shapes). text_encoder: CLIPTextConfig
    fields + `checkpoint` (a clip run or model folder); absent: unconditional. A frozen part without a
    checkpoint is randomly initialised (for tests and smoke runs) and says so.
    t5 (backbones mmdit and wan): T5Config fields of a bidirectional T5 encoder trained from scratch with the
    denoiser, over the captions' vocabulary; its params train beside the network's (`{"denoiser": ..., "t5": ...}`).
    An MMDiT reads its states as the text stream, the frozen CLIP (text_encoder) giving only the pooled embedding
    (Flux's split of the two encoders); a Wan transformer cross-attends to them instead of CLIP's (Wan's UMT5
    role: padding masked in the encoder and zeroed in its states), with no text_encoder.
    init_from: a latent text-to-image run or model folder whose EMA U-Net or MMDiT (and trained T5) is the start:
    fine-tuned as it is (backbone unet or mmdit, same config; conditioning channels it did not read, such as
    config.data.layout's map, are added with zero weights), or inflated into a video U-Net (backbone temporal_unet; `temporal`
    holds the video-only TemporalUNetConfig fields); for backbone wan, a Wan run or model folder, fine-tuned likewise.
    caption_dropout: the share of captions replaced by the empty one (classifier-free guidance); layout_dropout
    (config.data.layout): the share of examples whose layout map is zeroed, independently (so the model also
    draws from the caption alone);
    emphasis_words / emphasis_weight: examples whose caption holds one of these words weigh emphasis_weight
    times the others in the loss. image_dropout (image-to-video): the share of examples trained without their
    conditioning frame. num_frames: frames of the preview videos (default: from a moving_shapes data name).
    sample_*, guidance_scale: the preview grids' sampler.
    remat: activation checkpointing of a transformer backbone's blocks under a policy of REMAT_POLICIES ('' off):
    the backward pass recomputes what the policy does not keep."""
    backbone: str = "unet"
    space: str = "latent"
    unet: dict | None = None
    dit: dict | None = None
    mmdit: dict | None = None
    temporal_unet: dict | None = None
    wan: dict | None = None
    temporal: dict | None = None
    init_from: str = ""
    vae: dict | None = None
    text_encoder: dict | None = None
    t5: dict | None = None
    caption_dropout: float = 0.1
    layout_dropout: float = 0.1
    emphasis_words: tuple = ()
    emphasis_weight: float = 1.0
    image_dropout: float = 0.1
    num_frames: int = 0
    sample_method: str = "dpmpp_2m"
    sample_steps: int = 25
    guidance_scale: float = 4.0
    remat: str = ""
    objective: Objective = Objective()

    def __post_init__(self):
        choice(self.backbone, BACKBONES, "model.backbone")
        choice(self.space, SPACES, "model.space")
        choice(self.remat, REMAT_POLICIES, "model.remat")
        if self.remat and self.backbone not in TRANSFORMERS:
            raise ValueError(f"config.model.remat={self.remat!r} is for the transformer backbones "
                             f"({', '.join(TRANSFORMERS)}), not {self.backbone!r}")
        if self.backbone != "temporal_unet" and getattr(self, self.backbone) is None:   # (an inflated one has none)
            raise ValueError(f"config.model.backbone={self.backbone!r} needs config.model.{self.backbone} (its fields)")
        if self.backbone == "mmdit" and self.text_encoder is None:
            raise ValueError("config.model.backbone='mmdit' needs config.model.text_encoder (its text stream, or "
                             "beside config.model.t5 its pooled embedding)")
        if self.t5 is not None:
            self._check_t5()
        if self.latent and self.vae is None:
            raise ValueError("config.model.space='latent' needs config.model.vae")
        for name in ("caption_dropout", "layout_dropout", "image_dropout"):
            p = getattr(self, name)
            if not (isinstance(p, (int, float)) and 0.0 <= p <= 1.0):
                raise ValueError(f"config.model.{name}={p!r}: need a probability in [0, 1]")
        if not (isinstance(self.emphasis_weight, (int, float)) and self.emphasis_weight > 0):
            raise ValueError(f"config.model.emphasis_weight={self.emphasis_weight!r}: need a positive weight")
        if self.video:
            self._check_video()
        elif self.objective.frame_noise_correlation:
            raise ValueError(f"config.model.frame_noise_correlation is for videos (backbone 'temporal_unet' or "
                             f"'wan'), not backbone {self.backbone!r}")
        elif self.init_from and not (self.backbone in ("unet", "mmdit") and self.latent and self.text):
            raise ValueError(f"config.model.init_from={self.init_from!r} is for a latent text-conditioned backbone "
                             f"'unet' or 'mmdit' (fine-tuning) or 'temporal_unet' (inflating an image U-Net), not "
                             f"{self.backbone!r} in {self.space!r} space{'' if self.text else ' without a text encoder'}")

    def _check_t5(self) -> None:
        if self.backbone == "wan" and self.text_encoder is not None:
            raise ValueError("config.model.t5 on backbone 'wan' replaces config.model.text_encoder (the transformer "
                             "cross-attends to one encoder's states): leave text_encoder out")
        if self.backbone not in ("mmdit", "wan"):
            raise ValueError(f"config.model.t5 (a trained T5 text encoder) is for backbones 'mmdit' and 'wan', not "
                             f"{self.backbone!r}")

    def _check_video(self) -> None:
        what = f"config.model.backbone={self.backbone!r}"
        if not self.latent:
            raise ValueError(f"{what} trains in a VAE's latent space only: config.model.space={self.space!r} must be "
                             f"'latent'")
        if not self.text:
            raise ValueError(f"{what} needs config.model.text_encoder (the video model's cross-attention needs a "
                             f"text context{'; or config.model.t5 for wan' if self.backbone == 'wan' else ''})")
        if self.backbone == "wan":
            self._check_wan(what)
            return
        if bool(self.temporal_unet) == bool(self.init_from):
            raise ValueError(f"{what} needs exactly one of config.model.temporal_unet (a video U-Net from scratch) and "
                             f"config.model.init_from (a latent text-to-image run to inflate); got "
                             f"{'both' if self.temporal_unet else 'neither'}")
        if self.temporal_unet and self.temporal:
            raise ValueError("config.model.temporal (overrides of an inflated U-Net) goes with config.model.init_from; "
                             "from scratch put those fields into config.model.temporal_unet")

    def _check_wan(self, what: str) -> None:
        if self.temporal:
            raise ValueError(f"{what}: config.model.temporal (overrides of an inflated image U-Net) is for "
                             f"'temporal_unet'; a Wan transformer's fields are config.model.wan")
        if self.objective.prediction_type != "flow":
            raise ValueError(f"{what} trains with flow matching: config.model.prediction_type="
                             f"{self.objective.prediction_type!r} must be 'flow'")
        image = sorted(set(self.wan) & {"image_dim", "added_kv_proj_dim", "pos_embed_seq_len"})
        if image:
            raise ValueError(f"config.model.wan.{image[0]}: the recipe trains text-to-video Wan transformers; "
                             f"image-to-video fields are not supported")

    @property
    def latent(self) -> bool:
        return self.space == "latent"

    @property
    def text(self) -> bool:
        return self.text_encoder is not None or self.t5 is not None

    @property
    def video(self) -> bool:
        return self.backbone in VIDEO_BACKBONES

    @classmethod
    def of(cls, model) -> "ModelConfig":
        """A config's `model` (ConfigDict or dict) -> ModelConfig; an unknown field is an error naming it."""
        model = model.to_dict() if hasattr(model, "to_dict") else dict(model)
        objective_fields = {f.name for f in dataclasses.fields(Objective)}
        own = {f.name for f in dataclasses.fields(cls)} - {"objective"}
        unknown = sorted(set(model) - own - objective_fields)
        if unknown:
            raise ValueError(f"config.model.{unknown[0]}: unknown field of the diffusion recipe; fields: "
                             f"{', '.join(sorted(own | objective_fields))}")
        fields = {k: v for k, v in model.items() if k in own}
        fields["emphasis_words"] = tuple(fields.get("emphasis_words", ()))
        for name in SUB_CONFIGS:
            if fields.get(name) is not None:
                fields[name] = dict(fields[name])
        return cls(**fields, objective=Objective.of(model))


def model_fields(**overrides) -> dict:
    """Every field of the diffusion recipe's `config.model` with its default, updated by `overrides`; the
    sub-configs only where given."""
    defaults = {f.name: f.default for f in dataclasses.fields(ModelConfig)
                if f.name != "objective" and f.name not in SUB_CONFIGS}
    fields = {**defaults, **dataclasses.asdict(Objective()), **overrides}
    unknown = sorted(set(fields) - set(defaults) - set(dataclasses.asdict(Objective())) - set(SUB_CONFIGS))
    if unknown:
        raise ValueError(f"model_fields: unknown field {unknown[0]!r}")
    return fields
