"""The meta device as the tests' stand-in for CUDA, and CUDA's autocast for it.

No GPU here, and fake CUDA tensors abort the process at their first real op on a build without
CUDA. Meta tensors have a device, a shape and a dtype but no data. An elementwise op or a
concatenation that mixes them with CPU tensors (other than 0-dim scalars) raises as it would with
CUDA tensors; meta's matmul, linear and convolution kernels do not check devices, so inside
`cuda_stand_in()` every aten op (forward and backward) is checked as CUDA checks it: one device for
all its tensors, but 0-dim CPU scalars, CPU indices, and copies between devices. A model living on
meta then shows every tensor its backend or trainer leaves on the CPU. A value read back to the host
(`.item()`, legal on CUDA) reads as zero there: meta has no values.

What meta lacks is autocast (torch has none for it; CPU autocast leaves meta tensors alone), so a
step in fp16/bf16 would fail where CUDA autocast casts (a half convolution given a float input).
Inside `cuda_stand_in()`, `torch.autocast("cuda", dtype)` works on this machine as on a GPU: it sets
CUDA's autocast state (which checkpointing saves and restores for recomputation, as for CUDA
tensors), and its regions apply CUDA autocast's documented casting policy (ops that run in the
lower precision, in float32, in the widest input type) to meta tensors, by a TorchFunctionMode. It sees torch functions as Python calls them: a composite op (einsum) is cast as
the matmul it becomes.
"""
from __future__ import annotations

import contextlib
from typing import Iterator

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

T = torch.Tensor
#: CUDA ops that autocast to the lower precision (torch.amp docs), as Python reaches them
LOWER = {F.linear, F.conv1d, F.conv2d, F.conv3d, F.conv_transpose1d, F.conv_transpose2d, F.conv_transpose3d,
         F.prelu, F.scaled_dot_product_attention, F.bilinear,
         torch.matmul, torch.mm, torch.bmm, torch.baddbmm, torch.addmm, torch.addbmm, torch.addmv, torch.addr,
         torch.mv, torch.einsum, torch.conv2d, torch.conv1d, torch.conv3d,
         T.__matmul__, T.__rmatmul__, T.matmul, T.mm, T.bmm, T.baddbmm, T.addmm, T.mv}
#: CUDA ops that autocast to float32
FLOAT32 = {F.layer_norm, F.group_norm, F.softmax, F.log_softmax, F.softmin, F.softplus, F.normalize, F.mse_loss,
           F.l1_loss, F.smooth_l1_loss, F.cross_entropy, F.nll_loss, F.kl_div, F.cosine_similarity,
           F.binary_cross_entropy_with_logits,
           torch.layer_norm, torch.group_norm, torch.softmax, torch.log_softmax, torch.exp, torch.expm1, torch.log,
           torch.log1p, torch.log2, torch.log10, torch.pow, torch.rsqrt, torch.reciprocal, torch.sum, torch.prod,
           torch.cumsum, torch.cumprod, torch.norm, torch.cdist, torch.acos, torch.asin, torch.cosh, torch.sinh,
           torch.tan, torch.erfinv,
           T.softmax, T.log_softmax, T.exp, T.expm1, T.log, T.log1p, T.log2, T.log10, T.pow, T.__pow__, T.__rpow__,
           T.rsqrt, T.reciprocal, T.sum, T.prod, T.cumsum, T.cumprod, T.norm, T.__rtruediv__}
#: CUDA ops that run in the widest floating type of their inputs
PROMOTE = {torch.cat, torch.stack, torch.addcmul, torch.addcdiv, torch.atan2, torch.cross, torch.dot,
           torch.tensordot, F.grid_sample, T.addcmul, T.addcdiv, T.dot, T.index_put, T.index_put_, T.scatter_add,
           T.scatter_add_, torch.scatter_add, torch.index_put}


def _eligible(t: object) -> bool:
    return isinstance(t, torch.Tensor) and t.device.type == "meta" and t.is_floating_point() \
        and t.dtype != torch.float64


def _cast(value: object, dtype: torch.dtype) -> object:
    if _eligible(value):
        return value.to(dtype)
    if isinstance(value, (list, tuple)):
        return type(value)(_cast(v, dtype) for v in value)
    return value


def _floats(value: object) -> Iterator[torch.dtype]:
    if _eligible(value):
        yield value.dtype
    elif isinstance(value, (list, tuple)):
        for v in value:
            yield from _floats(v)


class _MetaAutocast(TorchFunctionMode):
    """CUDA autocast's policy for meta tensors, wherever CUDA's autocast state is on."""

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if torch.is_autocast_enabled("cuda"):
            if func in LOWER:
                target = torch.get_autocast_dtype("cuda")
            elif func in FLOAT32:
                target = torch.float32
            elif func in PROMOTE:
                found = list(_floats(args)) + list(_floats(tuple(kwargs.values())))
                target = max(found, key=lambda d: torch.finfo(d).bits) if found else None
            else:
                target = None
            if target is not None:
                args = _cast(args, target)
                kwargs = {k: _cast(v, target) for k, v in kwargs.items()}
        return func(*args, **kwargs)


#: aten ops that take tensors of another device on CUDA: copies, CPU indices, reading a value
CROSS_DEVICE = {"_to_copy", "copy_", "copy", "index", "index_put", "index_put_", "_index_put_impl_", "lift_fresh",
                "lift_fresh_copy", "_local_scalar_dense", "set_", "_has_compatible_shallow_copy_type"}


