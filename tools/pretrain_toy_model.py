"""Pretrain the embedded default model on the toy world (a one-time job; resumable).

    python tools/pretrain_toy_model.py --work /tmp/toy-pretrain

The VAE is pixel space (identity weights, see make_pixel_vae). The CLIP text encoder first learns
to state each caption's attributes (pretrain_text_encoder) and is then frozen, as Stable
Diffusion's CLIP is; the UNet trains on captioned scenes (v-prediction, cosine schedule, offset
noise, caption dropout for classifier-free guidance, EMA weights). With ε-prediction the loss hardly
rewards predicting the image at low SNR, and after 2,000 steps samples still took their background
colour from the starting noise; v-prediction asks for the image there directly. Every
`--save-every` steps it writes a checkpoint to --work and can be restarted with the same command.
At the end it writes the EMA weights, in fp16, as a diffusers folder to --out and prints how well
the model follows prompts (background colour, object colour and shape accuracy on probe prompts).

The shipped model was made in three stages (its pretraining_log.json records them):

    python tools/pretrain_toy_model.py --work /tmp/stage1 --out /tmp/stage1-model
    python tools/pretrain_toy_model.py --work /tmp/stage2 --init-from /tmp/stage1-model \
        --out /tmp/stage2-model --steps 4000 --lr 5e-4 --bare-captions 0.15

The second stage continues the first's UNet (frozen text encoder unchanged) with 15 % of captions
the bare class noun: after stage 1 the model drew 'a photo of a star' as a ragged many-coloured
blob, and those are exactly the class images DreamBooth's prior preservation trains on. A third
stage teaches the frozen text encoder to carry words that no caption used (the identifier, see
teach_new_words), the UNet unchanged:

    python tools/pretrain_toy_model.py --work /tmp/stage3 --init-from /tmp/stage2-model \
        --new-words 600 --steps 0
"""
from __future__ import annotations

import argparse
import json
import math
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from dreambooth_core.training import checkpoint, objective
from dreambooth_core.embedded import model as embedded, toyworld
from dreambooth_core import fileio  # noqa: E402


