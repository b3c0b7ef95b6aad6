"""Trainer mechanics on a tiny random model: resume, cancel, NaN guard, LoRA round trip."""
from __future__ import annotations

import json
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import diffusers_prediction, make_tiny_backend
from dreambooth_core import adapters
from dreambooth_core.training import objective
from dreambooth_core.config import TrainConfig
from dreambooth_core.training.checkpoint import CheckpointMismatch
from dreambooth_core.training.trainer import CHECKPOINT_NAME, Callbacks, TrainingDiverged, train


@dataclass
class Ex:
    image: Image.Image
    caption: str


@dataclass
class MaskedEx(Ex):
    mask: Image.Image


def examples(n: int, caption: str, seed: int) -> list:
    rng = np.random.default_rng(seed)
    return [Ex(Image.fromarray(rng.integers(0, 255, (16, 16, 3), dtype=np.uint8)), caption) for _ in range(n)]


INSTANCE = examples(3, "a photo of sks star", 0)
CLASS = examples(4, "a photo of a star", 1)


def config(tmp_path, **kw) -> TrainConfig:
    base = dict(class_noun="star", steps=6, output_dir=str(tmp_path), learning_rate=1e-2, batch_size=2,
                save_precision="fp32", train_text_encoder=True, flip=True)
    base.update(kw)
    return TrainConfig(**base)


def lora_state(result) -> dict:
    return {k: v.clone() for k, v in result.network.state_dict().items()}


def test_training_updates_the_lora_and_writes_outputs(tmp_path):
    result = train(make_tiny_backend(), config(tmp_path), INSTANCE, CLASS)
    assert result.status == "completed" and result.step == 6
    ups = [v for k, v in lora_state(result).items() if k.endswith("lora_up.weight")]
    assert any(v.abs().max() > 0 for v in ups), "lora_up starts at zero and must have moved"
    for name in ("dreambooth_lora.safetensors", "config.json", "loss.json", "loss.png"):
        assert (tmp_path / name).is_file()
    assert all(h["prior_loss"] is not None for h in result.history)
    assert not list(tmp_path.glob("*.partial"))


def test_cancel_then_resume_reaches_the_same_weights(tmp_path):
    straight = train(make_tiny_backend(), config(tmp_path / "a"), INSTANCE, CLASS)

    calls = {"n": 0}

    def stop_after_three() -> bool:
        calls["n"] += 1
        return calls["n"] > 3

    first = train(make_tiny_backend(), config(tmp_path / "b"), INSTANCE, CLASS,
                  Callbacks(should_stop=stop_after_three))
    assert first.status == "cancelled" and first.step == 3
    assert (tmp_path / "b" / CHECKPOINT_NAME).is_file()
    assert not (tmp_path / "b" / "dreambooth_lora.safetensors").exists()

    resumed = train(make_tiny_backend(), config(tmp_path / "b", resume=True), INSTANCE, CLASS)
    assert resumed.status == "completed" and resumed.step == 6
    assert [h["step"] for h in resumed.history] == list(range(1, 7))
    a, b = lora_state(straight), lora_state(resumed)
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


class HostCancel(Exception):
    """Stands for a host's interrupt raised from inside the model (ComfyUI >= 0.3.65)."""


def _raise_at(backend, where: str, call: int) -> None:
    """Make the backend raise HostCancel inside its `call`-th forward pass, the backward pass that
    follows it, or its `call`-th preview sample."""
    calls = {"predict": 0, "generate": 0}
    real_predict, real_generate = backend.predict, backend.generate

    def cancel(*_):
        raise HostCancel()

    def predict(*args, **kwargs):
        calls["predict"] += 1
        if where == "forward" and calls["predict"] == call:
            cancel()
        out = real_predict(*args, **kwargs)
        if where == "backward" and calls["predict"] == call:
            out.register_hook(cancel)
        return out

    def generate(*args, **kwargs):
        calls["generate"] += 1
        if where == "preview" and calls["generate"] == call:
            cancel()
        return real_generate(*args, **kwargs)

    backend.predict, backend.generate = predict, generate


