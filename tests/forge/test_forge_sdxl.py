"""SDXL trains on Forge's own StableDiffusionXL engine (sdxl_engine.py, in a fresh process in a writable
copy of Forge: its `modules` set up once, its full-size SDXL text encoders replaced by small ones built
the way its loader builds them). The LoRA trains with prior preservation and both text encoders, every
key of it is one that Forge's LoRA code maps, applying it changes the prediction, and the loaded model is
as before once the backend is released."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from forge_server import FORGE_DIR
from webui_server import _writable_copy


def test_sdxl_lora_with_prior_preservation_on_forges_engine(tmp_path):
    root = tmp_path / "forge"
    _writable_copy(FORGE_DIR, root)
    (root / "repositories").symlink_to(FORGE_DIR / "repositories", target_is_directory=True)
    env = {k: v for k, v in os.environ.items() if k != "HF_HOME"}
    env.update(HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONDONTWRITEBYTECODE="1")
    out = subprocess.run([sys.executable, str(Path(__file__).with_name("sdxl_engine.py")), str(root), str(tmp_path)],
                         cwd=str(root), env=env, capture_output=True, text=True, timeout=900)
    lines = [line for line in out.stdout.splitlines() if line.startswith("RESULT ")]
    assert out.returncode == 0 and lines, out.stdout[-3000:] + out.stderr[-5000:]
    r = json.loads(lines[-1][len("RESULT "):])
    assert (r["family"], r["native_resolution"]) == ("sdxl", 1024)
    assert r["steps"] == [1, 2] and all(p is not None for p in r["prior"]) and r["losses_finite"]
    assert r["prefixes"] == ["lora_te1", "lora_te2", "lora_unet"], "SDXL names: te1 = CLIP-L, te2 = CLIP-G"
    # Forge's own LoRA code maps every key of the file: nothing unmatched, every patch taken.
    assert r["unmatched"] == [], r["unmatched"][:5]
    assert r["unet_patched"] == r["unet_patches"] > 0 and r["clip_patched"] == r["clip_patches"] > 0
    assert r["unet_patches"] + r["clip_patches"] == r["modules"]
    # Every adapter trained but those of CLIP-L's last layer: SDXL reads CLIP-L's penultimate layer
    # (clip skip 2), so that layer never reaches the UNet (kohya's SDXL files carry them untrained too).
    assert r["n_untrained"] == 6 and all(k.startswith("lora_te1_text_model_encoder_layers_2_") for k in r["untrained"])
    assert r["restored"], "the engine predicts differently after release()"
    assert r["lora_change"] > 1e-3, "applying the LoRA with Forge's loader does not change the prediction"
