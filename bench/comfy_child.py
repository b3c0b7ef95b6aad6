"""One training run inside ComfyUI (in-process, the way the executor calls a node), for the
side-by-side with the host's own trainer. Run under the host's Python (.venv-comfyui for 0.3.64,
.venv-comfyui-current for 0.33, COMFYUI_DIR naming the host), wrapped by bench.child (which stamps
every optimizer step, records peak memory and, with --flops-step, counts one step's FLOPs):

    python -m bench.child --record R.json --steps N --module bench.comfy_child -- \
        --which ours|host --model sd15|sd3|sd3_d8 --work DIR --resolution 64 --steps N --rank 4 --lr 1e-4 \
        [--lora-set matched|shipped] [--checkpointing] [--depth D] [--offloading] [--bypass] [--dtype fp32|bf16]
        [--base stored|fp8]

- ours: DreamBoothDataset → DreamBoothTrain (LoRA on our default module set, prior preservation
  off as the host has none, batch 1, AdamW).
- host: VAEEncode of the same images + CLIPTextEncode of the same caption → the host's
  TrainLoraNode (bench/comfy_host_trainer.py: classic call on 0.3.64, V3 on 0.33; AdamW, MSE,
  lora_dtype fp32, batch 1). `--lora-set matched` (the default) restricts it to the modules ours
  adapts; `shipped` leaves it as the host ships it (every Linear/Conv + bias and norm differences).

Both on the same MODEL/CLIP/VAE, loaded by the host's own loaders on CPU under
torch.inference_mode() as the executor runs nodes: the seeded mini SD1.5 checkpoint of the
integration tests (tests/integration/mini_checkpoint.py) or an SD3 (MMDiT, a flow-matching family)
of tests/integration/family_checkpoints.py: the tests' tiny one (2 blocks, 128 wide) or, for timing, one
of 8 blocks, 512 wide (~60 M parameters).
"""
from __future__ import annotations

import argparse
import importlib
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
CAPTION = "a photo of sks star"


def comfy_dir() -> Path:
    return Path(os.environ.get("COMFYUI_DIR", REPO.parent / "shared" / "comfyui")).resolve()


def host_in_process(base: Path):
    """ComfyUI imported in this process as `main.py --cpu` would configure it, its folders in `base`.
    ComfyUI's folder goes first on sys.path: its top-level `nodes` must win over the pack's `nodes/`."""
    sys.path.insert(0, str(comfy_dir()))
    if "nodes" in sys.modules and not hasattr(sys.modules["nodes"], "NODE_CLASS_MAPPINGS"):
        del sys.modules["nodes"]
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import comfy.model_management  # noqa: F401  (reads args: CPU)
    import folder_paths

    for name in ("input", "output", "temp", "loras"):
        (base / name).mkdir(parents=True, exist_ok=True)
    folder_paths.set_input_directory(str(base / "input"))
    folder_paths.set_output_directory(str(base / "output"))
    folder_paths.set_temp_directory(str(base / "temp"))
    folder_paths.add_model_folder_path("loras", str(base / "loras"), is_default=True)
    return folder_paths


def host_version() -> str:
    try:
        return importlib.import_module("comfyui_version").__version__
    except ImportError:
        return "unknown"


def load_model(name: str, base: str = "stored"):
    """(MODEL, CLIP, VAE, label) through the host's loaders, under inference mode. `base="fp8"`: the
    diffusion model's weights stored float8_e4m3fn, as Load Diffusion Model's `weight_dtype` makes them."""
    import torch

    sys.path.append(str(REPO / "tests" / "integration"))
    options = {"dtype": torch.float8_e4m3fn} if base == "fp8" else {}
    with torch.inference_mode():
        import comfy.sd

        if name == "sd15":
            import mini_checkpoint

            model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(mini_checkpoint.ensure_checkpoint()),
                                                                     model_options=options)[:3]
            return model, clip, vae, "mini SD1.5 checkpoint"
        import family_checkpoints

        files = family_checkpoints.ensure_family(name)
        shape = files.layout
        model = comfy.sd.load_diffusion_model(str(files.diffusion_model), model_options=options)
        return (model, files.load_clip(), files.load_vae(),
                f"{files.model_class} {shape.get('depth')} blocks, {shape.get('hidden')} wide (flow matching)")


def our_module_names(pack, model, clip, scope: str = "transformer") -> set:
    """The diffusion-model modules our Train node adapts (as named in `model.model.named_modules()`)."""
    backend_mod = importlib.import_module(pack.__name__ + ".nodes.comfy_backend")
    kohya = importlib.import_module(pack.__name__ + ".dreambooth_core.adapters.kohya")
    backend = backend_mod.ComfyBackend(model, clip)
    targets = kohya.select_lora_targets(backend.lora_targets(True, False), scope)
    names = {id(m): n for n, m in backend.model.model.named_modules()}
    return {names[id(m)] for m in targets.values()}