@pytest.mark.parametrize("where, call, finished", [("forward", 4, 3), ("backward", 4, 3), ("preview", 2, 4)])
def test_cancel_raised_inside_the_model_keeps_the_last_finished_step(tmp_path, where, call, finished):
    """A host that raises its Cancel mid-step (forward, backward or a preview sample) loses nothing:
    the checkpoint is the last finished step, and resuming from it reaches the uninterrupted weights."""
    kw = dict(sample_every=2) if where == "preview" else {}
    previews = Callbacks(on_preview=lambda step, images: None)
    straight = train(make_tiny_backend(), config(tmp_path / "a", **kw), INSTANCE, CLASS, previews)

    backend = make_tiny_backend()
    _raise_at(backend, where, call)
    first = train(backend, config(tmp_path / "b", **kw), INSTANCE, CLASS,
                  Callbacks(on_preview=previews.on_preview, cancelled_by=(HostCancel,)))
    assert first.status == "cancelled" and first.step == finished
    assert [h["step"] for h in first.history] == list(range(1, finished + 1))
    assert first.checkpoint_path == tmp_path / "b" / CHECKPOINT_NAME and first.checkpoint_path.is_file()
    assert not (tmp_path / "b" / "dreambooth_lora.safetensors").exists()
    assert not list((tmp_path / "b").glob("*.partial"))

    resumed = train(make_tiny_backend(), config(tmp_path / "b", resume=True, **kw), INSTANCE, CLASS, previews)
    assert resumed.status == "completed" and resumed.step == 6
    a, b = lora_state(straight), lora_state(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_an_exception_not_named_as_cancel_is_not_taken_for_one(tmp_path):
    backend = make_tiny_backend()
    _raise_at(backend, "forward", 2)
    with pytest.raises(HostCancel):
        train(backend, config(tmp_path), INSTANCE, CLASS, Callbacks(cancelled_by=(TrainingDiverged,)))
    assert not (tmp_path / CHECKPOINT_NAME).exists()


def test_resume_refuses_a_checkpoint_of_other_settings(tmp_path):
    train(make_tiny_backend(), config(tmp_path, steps=2, checkpoint_every=1), INSTANCE, CLASS)
    with pytest.raises(CheckpointMismatch, match="rank"):
        train(make_tiny_backend(), config(tmp_path, steps=4, rank=8, resume=True), INSTANCE, CLASS)


def test_nan_loss_stops_with_a_message_and_keeps_the_last_good_state(tmp_path):
    backend = make_tiny_backend()
    real_predict = backend.predict
    calls = {"n": 0}

    def predict(*args, **kwargs):
        calls["n"] += 1
        out = real_predict(*args, **kwargs)
        return out * float("nan") if calls["n"] == 3 else out

    backend.predict = predict
    with pytest.raises(TrainingDiverged, match="step 3") as info:
        train(backend, config(tmp_path), INSTANCE, CLASS)
    assert "learning rate" in str(info.value)
    from safetensors.torch import load_file

    state = load_file(tmp_path / CHECKPOINT_NAME)
    params = {k: v for k, v in state.items() if k.startswith("param.")}
    assert params and all(torch.isfinite(v).all() for v in params.values())
    assert not (tmp_path / "dreambooth_lora.safetensors").exists()
    assert not list(tmp_path.glob("*.partial"))


def test_lora_file_round_trip_gives_identical_outputs(tmp_path):
    trained_backend = make_tiny_backend()
    result = train(trained_backend, config(tmp_path), INSTANCE, CLASS)
    fresh = make_tiny_backend()
    adapters.load_lora(fresh.lora_targets(True, True), result.lora_path)

    gen = torch.Generator().manual_seed(0)
    x = torch.randn(2, 4, 8, 8, generator=gen)
    t = torch.tensor([10, 500])
    with torch.no_grad():
        cond_a = trained_backend.encode_text(["a photo of sks star"] * 2, size=(16, 16))
        cond_b = fresh.encode_text(["a photo of sks star"] * 2, size=(16, 16))
        a = trained_backend.predict(x, t, cond_a)
        b = fresh.predict(x, t, cond_b)
        base = make_tiny_backend().predict(x, t, make_tiny_backend().encode_text(["a photo of sks star"] * 2,
                                                                                 size=(16, 16)))
    assert torch.equal(a, b)
    assert not torch.allclose(a, base, atol=1e-4), "the LoRA must change the output"


def test_lora_keys_are_kohya_style_with_metadata(tmp_path):
    result = train(make_tiny_backend(), config(tmp_path, steps=1), INSTANCE, CLASS)
    state, meta = adapters.read_lora_file(result.lora_path)
    assert any(k.startswith("lora_unet_down_blocks_1_attentions_0_transformer_blocks_0_attn2_to_k.") for k in state)
    assert any(k.startswith("lora_te_text_model_encoder_layers_0_self_attn_q_proj.") for k in state)
    assert {k.rsplit(".", 2)[-2] if k.endswith(".weight") else k.rsplit(".", 1)[-1] for k in state} == \
        {"lora_down", "lora_up", "alpha"}
    assert meta["dreambooth_token"] == "sks" and meta["dreambooth_class_noun"] == "star"
    assert meta["ss_network_dim"] == "4" and meta["dreambooth_steps"] == "1"


@pytest.mark.parametrize("lora_conv", [False, True])
def test_lora_loads_with_diffusers_load_lora_weights(tmp_path, lora_conv):
    pytest.importorskip("peft")
    ours = make_tiny_backend()
    result = train(ours, config(tmp_path, lora_conv=lora_conv), INSTANCE, CLASS)
    x = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    t = torch.tensor([300])
    theirs = diffusers_prediction(result.lora_path, x, t)
    with torch.no_grad():
        mine = ours.predict(x, t, ours.encode_text(["a photo of sks star"], size=(16, 16)))
    torch.testing.assert_close(theirs, mine, rtol=1e-4, atol=1e-5)


def test_full_fine_tune_changes_unet_weights(tmp_path):
    backend = make_tiny_backend()
    before = {k: v.clone() for k, v in backend.unet.state_dict().items()}
    result = train(backend, config(tmp_path, mode="full", steps=2, learning_rate=1e-3, train_text_encoder=False),
                   INSTANCE, CLASS)
    after = backend.unet.state_dict()
    assert any(not torch.equal(before[k], after[k]) for k in before)
    assert result.full_paths and all(p.endswith(".safetensors") for p in result.full_paths)


def test_objective_targets_and_min_snr():
    alphas = torch.linspace(0.99, 0.01, 1000)
    x0, noise = torch.randn(3, 4, 2, 2), torch.randn(3, 4, 2, 2)
    t = torch.tensor([0, 500, 999])
    eps = objective.make_batch(x0, noise, t, alphas, "epsilon")
    assert torch.equal(eps.target, noise)
    v = objective.make_batch(x0, noise, t, alphas, "v_prediction", min_snr_gamma=5.0)
    a = alphas[t].view(-1, 1, 1, 1)
    torch.testing.assert_close(v.target, a.sqrt() * noise - (1 - a).sqrt() * x0)
    snr = alphas[t] / (1 - alphas[t])
    torch.testing.assert_close(v.weight, torch.clamp(snr, max=5.0) / (snr + 1))
    w = objective.make_batch(x0, noise, t, alphas, "epsilon", min_snr_gamma=5.0).weight
    assert w[0] < 1 and w[2] == 1  # high-SNR (small t) steps are down-weighted
    pred = torch.zeros_like(noise)
    parts = objective.dreambooth_loss(pred, eps, n_instance=1, prior_weight=0.5)
    per = noise.pow(2).flatten(1).mean(1)
    torch.testing.assert_close(parts.total, per[0] + 0.5 * per[1:].mean())


def test_masked_loss_counts_only_the_subject_and_weights_each_sample_alike():
    target = torch.zeros(3, 2, 4, 4)
    batch = objective.NoisedBatch(None, None, target, torch.ones(3))
    weight = torch.zeros(2, 2, 4, 4)
    weight[0, :, :2] = 1.0  # sample 0: top half is the subject
    weight[1, :, 0, 0] = 1.0  # sample 1: one pixel
    pred = torch.zeros_like(target)
    pred[0, :, 2:] = 5.0  # wrong only outside the mask
    pred[1, :, 0, 0] = 2.0  # wrong on its one subject pixel
    pred[2] = 1.0  # the class sample: no mask
    parts = objective.dreambooth_loss(pred, batch, n_instance=2, prior_weight=1.0, instance_weight=weight)
    torch.testing.assert_close(parts.instance, torch.tensor((0.0 + 4.0) / 2))  # a mean over each subject
    torch.testing.assert_close(parts.prior, torch.tensor(1.0))
    plain = objective.dreambooth_loss(pred, batch, 2, 1.0)
    ones = objective.dreambooth_loss(pred, batch, 2, 1.0, torch.ones(2, 2, 4, 4))
    torch.testing.assert_close(plain.total, ones.total)


def test_masks_reach_the_loss_and_change_what_is_learned(tmp_path):
    """A mask that marks only part of each photo trains a different LoRA than the whole photo, and
    one that marks everything trains the same one."""
    def masked(value_of):
        out = []
        for ex in INSTANCE:
            m = np.zeros((16, 16), np.uint8)
            m[:, :8] = 255
            out.append(MaskedEx(ex.image, ex.caption, Image.fromarray(value_of(m))))
        return out

    plain = lora_state(train(make_tiny_backend(), config(tmp_path / "a"), INSTANCE, CLASS))
    full = lora_state(train(make_tiny_backend(), config(tmp_path / "b"), masked(lambda m: m * 0 + 255), CLASS))
    half = lora_state(train(make_tiny_backend(), config(tmp_path / "c"), masked(lambda m: m), CLASS))
    for k in plain:
        torch.testing.assert_close(plain[k], full[k], rtol=0, atol=1e-6)
    assert max((plain[k] - half[k]).abs().max().item() for k in plain) > 1e-4
    with pytest.raises(Exception, match="mask_background_weight"):
        config(tmp_path, mask_background_weight=1.5).validate()


def test_resume_refuses_a_checkpoint_trained_with_other_masks(tmp_path):
    masked = [MaskedEx(ex.image, ex.caption, Image.new("L", ex.image.size, 255)) for ex in INSTANCE]
    train(make_tiny_backend(), config(tmp_path, steps=2, checkpoint_every=1), masked, CLASS)
    with pytest.raises(CheckpointMismatch, match="masked_loss"):
        train(make_tiny_backend(), config(tmp_path, steps=4, resume=True), INSTANCE, CLASS)


def test_releasing_frozen_encoders_frees_them_and_changes_no_weight(tmp_path):
    """The CLI's lean mode drops the VAE and frozen text encoder after caching: same LoRA, less held."""
    kept = train(make_tiny_backend(), config(tmp_path / "a", train_text_encoder=False), INSTANCE, CLASS)
    backend = make_tiny_backend()
    lean = train(backend, config(tmp_path / "b", train_text_encoder=False), INSTANCE, CLASS, release_frozen=True)
    assert backend.vae is None and not backend.text_encoders
    with pytest.raises(RuntimeError, match="released"):
        backend.encode_text(["a photo of a star"], size=(16, 16))
    a, b = lora_state(kept), lora_state(lean)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=0)


