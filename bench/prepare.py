"""Heavy preparation steps, run as child processes so that the orchestrator (bench/run.py) stays a
small stdlib-only process (a forked child briefly shares its parent's pages, which would blur
wait4's peak-RSS numbers, and the orchestrator may run under any Python).

    python -m bench.prepare model NAME                 -> prints {"path": ..., "label": ..., ...}
    python -m bench.prepare instances ROOT RES COUNT   -> prints {"path": ...}
    python -m bench.prepare resize SRC DEST RES        -> prints {"path": ..., "count": N}
"""
from __future__ import annotations

import json
import sys
from pathlib import Path


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    what = argv[0]
    if what == "model":
        from .models import model_folder, native_resolution, param_count

        logs = []
        path, label = model_folder(argv[1], log=lambda m: (logs.append(m), print(m, file=sys.stderr)))
        info = {"path": str(path), "label": label, "native_resolution": native_resolution(path), "notes": logs,
                "params": {p: param_count(path, p) for p in ("unet", "vae", "text_encoder", "text_encoder_2")
                           if (path / p).is_dir()}}
    elif what == "instances":
        from .data import instance_folder

        info = {"path": str(instance_folder(Path(argv[1]), int(argv[2]), int(argv[3])))}
    elif what == "resize":
        from PIL import Image

        from .data import images_in

        src, dest, res = Path(argv[1]), Path(argv[2]), int(argv[3])
        dest.mkdir(parents=True, exist_ok=True)
        files = images_in(src)
        for i, p in enumerate(files):
            with Image.open(p) as im:
                im.convert("RGB").resize((res, res), Image.LANCZOS).save(dest / f"{i:04d}.png")
        info = {"path": str(dest), "count": len(files)}
    else:
        raise SystemExit(f"unknown step {what!r}")
    print(json.dumps(info))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
