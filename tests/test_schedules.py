"""The training schedules (training/schedules.py): the discrete one is exactly what the trainer did
before Backend.schedule(); the flow one is rectified flow as SD3/Flux train it; and the trainer
trains a tiny flow-matching model through it."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from conftest import make_tiny_backend
from dreambooth_core.adapters.kohya import kohya_name
from dreambooth_core.backends.base import Backend, BackendDefaults
from dreambooth_core.config import TrainConfig
from dreambooth_core.training import objective
from dreambooth_core.training.cache import Bucket
from dreambooth_core.training.draw import draw
from dreambooth_core.training.objective import DiscreteSchedule, FlowSchedule, Schedule
from dreambooth_core.training.trainer import train
from test_trainer import Ex

ALPHAS = torch.linspace(0.999, 0.01, 1000)


# -- the discrete schedule ------------------------------------------------------------------------

@pytest.mark.parametrize("prediction", ["epsilon", "v_prediction"])
@pytest.mark.parametrize("gamma", [None, 5.0])
def test_the_discrete_schedule_is_make_batch(prediction, gamma):
    gen = torch.Generator().manual_seed(1)
    x0, noise = torch.randn(4, 4, 3, 3, generator=gen), torch.randn(4, 4, 3, 3, generator=gen)
    t = torch.tensor([0, 17, 500, 999])
    ours = DiscreteSchedule(ALPHAS, prediction).noised(x0, noise, t, min_snr_gamma=gamma)
    before = objective.make_batch(x0, noise, t, ALPHAS, prediction, gamma)
    for field in ("noisy", "timesteps", "target", "weight"):
        assert torch.equal(getattr(ours, field), getattr(before, field)), field
    a = ALPHAS[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(ours.noisy, a.sqrt() * x0 + (1 - a).sqrt() * noise)
    assert (gamma is None) == bool((ours.weight == 1).all())


def test_the_discrete_schedule_draws_what_randint_drew():
    """Same values and same generator consumption: every run, resume and demo stays bit-identical."""
    schedule = DiscreteSchedule(ALPHAS, "epsilon")
    ours, theirs = torch.Generator().manual_seed(7), torch.Generator().manual_seed(7)
    t = schedule.sample_timesteps(6, ours)
    assert torch.equal(t, torch.randint(0, 1000, (6,), generator=theirs)) and t.dtype == torch.int64
    assert torch.equal(torch.rand(3, generator=ours), torch.rand(3, generator=theirs))


def test_a_discrete_backend_trains_with_its_own_schedule():
    backend = make_tiny_backend(prediction_type="v_prediction")
    schedule = backend.schedule()
    assert isinstance(schedule, DiscreteSchedule) and isinstance(schedule, Schedule) and schedule.kind == "discrete"
    assert schedule.prediction_type == "v_prediction" and schedule.alphas_cumprod is backend.alphas_cumprod
    with pytest.raises(ValueError, match="prediction_type 'flow'"):
        DiscreteSchedule(ALPHAS, "flow")


# -- the flow schedule ----------------------------------------------------------------------------

def test_flow_noisy_input_target_and_weight():
    gen = torch.Generator().manual_seed(2)
    x0, noise = torch.randn(3, 4, 2, 2, generator=gen), torch.randn(3, 4, 2, 2, generator=gen)
    sigma = torch.tensor([0.1, 0.5, 0.9])
    batch = FlowSchedule(shift=3.0).noised(x0, noise, sigma)
    s = sigma.view(-1, 1, 1, 1)
    torch.testing.assert_close(batch.noisy, (1 - s) * x0 + s * noise)
    torch.testing.assert_close(batch.target, noise - x0)
    assert torch.equal(batch.timesteps, sigma) and batch.timesteps.dtype == torch.float32
    assert torch.equal(batch.weight, torch.ones(3))
    # following the velocity from the noisy input for σ lands on the image
    torch.testing.assert_close(batch.noisy - s * batch.target, x0)


def _sigmas(schedule: FlowSchedule, n: int = 20000, seed: int = 0) -> torch.Tensor:
    return schedule.sample_timesteps(n, torch.Generator().manual_seed(seed))


@pytest.mark.parametrize("schedule", [FlowSchedule(), FlowSchedule(shift=3.0), FlowSchedule(sampling="uniform"),
                                      FlowSchedule(shift=0.3, sampling="uniform"), FlowSchedule(logit_std=30.0)])
def test_flow_sigmas_lie_strictly_between_image_and_noise(schedule):
    """Also where float32 would round the draw to 0 or 1 (a wide logit-normal, a uniform 0)."""
    s = _sigmas(schedule)
    assert s.dtype == torch.float32 and s.shape == (20000,)
    assert bool((s > 0).all()) and bool((s < 1).all())
    assert torch.equal(s, _sigmas(schedule))  # the generator decides them


def test_logit_normal_centres_on_half_and_the_shift_moves_it_to_noise():
    plain, shifted = _sigmas(FlowSchedule()).median(), _sigmas(FlowSchedule(shift=3.0)).median()
    assert abs(float(plain) - 0.5) < 0.02
    # shift·σ / (1 + (shift − 1)·σ) is monotone, so the median maps with it: 3·0.5 / 2 = 0.75
    assert abs(float(shifted) - 0.75) < 0.02 and shifted > plain + 0.2
    assert abs(float(_sigmas(FlowSchedule(logit_mean=1.0)).median()) - float(torch.sigmoid(torch.tensor(1.0)))) < 0.02
    uniform = _sigmas(FlowSchedule(sampling="uniform"))
    torch.testing.assert_close(uniform.quantile(torch.tensor([0.1, 0.5, 0.9])), torch.tensor([0.1, 0.5, 0.9]),
                               atol=0.02, rtol=0)
    # a narrow logit-normal puts fewer steps at the ends than uniform does
    assert (_sigmas(FlowSchedule()) < 0.1).float().mean() < (uniform < 0.1).float().mean()


def test_flow_refuses_min_snr_and_bad_settings():
    with pytest.raises(ValueError, match=r"min_snr_gamma=5: min-SNR weighting is defined for ε/v-prediction on a "
                                         r"discrete .* Leave min_snr_gamma unset"):
        FlowSchedule().noised(torch.zeros(1, 4, 2, 2), torch.zeros(1, 4, 2, 2), torch.tensor([0.5]), 5.0)
    with pytest.raises(ValueError, match="shift 0"):
        FlowSchedule(shift=0)
    with pytest.raises(ValueError, match="sampling 'mode'"):
        FlowSchedule(sampling="mode")
    with pytest.raises(ValueError, match="logit_std -1"):
        FlowSchedule(logit_std=-1)


def test_the_draw_takes_its_timesteps_from_the_schedule():
    """Flow σ for both parts, the rest of the batch as with any schedule; offset noise still applies."""
    gen = torch.Generator().manual_seed(3)
    inst = Bucket(torch.randn(3, 4, 2, 2, generator=gen), None, ["a photo of sks star"] * 3, (16, 16))
    cls = Bucket(torch.randn(4, 4, 2, 2, generator=gen), None, ["a photo of a star"] * 4, (16, 16))
    cfg = TrainConfig(class_noun="star", batch_size=3, offset_noise=0.1)
    parts, _ = draw(cfg, FlowSchedule(shift=3.0), 5, 0, [inst], [cls])
    discrete, _ = draw(cfg, DiscreteSchedule(ALPHAS, "epsilon"), 5, 0, [inst], [cls])
    assert len(parts) == 2
    for (_, _, t, _, _), (_, _, dt, _, _) in zip(parts, discrete):
        assert t.dtype == torch.float32 and bool(((t > 0) & (t < 1)).all()) and dt.dtype == torch.int64
    # the instance samples and noise are drawn before their timesteps: the same for any schedule
    assert torch.equal(parts[0][0], discrete[0][0]) and torch.equal(parts[0][1], discrete[0][1])
    assert torch.equal(draw(cfg, FlowSchedule(shift=3.0), 5, 0, [inst], [cls])[0][1][2], parts[1][2])


# -- training a tiny flow-matching model ----------------------------------------------------------

INSTANCE_PROMPT, CLASS_PROMPT = "a photo of sks star", "a photo of a star"
SIZE = 8  # pixels; the latents are the pixels themselves (no VAE)


class TinyFlowDenoiser(nn.Module):
    """An MLP velocity model v(x_σ, σ, text): the smallest model that is a flow-matching DiT's
    interface, with Linear layers for the LoRA."""

    def __init__(self, dim: int = 3 * SIZE * SIZE, text_dim: int = 32, hidden: int = 128):
        super().__init__()
        self.x_in, self.time_in, self.text_in = nn.Linear(dim, hidden), nn.Linear(16, hidden), nn.Linear(text_dim, hidden)
        self.blocks = nn.ModuleList(nn.Sequential(nn.Linear(hidden, 2 * hidden), nn.SiLU(), nn.Linear(2 * hidden, hidden))
                                    for _ in range(2))
        self.out = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor, sigma: torch.Tensor, text: torch.Tensor) -> torch.Tensor:
        freqs = torch.arange(8, dtype=torch.float32, device=x.device)
        angles = sigma.float()[:, None] * 1000 * torch.exp(-freqs * 1.0)[None]
        h = self.x_in(x.flatten(1)) + self.time_in(torch.cat([angles.sin(), angles.cos()], 1)) + self.text_in(text)
        for block in self.blocks:
            h = h + block(torch.nn.functional.silu(h))
        return self.out(h).view_as(x)


_PRETRAINED: dict = {}


def _pretrained(shift: float) -> dict:
    """The base model's weights: TinyFlowDenoiser trained (fully, seeded) on the class, so that
    DreamBooth starts, as it does on Flux or SD3, from a model that already generates the class."""
    if shift not in _PRETRAINED:
        from dreambooth_core.training.cache import pil_to_tensor

        backend = TinyFlowBackend(shift, pretrained=False)
        x0 = torch.stack([pil_to_tensor(image) for image in _stars(100, 256)])
        gen = torch.Generator().manual_seed(100)
        context = backend.encode_text([CLASS_PROMPT], size=(SIZE, SIZE))["context"].expand(64, -1)
        optimizer = torch.optim.Adam(backend.model.parameters(), lr=2e-3)
        schedule = backend.schedule()
        for _ in range(PRETRAIN_STEPS):
            x = x0[torch.randint(len(x0), (64,), generator=gen)]
            batch = schedule.noised(x, torch.randn(x.shape, generator=gen), schedule.sample_timesteps(64, gen))
            loss = objective.per_sample_mse(backend.model(batch.noisy, batch.timesteps, context), batch.target).mean()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
        _PRETRAINED[shift] = {k: v.detach().clone() for k, v in backend.model.state_dict().items()}
    return _PRETRAINED[shift]


PRETRAIN_STEPS = 300


class TinyFlowBackend(BackendDefaults):
    """A Backend for TinyFlowDenoiser: identity "VAE", a frozen bag-of-tokens text encoder on the CLIP
    tokenizer, and a flow schedule. It records the timesteps the trainer predicts at."""

    # The LoRA file's metadata knows only the SD families so far (adapters.metadata.FAMILIES): these
    # label the file; the trainer reads the schedule.
    prediction_type, family = "epsilon", "sd1"
    alphas_cumprod = torch.ones(1)
    native_resolution, latent_factor = SIZE, 1

    def __init__(self, shift: float = 3.0, pretrained: bool = True):
        from dreambooth_core.embedded.model import clip_tokenizer

        torch.manual_seed(0)
        self.model, self.words = TinyFlowDenoiser(), nn.Embedding(49408, 32)
        self.words.requires_grad_(False)
        self.tokenizer, self.shift, self.seen = clip_tokenizer(), shift, []
        if pretrained:
            self.model.load_state_dict(_pretrained(shift))

    @property
    def device(self) -> torch.device:
        return torch.device("cpu")

    def schedule(self) -> FlowSchedule:
        return FlowSchedule(shift=self.shift)

    def fingerprint(self) -> str:
        return "tiny-flow"

    def describe(self) -> str:
        return "tiny flow model"

    def tokenizers(self):
        return [self.tokenizer]

    def encode_text(self, prompts, *, size):
        ids = self.tokenizer(list(prompts), padding="max_length", max_length=77, return_tensors="pt")
        mask = ids.attention_mask.unsqueeze(-1).float()
        return {"context": (self.words(ids.input_ids) * mask).sum(1) / mask.sum(1)}

    def encode_images(self, pixels):
        return pixels.clone()

    def decode_latents(self, latents):
        return latents.clone()

    def predict(self, noisy, timesteps, cond):
        self.seen.append(timesteps.detach().clone())
        return self.model(noisy, timesteps, cond["context"])

    def lora_targets(self, unet, text_encoder, conv=False):
        if not unet:
            return {}
        return {kohya_name("lora_unet", path): m for path, m in self.model.named_modules() if isinstance(m, nn.Linear)}

    def trainable_models(self, unet, text_encoder):
        return [self.model] if unet else []

    def set_gradient_checkpointing(self, enabled) -> None:
        pass

    def generate(self, prompts, seeds, settings, progress=None):
        raise NotImplementedError("the tiny flow model is not sampled through the backend")

    def save_full(self, path, metadata=None):
        raise NotImplementedError


def _square(rng, background, colour, y: int, x: int, side: int):
    import numpy as np
    from PIL import Image

    arr = np.empty((SIZE, SIZE, 3), np.uint8)
    arr[...] = background
    arr[y:y + side, x:x + side] = colour
    return Image.fromarray(arr)


def _stars(seed: int, n: int) -> list:
    """The class: a square of any colour, size and place on a plain background of any colour."""
    import numpy as np

    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        side = int(rng.integers(3, 6))
        y, x = (int(v) for v in rng.integers(0, SIZE - side + 1, 2))
        out.append(_square(rng, rng.integers(0, 256, 3), rng.integers(0, 256, 3), y, x, side))
    return out


# The subject: one bright red square on dark blue, photographed at a few places.
INSTANCE = [Ex(_square(None, (0, 0, 90), (240, 30, 30), 1 + i, 2 + i, 4), INSTANCE_PROMPT) for i in range(3)]
CLASS = [Ex(image, CLASS_PROMPT) for image in _stars(1, 4)]

def _pixels(examples) -> torch.Tensor:
    from dreambooth_core.training.cache import pil_to_tensor

    return torch.stack([pil_to_tensor(ex.image) for ex in examples])


@torch.no_grad()
def _held_out_loss(backend: TinyFlowBackend, x0: torch.Tensor, prompt: str, draws: int = 64) -> float:
    """The flow loss at σ and noise the training never drew (another generator)."""
    gen = torch.Generator().manual_seed(12345)
    schedule = backend.schedule()
    x = x0.repeat(draws, 1, 1, 1)
    batch = schedule.noised(x, torch.randn(x.shape, generator=gen), schedule.sample_timesteps(len(x), gen))
    pred = backend.model(batch.noisy, batch.timesteps, backend.encode_text([prompt] * len(x), size=(SIZE, SIZE))["context"])
    return float(objective.per_sample_mse(pred, batch.target).mean())


@torch.no_grad()
def _sample(backend: TinyFlowBackend, prompt: str, n: int = 8, steps: int = 20) -> torch.Tensor:
    """Euler steps along the predicted velocity from pure noise (σ = 1) to the image (σ = 0)."""
    x = torch.randn(n, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(99))
    context = backend.encode_text([prompt] * n, size=(SIZE, SIZE))["context"]
    sigmas = objective.shift_sigmas(torch.linspace(1, 0, steps + 1), backend.shift)
    for s, s_next in zip(sigmas[:-1], sigmas[1:]):
        x = x + (s_next - s) * backend.model(x, s.expand(n), context)
    return x


def _distance_to_subject(images: torch.Tensor, subject: torch.Tensor) -> float:
    """Each image's mean squared distance to its nearest subject photo, averaged."""
    return float(torch.cdist(images.flatten(1), subject.flatten(1)).pow(2).min(1).values.mean() / images[0].numel())