def test_cli_trimming_runs_once_the_encoders_are_released_and_after_every_step(tmp_path):
    """The CLI's malloc trims: one when training starts (after caching, once the encoders are
    gone), one after each step, with the progress callbacks still called in between."""
    from dreambooth_core.cli.memory import trimming

    events = []
    backend = make_tiny_backend()

    def trim():
        events.append(("trim", backend.vae is None))

    inner = Callbacks(on_step=lambda info: events.append(("step", info.step)),
                      on_phase=lambda name: events.append(("phase", name)))
    train(backend, config(tmp_path, steps=3, train_text_encoder=False), INSTANCE, CLASS, trimming(inner, trim),
          release_frozen=True)
    start = events.index(("phase", "training"))
    assert ("trim", False) not in events, "no trim while the VAE is still in use (caching)"
    assert events[start - 1] == ("trim", True)
    assert events[start + 1:start + 7] == [("trim", True), ("step", 1), ("trim", True), ("step", 2),
                                           ("trim", True), ("step", 3)]


@pytest.mark.parametrize("train_text_encoder", [True, False])
def test_caption_dropout_trains_a_share_of_the_subject_with_the_empty_caption(tmp_path, train_text_encoder):
    """The dropped captions reach the text encoder (or its cache, when frozen) at about the asked
    rate, only for the subject's photos, and change what is learned. (On the embedded model the
    effect on samples is measured by the eval: README, *Quality evaluation*.)"""
    captions = []

    def run(name, p):
        backend = make_tiny_backend()
        encode = backend.encode_text
        backend.encode_text = lambda prompts, size: captions.extend(prompts) or encode(prompts, size=size)
        cfg = config(tmp_path / name, caption_dropout=p, steps=30, train_text_encoder=train_text_encoder)
        return lora_state(train(backend, cfg, INSTANCE, CLASS))

    plain = run("off", 0.0)
    assert "" not in captions
    captions.clear()
    dropped = run("on", 0.5)
    if train_text_encoder:  # every step encodes its batch: 2 subject and 2 class captions
        subject = [c for c in captions if "sks" in c or c == ""]
        assert len(subject) == 60 and 15 <= subject.count("") <= 45, subject.count("")
        assert captions.count("a photo of a star") == 60
    else:  # encoded once, into the cache
        assert "" in captions
    assert max((plain[k] - dropped[k]).abs().max().item() for k in plain) > 1e-4
    with pytest.raises(Exception, match="caption_dropout"):
        config(tmp_path, caption_dropout=1.0).validate()


