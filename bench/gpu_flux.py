"""A Flux-class LoRA step with our core at real size, on a real GPU, for `bench/gpu.sh`.

    python -m bench.gpu_flux [--base bf16|fp8] [--steps N] [--resolution 1024] [--device auto|cuda|cpu] [--tiny]

Why this exists: no Flux trainer of ours runs outside ComfyUI, and Flux dev's weights cannot be
downloaded here; the memory estimator (bench/memory) already builds Flux dev's transformer from
its published config and runs our core's LoRA + objective on it through `FluxBackend`. This runs
that same step (`bench.memory.step.attach` + `train_step`: our LoRANetwork, kohya's target set,
the flow schedule, `dreambooth_loss`, AdamW, gradient clipping) with real tensors: the model is
built on the meta device, materialised on the GPU (`to_empty`) and filled with random values
there, which takes seconds where a CPU init of 12 B parameters would take minutes. Frozen Linears
run as the ComfyUI flow path runs them (bench/memory/frozen.py); `--base fp8` stores them as
float8_e4m3fn and computes in bf16. Every block is checkpointed (the Train node's gradient_checkpointing on).

Run it under `bench.child` (as bench/gpu does) so step times, torch.cuda.max_memory_allocated per
phase and one step's FLOPs are recorded as for the diffusers trainers. `--tiny` uses the reduced
Flux layout of the estimator's self-check: it runs on a CPU in seconds (the unit test does).
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from typing import List, Optional

import torch
from torch import nn

from bench.memory import architectures, fake, step
from bench.memory.settings import Setting, flux_settings


def setting_for(base: str, prior: bool = True) -> Setting:
    """The estimator's Flux setting of this base (bf16 or fp8, checkpointing on), so the GPU row and
    its prediction are the same step."""
    key = {"bf16": "bf16", "fp8": "fp8"}[base]
    s = next(s for s in flux_settings() if s.key == key)
    return s if prior else dataclasses.replace(s, prior=False, key=f"{key}-noprior")


@torch.no_grad()
def randomise(model: nn.Module, seed: int = 0) -> None:
    """Fill every parameter and buffer in place: weights ~ N(0, 1/fan_in) (activations keep their
    scale through 57 blocks, so the loss stays finite), biases 0, 1-D scales 1. Speed and memory
    depend on shapes only; finite values keep the optimizer's work the same as with real weights."""
    gen = torch.Generator(device=next(model.parameters()).device).manual_seed(seed)
    for name, t in list(model.named_parameters()) + list(model.named_buffers()):
        if not t.is_floating_point():
            t.zero_()
        elif t.ndim >= 2:
            fan_in = t[0].numel()
            if t.dtype in (torch.float32, torch.bfloat16, torch.float16):
                t.normal_(0.0, fan_in ** -0.5, generator=gen)
            else:  # float8 storage: draw in bf16, then cast
                t.copy_(torch.empty(t.shape, dtype=torch.bfloat16, device=t.device)
                        .normal_(0.0, fan_in ** -0.5, generator=gen).to(t.dtype))
        elif name.endswith("bias"):
            t.zero_()
        else:
            t.fill_(1.0)


def build_backend(spec: architectures.Spec, device: torch.device):
    """FluxBackend over a FluxTransformer2DModel of `spec`, in bf16 on `device` (random values are
    filled after `attach`, once an fp8 base has re-stored its Linears)."""
    from diffusers import FluxTransformer2DModel

    from bench.memory.flux_backend import FluxBackend

    model = fake.build_on_meta(lambda: FluxTransformer2DModel(**spec.configs["transformer"]), torch.bfloat16)
    model.to_empty(device=device)
    return FluxBackend(model, native_resolution=spec.resolution)


def prepare(spec: architectures.Spec, setting: Setting, device: torch.device, seed: int = 0) -> step.Prepared:
    """Our core's LoRA step on a random Flux transformer on `device`, cached inputs there too."""
    backend = build_backend(spec, device)
    prepared = step.attach(backend, spec, setting, seed=seed)
    lora_ids = {id(p) for p in prepared.params}
    model = backend.transformer
    with torch.no_grad():
        saved = [(n, t.detach().clone()) for n, t in model.named_parameters() if id(t) in lora_ids]  # LoRA's init
        randomise(model, seed)
        named = dict(model.named_parameters())
        for n, value in saved:  # LoRA keeps its own init (down: kaiming, up: zeros), as in training
            named[n].copy_(value)
    prepared.inputs = [(lat.to(device), {k: v.to(device) for k, v in cond.items()}) for lat, cond in prepared.inputs]
    return prepared


def parse(argv: Optional[List[str]]) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.gpu_flux", description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", choices=("bf16", "fp8"), default="bf16", help="frozen weights' storage")
    ap.add_argument("--steps", type=int, default=5, help="optimizer steps to run")
    ap.add_argument("--resolution", type=int, default=None, help="px (default: 1024; --tiny: 64)")
    ap.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    ap.add_argument("--no-prior", action="store_true", help="batch 1 instance image (default: + 1 class image)")
    ap.add_argument("--tiny", action="store_true", help="the reduced Flux layout (a CPU check of this runner)")
    ap.add_argument("--seed", type=int, default=0)
    return ap.parse_args(argv)


def main(argv: Optional[List[str]] = None) -> int:
    a = parse(argv)
    device = torch.device("cuda" if a.device == "auto" and torch.cuda.is_available() else
                          ("cpu" if a.device == "auto" else a.device))
    spec = (architectures.reduced_specs() if a.tiny else architectures.real_specs())["flux"]
    spec = dataclasses.replace(spec, resolution=a.resolution or (64 if a.tiny else spec.resolution))
    setting = setting_for(a.base, prior=not a.no_prior)
    if setting.base == "fp8" and device.type == "cpu" and not hasattr(torch, "float8_e4m3fn"):
        raise SystemExit("this torch has no float8_e4m3fn")
    t0 = time.time()
    torch.manual_seed(a.seed)
    p = prepare(spec, setting, device, a.seed)
    n_frozen = sum(t.numel() for m in p.step_modules for t in m.parameters()) - sum(q.numel() for q in p.params)
    print(f"gpu_flux: {spec.label} {spec.resolution} px on {device}, base {setting.base}, "
          f"{n_frozen / 1e6:.1f} M frozen + {sum(q.numel() for q in p.params) / 1e6:.2f} M LoRA parameters, "
          f"{len(p.network.adapters)} adapters, built in {time.time() - t0:.1f} s", flush=True)
    gen = torch.Generator().manual_seed(a.seed)
    for i in range(a.steps):
        loss = step.train_step(p, gen)
        if i == 0 or i == a.steps - 1:
            print(f"gpu_flux: step {i + 1}/{a.steps} loss {loss.float().item():.4f}", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
