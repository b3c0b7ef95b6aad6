"""Command line: `python -m dreambooth_core {demo,train,sample,prepare,class-images,token}`."""
from __future__ import annotations

import argparse
import sys
from typing import List, Optional

from .. import __version__
from ..config import (
    CROPS,
    GRADIENT_CHECKPOINTING,
    LORA_TARGETS,
    LR_SCHEDULES,
    MIXED_PRECISION,
    MODES,
    OPTIMIZERS,
    PRIOR_PASSES,
    ConfigError,
)

S = argparse.SUPPRESS
BOOL = argparse.BooleanOptionalAction


def _add_train_flags(p: argparse.ArgumentParser) -> None:
    """Every flag defaults to 'not given', so a --config file's value wins unless overridden."""
    g = p.add_argument_group("subject")
    g.add_argument("--instance-dir", default=S, help="folder of 3-30 photos of the subject")
    g.add_argument("--token", default=S, help="rare identifier that stays one token (default sks)")
    g.add_argument("--class-noun", default=S, help="the subject's class, e.g. dog")
    g.add_argument("--instance-prompt", default=S, help="caption template; {token} and {class} are filled in")
    g.add_argument("--class-prompt", default=S, help="class prompt template (default 'a photo of a {class}')")
    g.add_argument("--resolution", type=int, default=S, help="training resolution (default: the model's)")
    g.add_argument("--crop", choices=CROPS, default=S)
    g.add_argument("--flip", action=BOOL, default=S, help="mirror images at random (not for text or logos)")
    g.add_argument("--masked-loss", action=BOOL, default=S,
                   help="learn only the subject, not the photos' backgrounds: masks from the photos' alpha "
                        "channel (cut-outs with a transparent background)")
    g.add_argument("--mask-background-weight", type=float, default=S,
                   help="loss weight outside the mask with --masked-loss (default 0; 1 = no mask)")
    g = p.add_argument_group("model")
    g.add_argument("--model", default=S, help="'embedded' (default), a diffusers folder, or a .safetensors checkpoint")
    g.add_argument("--prediction-type", choices=("epsilon", "v_prediction"), default=S,
                   help="override the detected prediction type (SD2.x 768 models use v_prediction)")
    g = p.add_argument_group("prior preservation")
    g.add_argument("--prior", action=BOOL, default=S, help="class-specific prior-preservation loss (default on)")
    g.add_argument("--prior-weight", type=float, default=S, help="λ in L = L_instance + λ·L_class (default 1)")
    g.add_argument("--class-dir", default=S, help="your class images, or where generated ones are cached")
    g.add_argument("--num-class-images", type=int, default=S)
    g.add_argument("--class-steps", type=int, default=S)
    g.add_argument("--class-guidance", type=float, default=S)
    g.add_argument("--negative-prompt", default=S)
    g = p.add_argument_group("method")
    g.add_argument("--mode", choices=MODES, default=S, help="lora (default) or full fine-tune")
    g.add_argument("--rank", type=int, default=S)
    g.add_argument("--alpha", type=float, default=S)
    g.add_argument("--lora-conv", action=BOOL, default=S, help="also adapt the UNet's convolutions (LoCon)")
    g.add_argument("--lora-targets", choices=LORA_TARGETS, default=S,
                   help="modules of the transformer blocks that carry LoRA: transformer (default, kohya's set: "
                        "attention, proj_in/proj_out, feed-forward) or attention (to_q/to_k/to_v/to_out only, "
                        "as diffusers' script: faster, less memory)")
    g.add_argument("--train-text-encoder", action=BOOL, default=S)
    g = p.add_argument_group("optimisation")
    g.add_argument("--steps", type=int, default=S)
    g.add_argument("--learning-rate", "--lr", type=float, default=S)
    g.add_argument("--text-encoder-lr", type=float, default=S)
    g.add_argument("--lr-scheduler", choices=LR_SCHEDULES, default=S)
    g.add_argument("--lr-warmup-steps", type=int, default=S)
    g.add_argument("--batch-size", type=int, default=S, help="instance images per step per process "
                   "(as many class images are added with prior preservation)")
    g.add_argument("--gradient-accumulation", type=int, default=S)
    g.add_argument("--max-grad-norm", type=float, default=S)
    g.add_argument("--seed", type=int, default=S)
    g.add_argument("--min-snr-gamma", type=float, default=S)
    g.add_argument("--offset-noise", type=float, default=S)
    g.add_argument("--caption-dropout", type=float, default=S,
                   help="share of instance samples trained with the empty caption (0: off; 0.05-0.1 typical)")
    g.add_argument("--gradient-checkpointing", nargs="?", const="full", choices=GRADIENT_CHECKPOINTING, default=S,
                   help="recompute activations in the backward pass: full (the default when given without a "
                        "value; least memory, slowest), attention (only the transformer blocks: most of the "
                        "saving, less of the cost), attention-hires (only the highest-resolution transformer "
                        "blocks: over half of that saving for less of its cost) or off")
    g.add_argument("--no-gradient-checkpointing", dest="gradient_checkpointing", action="store_const", const="off",
                   default=S)
    g.add_argument("--prior-pass", choices=PRIOR_PASSES, default=S,
                   help="with prior preservation: joint (default; subject and class images in one pass) or "
                        "separate (one after the other: the same result, about half the activation memory)")
    g.add_argument("--mixed-precision", choices=MIXED_PRECISION, default=S, help="fp16/bf16 on CUDA")
    g.add_argument("--optimizer", choices=OPTIMIZERS, default=S,
                   help="adamw (default), adamw8bit (8-bit state, needs bitsandbytes and a CUDA GPU) or adafactor "
                        "(factored state, least memory, no extra package)")
    g = p.add_argument_group("outputs")
    g.add_argument("--output-dir", "--output", default=S)
    g.add_argument("--save-name", default=S)
    g.add_argument("--save-precision", choices=("fp16", "bf16", "fp32"), default=S)
    g.add_argument("--checkpoint-every", type=int, default=S)
    g.add_argument("--resume", action=BOOL, default=S, help="continue from output-dir/checkpoint.safetensors")
    g.add_argument("--sample-every", type=int, default=S)
    g.add_argument("--sample-prompts", nargs="+", default=S)
    g.add_argument("--thumbnail-steps", type=int, default=S,
                   help="sampling steps of the picture stored in the saved file (default 20; 0: the first photo)")