def test_a_lora_of_the_same_name_is_replaced_only_if_dreambooth_made_it(tmp_path):
    from safetensors.torch import save_file

    adapters.check_replaceable(tmp_path / "none_yet.safetensors")  # nothing there: fine
    ours = train(make_tiny_backend(), config(tmp_path / "run", steps=1), INSTANCE, CLASS).lora_path
    adapters.check_replaceable(ours)
    save_file({"w": torch.zeros(1)}, str(tmp_path / "theirs.safetensors"), metadata={"ss_network_dim": "8"})
    (tmp_path / "broken.safetensors").write_bytes(b"not a safetensors file")
    for name in ("theirs.safetensors", "broken.safetensors"):
        with pytest.raises(adapters.LoRAError, match="save_name: .* was not made by DreamBooth; choose another save_name"):
            adapters.check_replaceable(tmp_path / name)


def test_the_backend_protocol_states_every_method_the_trainer_calls():
    """The trainer reaches a backend only through the protocol (no hasattr/getattr probing), and every
    backend inherits the defaults for the optional parts."""
    import ast
    import inspect

    from dreambooth_core.backends.base import Backend, BackendDefaults
    from dreambooth_core.training import cache, draw, trainer as trainer_module

    used = set()
    source = "\n".join(inspect.getsource(m) for m in (trainer_module, cache, draw))
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Attribute):
            owner = node.value
            if (isinstance(owner, ast.Name) and owner.id == "backend") or (
                    isinstance(owner, ast.Attribute) and owner.attr == "backend"):
                used.add(node.attr)
    assert {"predict", "encode_images", "attach_lora", "unwrap", "release_encoders"} <= used
    stated = {name for name in dir(Backend) if not name.startswith("_")} | set(Backend.__annotations__)
    assert used <= stated, f"the trainer calls {sorted(used - stated)} outside the Backend protocol"
    backend = make_tiny_backend()
    assert isinstance(backend, BackendDefaults) and isinstance(backend, Backend)


