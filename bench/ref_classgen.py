"""Class-image generation the way diffusers' DreamBooth script does it, for the same count, steps,
guidance and resolution as ours (the script itself always uses the pipeline's defaults: 50 steps
at the UNet's native size, so its own run cannot be matched to ours).

What the script does (train_dreambooth_lora.py, "Generate class images if prior preservation is
enabled"): ``DiffusionPipeline.from_pretrained(model, torch_dtype=float32 on CPU,
safety_checker=None)``, progress bar off, prompts in batches of ``--sample_batch_size`` (4),
``pipeline(prompts).images``, each saved as ``{index}-{sha1}.jpg``. This module does the same
with diffusers' public API, passing ``num_inference_steps``, ``guidance_scale``, ``height`` and
``width``, and with the scheduler set to DPM-Solver++ 2M (``DPMSolverMultistepScheduler`` from the
folder's scheduler config): the sampler our ``class-images`` uses by default, so both run the
same number of UNet evaluations per image (the folder's PNDM would add one).

    python -m bench.ref_classgen --model DIR --prompt "a photo of a dog" --count N --steps S
        --guidance G --resolution R --out DIR [--batch-size 4] [--device cpu]
"""
from __future__ import annotations

import argparse
import hashlib
from pathlib import Path


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True)
    p.add_argument("--prompt", required=True)
    p.add_argument("--count", type=int, required=True)
    p.add_argument("--steps", type=int, required=True)
    p.add_argument("--guidance", type=float, required=True)
    p.add_argument("--resolution", type=int, required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="cpu")
    a = p.parse_args(argv)

    import torch
    from diffusers import DiffusionPipeline, DPMSolverMultistepScheduler

    dtype = torch.float16 if a.device.startswith("cuda") else torch.float32
    pipeline = DiffusionPipeline.from_pretrained(a.model, torch_dtype=dtype, safety_checker=None)
    pipeline.scheduler = DPMSolverMultistepScheduler.from_config(pipeline.scheduler.config)
    pipeline.set_progress_bar_config(disable=True)
    pipeline.to(a.device)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    done = 0
    while done < a.count:
        n = min(a.batch_size, a.count - done)
        images = pipeline([a.prompt] * n, num_inference_steps=a.steps, guidance_scale=a.guidance,
                          height=a.resolution, width=a.resolution).images
        for i, image in enumerate(images):
            digest = hashlib.sha1(image.tobytes()).hexdigest()
            image.save(out / f"{done + i}-{digest}.jpg")
        done += n
    print(f"{done} class images in {out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