def to_tensor(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float() / 127.5 - 1


def level_sizes(unet_config: dict) -> list:
    """The latent resolution of each UNet level, highest first."""
    return [unet_config["sample_size"] >> i for i in range(len(unet_config["block_out_channels"]))]


def joined(sizes) -> str:
    return ",".join(map(str, sizes))


def heads_of(config: dict) -> tuple:
    """A UNet config's attention heads at each level, highest resolution first."""
    heads = config["attention_head_dim"]  # diffusers' name for the number of heads
    return tuple(heads) if isinstance(heads, (list, tuple)) else (heads,) * len(config["block_out_channels"])


def default_heads() -> tuple:
    return heads_of(embedded.UNET_CONFIG)


# The pooled prompt added to the time embedding (diffusers' TextTimeEmbedding) and applied as a
# scale and shift in every res-block: the shipped UNet's res-blocks at 32x32 and 16x16 see the
# prompt only through what its 8x8 attention passes up, so what DreamBooth teaches them reaches
# every prompt alike.
POOLED_PROMPT = dict(addition_embed_type="text", addition_embed_type_num_heads=8,
                     resnet_time_scale_shift="scale_shift")


def unet_config(cross_attention: tuple, heads: tuple | None = None, pooled: bool = False) -> dict:
    """The embedded UNet's layout with cross-attention at the given latent resolutions (the shipped
    model: 8 only; Stable Diffusion has it at every level but the lowest-resolution one) and `heads`
    attention heads per level (default: the shipped 8 each). At 32x32 the shipped 8 heads of 32
    channels are 4 wide, and torch's CPU flash-attention kernel then runs a pass about 3x slower
    than with one head."""
    sizes = level_sizes(embedded.UNET_CONFIG)
    unknown = set(cross_attention) - set(sizes)
    if unknown:
        raise SystemExit(f"--cross-attention {joined(sorted(unknown))}: the UNet's levels are {joined(sizes)}")
    heads = tuple(heads or default_heads())
    channels = embedded.UNET_CONFIG["block_out_channels"]
    if len(heads) != len(sizes) or any(n < 1 or c % n for n, c in zip(heads, channels)):
        raise SystemExit(f"--attention-heads {joined(heads)}: give one count per UNet level ({joined(sizes)}, "
                         f"highest first), each dividing that level's channels ({joined(channels)})")
    down = tuple("CrossAttnDownBlock2D" if r in cross_attention else "DownBlock2D" for r in sizes)
    up = tuple("CrossAttnUpBlock2D" if r in cross_attention else "UpBlock2D" for r in reversed(sizes))
    config = dict(embedded.UNET_CONFIG, down_block_types=down, up_block_types=up)
    if heads != default_heads():
        config["attention_head_dim"] = heads
    if pooled:
        config.update(POOLED_PROMPT)
    return config


def build_models(seed: int, cross_attention: tuple = (8,), heads: tuple | None = None, pooled: bool = False):
    from diffusers import AutoencoderKL, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    torch.manual_seed(seed)
    vae = AutoencoderKL(**embedded.VAE_CONFIG)
    unet = UNet2DConditionModel(**unet_config(cross_attention, heads, pooled))
    text_encoder = CLIPTextModel(CLIPTextConfig(**embedded.TEXT_ENCODER_CONFIG))
    tokenizer = embedded.clip_tokenizer()
    return vae, unet, text_encoder, tokenizer


@torch.no_grad()
def make_pixel_vae(vae, big: float = 256.0, lift: float = 20.0) -> None:
    """Set the AutoencoderKL's weights so that encode and decode are the identity.

    Every resnet's last convolution is zero, so each block passes its input through. What is
    left is conv_in → GroupNorm(1 group) → SiLU → conv_out at both ends: conv_in writes the pixel
    as (x, -x), which has mean 0, plus two constant channels ±`big` that fix the group's standard
    deviation at ~big/2 whatever the image (relative error < 3/big²); the norm's weight undoes
    that scale, its bias lifts the values to ~`lift` where SiLU(y) = y to 1e-7, and conv_out
    subtracts the lift again. `big` stays small enough for the variance to fit in fp16.
    """
    for p in vae.parameters():
        p.zero_()
    n = vae.config.in_channels
    for coder in (vae.encoder, vae.decoder):
        conv_in = coder.conv_in
        for i in range(n):
            conv_in.weight[i, i, 1, 1] = 1.0
            conv_in.weight[n + i, i, 1, 1] = -1.0
        conv_in.bias[2 * n], conv_in.bias[2 * n + 1] = big, -big
        coder.conv_norm_out.weight.fill_(big / 2)
        coder.conv_norm_out.bias[: 2 * n] = lift
        for i in range(n):
            coder.conv_out.weight[i, i, 1, 1] = 1.0
        coder.conv_out.bias[:n] = -lift
    vae.encoder.conv_out.bias[n:] = -30.0  # log-variance: posterior std e^-15
    for q in (vae.quant_conv, vae.post_quant_conv):
        q.weight[:, :, 0, 0] = torch.eye(q.weight.shape[0])


@torch.no_grad()
def latent_scale(vae, seed: int) -> float:
    images, _ = toyworld.pretraining_batch(random.Random(f"scale-{seed}"), 256, embedded.RESOLUTION)
    z = vae.encode(to_tensor(images)).latent_dist.sample()
    return float(1.0 / z.std())


def tokenize(tokenizer, captions):
    return tokenizer(captions, padding="max_length", max_length=77, truncation=True,
                     return_tensors="pt").input_ids


HEADS = {"colour": toyworld.COLOURS, "pattern": toyworld.PATTERNS, "shape": toyworld.SHAPES,
         "companion": toyworld.COLOURS, "background": toyworld.COLOURS}


def caption_labels(text: str) -> list:
    """What a pretraining caption states, one class per head (0: not stated)."""
    words = text.replace(",", "").split()
    main, _, rest = " ".join(words).partition(" next to ")
    companion, _, _ = rest.partition(" on ")
    main = main.partition(" on ")[0].split()
    background = text.partition(" on ")[2].split()
    found = {"colour": next((w for w in main if w in toyworld.COLOURS), None),
             "pattern": next((w for w in main if w in toyworld.PATTERNS), None),
             "shape": next((w for w in main if w in toyworld.SHAPES), None),
             "companion": next((w for w in companion.split() if w in toyworld.COLOURS), None),
             "background": next((w for w in background if w in toyworld.COLOURS), None)}
    return [0 if found[h] is None else HEADS[h].index(found[h]) + 1 for h in HEADS]


def pretrain_text_encoder(text_encoder, tokenizer, seed: int, steps: int = 400, batch: int = 64) -> float:
    """Teach the text encoder to state each caption's attributes at every position after the prompt.

    Trained jointly from scratch with the UNet, the encoder's outputs for different prompts stayed
    ~80% identical (the shared words, the end and padding tokens dominate every position), and the
    UNet's cross-attention learned to ignore them: after 1,500 steps samples did not depend on the
    prompt at all. Stable Diffusion gets a pretrained CLIP; this is the toy world's version: linear
    heads read the object's colour, pattern and shape, the companion's colour and the background
    from each end/padding position (the heads are thrown away), after which the encoder is frozen.
    Returns the heads' final accuracy."""
    hidden = text_encoder.config.hidden_size
    heads = torch.nn.ModuleList(torch.nn.Linear(hidden, len(v) + 1) for v in HEADS.values())
    opt = torch.optim.AdamW(list(text_encoder.parameters()) + list(heads.parameters()), lr=1e-3)
    rng = random.Random(f"text-{seed}")
    eos = tokenizer.eos_token_id
    acc = 0.0
    for step in range(steps):
        scenes = [toyworld.random_scene(rng) for _ in range(batch)]
        captions = [toyworld.caption(s, rng) for s in scenes]
        labels = torch.tensor([caption_labels(c) for c in captions])
        ids = tokenize(tokenizer, captions)
        out = text_encoder(ids)[0]
        after = (ids == eos).float()  # the end token and the padding that repeats it
        loss, hits = 0.0, 0.0
        for k, head in enumerate(heads):
            logits = head(out)  # (B, T, classes)
            target = labels[:, k, None].expand(-1, ids.shape[1])
            ce = F.cross_entropy(logits.transpose(1, 2), target, reduction="none")
            loss = loss + (ce * after).sum() / after.sum()
            hits += float(((logits.argmax(-1) == target).float() * after).sum() / after.sum())
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        acc = hits / len(heads)
        if step % 100 == 0 or step == steps - 1:
            print(f"text encoder step {step} loss {loss.item():.4f} attribute accuracy {acc:.3f}", flush=True)
    text_encoder.requires_grad_(False)
    return acc


_CAPTION_WORDS = set(toyworld.COLOURS + toyworld.SHAPES + toyworld.PATTERNS) | {
    "a", "an", "photo", "of", "next", "to", "small", "on", "background"}


def _new_word_ids(tokenizer) -> list:
    """Whole-word tokens that no pretraining caption uses: the identifiers a user may pick."""
    return sorted(i for piece, i in tokenizer.get_vocab().items()
                  if piece.endswith("</w>") and piece[:-4].isalpha() and piece[:-4] not in _CAPTION_WORDS
                  and i < tokenizer.bos_token_id)


def _with_new_word(tokens: list, word: int, nouns: set, rng: random.Random):
    """Put `word` where DreamBooth prompts put the identifier: in place of the article before the
    object ('a photo of sks star') or just before its shape noun ('a photo of a red sks star').
    Returns the new tokens, the word's position and whether it was inserted (the caption's later
    positions then move one place on), or None for a caption without an object."""
    noun = next((j for j, t in enumerate(tokens) if t in nouns), None)
    if noun is None:
        return None
    if noun >= 5 and rng.random() < 0.5:
        article = 4  # [start] a photo of <article> ...
        return tokens[:article] + [word] + tokens[article + 1:], article, False
    return tokens[:noun] + [word] + tokens[noun:-1], noun, True


def teach_new_words(text_encoder, tokenizer, seed: int, steps: int = 600, batch: int = 64,
                    strength: float = 0.5, lr: float = 1e-3) -> dict:
    """Make the frozen text encoder carry a word that no caption used, as CLIP does.

    Trained on attribute heads only, the encoder had learned to ignore every other word: 'a photo
    of sks star' came out 0.9985-cosine-identical to 'a photo of a star' (a colour word moves it to
    ~0.75), so DreamBooth's identifier was nearly invisible, and prior preservation, which keeps
    'a star' where the base model had it while 'sks star' learns the subject, pulled the subject
    back with it. This continues the encoder (the UNet is not touched) towards targets read off the
    encoder as it was: an ordinary caption comes out unchanged, and the same caption with a new
    word comes out the same before the word and, from the word on, turned by `strength` (of each
    position's norm) towards a direction taken from the word's own (frozen) embedding, so that
    every token of the vocabulary moves the encoding its own way. Returns the final errors."""
    import copy

    old = copy.deepcopy(text_encoder).eval().requires_grad_(False)
    text_encoder.requires_grad_(True)
    embeddings = text_encoder.get_input_embeddings()
    embeddings.requires_grad_(False)  # every word keeps its embedding; the layers learn to read it
    width = embeddings.weight.shape[1]
    turn = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(seed)))[0]
    words = _new_word_ids(tokenizer)
    nouns = {tokenizer.convert_tokens_to_ids(f"{s}</w>") for s in toyworld.SHAPES}
    params = [p for p in text_encoder.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=0.0)
    rng = random.Random(f"words-{seed}")
    errors: dict = {}
    for step in range(steps):
        captions = []
        for _ in range(batch):
            scene = toyworld.random_scene(rng)
            bare = f"a photo of {toyworld._article(scene.thing.shape)} {scene.thing.shape}"
            captions.append(bare if rng.random() < 0.2 else toyworld.caption(scene, rng))
        ids = tokenize(tokenizer, captions)
        with torch.no_grad():
            ref = old(ids)[0]
        keep = F.mse_loss(text_encoder(ids)[0], ref)
        new_ids, targets, masks = [], [], []
        for k in range(batch):
            made = _with_new_word(ids[k].tolist(), words[rng.randrange(len(words))], nouns, rng)
            if made is None:
                continue
            tokens, pos, inserted = made
            target = ref[k].clone()
            mask = torch.ones(ids.shape[1], 1)
            if inserted:
                target[pos + 1:] = ref[k, pos:-1]
                mask[pos] = 0.0  # the new word's own position has no counterpart in the caption
            direction = F.normalize(embeddings.weight[tokens[pos]] @ turn, dim=0)
            norm = target[pos:].norm(dim=-1, keepdim=True)
            target[pos:] = F.normalize(target[pos:] + strength * norm * direction, dim=-1) * norm
            new_ids.append(torch.tensor(tokens))
            targets.append(target)
            masks.append(mask)
        out = text_encoder(torch.stack(new_ids))[0]
        mask = torch.stack(masks)
        learn = (((out - torch.stack(targets)) ** 2) * mask).sum() / (mask.sum() * out.shape[-1])
        (keep + learn).backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        errors = {"keep_mse": keep.item(), "new_word_mse": learn.item()}
        if step % 100 == 0 or step == steps - 1:
            print(f"new words step {step} keep {errors['keep_mse']:.5f} new word {errors['new_word_mse']:.5f}",
                  flush=True)
    text_encoder.requires_grad_(False)
    return errors