def test_a_non_square_bucket_trains_beside_square_class_images(tmp_path):
    """crop="bucket" gives the subject's photos another size than the class images: two forward
    passes, each part's loss over its own latents (they cannot be concatenated)."""
    rng = np.random.default_rng(2)
    wide = [Ex(Image.fromarray(rng.integers(0, 255, (16, 24, 3), dtype=np.uint8)), "a photo of sks star")
            for _ in range(3)]
    result = train(make_tiny_backend(), config(tmp_path, steps=2, crop="bucket"), wide, CLASS)
    assert result.status == "completed" and result.step == 2
    for h in result.history:
        assert np.isfinite(h["loss"]) and h["prior_loss"] is not None
        assert h["loss"] == pytest.approx(h["instance_loss"] + 1.0 * h["prior_loss"])


@pytest.mark.parametrize("masked", [False, True])
def test_the_loss_by_part_is_the_merged_loss_for_equal_sizes(masked):
    """Instance and class parts scored apart give the loss of one batch (min-SNR weights, λ, a
    masked instance loss alike)."""
    gen = torch.Generator().manual_seed(0)
    alphas = torch.linspace(0.99, 0.01, 1000)
    parts = [objective.make_batch(torch.randn(n, 4, 4, 4, generator=gen), torch.randn(n, 4, 4, 4, generator=gen),
                                  torch.randint(0, 1000, (n,), generator=gen), alphas, "epsilon", min_snr_gamma=5.0)
             for n in (2, 3)]
    preds = [torch.randn(b.target.shape, generator=gen) for b in parts]
    weight = torch.rand(2, 4, 4, 4, generator=gen) if masked else None
    merged = objective.NoisedBatch(None, None, torch.cat([b.target for b in parts]),
                                   torch.cat([b.weight for b in parts]))
    whole = objective.dreambooth_loss(torch.cat(preds), merged, 2, 0.7, weight)
    apart = objective.dreambooth_loss_by_part(preds, parts, 0.7, weight)
    for a, b in ((whole.total, apart.total), (whole.instance, apart.instance), (whole.prior, apart.prior)):
        torch.testing.assert_close(a, b)
    alone = objective.dreambooth_loss_by_part(preds[:1], parts[:1], 0.7, weight)
    torch.testing.assert_close(alone.total, objective.dreambooth_loss(preds[0], parts[0], 2, 0.7, weight).total)
    assert alone.prior is None