def lora_file_params(path: str) -> int:
    import numpy as np
    from safetensors import safe_open

    with safe_open(path, framework="pt") as f:
        return sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys() if not k.endswith(".alpha"))


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--which", choices=("ours", "host"), required=True)
    p.add_argument("--model", choices=("sd15", "sd3", "sd3_d8"), default="sd15",
                   help="sd3: the tests' tiny SD3 (2 blocks, 128 wide); sd3_d8: 8 blocks, 512 wide")
    p.add_argument("--work", default=None)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--lora-set", choices=("matched", "shipped"), default="matched",
                   help="host: restricted to our modules (matched) or as shipped")
    p.add_argument("--checkpointing", action="store_true", help="gradient checkpointing (host: at --depth)")
    p.add_argument("--depth", type=int, default=1, help="host: checkpoint_depth (0.33)")
    p.add_argument("--offloading", action="store_true", help="host: offloading (0.33)")
    p.add_argument("--bypass", action="store_true", help="host: bypass_mode (0.33)")
    p.add_argument("--dtype", choices=("fp32", "bf16"), default="fp32", help="training dtype of the base model")
    p.add_argument("--base", choices=("stored", "fp8"), default="stored",
                   help="the diffusion model's weights as stored, or loaded as float8_e4m3fn (both trainers)")
    p.add_argument("--info", default=None, help="write what was trained (JSON) here")
    a = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    base = Path(a.work or tempfile.mkdtemp(prefix="bench-comfy-"))
    host_in_process(base)
    import nodes as comfy_nodes

    if os.environ.get("BENCH_PHASES"):
        from bench.phases import time_comfy_weight_wrappers

        time_comfy_weight_wrappers()

    sys.path.append(str(REPO / "tests" / "integration"))
    from comfy_pack import import_pack

    model, clip, vae, label = load_model(a.model, a.base)
    from bench import child

    child.model_loaded()  # what follows is the trainer's: its dataset, its setup, its steps

    from bench.data import subject
    from dreambooth_core.embedded import toyworld

    folder = base / "input" / "subject"
    folder.mkdir(parents=True, exist_ok=True)
    views = toyworld.subject_views(subject(), a.images, seed=7, size=a.resolution)
    for i, arr in enumerate(views):
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    pack = import_pack()
    info = {"which": a.which, "model": a.model, "label": label, "host_version": host_version(),
            "resolution": a.resolution, "steps": a.steps, "rank": a.rank, "images": a.images, "dtype": a.dtype,
            "lora_set": a.lora_set if a.which == "host" else "ours", "checkpointing": a.checkpointing,
            "base": a.base}

    if a.which == "ours":
        if a.bypass or a.offloading or a.depth != 1:
            raise SystemExit("--bypass/--offloading/--depth are the host's levers: ours has no equivalent")
        n = {k: v() for k, v in pack.NODE_CLASS_MAPPINGS.items()}
        with torch.inference_mode():
            ds = n["DreamBoothDataset"].prepare(clip, "subject", "sks", "star", a.resolution, "center", False)["result"][0]
            out = n["DreamBoothTrain"].train(
                model=model, clip=clip, vae=vae, dataset=ds, mode="lora", rank=a.rank, alpha=0.0,
                train_text_encoder=False, steps=a.steps, learning_rate=a.lr, prior_weight=0.0, batch_size=1, seed=0,
                save_name=f"bench_ours_{os.getpid()}", resume=False, checkpoint_every=0,
                gradient_checkpointing=a.checkpointing, training_dtype=a.dtype)
        info["lora_path"] = out["result"][2]
        info["trainable_params"] = lora_file_params(out["result"][2])
    else:
        from bench.comfy_host_trainer import restricted_to, train_host

        keep = our_module_names(pack, model, clip) if a.lora_set == "matched" else None
        pixels = torch.from_numpy(np.stack(views).astype(np.float32) / 255.0)
        with torch.inference_mode():
            latents = comfy_nodes.VAEEncode().encode(vae, pixels)[0]
            positive = comfy_nodes.CLIPTextEncode().encode(clip, CAPTION)[0]
        with restricted_to(keep) as installed:
            with torch.inference_mode():
                lora = train_host(model, latents, positive, steps=a.steps, rank=a.rank, lr=a.lr,
                                  training_dtype=a.dtype, gradient_checkpointing=a.checkpointing,
                                  checkpoint_depth=a.depth, offloading=a.offloading, bypass_mode=a.bypass)
        info["trainable_params"] = installed.params
        info["trainable_scalars"] = installed.scalars
        info["host_created_params"] = int(sum(t.numel() for t in lora.values()))
        if keep is not None and installed.keys != {k + ".weight" for k in keep}:
            raise SystemExit(f"the host adapted {len(installed.keys)} modules, ours {len(keep)}: not a matched row")
    if a.info:
        Path(a.info).write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
