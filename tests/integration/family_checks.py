"""The checks the per-family integration tests share (test_flow_families*.py, test_dit_families.py,
test_pixel_families.py), as plain functions: each test file holds a table of its families (`Family`, in a
`FamilySuite` with its loader and the host's prediction it compares with) and thin parametrized tests that call
these. What they check, per family:
  - detection: the host's own model class and config, the backend's family and prediction type;
  - `predict` equals the host's own prediction (its encoding, `extra_conds`, `apply_model`) for prompts of two
    lengths;
  - a few LoRA steps of the core trainer with prior preservation (class images from `generate`) lower the
    held-out loss of the identifier prompt; the LoRA targets are stock-loader keys; the identifier is checked,
    and suggested, in the tokenizers that read the prompt; the file's keys are the targets and its metadata the
    family's; the stock LoraLoader uses every key and changes the output as the trained MODEL does; the base
    MODEL stays bit-identical;
  - a class image equals the stock graph's image with that seed.
Also the host-side helpers they and test_flow_families.py compare with (the host's velocity, output and ε).
"""
from __future__ import annotations

import contextlib
import gc
import hashlib
import importlib
import logging
import math
import re
import shutil
from dataclasses import dataclass
from types import ModuleType, SimpleNamespace
from typing import Callable, Dict, Optional, Sequence, Tuple

import numpy as np
import pytest
import torch

import family_checkpoints as fc
from stock_graph import stock_image

PROMPT = "a photo of sks dog"


def comfy_backend(pack) -> ModuleType:
    return importlib.import_module(pack.__name__ + ".nodes.comfy_backend")


def core(pack, name: str) -> ModuleType:
    """A module of the pack's core, e.g. core(pack, "training.trainer")."""
    return importlib.import_module(pack.__name__ + ".dreambooth_core." + name)


# ------------------------------------------------------------------------------------------- the host's side

def host_x(model, x: torch.Tensor) -> torch.Tensor:
    """A [B, C, H, W] latent as the host's sampler hands it to this model (one frame for 3-D formats)."""
    return x.unsqueeze(2) if model.get_model_object("latent_format").latent_dimensions == 3 else x


def _host_denoised(model, clip, prompt: str, x: torch.Tensor, sigma: torch.Tensor, factor: int) -> torch.Tensor:
    """apply_model's denoised x0 from the host's own path: its encoding, its extra_conds (the image size is the
    latent's times `factor`), with this MODEL's patches (the memory manager loads it first, as a sampler does)."""
    import comfy.model_management

    comfy.model_management.load_models_gpu([model])
    with torch.no_grad():
        enc = clip.encode_from_tokens(clip.tokenize(prompt), return_pooled=True, return_dict=True)
        params = dict(enc)
        params["cross_attn"] = params.pop("cond")
        conds = model.model.extra_conds(noise=x, device=x.device, width=x.shape[-1] * factor,
                                        height=x.shape[-2] * factor, prompt_type="positive", **params)
        kwargs = {k: c.process_cond(batch_size=x.shape[0], device=x.device, area=None).cond for k, c in conds.items()}
        return model.model.apply_model(x, sigma, **kwargs)


