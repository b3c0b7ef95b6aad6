"""What each step trains on: the global batch of a micro-step (instance bucket, samples, mirror
images, noise, timesteps, class samples, dropped captions), drawn from a generator seeded by
(seed, step, micro), then this process's slice of it. One process with batch 2·B and two with
batch B see exactly the same samples and noise, and a resumed run continues exactly where it
stopped.

Several subjects in one run (dataset/concepts.py): an image is drawn as often as its subject's
repeats say (kohya's subset repeats: relative frequency), its instance loss is multiplied by its
subject's loss weight, and each instance sample's prior sample is a class image of that sample's own
class. A run of one subject draws as it always did."""
from __future__ import annotations

from typing import Dict, List, Sequence

import torch

from ..config import TrainConfig
from . import objective
from .cache import Bucket
from .schedules import Schedule


def step_generator(seed: int, step: int, micro: int) -> torch.Generator:
    return torch.Generator("cpu").manual_seed((seed * 1_000_003 + step * 1009 + micro) % (2**63))


def _pick(choose_first: torch.Tensor, first: torch.Tensor, second: torch.Tensor) -> torch.Tensor:
    """Per sample, `first` where `choose_first` (drawn on the CPU generator) is set, else `second`. The
    choice moves to the samples' device: backends cache latents on theirs (CUDA), and torch.where
    refuses a CPU condition against CUDA tensors."""
    return torch.where(choose_first.bool().view(-1, *(1,) * (first.ndim - 1)).to(first.device), first, second)


def draw(config: TrainConfig, schedule: Schedule, step: int, micro: int, inst: List[Bucket], cls: List[Bucket], *,
         processes: int = 1, rank: int = 0):
    """The global batch of this micro-step, then this process's slice of it, and the instance
    samples' loss weights or None: a tensor of the latents' shape (masked loss), or InstanceWeights where
    a subject's loss weight applies. `schedule` (the backend's) draws the timesteps."""
    c = config
    g = step_generator(c.seed, step, micro)
    world, b = processes, c.batch_size
    total = world * b
    if inst[0].repeats is not None:  # images drawn as often as their subject's repeats say
        sizes = torch.stack([x.repeats.sum() for x in inst])
        bucket = inst[int(torch.multinomial(sizes, 1, generator=g))]
        idx = torch.multinomial(bucket.repeats, total, replacement=True, generator=g)
    else:
        sizes = torch.tensor([len(x.captions) for x in inst], dtype=torch.float)
        bucket = inst[int(torch.multinomial(sizes, 1, generator=g))]
        idx = torch.randint(len(bucket.captions), (total,), generator=g)
    flips = torch.randint(2, (total,), generator=g) if bucket.flipped is not None else torch.zeros(total, dtype=torch.long)
    lat = _pick(flips, (bucket.flipped if bucket.flipped is not None else bucket.latents)[idx], bucket.latents[idx])
    noise = objective.sample_noise(lat.shape, g, c.offset_noise)
    t = schedule.sample_timesteps(total, g)
    mine = slice(rank * b, (rank + 1) * b)
    parts = [(lat[mine], noise[mine], t[mine], [bucket.captions[i] for i in idx[mine].tolist()], bucket.size)]
    weight = None
    if bucket.masks is not None:
        masks = _pick(flips, bucket.masks.flip(-1)[idx], bucket.masks[idx])[mine]
        floor = c.mask_background_weight
        weight = (floor + (1 - floor) * masks).expand(-1, lat.shape[1], -1, -1)
    if cls:
        cb = cls[0]
        if bucket.class_prompts is not None:  # each sample's prior from its own subject's class
            cidx = paired_class_images(cb.captions, [bucket.class_prompts[i] for i in idx.tolist()], g)
        else:
            cidx = torch.randint(len(cb.captions), (total,), generator=g)
        clat = cb.latents[cidx]
        cnoise = objective.sample_noise(clat.shape, g, c.offset_noise)
        ct = schedule.sample_timesteps(total, g)
        parts.append((clat[mine], cnoise[mine], ct[mine], [cb.captions[i] for i in cidx[mine].tolist()], cb.size))
    if c.caption_dropout:
        # drawn last, so that the batch is the one drawn without dropout but for its captions
        keep = (torch.rand(total, generator=g) >= c.caption_dropout)[mine].tolist()
        lat_i, noise_i, t_i, captions, size = parts[0]
        parts[0] = (lat_i, noise_i, t_i, [cap if k else "" for cap, k in zip(captions, keep)], size)
    if bucket.loss_weights is not None:
        weight = objective.InstanceWeights(elements=weight, samples=bucket.loss_weights[idx][mine])
    return parts, weight


def paired_class_images(class_captions: Sequence[str], prompts: Sequence[str], g: torch.Generator) -> torch.Tensor:
    """For each instance sample's class prompt, the index of a class image of that prompt, uniformly
    among them. Class images are captioned with their class prompt (class_images.cache), which is
    what pairs them with the subjects of their class."""
    members: Dict[str, List[int]] = {}
    for j, caption in enumerate(class_captions):
        members.setdefault(caption, []).append(j)
    picks = []
    for prompt, u in zip(prompts, torch.rand(len(prompts), generator=g).tolist()):
        among = members.get(prompt)
        if not among:
            raise ValueError(f"class images: none for the class prompt {prompt!r} of a subject in this run "
                             f"(the class images are of {sorted(members)}); give every subject's class its images")
        picks.append(among[min(int(u * len(among)), len(among) - 1)])
    return torch.tensor(picks, dtype=torch.long)