class _SameDevice(TorchDispatchMode):
    """CUDA's device check for every aten op that meets a meta tensor (a dispatch mode: it sees the
    backward pass too)."""

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.ops.aten._local_scalar_dense.default and args[0].device == META:
            # A value read back to the host (legal on CUDA: a sync), e.g. a fill value passed as a 0-dim
            # tensor; meta has none, so it reads as zero. The step itself reads none (run_one_step).
            return False if args[0].dtype == torch.bool else 0.0 if args[0].is_floating_point() else 0
        if func.overloadpacket.__name__ not in CROSS_DEVICE:
            tensors = [t for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
            devices = {t.device for t in tensors if t.device.type == "meta" or t.ndim > 0}
            if len(devices) > 1 and META in devices:
                raise RuntimeError(f"Expected all tensors to be on the same device, but found at least two "
                                   f"devices, {', '.join(sorted(map(str, devices)))}! (in {func}, checked as CUDA does)")
        return func(*args, **kwargs)


META = torch.device("meta")


def _meta_is_cuda(infer):
    def infer_device_type(*args):
        device_type = infer(*args)
        return "cuda" if device_type == "meta" else device_type

    return infer_device_type


def _with_meta_casts(enter, exit_):
    """autocast's __enter__/__exit__, a CUDA region also carrying the meta casts. Python's torch
    function modes do not reach into backward; autocast regions do (checkpointing re-enters the
    forward's for its recomputation, custom_bwd functions theirs), so the casts follow them."""
    def __enter__(self):
        out = enter(self)
        if self.device == "cuda":
            self._meta_casts = _MetaAutocast()
            self._meta_casts.__enter__()
        return out

    def __exit__(self, *exc):
        mode = vars(self).pop("_meta_casts", None)
        if mode is not None:
            mode.__exit__(*exc)
        return exit_(self, *exc)

    return __enter__, __exit__


@contextlib.contextmanager
def cuda_stand_in() -> Iterator[None]:
    """Meta as CUDA: every aten op's devices checked as CUDA checks them; `torch.autocast("cuda", ...)`
    usable here (this machine has no CUDA device, so torch would turn it off) and applying CUDA's
    casts to meta tensors; checkpointing treating meta inputs as CUDA ones (it saves the forward's
    CUDA autocast state and restores it when it recomputes a block in backward)."""
    import torch.cuda.amp.common as amp_common
    import torch.utils.checkpoint as ckpt

    autocast = torch.amp.autocast_mode.autocast
    enter, exit_ = _with_meta_casts(autocast.__enter__, autocast.__exit__)
    patches = [(amp_common, "amp_definitely_not_available", lambda: False),
               (torch.cuda, "is_bf16_supported", lambda *args, **kwargs: True),
               (ckpt, "_infer_device_type", _meta_is_cuda(ckpt._infer_device_type)),
               (autocast, "__enter__", enter), (autocast, "__exit__", exit_)]
    saved = [(owner, name, getattr(owner, name)) for owner, name, _ in patches]
    for owner, name, value in patches:
        setattr(owner, name, value)
    try:
        with _SameDevice():
            yield
    finally:
        for owner, name, original in saved:
            setattr(owner, name, original)


@contextlib.contextmanager
def as_on_a_gpu(accelerator, mixed_precision: str) -> Iterator[None]:
    """`cuda_stand_in()`, and `accelerator` (made on this CPU machine, where accelerate autocasts
    bf16 on the CPU only and fp16 not at all) autocasting as it does on a GPU: CUDA's autocast in
    fp16 or bf16, none for "no"."""
    dtype = {"fp16": torch.float16, "bf16": torch.bfloat16}.get(mixed_precision)
    if dtype is not None:
        accelerator.autocast = lambda *args, **kwargs: torch.autocast("cuda", dtype=dtype)
    try:
        with cuda_stand_in():
            yield
    finally:
        vars(accelerator).pop("autocast", None)


def run_one_step(trainer, device: str = "meta"):
    """The trainer's own setup (`_start`: caching, the trained parameters, wrapped models, the
    optimizer) and one optimizer step of its own device code (`_micro_step` for each micro-step),
    the accelerator autocasting as on a GPU (`as_on_a_gpu`); `trainer` is a DreamBoothTrainer whose
    backend's model lives on meta. Checks what the step leaves: a float32 loss and finiteness flag
    on the device, the trained parameters still float32 there with no gradient, the optimizer's
    state there. Returns the run's RunState. Afterwards accelerate's process-wide state is reset, so a
    later test may make an accelerator of another precision."""
    import importlib

    seen = []
    try:
        with as_on_a_gpu(trainer.accelerator, trainer.config.mixed_precision):
            run = trainer._start()
            try:
                for micro in range(trainer.config.gradient_accumulation):
                    trainer._micro_step(run, 0, micro, lambda loss, finite: seen.append((loss, finite)))
                run.scheduler.step()
            finally:
                trainer._end(run)
    finally:
        # the core's accel module beside the trainer's (the pack imports the core as its subpackage)
        importlib.import_module(type(trainer).__module__.rsplit(".", 1)[0] + ".accel")._reset_state()
    assert len(seen) == trainer.config.gradient_accumulation
    for loss, finite in seen:
        parts = [loss.total, loss.instance] + ([loss.prior] if trainer.config.prior else [])
        assert None not in parts, "prior preservation is on but the step made no prior loss"
        assert all(t.device.type == device and t.dtype == torch.float32 and t.ndim == 0 for t in parts)
        assert finite.device.type == device and finite.ndim == 0
    assert run.params and all(p.device.type == device and p.dtype == torch.float32 and p.grad is None
                              for p in run.params)
    state = run.optimizer.state_dict()["state"]
    assert len(state) == len(run.params), "the optimizer did not step every trained parameter"
    for s in state.values():
        assert all(v.device.type == device for v in s.values() if torch.is_tensor(v) and v.ndim > 0)
    return run
