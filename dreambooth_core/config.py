"""Training configuration: one dataclass, filled from defaults, a TOML/JSON file and flags."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Any, Mapping, Optional

MODES = ("lora", "full")
LR_SCHEDULES = ("constant", "constant_with_warmup", "linear", "cosine")
MIXED_PRECISION = ("no", "fp16", "bf16")
CROPS = ("center", "random", "bucket")
# Which Linear/Conv modules of the transformer blocks carry LoRA: "transformer" is kohya's set
# (attention projections, proj_in/proj_out, feed-forward); "attention" only the attention
# projections (to_q/to_k/to_v/to_out.0; q/k/v/out_proj in the text encoder), the set diffusers'
# DreamBooth script adapts: fewer saved activations and less work per step.
LORA_TARGETS = ("transformer", "attention")
# What gradient checkpointing recomputes in the backward pass: "attention-hires" the transformer
# blocks of the highest-resolution level that has them, "attention" every transformer block
# (where activations pile up), "full" every block (least memory, slowest).
GRADIENT_CHECKPOINTING = ("off", "attention-hires", "attention", "full")
OPTIMIZERS = ("adamw", "adamw8bit", "adafactor")  # training/optimizers.py builds them
# How a step with prior preservation runs its two parts: "joint" one forward of instance and class
# images together (fastest), "separate" the instance part's forward and backward, then the class
# part's: the same gradient, with one part's activations in memory at a time.
PRIOR_PASSES = ("joint", "separate")


class ConfigError(ValueError):
    pass


@dataclass
class TrainConfig:
    # subject
    instance_dir: Optional[str] = None
    token: str = "sks"
    class_noun: str = ""
    instance_prompt: Optional[str] = None  # default: "a photo of {token} {class}"
    class_prompt: Optional[str] = None  # default: "a photo of a {class}"
    resolution: Optional[int] = None  # default: the model's native resolution
    crop: str = "center"
    flip: bool = False
    masked_loss: bool = False  # learn only the subject: masks from the photos' alpha channel (masks.py)
    mask_background_weight: float = 0.0  # loss weight outside the subject mask (1: as without a mask)
    # Share of instance samples trained with the empty caption (kohya's caption_dropout_rate), so that
    # the unconditional side of guidance knows the subject too. 0: off. On the toy model it moved no
    # eval target the right way (README, Quality evaluation); kept for models where users find it does.
    caption_dropout: float = 0.0
    # Several subjects in one run (dataset/concepts.py): a list of {instance_dir, token, class_noun, repeats,
    # loss_weight, class_dir}. Empty: the one subject of instance_dir, token and class_noun above. Given, it
    # replaces them (token and class_noun then name the first subject: previews and the file's picture).
    concepts: list = field(default_factory=list)
    # model
    model: str = "embedded"
    prediction_type: Optional[str] = None
    # prior preservation
    prior: bool = True
    prior_weight: float = 1.0
    class_dir: Optional[str] = None
    num_class_images: int = 100
    class_steps: int = 25
    class_guidance: float = 5.0
    class_sampler: str = "dpmpp_2m"
    negative_prompt: str = ""
    # method
    mode: str = "lora"
    rank: int = 4
    alpha: Optional[float] = None  # default: rank (scale 1)
    lora_conv: bool = False
    lora_targets: str = "transformer"
    train_text_encoder: bool = False
    # optimisation
    steps: int = 400
    learning_rate: Optional[float] = None  # default: 1e-4 (LoRA), 5e-6 (full)
    text_encoder_lr: Optional[float] = None  # default: learning_rate
    lr_scheduler: str = "constant"
    lr_warmup_steps: int = 0
    batch_size: int = 1
    gradient_accumulation: int = 1
    max_grad_norm: float = 1.0
    weight_decay: float = 1e-2
    seed: int = 0
    min_snr_gamma: Optional[float] = None
    offset_noise: float = 0.0
    gradient_checkpointing: str = "off"  # also True (= "full") / False (= "off"), as before
    prior_pass: str = "joint"  # PRIOR_PASSES
    mixed_precision: str = "no"
    optimizer: str = "adamw"  # adamw | adamw8bit (bitsandbytes) | adafactor: training/optimizers.py
    # outputs
    output_dir: str = "output"
    save_name: str = "dreambooth_lora"
    save_precision: str = "fp16"
    checkpoint_every: int = 0  # 0: only on cancel, on divergence and at the end
    resume: bool = False
    sample_every: int = 0
    sample_prompts: list = field(default_factory=list)
    thumbnail_steps: int = 20  # the saved file's picture: a sample with this many steps (0: the first photo)

    def __post_init__(self) -> None:
        self.gradient_checkpointing = _checkpointing_scope(self.gradient_checkpointing)

    # -- derived ------------------------------------------------------------------------------
    def resolved_instance_prompt(self) -> str:
        template = self.instance_prompt or "a photo of {token} {class}"
        return template.replace("{token}", self.token).replace("{class}", self.class_noun).strip()

    def resolved_class_prompt(self) -> str:
        template = self.class_prompt or "a photo of a {class}"
        return template.replace("{class}", self.class_noun).strip()

    def resolved_lr(self) -> float:
        if self.learning_rate is not None:
            return self.learning_rate
        return 1e-4 if self.mode == "lora" else 5e-6

    def validate(self) -> "TrainConfig":
        def bad(name: str, why: str) -> None:
            raise ConfigError(f"{name}: {why}")

        if self.mode not in MODES:
            bad("mode", f"{self.mode!r} is not one of {MODES}")
        if self.lr_scheduler not in LR_SCHEDULES:
            bad("lr_scheduler", f"{self.lr_scheduler!r} is not one of {LR_SCHEDULES}")
        if self.mixed_precision not in MIXED_PRECISION:
            bad("mixed_precision", f"{self.mixed_precision!r} is not one of {MIXED_PRECISION}")
        if self.lora_targets not in LORA_TARGETS:
            bad("lora_targets", f"{self.lora_targets!r} is not one of {LORA_TARGETS}")
        self.gradient_checkpointing = _checkpointing_scope(self.gradient_checkpointing)
        if self.gradient_checkpointing not in GRADIENT_CHECKPOINTING:
            bad("gradient_checkpointing", f"{self.gradient_checkpointing!r} is not one of {GRADIENT_CHECKPOINTING} "
                                          "(or true/false)")
        if self.prior_pass not in PRIOR_PASSES:
            bad("prior_pass", f"{self.prior_pass!r} is not one of {PRIOR_PASSES}")
        if self.optimizer not in OPTIMIZERS:
            bad("optimizer", f"{self.optimizer!r} is not one of {OPTIMIZERS}")
        if self.crop not in CROPS:
            bad("crop", f"{self.crop!r} is not one of {CROPS}")
        if self.save_precision not in ("fp16", "bf16", "fp32"):
            bad("save_precision", "use fp16, bf16 or fp32")
        if self.thumbnail_steps < 0:
            bad("thumbnail_steps", "must be 0 (the file shows the first instance photo) or more sampling steps")
        for name in ("steps", "rank", "batch_size", "gradient_accumulation"):
            if getattr(self, name) < 1:
                bad(name, "must be at least 1")
        if not 0.0 <= self.mask_background_weight <= 1.0:
            bad("mask_background_weight", "must be between 0 (learn only the subject) and 1 (as without a mask)")
        if not 0.0 <= self.caption_dropout < 1.0:
            bad("caption_dropout", "must be at least 0 (off) and below 1 (every caption dropped would never "
                                   "bind the token); 0.05-0.1 is typical")
        if self.learning_rate is not None and not self.learning_rate > 0:
            bad("learning_rate", "must be positive")
        if self.resolution is not None and (self.resolution < 8 or self.resolution % 8):
            bad("resolution", "must be a positive multiple of 8")
        if self.prior and not (self.class_noun or self.class_prompt or self.concepts):  # concepts: checked each
            bad("class_noun", "prior preservation needs the subject's class noun (e.g. 'dog'), or use --no-prior")
        if "{token}" in (self.instance_prompt or "") or self.instance_prompt is None:
            if not self.token.strip():
                bad("token", "the identifier token is empty")
        elif self.token not in self.instance_prompt:
            bad("instance_prompt", f"does not contain the identifier {self.token!r}; the subject would not "
                                   "be bound to it")
        if self.num_class_images < 1 and self.prior:
            bad("num_class_images", "must be at least 1 with prior preservation")
        return self

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_mapping(cls, data: Mapping[str, Any], source: str = "config") -> "TrainConfig":
        known = {f.name for f in fields(cls)}
        normalised = {k.replace("-", "_"): v for k, v in data.items()}
        unknown = sorted(set(normalised) - known)
        if unknown:
            raise ConfigError(f"{source}: unknown setting(s) {', '.join(unknown)}")
        return cls(**normalised)


def _checkpointing_scope(value: "bool | str") -> str:
    """The setting was a boolean before it had scopes: True/False (old flags, config files, the
    ComfyUI node) keep meaning what they meant, "full" and "off"."""
    if isinstance(value, bool):
        return "full" if value else "off"
    return value


def read_config_file(path: str | Path) -> dict:
    """A TOML or JSON file of TrainConfig fields (a [train] table in TOML is also accepted)."""
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"--config {path}: no such file")
    text = p.read_text(encoding="utf-8")
    try:
        if p.suffix.lower() == ".json":
            data = json.loads(text)
        else:
            try:
                import tomllib
            except ModuleNotFoundError:  # Python 3.10
                import tomli as tomllib  # type: ignore[no-redef]
            data = tomllib.loads(text)
    except ValueError as exc:
        raise ConfigError(f"--config {path}: cannot parse ({exc})") from exc
    if isinstance(data.get("train"), dict):
        data = data["train"]
    return data


def build_config(args: Any) -> TrainConfig:
    """The config of a `train` command line: its --config file (if any), overridden by its flags."""
    data = read_config_file(args.config) if getattr(args, "config", None) else {}
    names = {f.name for f in fields(TrainConfig)}
    data.update({k: v for k, v in vars(args).items() if k in names})
    return TrainConfig.from_mapping(data, source=getattr(args, "config", None) or "flags").validate()