def _phases() -> tuple:
    said = []
    return said, Callbacks(on_phase=said.append)


def test_resume_refuses_a_change_of_what_the_run_trains(tmp_path):
    """Batch, accumulation, λ, min-SNR, offset noise, caption dropout and flipping define the samples
    and the loss: a resumed run with another value would not continue the checkpoint's training.
    The refusal names each setting with both values and says what to do."""
    train(make_tiny_backend(), config(tmp_path, steps=2, checkpoint_every=1), INSTANCE, CLASS)
    changes = {"batch_size": (2, 1), "gradient_accumulation": (1, 2), "prior_weight": (1.0, 0.5),
               "min_snr_gamma": (None, 5.0), "offset_noise": (0.0, 0.1), "caption_dropout": (0.0, 0.1),
               "flip": (True, False)}
    for name, (old, new) in changes.items():
        with pytest.raises(CheckpointMismatch) as info:
            train(make_tiny_backend(), config(tmp_path, steps=4, resume=True, **{name: new}), INSTANCE, CLASS)
        message = str(info.value)
        assert f"{name}: {old} in the checkpoint, {new} now" in message, message
        assert "set it back" in message and "fresh run" in message
    with pytest.raises(CheckpointMismatch, match="min_snr_gamma: None in the checkpoint, 5.0 now; offset_noise"):
        train(make_tiny_backend(), config(tmp_path, steps=4, resume=True, min_snr_gamma=5.0, offset_noise=0.1),
              INSTANCE, CLASS)