def host_velocity(model, clip, prompt: str, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """v = (x − denoised)/σ from the host's own path (8x latents)."""
    return (x - _host_denoised(model, clip, prompt, x, sigma, 8)) / sigma.view(-1, 1, 1, 1)


def host_output(model, clip, prompt: str, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """What the host's own path makes the diffusion model output at σ, as the backend's `predict` returns it:
    apply_model's denoised x0 turned back through the sampling's own calculate_denoised, which is linear in the
    output: out = (calculate_denoised(σ, 0, x) − denoised) / (calculate_denoised(σ, 0, x) −
    calculate_denoised(σ, 1, x)); for rectified flow (CONST) that is the velocity (x − denoised) / σ."""
    factor = getattr(model.get_model_object("latent_format"), "spacial_downscale_ratio", 8)  # 0.3.64: none, 8
    sampling = model.get_model_object("model_sampling")
    denoised = _host_denoised(model, clip, prompt, x, sigma, factor)
    with torch.no_grad():
        at0 = sampling.calculate_denoised(sigma, torch.zeros_like(x), x)
        at1 = sampling.calculate_denoised(sigma, torch.ones_like(x), x)
    return (at0 - denoised) / (at0 - at1)


def host_point(model, x: torch.Tensor, sigma: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """The core's point x = (1−σ)·x0 + σ·ε at σ where the host's sampler holds it: the same for CONST; for
    Cosmos's RFlow at the host's σ_e = `sigma(σ)` (its inverse of `timestep`) and x0 + σ_e·ε, which its
    `calculate_input` scales by 1/(1 + σ_e)."""
    import comfy.model_sampling as ms

    sampling = model.get_model_object("model_sampling")
    if not isinstance(sampling, ms.ModelSamplingCosmosRFlow):
        return x, sigma
    host_sigma = torch.stack([torch.as_tensor(sampling.sigma(s)).float() for s in sigma])
    return x / sampling.calculate_input(host_sigma, torch.ones_like(x)), host_sigma


def host_output_at_point(model, clip, prompt: str, x: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """`host_output` at the core's point x, σ (`host_point`)."""
    return host_output(model, clip, prompt, *host_point(model, x, sigma))


def host_eps(model, clip, prompt: str, noisy: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """The model's raw output (ε or v) from the host's own path at the core's (VP-scaled) input and integer
    timesteps: the host's input is x = x0 + σε = noisy·√(1+σ²); for EPS sampling ε = (x − denoised)/σ, for
    V_PREDICTION (σ_data 1) denoised = x/(σ²+1) − v·σ/√(σ²+1)."""
    import comfy.model_sampling

    sampling = model.get_model_object("model_sampling")
    sigma = sampling.sigmas[t].float()
    s = sigma.view(-1, 1, 1, 1)
    x = noisy * (1 + s ** 2).sqrt()
    eps = host_velocity(model, clip, prompt, x, sigma)
    if not isinstance(sampling, comfy.model_sampling.V_PREDICTION):
        return eps
    denoised = x - eps * s
    return (x / (s ** 2 + 1) - denoised) * (s ** 2 + 1).sqrt() / s


def digest(module) -> str:
    """A hash of every tensor's bytes (bit-identical or not), without copying them."""
    h = hashlib.sha256()
    for k, v in sorted(module.state_dict().items()):
        h.update(k.encode())
        h.update(v.detach().cpu().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


# ------------------------------------------------------------------------------------------- data and losses

def instance_images(n: int = 3, size: int = 64) -> list:
    from PIL import Image

    rng = np.random.default_rng(0)
    out = []
    for i in range(n):
        img = np.zeros((size, size, 3), np.uint8)
        img[..., i % 3] = 200
        img[16:48, 16:48] = (rng.random((32, 32, 3)) * 255).astype(np.uint8)
        out.append(Image.fromarray(img))
    return out


def training_data(backend, base_mod, size: int = 64, n: int = 3):
    """Two class images the backend makes with the host's sampler, `n` instance photos, and the
    photos' latents and prompt conditioning (the held-out loss is measured on these), all `size` px."""
    from PIL import Image

    settings = base_mod.SampleSettings(steps=2, guidance=1.0, sampler="euler", width=size, height=size)
    with torch.inference_mode():
        class_arrays = backend.generate(["a photo of a dog"] * 2, [0, 1], settings)
    assert len(class_arrays) == 2 and class_arrays[0].shape == (size, size, 3)
    instance = [SimpleNamespace(image=im, caption=PROMPT) for im in instance_images(n, size)]
    classes = [SimpleNamespace(image=Image.fromarray(a), caption="a photo of a dog") for a in class_arrays]
    with torch.no_grad():
        latents = backend.encode_images(torch.stack([torch.from_numpy(np.asarray(im.image, np.float32))
                                                     .permute(2, 0, 1) / 127.5 - 1 for im in instance]))
        cond = backend.encode_text([PROMPT] * n, size=(size, size))
    return instance, classes, latents, cond


def flow_loss(backend, latents, cond, seed: int = 1234) -> float:
    """The mean flow loss at fixed held-out noise and σ (not drawn by any training step)."""
    g = torch.Generator().manual_seed(seed)
    noise = torch.randn(latents.shape, generator=g)
    sigma = torch.tensor([0.3, 0.5, 0.7])[: latents.shape[0]]
    s = sigma.view(-1, 1, 1, 1)
    noisy = (1 - s) * latents + s * noise
    with torch.no_grad():
        v = backend.predict(noisy, sigma, cond)
    return float(((v - (noise - latents)) ** 2).mean())


def eps_loss(backend, latents, cond, seed: int = 1234) -> float:
    """The mean ε (or v) loss at fixed held-out noise and timesteps (not drawn by any training step)."""
    noise = torch.randn(latents.shape, generator=torch.Generator().manual_seed(seed))
    t = torch.tensor([250, 500, 750])[: latents.shape[0]]
    batch = backend.schedule().noised(latents, noise, t)
    with torch.no_grad():
        eps = backend.predict(batch.noisy, t, cond)
    return float(((eps - batch.target) ** 2).mean())


# ------------------------------------------------------------------------------------------- checkpointing

def lora_setup(pack, backend, std: float = 0.05):
    """A rank-2 LoRA network on the backend's targets, attached, with non-zero `up` (every parameter
    then gets a gradient)."""
    adapters = core(pack, "adapters")
    torch.manual_seed(0)
    network = adapters.LoRANetwork(backend.lora_targets(True, False), rank=2, alpha=2.0)
    for a in network.adapters.values():
        torch.nn.init.normal_(a.lora_up.weight, std=std)
    backend.attach_lora(network)
    return network


def _saved_activation_bytes(run, exclude) -> int:
    """Bytes of the distinct tensors autograd keeps for backward while `run()` builds its graph (what a
    checkpointed region keeps is only its inputs), the model's own tensors (`exclude`: storages) not
    counted."""
    seen = {}

    def pack_hook(t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in exclude:
            seen[ptr] = max(seen.get(ptr, 0), t.untyped_storage().nbytes())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack_hook, lambda t: t):
        out = run()
    out.float().pow(2).mean().backward()  # the graph works, with these saved tensors
    return sum(seen.values())


def checkpointing_bytes(backend, network, predict) -> dict:
    """{checkpointing on: bytes kept for backward by `predict()`} for off and on."""
    exclude = {t.untyped_storage().data_ptr() for t in backend.model.model.state_dict().values()}
    exclude |= {p.untyped_storage().data_ptr() for p in network.parameters()}
    out = {}
    for on in (False, True):
        backend.set_gradient_checkpointing(on)
        out[on] = _saved_activation_bytes(predict, exclude)
    backend.set_gradient_checkpointing(False)
    return out


# ------------------------------------------------------------------------------------------- the families

@dataclass(frozen=True)
class Family:
    """What the checks expect of one family fixture, and how it trains here."""
    family: str                       # Backend.family
    lora: str                         # a LoRA name its targets must have
    version: str                      # the file's ss_base_model_version
    arch: str                         # the file's modelspec.architecture
    prediction: str = "flow"          # Backend.prediction_type; "flow" trains on the flow loss, else ε / v
    shift: Optional[float] = None     # the host's model_sampling.shift, where checked
    tokenizers: Optional[Tuple[str, ...]] = None  # backend.tokenizers()' types (full regular expressions)
    splits: bool = True               # "sks" is several tokens there (else one rare token)
    suggestions: int = 3              # where it splits: how many suggestions are checked (0: none)
    steps: int = 2
    lr: float = 3e-3
    checkpointing: bool = False       # trained with gradient checkpointing on (the blocks recomputed)
    resolution: int = 64              # of the photos and class images it trains on
    photos: int = 3                   # instance photos
    clip_options: Tuple[Tuple[str, object], ...] = ()  # tokenizer options set on the loaded CLIP


class FamilySuite:
    """A test module's families, how their fixtures load (`ensure(name)` -> files, `load(files)` -> MODEL, CLIP,
    VAE, under `detection()`), the host prediction `predict` is compared with (`host(model, clip, prompt, x, at)`)
    and the prefix of its LoRA files. One family is in memory at a time, loaded under inference mode as the
    executor loads; a family this host lacks is skipped with why."""

    def __init__(self, families: Dict[str, Family], ensure: Callable, load: Callable,
                 host: Callable = host_velocity, save_prefix: str = "flow_",
                 detection: Callable = contextlib.nullcontext):
        self.families, self.ensure, self.load_files, self.host = families, ensure, load, host
        self.save_prefix, self.detection = save_prefix, detection
        self._loaded: dict = {}
        self._unsupported: dict = {}

    def __getitem__(self, name: str) -> Family:
        return self.families[name]

    def load(self, name: str):
        """(files, MODEL, CLIP, VAE) of a family, loaded once per module."""
        if name in self._unsupported:
            pytest.skip(self._unsupported[name])
        if name not in self._loaded:
            self._loaded.clear()
            gc.collect()
            try:
                files = self.ensure(name)
            except fc.FamilyUnsupported as e:
                self._unsupported[name] = str(e)
                pytest.skip(str(e))
            with self.detection(), torch.inference_mode():
                model, clip, vae = self.load_files(files)
            for option, value in self.families[name].clip_options:  # see the test module's docstring
                clip.set_tokenizer_option(option, value)
            self._loaded[name] = (files, model, clip, vae)
        return self._loaded[name]

    def fixture(self):
        """The module-scoped `name` fixture over the families (pytest then runs a family's tests together)."""
        @pytest.fixture(scope="module", params=list(self.families))
        def name(request):
            """The family fixture's name."""
            return request.param

        return name


# ------------------------------------------------------------------------------------------- checks

def check_detected(pack, loaded, fam: Family):
    """The host detected the fixture's model class and config; the backend names the family and its prediction.
    Returns the backend."""
    files, model, clip, vae = loaded
    assert type(model.model.model_config).__name__ == files.model_class  # the host's own detection
    unet_config = model.model.model_config.unet_config
    assert {k: unet_config.get(k) for k in files.expect} == files.expect
    backend = comfy_backend(pack).ComfyBackend(model, clip, vae)
    assert backend.family == fam.family and backend.prediction_type == fam.prediction
    return backend


def check_flow_shift(backend, model, shift: float) -> None:
    """The backend's shift is the host's (Flux-kind samplings store μ = log s: families.flow_shift), which is
    `shift`."""
    sampling = model.get_model_object("model_sampling")
    flux_kind = "Flux" in type(sampling).__mro__[1].__name__
    assert backend.schedule().shift == pytest.approx(math.exp(sampling.shift) if flux_kind else sampling.shift)
    assert sampling.shift == pytest.approx(shift)


def check_predict(backend, model, clip, host: Callable, x: torch.Tensor, at: torch.Tensor, size: Sequence[int]):
    """`predict` at x, σ (or t) for PROMPT and a shorter prompt is the host's, a prompt at a time. Returns the
    output and the conditioning."""
    prompts = [PROMPT, "a dog"]
    with torch.no_grad():
        cond = backend.encode_text(prompts, size=tuple(size))
        out = backend.predict(x, at, cond)
    assert out.shape == x.shape and out.dtype == torch.float32
    for i, prompt in enumerate(prompts):
        expected = host(model, clip, prompt, host_x(model, x[i:i + 1]), at[i:i + 1])
        torch.testing.assert_close(out[i:i + 1], expected.reshape(1, *x.shape[1:]), rtol=1e-3, atol=1e-3)
    return out, cond


def check_flow_predict(pack, suite: FamilySuite, name: str):
    """A flow family's detection, shift (`suite[name].shift`) and `predict` at two σ, as the host's. Returns the
    loaded (files, MODEL, CLIP, VAE)."""
    loaded = files, model, clip, vae = suite.load(name)
    backend = check_detected(pack, loaded, suite[name])
    check_flow_shift(backend, model, suite[name].shift)
    x = torch.randn(2, files.latent_channels, 8, 8, generator=torch.Generator().manual_seed(0))
    check_predict(backend, model, clip, suite.host, x, torch.tensor([0.35, 0.8]), (64, 64))
    return loaded


def check_identifier(pack, backend, fam: Family) -> None:
    """The identifier is checked in the tokenizers that read the prompt; where they split "sks", the
    suggestions come from their own vocabulary, are named in the message and pass the check."""
    tokens = core(pack, "dataset.tokens")
    tokenizers = backend.tokenizers()
    kinds = [type(t).__name__ for t in tokenizers]
    assert len(kinds) == len(fam.tokenizers) and all(map(re.fullmatch, fam.tokenizers, kinds)), kinds
    check = tokens.check_token(tokenizers, "sks")
    assert check.single != fam.splits, check.message
    if fam.splits and fam.suggestions:
        picks = tokens.suggest_tokens(tokenizers, fam.suggestions)
        assert len(picks) == fam.suggestions and repr(picks[0]) in check.message, (picks, check.message)
        assert all(tokens.check_token(tokenizers, w).single for w in picks), picks


def check_lora_training(comfy_host, pack, suite: FamilySuite, name: str, tmp_path, caplog, *,
                        excluded: Optional[str] = None, pattern: Optional[str] = None,
                        expect_targets: Optional[set] = None, probe_shape: Optional[Sequence[int]] = None,
                        probe_at: float = 0.6) -> None:
    """LoRA training of a family through the core trainer, with prior preservation: its targets are stock-loader
    keys (with `suite[name].lora`; none matching `excluded`, all matching `pattern`, or exactly `expect_targets`);
    the identifier is checked where the family names its tokenizers; the held-out loss falls; the file's keys are
    the targets, its metadata the family's; the stock LoraLoader uses every key and changes the host's
    prediction at a probe (`probe_shape`, default one latent of the training size; σ or t `probe_at`) as the
    trained MODEL does; the base MODEL stays bit-identical and unpatched."""
    import comfy.lora

    fam = suite[name]
    files, model, clip, vae = suite.load(name)
    cb = comfy_backend(pack)
    base_mod = core(pack, "backends.base")
    before = digest(model.model)

    backend = cb.ComfyBackend(model, clip, vae)
    targets = backend.lora_targets(True, False)
    key_map = comfy.lora.model_lora_keys_unet(model.model, {})
    assert fam.lora in targets and all(key_map.get(n) == backend._target_keys[n][1] for n in targets)
    if excluded:
        assert not any(re.search(excluded, n) for n in targets), sorted(targets)
    if pattern:
        assert all(re.match(pattern, n) for n in targets), sorted(targets)
    if expect_targets is not None:
        assert set(targets) == expect_targets
    if fam.tokenizers is not None:
        check_identifier(pack, backend, fam)

    loss = flow_loss if fam.prediction == "flow" else eps_loss
    size = fam.resolution
    instance, classes, latents, cond = training_data(backend, base_mod, size=size, n=fam.photos)
    side = size // backend.latent_factor
    assert latents.shape == (fam.photos, files.latent_channels, side, side)
    untrained = loss(backend, latents, cond)

    save_name = suite.save_prefix + name
    result = train_with_prior(pack, backend, instance, classes, tmp_path, save_name, resolution=size,
                              steps=fam.steps, lr=fam.lr, checkpointing=fam.checkpointing)
    trained = loss(cb.ComfyBackend(backend.result()[0], clip, vae), latents, cond)
    assert result.status == "completed" and trained < untrained, (untrained, trained)
    assert all("forward" not in vars(m) for m in model.model.diffusion_model.modules())

    shape = probe_shape or (files.latent_channels, side, side)
    x = host_x(model, torch.randn(1, *shape, generator=torch.Generator().manual_seed(5)))
    at = torch.tensor([probe_at])
    check_lora_file_and_stock_loader(
        comfy_host, model, clip, backend.result()[0], result.lora_path, set(targets),
        (fam.version, fam.arch, fam.family, fam.prediction == "v_prediction"), save_name, caplog,
        lambda m, c: suite.host(m, c, PROMPT, x, at))
    assert digest(model.model) == before, "training changed the shared base MODEL's weights"


def train_with_prior(pack, backend, instance, classes, tmp_path, save_name: str, *, resolution: int, steps: int,
                     lr: float, checkpointing: bool):
    """LoRA rank 4 through the core trainer, with prior preservation (weight 1), saved in fp32 under save_name;
    the backend released after it. The trainer's result."""
    config = core(pack, "config").TrainConfig(
        token="sks", class_noun="dog", resolution=resolution, prior=True, prior_weight=1.0, rank=4, steps=steps,
        learning_rate=lr, batch_size=1, seed=0, output_dir=str(tmp_path), save_name=save_name,
        save_precision="fp32", max_grad_norm=0.0, thumbnail_steps=0, gradient_checkpointing=checkpointing)
    try:
        with torch.inference_mode(False), torch.enable_grad():
            return core(pack, "training.trainer").train(backend, config, instance, classes)
    finally:
        backend.release()


def check_lora_file_and_stock_loader(comfy_host, model, clip, trained_model, lora_path, targets: set,
                                     meta: Tuple[str, str, str, bool], save_name: str, caplog,
                                     out: Callable) -> None:
    """The LoRA file holds the targets' keys and the family's metadata (`meta`: ss_base_model_version,
    modelspec.architecture, dreambooth_base_family, v-parameterization); the stock LoraLoader uses every key,
    and `out(model, clip)` (the host's prediction at one probe) changes with it as with the trained MODEL."""
    import comfy.utils
    import nodes as host_nodes
    from safetensors import safe_open

    lora = comfy.utils.load_torch_file(str(lora_path))
    names = {k.split(".")[0] for k in lora}
    assert names == targets
    with safe_open(str(lora_path), "pt") as f:
        found = f.metadata()
    version, arch, family, v = meta
    assert (found["ss_base_model_version"], found["modelspec.architecture"]) == (version, arch)
    assert found["dreambooth_base_family"] == family
    assert found["ss_v_parameterization"] == str(v)

    shutil.copyfile(lora_path, f"{comfy_host.get_folder_paths('loras')[0]}/{save_name}.safetensors")
    caplog.set_level(logging.WARNING)
    with torch.inference_mode():
        lm, lc = host_nodes.LoraLoader().load_lora(model, clip, f"{save_name}.safetensors", 1.0, 1.0)
    assert "lora key not loaded" not in caplog.text and "NOT LOADED" not in caplog.text
    assert len(lm.patches) == len(names), "every key patches one weight"
    base, with_lora = out(model, clip), out(lm, lc)
    assert not torch.equal(base, with_lora)
    torch.testing.assert_close(with_lora, out(trained_model, clip), rtol=1e-3, atol=1e-3)


def assert_class_image_is_stock(pack, model, clip, vae, width: int = 64, height: int = 48,
                                latent: Optional[Callable[[int], dict]] = None) -> None:
    """The backend's class image (seed 7, 2 Euler steps, CFG 3 against "blurry", width × height) equals the
    stock graph's on `latent(the backend's latent factor)` (default: a 16-channel empty latent, 8x)."""
    base = core(pack, "backends.base")
    backend = comfy_backend(pack).ComfyBackend(model, clip, vae)
    settings = base.SampleSettings(steps=2, guidance=3.0, sampler="euler:simple", negative_prompt="blurry",
                                   width=width, height=height)
    with torch.inference_mode():
        ours = backend.generate(["a photo of a dog"], [7], settings)[0]
    empty = (latent(backend.latent_factor) if latent else
             {"samples": torch.zeros([1, 16, height // 8, width // 8])})
    stock = stock_image(model, clip, vae, "a photo of a dog", "blurry", empty, 7, 2, 3.0, "euler", "simple")
    assert ours.shape == (height, width, 3) and np.array_equal(ours, stock)


def assert_detection_refuses(pack, config, sampling, match: str) -> None:
    """A stand-in MODEL of `config` and `sampling` (detection reads only the host's model config and
    model_sampling objects) is refused before any work, with a message matching `match`."""
    families = importlib.import_module(pack.__name__ + ".nodes.families")
    base = core(pack, "backends.base")
    model = SimpleNamespace(model=SimpleNamespace(model_config=config), get_model_object=lambda _name: sampling)
    with pytest.raises(base.UnsupportedModel, match=match):
        families.detect(model)
