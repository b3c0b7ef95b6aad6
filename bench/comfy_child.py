"""One training run inside ComfyUI (in-process, the way the executor calls a node), for the
side-by-side with the host's own trainer. Run under the host's Python (.venv-comfyui), wrapped by
bench.child (which stamps every optimizer step and records peak memory):

    python -m bench.child --record R.json --steps N --module bench.comfy_child -- \
        --which ours|host --work DIR --resolution 64 --steps N --rank 4 --lr 1e-4 --images 5

- ours: DreamBoothDataset → DreamBoothTrain (LoRA, prior preservation off, training_dtype fp32,
  no gradient checkpointing).
- host: VAEEncode of the same images + CLIPTextEncode of the same caption → the host's
  TrainLoraNode (comfy_extras/nodes_train.py: LoRA, AdamW, MSE, training_dtype and lora_dtype
  fp32, gradient_checkpointing off, batch 1).

Both on the same MODEL/CLIP/VAE: the seeded mini SD1.5 checkpoint of the integration tests
(tests/integration/mini_checkpoint.py), loaded by the stock loader on CPU, under
torch.inference_mode() as the executor runs nodes.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


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


def main(argv=None) -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--which", choices=("ours", "host"), required=True)
    p.add_argument("--work", default=None)
    p.add_argument("--resolution", type=int, default=64)
    p.add_argument("--steps", type=int, default=5)
    p.add_argument("--rank", type=int, default=4)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--images", type=int, default=5)
    p.add_argument("--info", default=None, help="write what was trained (JSON) here")
    a = p.parse_args(argv)

    import numpy as np
    import torch
    from PIL import Image

    base = Path(a.work or tempfile.mkdtemp(prefix="bench-comfy-"))
    host_in_process(base)
    sys.path.append(str(REPO / "tests" / "integration"))
    import comfy.sd
    import mini_checkpoint
    import nodes as comfy_nodes
    from comfy_pack import import_pack

    ckpt = mini_checkpoint.ensure_checkpoint()
    with torch.inference_mode():
        model, clip, vae = comfy.sd.load_checkpoint_guess_config(str(ckpt))[:3]

    from bench.data import subject
    from dreambooth_core.embedded import toyworld

    folder = base / "input" / "subject"
    folder.mkdir(parents=True, exist_ok=True)
    views = toyworld.subject_views(subject(), a.images, seed=7, size=a.resolution)
    for i, arr in enumerate(views):
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    caption = "a photo of sks star"
    info = {"which": a.which, "resolution": a.resolution, "steps": a.steps, "rank": a.rank, "images": a.images}

    if a.which == "ours":
        pack = import_pack()
        n = {k: v() for k, v in pack.NODE_CLASS_MAPPINGS.items()}
        with torch.inference_mode():
            ds = n["DreamBoothDataset"].prepare(clip, "subject", "sks", "star", a.resolution, "center", False)["result"][0]
            out = n["DreamBoothTrain"].train(model, clip, vae, ds, "lora", a.rank, 0.0, False, a.steps, a.lr, 0.0, 1, 0,
                                             "bench_ours", False, 0, gradient_checkpointing=False,
                                             training_dtype="fp32")
        info["lora_path"] = out["result"][2]
        from safetensors import safe_open

        with safe_open(out["result"][2], framework="pt") as f:
            info["trainable_params"] = sum(int(np.prod(f.get_slice(k).get_shape())) for k in f.keys()
                                           if not k.endswith(".alpha"))
    else:
        from comfy_extras.nodes_train import TrainLoraNode

        pixels = torch.from_numpy(np.stack(views).astype(np.float32) / 255.0)
        with torch.inference_mode():
            latents = comfy_nodes.VAEEncode().encode(vae, pixels)[0]
            positive = comfy_nodes.CLIPTextEncode().encode(clip, caption)[0]
            out = TrainLoraNode().train(model, latents, positive, batch_size=1, steps=a.steps,
                                        grad_accumulation_steps=1, learning_rate=a.lr, rank=a.rank, optimizer="AdamW",
                                        loss_function="MSE", seed=0, training_dtype="fp32", lora_dtype="fp32",
                                        algorithm="LoRA", gradient_checkpointing=False, existing_lora="[None]")
        info["trainable_params"] = int(sum(t.numel() for t in out[1].values()))
    if a.info:
        Path(a.info).write_text(json.dumps(info, indent=1))
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