def test_resume_takes_the_new_learning_rate_and_more_steps(tmp_path):
    """A lower learning rate is what the divergence message advises before resuming, and more steps
    is how one trains longer: both apply, the restored optimizer does not keep the old rate, and the
    run says so."""
    from safetensors import safe_open

    train(make_tiny_backend(), config(tmp_path, steps=2, checkpoint_every=1), INSTANCE, CLASS)
    said, callbacks = _phases()
    resumed = train(make_tiny_backend(), config(tmp_path, steps=4, checkpoint_every=1, learning_rate=5e-3,
                                                resume=True), INSTANCE, CLASS, callbacks)
    assert resumed.status == "completed" and resumed.step == 4
    assert [h["lr"] for h in resumed.history] == [1e-2, 1e-2, 5e-3, 5e-3]
    with safe_open(str(tmp_path / CHECKPOINT_NAME), framework="pt") as f:
        groups = json.loads(f.metadata()["dreambooth_checkpoint"])["optimizer"]["param_groups"]
    assert len(groups) == 2 and all(g["lr"] == g["initial_lr"] == 5e-3 for g in groups)
    note = next(s for s in said if s.startswith("resuming"))
    assert "learning_rate 0.01 -> 0.005" in note and "steps 2 -> 4" in note, note


def test_resume_refuses_fewer_steps_than_the_checkpoint_has_trained(tmp_path):
    train(make_tiny_backend(), config(tmp_path, steps=3, checkpoint_every=1), INSTANCE, CLASS)
    with pytest.raises(CheckpointMismatch, match="trained 3 steps, more than steps=2"):
        train(make_tiny_backend(), config(tmp_path, steps=2, resume=True), INSTANCE, CLASS)


def test_a_checkpoint_from_before_the_new_checks_still_resumes(tmp_path):
    """Checkpoints whose signature lacks the objective's settings resume; their saved config still
    tells a changed setting apart."""
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file

    train(make_tiny_backend(), config(tmp_path, steps=2, checkpoint_every=1), INSTANCE, CLASS)
    path = tmp_path / CHECKPOINT_NAME
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["dreambooth_checkpoint"])
    old = ("mode", "rank", "alpha", "lora_conv", "lora_targets", "train_text_encoder", "seed", "prior",
           "masked_loss", "n_trainable", "model")
    meta["signature"] = {k: meta["signature"][k] for k in old}
    save_file(load_file(str(path)), str(path), metadata={"dreambooth_checkpoint": json.dumps(meta)})
    with pytest.raises(CheckpointMismatch, match="batch_size: 2 in the checkpoint, 1 now"):
        train(make_tiny_backend(), config(tmp_path, steps=4, resume=True, batch_size=1), INSTANCE, CLASS)
    resumed = train(make_tiny_backend(), config(tmp_path, steps=3, resume=True), INSTANCE, CLASS)
    assert resumed.status == "completed" and [h["step"] for h in resumed.history] == [1, 2, 3]


