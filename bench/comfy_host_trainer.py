"""The host's own LoRA trainer (comfy_extras/nodes_train.py TrainLoraNode), called the way the
executor calls it on each ComfyUI version, optionally restricted to the modules our trainer adapts.

- 0.3.64: a classic node, `TrainLoraNode().train(...)` with scalar inputs.
- 0.33: a V3 node (`is_input_list=True`), `TrainLoraNode.execute(...)` with every input a list, and
  new levers (`checkpoint_depth`, `offloading`, `bypass_mode`, `quantized_backward`, `bucket_mode`).

Restriction (a matched row): the host puts a LoRA on every Linear and Conv of the diffusion model
and a weight/bias difference on every other weight and bias, and has no input to narrow that. The
bench narrows it from outside: while the node runs, `ModelPatcher.add_weight_wrapper` (and, in bypass
mode, `BypassInjectionManager.add_adapter`) only installs the adapters of the modules in `keep`. The
host still creates the others (its own code runs unchanged), but they never enter a forward pass,
get no gradient, and AdamW skips parameters without one. What gets installed is counted: that is
the trainable-parameter count printed beside the row (LoRA matrices; 0.33 also trains each LoRA's
alpha, one scalar per module, counted apart).
"""
from __future__ import annotations

import contextlib
import inspect
from typing import Iterator, Optional, Set


class Installed:
    """What the host actually installed (module keys and their trainable parameters)."""

    def __init__(self) -> None:
        self.keys: Set[str] = set()
        self.params = 0
        self.scalars = 0

    def add(self, key: str, adapter) -> None:
        self.keys.add(key)
        if hasattr(adapter, "parameters"):  # trainable only (the host keeps alpha as a frozen Parameter)
            for p in adapter.parameters():
                if p.requires_grad and p.dim() == 0:  # 0.33 also trains each LoRA's alpha
                    self.scalars += 1
                elif p.requires_grad:
                    self.params += p.numel()


def _fresh(weight):
    """What a left-out module gets instead of the host's adapter: its weight as a normal tensor. On
    0.3.64 the loaded weights are inference tensors, which autograd cannot save; the host gets
    around that only because every weight goes through one of its adapters (as ours does with a
    copy, adapters.FreshCopy)."""
    return weight.clone() if weight.is_inference() else weight


@contextlib.contextmanager
def restricted_to(keep: Optional[Set[str]]) -> Iterator[Installed]:
    """Only the weight adapters of modules in `keep` (names as in `model.named_modules()`) are
    installed; no bias/norm differences. `keep=None`: everything the host makes (as shipped)."""
    import comfy.model_patcher as mp_mod

    installed = Installed()
    original = mp_mod.ModelPatcher.add_weight_wrapper

    def admit(key: str) -> bool:
        return keep is None or (key.endswith(".weight") and key[: -len(".weight")] in keep)

    def add_weight_wrapper(self, name, function):
        if admit(name):
            installed.add(name, function)
            return original(self, name, function)
        return original(self, name, _fresh)

    patches = [(mp_mod.ModelPatcher, "add_weight_wrapper", add_weight_wrapper)]
    try:
        from comfy.weight_adapter.bypass import BypassInjectionManager

        original_bypass = BypassInjectionManager.add_adapter

        def add_adapter(self, key, adapter, *args, **kwargs):
            if admit(key):
                installed.add(key, adapter)
                return original_bypass(self, key, adapter, *args, **kwargs)
            return None

        patches.append((BypassInjectionManager, "add_adapter", add_adapter))
    except ImportError:  # 0.3.64 has no bypass mode
        pass
    saved = [(owner, name, owner.__dict__[name]) for owner, name, _ in patches]
    for owner, name, fn in patches:
        setattr(owner, name, fn)
    try:
        yield installed
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)


# The 0.33 levers' values that mean "off" (0.3.64 behaves so without the inputs).
LEVER_DEFAULTS = dict(checkpoint_depth=1, offloading=False, bypass_mode=False, quantized_backward=False,
                      bucket_mode=False)


def is_v3() -> bool:
    from comfy_extras.nodes_train import TrainLoraNode

    return not hasattr(TrainLoraNode, "train") and hasattr(TrainLoraNode, "execute")


def host_inputs() -> Set[str]:
    """The inputs this host's TrainLoraNode takes (the levers it offers)."""
    from comfy_extras.nodes_train import TrainLoraNode

    fn = TrainLoraNode.execute if is_v3() else TrainLoraNode.train
    return set(inspect.signature(fn).parameters) - {"self", "cls"}


def train_host(model, latents: dict, positive, *, steps: int, rank: int, lr: float, seed: int = 0,
               training_dtype: str = "fp32", gradient_checkpointing: bool = False, checkpoint_depth: int = 1,
               offloading: bool = False, bypass_mode: bool = False) -> dict:
    """Run the host's TrainLoraNode on `latents`/`positive`; returns its LoRA state dict. Levers
    the running host does not have raise ValueError naming them."""
    from comfy_extras.nodes_train import TrainLoraNode

    inputs = dict(model=model, latents=latents, positive=positive, batch_size=1, steps=steps,
                  grad_accumulation_steps=1, learning_rate=lr, rank=rank, optimizer="AdamW", loss_function="MSE",
                  seed=seed, training_dtype=training_dtype, lora_dtype="fp32", algorithm="LoRA",
                  gradient_checkpointing=gradient_checkpointing, existing_lora="[None]")
    extra = dict(checkpoint_depth=checkpoint_depth, offloading=offloading, bypass_mode=bypass_mode,
                 quantized_backward=False, bucket_mode=False)
    have = host_inputs()
    asked = {k for k, v in extra.items() if v != LEVER_DEFAULTS[k]}
    missing = sorted(asked - have)
    if missing:
        raise ValueError(f"this ComfyUI's TrainLoraNode has no input {', '.join(missing)}")
    inputs.update({k: v for k, v in extra.items() if k in have})
    if is_v3():
        out = TrainLoraNode.execute(**{k: [v] for k, v in inputs.items()})
        return out.args[0]
    return TrainLoraNode().train(**inputs)[1]