def parser() -> argparse.ArgumentParser:
    root = argparse.ArgumentParser(prog="python -m dreambooth_core",
                                   description="DreamBooth training (Ruiz et al. 2022) with prior preservation.")
    root.add_argument("--version", action="version", version=__version__)
    sub = root.add_subparsers(dest="command", required=True)

    p = sub.add_parser("demo", help="teach the embedded model a new subject and show it in new contexts")
    p.add_argument("--output", default="demo_out", help="folder for the grid, LoRA, config and loss curve")
    p.add_argument("--steps", type=int, default=None, help="training steps (default: the demo's tuned value)")

    p = sub.add_parser("train", help="train DreamBooth on your own images")
    p.add_argument("--config", help="TOML or JSON file with the same settings (flags override it)")
    p.add_argument("--force-token", action="store_true", help="train even if the token splits")
    p.add_argument("--concepts", dest="concepts_file", default=S, metavar="FILE",
                   help="several subjects in one run: a JSON (or TOML) list of {instance_dir, token, class_noun, "
                        "repeats, loss_weight, class_dir}, folders relative to the file; replaces --instance-dir, "
                        "--token and --class-noun (README: several subjects in one run)")
    _add_train_flags(p)

    p = sub.add_parser("sample", help="render prompts (or a built-in prompt set) with a trained LoRA")
    p.add_argument("--model", default="embedded")
    p.add_argument("--lora", help="LoRA .safetensors to apply")
    p.add_argument("--lora-scale", type=float, default=1.0)
    p.add_argument("--prompts", nargs="+", help="prompts; {token} and {class} are filled in")
    p.add_argument("--prompt-set", default=None, help="built-in set: all, recontextualization, art_renditions, "
                   "property_modification, accessories, class_hybrids, product_shots")
    p.add_argument("--token", default=None, help="identifier (default: read from the LoRA's metadata)")
    p.add_argument("--class-noun", default=None)
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1])
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--output", default="samples.png")

    p = sub.add_parser("prepare", help="clean, crop and caption instance images; write a report")
    p.add_argument("input_dir")
    p.add_argument("--output", required=True)
    p.add_argument("--token", default="sks")
    p.add_argument("--class-noun", default="")
    p.add_argument("--caption-template", default="a photo of {token} {class}")
    p.add_argument("--resolution", type=int, default=512)
    p.add_argument("--crop", choices=CROPS, default="center")
    p.add_argument("--flip", action=BOOL, default=False)
    p.add_argument("--recursive", action=BOOL, default=False)
    p.add_argument("--masked-loss", action=BOOL, default=False,
                   help="read subject masks from the alpha channel (written to OUTPUT/masks/)")
    p.add_argument("--min-size", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("class-images", help="generate (or top up) cached class images for prior preservation")
    p.add_argument("--model", default="embedded")
    p.add_argument("--class-noun", default=None)
    p.add_argument("--class-prompt", default=None)
    p.add_argument("--count", type=int, default=100)
    p.add_argument("--class-dir", default=None, help="cache folder (default: ~/.cache/dreambooth/class_images)")
    p.add_argument("--steps", type=int, default=25)
    p.add_argument("--guidance", type=float, default=5.0)
    p.add_argument("--sampler", default="dpmpp_2m")
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--resolution", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)

    p = sub.add_parser("eval", help="the paper's DreamBench protocol in miniature, on the toy world")
    p.add_argument("--multi", action="store_true",
                   help="two subjects in one image instead: LoRA stacking, regional composition and joint "
                        "training (its options: eval --multi --help)")
    p.add_argument("--quick", action="store_true", help="fewer samples and steps (6-14 min on 2 CPU cores)")
    p.add_argument("--output", default="eval_out", help="folder for results.json and the sample sheet")
    p.add_argument("--subjects", type=int, default=None, help="evaluate only the first N subjects")
    p.add_argument("--workers", type=int, default=None,
                   help="subjects evaluated in parallel processes (default: one per CPU core)")
    p.add_argument("--steps", type=int, default=None,
                   help="DreamBooth steps per run (default: 250, or 200 with --quick)")
    p.add_argument("--frozen-text-encoder", action="store_true",
                   help="train the UNet's LoRA only (the default also trains the text encoder's)")
    p.add_argument("--masked-loss", action="store_true",
                   help="learn only the subject (masks read off the renders); the default trains on the whole photos")
    p.add_argument("--caption-dropout", type=float, default=0.0,
                   help="share of the subject's photos trained with the empty caption (default 0)")

    p = sub.add_parser("token", help="check or propose a rare identifier token")
    tsub = p.add_subparsers(dest="token_command", required=True)
    c = tsub.add_parser("check", help="how the model's tokenizer splits WORD")
    c.add_argument("word")
    c.add_argument("--model", default="embedded")
    c.add_argument("--force", action="store_true", help="only warn when the word splits")
    s = tsub.add_parser("suggest", help="propose rare single tokens, as the paper does")
    s.add_argument("--model", default="embedded")
    s.add_argument("-n", type=int, default=5)
    s.add_argument("--seed", type=int, default=0)
    return root


def main(argv: Optional[List[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["eval"] and "--multi" in argv:  # two subjects in one image: its own flags (eval --multi -h)
        from ..evaluation.multi import main as multi_main

        return multi_main(argv[1:])
    args = parser().parse_args(argv)
    from . import commands

    try:
        return getattr(commands, "cmd_" + args.command.replace("-", "_"))(args)
    except (ConfigError, ValueError, FileNotFoundError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except RuntimeError as exc:  # e.g. training diverged: the message says what to change
        print(f"error: {exc}", file=sys.stderr)
        return 3
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130