def test_the_trainer_trains_a_flow_matching_model_through_its_schedule(tmp_path):
    backend = TinyFlowBackend(shift=3.0)
    assert isinstance(backend, Backend)
    subject = _pixels(INSTANCE)
    before = _held_out_loss(backend, subject, INSTANCE_PROMPT)
    sampled_before = _sample(backend, INSTANCE_PROMPT)
    config = TrainConfig(class_noun="star", steps=40, output_dir=str(tmp_path), learning_rate=1e-2, batch_size=2,
                         rank=8, save_precision="fp32", offset_noise=0.05)
    result = train(backend, config, INSTANCE, CLASS)
    assert result.status == "completed" and result.lora_path and result.lora_path.is_file()
    assert all(h["prior_loss"] is not None for h in result.history)  # prior preservation ran

    # the trainer predicted at the schedule's σ: floats in (0, 1), shifted towards noise (median 0.75)
    seen = torch.cat(backend.seen)
    assert seen.dtype == torch.float32 and bool(((seen > 0) & (seen < 1)).all())
    assert float(seen.median()) > 0.6

    # The subject's flow loss drops (0.93 → 0.68 here; trained towards ε or −v instead, it rises to 1.1 or 3)
    after = _held_out_loss(backend, subject, INSTANCE_PROMPT)
    assert after < 0.8 * before, (before, after)
    # ... and what the model generates for the instance prompt moves to the subject (1.37 → 0.73 here)
    sampled_after = _sample(backend, INSTANCE_PROMPT)
    assert (sampled_after - sampled_before).abs().mean() > 0.2
    near_before, near_after = (_distance_to_subject(x, subject) for x in (sampled_before, sampled_after))
    assert near_after < 0.65 * near_before, (near_before, near_after)