@torch.no_grad()
def probe(vae, unet, text_encoder, tokenizer, scheduler_config, n: int = 24, seed: int = 0):
    """Background colour, object colour and shape accuracy of samples on probe prompts (guidance 4,
    25 steps)."""
    from dreambooth_core.evaluation.metrics import object_shape
    from dreambooth_core.backends.pipelines import pipeline_classes
    from diffusers import DPMSolverMultistepScheduler

    StableDiffusionPipeline, _ = pipeline_classes()
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=DPMSolverMultistepScheduler.from_config(scheduler_config),
                                   safety_checker=None, feature_extractor=None, requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)
    checks = toyworld.probe_prompts(n, seed)
    out = pipe([c.prompt for c in checks], num_inference_steps=25, guidance_scale=4.0,
               generator=torch.Generator().manual_seed(seed), output_type="np",
               height=embedded.RESOLUTION, width=embedded.RESOLUTION).images
    images = (out * 255).round().astype(np.uint8)
    bg = np.mean([toyworld.background_colour(im) == c.background for im, c in zip(images, checks)])
    obj = np.mean([toyworld.object_colour(im) == c.colour for im, c in zip(images, checks)])
    shape = np.mean([object_shape(im) == c.shape for im, c in zip(images, checks)])
    return float(bg), float(obj), float(shape), images


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--work", type=Path, required=True, help="checkpoint folder (resumes from it)")
    p.add_argument("--out", type=Path, default=embedded.EMBEDDED_MODEL_DIR)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, default=2000)
    p.add_argument("--batch", type=int, default=32)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--offset-noise", type=float, default=0.1)
    p.add_argument("--bare-captions", type=float, default=0.0,
                   help="share of captions that are the class noun alone (DreamBooth's class prompt)")
    p.add_argument("--ema", type=float, default=0.998)
    p.add_argument("--save-every", type=int, default=250)
    p.add_argument("--probe-every", type=int, default=500)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--init-from", type=Path, default=None,
                   help="continue from an exported model (e.g. the embedded one): its UNet and frozen text "
                        "encoder, a fresh optimizer with its own warm-up and cosine over --steps")
    p.add_argument("--new-words", type=int, default=0, metavar="STEPS",
                   help="with --init-from: first teach its frozen text encoder to carry words no caption used "
                        "(teach_new_words) for STEPS steps; --steps 0 then leaves the UNet as it was")
    p.add_argument("--export-only", action="store_true", help="write the latest checkpoint's EMA weights to --out")
    p.add_argument("--cross-attention", default=None, metavar="SIZES",
                   help="latent resolutions whose UNet blocks have cross-attention, e.g. 16,8 (default: 8, the "
                        "shipped layout, or with --init-from that model's)")
    p.add_argument("--attention-heads", default=None, metavar="COUNTS",
                   help="attention heads at each UNet level, highest resolution first, e.g. 1,8,8 with "
                        "--cross-attention 32,16,8 (one head of 32 channels at 32x32 trains ~3x faster on CPU "
                        "than 8 of 4; default: 8 each, the shipped layout, or with --init-from that model's)")
    p.add_argument("--pooled-prompt", action="store_true",
                   help="every res-block also gets the pooled prompt as a scale and shift (POOLED_PROMPT; "
                        "default: off, the shipped layout, or with --init-from that model's)")
    p.add_argument("--text-encoder-from", type=Path, default=None, metavar="MODEL",
                   help="train a new UNet from scratch with an exported model's frozen text encoder (its "
                        "pretraining and --new-words stage kept), e.g. for another --cross-attention layout")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu",
                   help="where the UNet trains (default: cuda when there is one); text-encoder stages run on CPU")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.init_from is not None and args.text_encoder_from is not None:
        raise SystemExit("--text-encoder-from starts a new UNet; --init-from continues one: give one of them")
    levels = None
    if args.cross_attention:
        levels = tuple(sorted({int(x) for x in args.cross_attention.split(",")}, reverse=True))
    heads = tuple(int(x) for x in args.attention_heads.split(",")) if args.attention_heads else None
    if args.init_from is not None:
        found = exported_cross_attention(args.init_from)
        if levels and levels != found:
            raise SystemExit(f"--cross-attention {args.cross_attention}: --init-from {args.init_from} has it at "
                             f"{joined(found)}; a continued UNet keeps its layout")
        levels = found
        found_heads = exported_attention_heads(args.init_from)
        if heads and heads != found_heads:
            raise SystemExit(f"--attention-heads {args.attention_heads}: --init-from {args.init_from} has "
                             f"{joined(found_heads)}; a continued UNet keeps its layout")
        heads = found_heads
        found_pooled = exported_pooled_prompt(args.init_from)
        if args.pooled_prompt and not found_pooled:
            raise SystemExit(f"--pooled-prompt: --init-from {args.init_from} has no pooled-prompt path; a "
                             "continued UNet keeps its layout")
        args.pooled_prompt = found_pooled
    levels = levels or (8,)
    heads = heads or default_heads()
    args.work.mkdir(parents=True, exist_ok=True)

    from diffusers import DDPMScheduler

    vae, unet, text_encoder, tokenizer = build_models(args.seed, levels, heads, args.pooled_prompt)
    make_pixel_vae(vae)
    vae.requires_grad_(False).eval()
    scheduler = DDPMScheduler(**embedded.SCHEDULER_CONFIG)
    scale = latent_scale(vae, args.seed)
    vae.register_to_config(scaling_factor=scale)
    print(f"latent scaling factor {scale:.4f}")

    start = 0
    ckpt = args.work / "unet_te.safetensors"
    log = []
    tensors = None
    offset = 0  # steps that the --init-from model had already trained
    if args.init_from is not None:
        init_unet, init_te, log = load_exported(args.init_from)
        unet.load_state_dict(init_unet)
        text_encoder.load_state_dict(init_te)
        text_encoder.requires_grad_(False)
        offset = max(entry["step"] for entry in log)
        if args.steps:
            log.append({"step": offset, "continued_with": {"steps": args.steps, "lr": args.lr,
                                                            "bare_captions": args.bare_captions}})
    if args.new_words:
        if args.init_from is None or ckpt.exists():
            raise SystemExit("--new-words continues an exported model's text encoder: give --init-from and a new --work")
        errors = teach_new_words(text_encoder, tokenizer, args.seed, steps=args.new_words)
        log.append({"step": offset, "text_encoder_new_words": {"steps": args.new_words, **errors}})
    if ckpt.exists():
        from safetensors.torch import load_file
        saved = json.loads((args.work / "unet_te.json").read_text())
        saved_levels = tuple(saved.get("cross_attention", (8,)))
        if saved_levels != levels:
            raise SystemExit(f"--work {args.work}: its checkpoint has cross-attention at {joined(saved_levels)}, "
                             f"not {joined(levels)}; give the same --cross-attention or a new --work")
        saved_heads = tuple(saved.get("attention_heads", default_heads()))
        if saved_heads != heads:
            raise SystemExit(f"--work {args.work}: its checkpoint has {joined(saved_heads)} attention heads, "
                             f"not {joined(heads)}; give the same --attention-heads or a new --work")
        if saved.get("pooled_prompt", False) != args.pooled_prompt:
            raise SystemExit(f"--work {args.work}: its checkpoint was {'' if saved.get('pooled_prompt') else 'not '}"
                             "trained with --pooled-prompt; give the same flag or a new --work")
        tensors = load_file(ckpt)
        text_encoder.load_state_dict({k[3:]: v for k, v in tensors.items() if k.startswith("te.")})
        text_encoder.requires_grad_(False)
    elif args.text_encoder_from is not None:
        _, te_weights, te_log = load_exported(args.text_encoder_from)
        text_encoder.load_state_dict(te_weights)
        text_encoder.requires_grad_(False)
        log.append({"step": 0, "text_encoder_from": str(args.text_encoder_from),
                    "text_encoder_log": [e for e in te_log if any(k.startswith("text_encoder") for k in e)]})
    elif args.init_from is None:
        acc = pretrain_text_encoder(text_encoder, tokenizer, args.seed)
        log.append({"step": 0, "text_encoder_attribute_acc": acc})
    text_encoder.eval()
    device = torch.device(args.device)
    for model in (vae, unet, text_encoder):
        model.to(device)

    params = list(unet.parameters())
    ema = [q.detach().clone() for q in params]
    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=1e-2)
    warmup = 200

    def lr_at(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return 0.5 * (1 + math.cos(math.pi * (step - warmup) / max(1, args.steps - warmup))) * 0.95 + 0.05

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    if tensors is not None:
        meta = json.loads((args.work / "unet_te.json").read_text())
        for i, q in enumerate(params):
            q.data.copy_(tensors[f"param.{i}"])
            ema[i].copy_(tensors[f"ema.{i}"])
        checkpoint.load_optimizer(opt, tensors, meta["optimizer"])
        start = meta["step"]
        log = meta["log"]
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at, last_epoch=start - 1)
        print("resumed at step", start)

    t0 = time.time()
    for step in range(start, start if args.export_only else args.steps):
        unet.train()
        images, captions = toyworld.pretraining_batch(random.Random(f"unet-{args.seed}-{step}"), args.batch,
                                                      embedded.RESOLUTION, bare=args.bare_captions)
        g = torch.Generator().manual_seed(args.seed * 1_000_003 + step)
        with torch.no_grad():
            latents = vae.encode(to_tensor(images).to(device)).latent_dist.sample(generator=g) * scale
        noise = objective.sample_noise(latents.shape, g, args.offset_noise).to(device)
        t = torch.randint(0, scheduler.config.num_train_timesteps, (latents.shape[0],), generator=g).to(device)
        batch = objective.make_batch(latents, noise, t, scheduler.alphas_cumprod, scheduler.config.prediction_type)
        with torch.no_grad():
            hidden = text_encoder(tokenize(tokenizer, captions).to(device))[0]
        pred = unet(batch.noisy, t, hidden).sample
        loss = F.mse_loss(pred, batch.target)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        with torch.no_grad():
            d = min(args.ema, (1 + step) / (10 + step))
            for e, q in zip(ema, params):
                e.lerp_(q.detach(), 1 - d)
        if step % 50 == 0:
            print(f"step {step} loss {loss.item():.4f} lr {sched.get_last_lr()[0]:.2e} "
                  f"{time.time() - t0:.0f}s", flush=True)
        done = step + 1
        if done % args.probe_every == 0 or done == args.steps:
            live = [q.detach().clone() for q in params]
            for e, q in zip(ema, params):
                q.data.copy_(e)
            bg, obj, shape, images = probe(vae, unet.eval(), text_encoder, tokenizer, scheduler.config)
            for l, q in zip(live, params):
                q.data.copy_(l)
            log.append({"step": offset + done, "background_acc": bg, "object_colour_acc": obj, "shape_acc": shape})
            print(f"probe at {offset + done}: background {bg:.2f} object colour {obj:.2f} shape {shape:.2f}",
                  flush=True)
            from PIL import Image
            r = embedded.RESOLUTION
            grid = images[:24].reshape(4, 6, r, r, 3).transpose(0, 2, 1, 3, 4).reshape(4 * r, 6 * r, 3)
            Image.fromarray(grid).resize((24 * r, 16 * r), Image.NEAREST).save(args.work / f"probe_{done:05d}.png")
        if done % args.save_every == 0 or done == args.steps:
            tensors = {f"param.{i}": q for i, q in enumerate(params)}
            tensors.update({f"ema.{i}": e for i, e in enumerate(ema)})
            tensors.update({f"te.{k}": v for k, v in text_encoder.state_dict().items()})
            opt_t, opt_meta = checkpoint.optimizer_tensors(opt)
            tensors.update(opt_t)
            fileio.save_tensors(ckpt, {k: v.detach().cpu() for k, v in tensors.items()})
            fileio.write_json(args.work / "unet_te.json", {"step": done, "optimizer": opt_meta, "log": log,
                                                           "cross_attention": list(levels),
                                                           "attention_heads": list(heads),
                                                           "pooled_prompt": args.pooled_prompt})

    for e, q in zip(ema, params):
        q.data.copy_(e)
    for model in (vae, unet, text_encoder):
        model.to("cpu")
    export(vae, unet, text_encoder, tokenizer, scheduler, args.out, log)