@pytest.mark.parametrize("crop_apart", [False, True])
def test_a_separate_prior_pass_trains_the_same_with_one_part_in_memory(tmp_path, monkeypatch, crop_apart):
    """prior_pass="separate" runs the instance part's forward and backward before the class part's: the
    losses and the trained weights are the joint pass's (up to float summation order), and what
    autograd holds for the backward pass at once is one part's, not both parts'. (With non-square
    buckets the two parts are predicted apart in either mode: the same result.)"""
    from dreambooth_core.training import trainer as trainer_mod

    held = []  # bytes saved for backward since the last backward, at each backward

    class Saved:
        live = 0

    def pack(t):
        Saved.live += t.untyped_storage().nbytes()
        return t

    real_backward = trainer_mod.DreamBoothTrainer._make_accelerator

    def accelerator(self):
        acc = real_backward(self)
        plain = acc.backward

        def backward(loss, **kw):
            held.append(Saved.live)
            Saved.live = 0
            return plain(loss, **kw)

        acc.backward = backward
        return acc

    monkeypatch.setattr(trainer_mod.DreamBoothTrainer, "_make_accelerator", accelerator)
    inst = examples(3, "a photo of sks star", 0)
    if crop_apart:
        inst = [Ex(e.image.resize((24, 16)), e.caption) for e in inst]
    runs = {}
    for mode in ("joint", "separate"):
        held.clear()
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            result = train(make_tiny_backend(), config(tmp_path / mode, prior_pass=mode, train_text_encoder=False,
                                                       flip=False, steps=2, prior_weight=0.5, crop="bucket" if crop_apart else "center"),
                           inst, CLASS)
        runs[mode] = (result, list(held))
    (joint, joint_held), (apart, apart_held) = runs["joint"], runs["separate"]
    assert len(apart_held) == 2 * len(joint_held) == 2 * 2
    if not crop_apart:
        assert max(apart_held) < 0.7 * max(joint_held), (max(apart_held), max(joint_held))
    for a, b in zip(joint.history, apart.history):
        for key in ("loss", "instance_loss", "prior_loss"):
            assert a[key] == pytest.approx(b[key], rel=1e-4), key
    for name, value in lora_state(joint).items():
        # Adam's update is ill-conditioned where a gradient is ~0: compare against the tensor's scale
        torch.testing.assert_close(lora_state(apart)[name], value, rtol=1e-3, atol=1e-2 * float(value.abs().max()))


def test_prior_pass_is_checked_and_set_from_the_cli():
    from dreambooth_core.cli.main import parser
    from dreambooth_core.config import build_config

    with pytest.raises(ValueError, match="prior_pass"):
        TrainConfig(class_noun="star", prior_pass="twice").validate()
    for flags, expected in (([], "joint"), (["--prior-pass", "separate"], "separate")):
        assert build_config(parser().parse_args(["train", "--class-noun", "star", *flags])).prior_pass == expected


def test_running_out_of_memory_keeps_the_last_step_and_names_what_to_change(tmp_path):
    """An allocation that fails mid-run (here the 3rd forward) loses nothing: the last finished step is
    kept, the error names the memory settings this run can still change, and resume finishes with the
    weights of a run that never failed."""
    from dreambooth_core.training.out_of_memory import OOM_ERRORS, TrainingOutOfMemory

    straight = train(make_tiny_backend(), config(tmp_path / "a", steps=4), INSTANCE, CLASS)
    backend = make_tiny_backend()
    real_predict, calls = backend.predict, {"n": 0}

    def predict(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 3:
            raise OOM_ERRORS[0]("CUDA out of memory. Tried to allocate 2.00 GiB")
        return real_predict(*args, **kwargs)

    backend.predict = predict
    with pytest.raises(TrainingOutOfMemory) as err:
        train(backend, config(tmp_path / "b", steps=4), INSTANCE, CLASS)
    text = str(err.value)
    assert "step 3" in text and str(tmp_path / "b" / CHECKPOINT_NAME) in text
    assert "gradient_checkpointing" in text and "prior_pass" in text and "adafactor" in text
    assert "batch_size" in text and "(now 2" in text
    resumed = train(make_tiny_backend(), config(tmp_path / "b", steps=4, resume=True), INSTANCE, CLASS)
    assert resumed.status == "completed" and resumed.step == 4
    a, b = lora_state(straight), lora_state(resumed)
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=0, atol=1e-6)


def test_the_out_of_memory_advice_leaves_out_what_is_already_set():
    from dreambooth_core.training.out_of_memory import levers

    lean = TrainConfig(class_noun="star", gradient_checkpointing="full", prior_pass="separate", optimizer="adafactor")
    text = " ".join(levers(lean, prior=True))
    assert "gradient_checkpointing" not in text and "prior_pass" not in text and "adafactor" not in text
    assert "resolution" in text