def test_a_flow_model_refuses_min_snr_before_any_work(tmp_path):
    backend = TinyFlowBackend()
    backend.encode_images = lambda pixels: pytest.fail("min-SNR was refused only after caching")
    config = TrainConfig(class_noun="star", steps=2, output_dir=str(tmp_path), min_snr_gamma=5.0)
    with pytest.raises(ValueError, match="min_snr_gamma=5: .* Leave min_snr_gamma unset"):
        train(backend, config, INSTANCE, CLASS)
    assert not list(tmp_path.iterdir())


def test_a_flow_checkpoint_records_its_schedule(tmp_path):
    """Another shift trains other noise levels: a resumed run refuses it like any other setting."""
    from dreambooth_core.training.checkpoint import CheckpointMismatch

    config = TrainConfig(class_noun="star", steps=2, output_dir=str(tmp_path), checkpoint_every=1,
                         learning_rate=1e-3)
    train(TinyFlowBackend(shift=3.0), config, INSTANCE, CLASS)
    with pytest.raises(CheckpointMismatch, match="schedule: .*'shift': 3.0.* in the checkpoint, .*'shift': 1.0"):
        train(TinyFlowBackend(shift=1.0), TrainConfig(**{**config.to_dict(), "steps": 3, "resume": True}),
              INSTANCE, CLASS)
    resumed = train(TinyFlowBackend(shift=3.0), TrainConfig(**{**config.to_dict(), "steps": 3, "resume": True}),
                    INSTANCE, CLASS)
    assert resumed.status == "completed" and resumed.step == 3