def exported_cross_attention(folder: Path) -> tuple:
    """The latent resolutions at which an exported model's UNet has cross-attention."""
    config = json.loads((folder / "unet" / "config.json").read_text())
    return tuple(r for r, kind in zip(level_sizes(config), config["down_block_types"]) if kind.startswith("CrossAttn"))


def exported_attention_heads(folder: Path) -> tuple:
    """The attention heads at each level of an exported model's UNet, highest resolution first."""
    return heads_of(json.loads((folder / "unet" / "config.json").read_text()))


def exported_pooled_prompt(folder: Path) -> bool:
    """Whether an exported model's res-blocks get the pooled prompt (--pooled-prompt)."""
    return json.loads((folder / "unet" / "config.json").read_text()).get("addition_embed_type") == "text"


def load_exported(folder: Path):
    """UNet and text-encoder weights (fp32) and the pretraining log of an exported model."""
    from safetensors.torch import load_file

    def weights(part: str):
        files = sorted((folder / part).glob("*.safetensors"))
        if not files:
            raise SystemExit(f"--init-from {folder}: no {part}/*.safetensors (expected an exported model folder)")
        return {k: v.float() for f in files for k, v in load_file(f).items()}

    return weights("unet"), weights("text_encoder"), json.loads((folder / "pretraining_log.json").read_text())


def export(vae, unet, text_encoder, tokenizer, scheduler, out: Path, log) -> None:
    from dreambooth_core.backends.pipelines import pipeline_classes

    StableDiffusionPipeline, _ = pipeline_classes()
    pipe = StableDiffusionPipeline(vae=vae, unet=unet, text_encoder=text_encoder, tokenizer=tokenizer,
                                   scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                   requires_safety_checker=False)
    pipe.to(torch.float16)
    pipe.save_pretrained(out, safe_serialization=True)
    # Ship the plain BPE files (readable by old and new transformers alike) instead of the
    # 3.5 MB tokenizer.json that new transformers writes.
    (out / "tokenizer" / "tokenizer.json").unlink(missing_ok=True)
    for name in ("vocab.json", "merges.txt"):
        fileio.write_bytes(out / "tokenizer" / name, (embedded.CLIP_TOKENIZER_DIR / name).read_bytes())
    fileio.write_json(out / "pretraining_log.json", log)
    print("wrote", out)


if __name__ == "__main__":
    main()
