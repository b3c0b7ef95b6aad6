"""Screenshots of the example workflow in the real ComfyUI front end (headless Chromium).

    OMP_NUM_THREADS=1 .venv-comfyui/bin/python tools/screenshot_comfyui.py [docs/comfyui_graph.png]
    OMP_NUM_THREADS=1 .venv-comfyui/bin/python tools/screenshot_comfyui.py --live [docs/comfyui_live_training.png]

What it does (the helpers are in tools/comfyui_browser.py, shared with tests/browser/):
1. starts the real ComfyUI (`main.py --cpu` from ../shared/comfyui, read-only) on a free loopback
   port: a temporary base directory whose custom_nodes/ links to this repository, whose
   models/checkpoints holds the seeded mini SD1.5 checkpoint under the name the example asks for,
   and whose input/dog/ holds a few placeholder photos, so every combo of the graph resolves;
2. opens the front end in the system's headless Chromium (through the Python `playwright`
   package; no browser is downloaded) with a fresh profile; non-loopback requests are aborted;
3. loads example_workflows/dreambooth.json with the front end's `app.loadGraphData` and checks
   that every node type is known (our pack loaded);
4. default: fits the view to the whole graph. `--live`: makes the graph small (64 px, few
   sampler steps), queues it, waits until DreamBooth Train is part-way through its steps with a
   preview on the node, and fits the view to the dataset → class images → train → preview part;
5. writes the PNG and stops the server (and the browser) whatever happens.

Needs the host's venv (`bash tools/setup_comfyui_env.sh`, which installs playwright too) and
Chromium (`bash tools/setup_browser.sh`); run under another Python, the script re-runs itself with
.venv-comfyui/bin/python when that exists.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import comfyui_browser as cb  # noqa: E402

DEFAULT_OUT = cb.REPO / "docs" / "comfyui_graph.png"
DEFAULT_LIVE_OUT = cb.REPO / "docs" / "comfyui_live_training.png"
LIVE_NODES = ("2", "3", "4", "5", "6", "7")  # dataset, class images, train and their previews


def wait_for_live_view(page, fraction: float, need_preview: bool, timeout_s: float) -> dict:
    """Until the Train node's panel shows `fraction` of the steps (and a preview, if asked)."""
    deadline = time.monotonic() + timeout_s
    state = {}
    while time.monotonic() < deadline:
        state = page.evaluate(f"() => window.DreamBoothLive.state('{cb.TRAIN_NODE}')")
        if state.get("status") in ("error", "interrupted"):
            raise RuntimeError(f"training ended with {state['status']}: {state}")
        total = state.get("total") or 0
        if total and state.get("step", 0) >= fraction * total and (state.get("preview") or not need_preview):
            return state
        page.wait_for_timeout(500)
    raise TimeoutError(f"the live view did not reach {fraction:.0%} of the steps in {timeout_s:.0f} s: {state}")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", nargs="?", help="PNG to write (default docs/comfyui_graph.png, with --live "
                                              "docs/comfyui_live_training.png)")
    ap.add_argument("--workflow", default=str(cb.WORKFLOW), help="front-end workflow JSON to show")
    ap.add_argument("--live", action="store_true", help="queue the (shrunk) example and capture DreamBooth Train "
                                                        "while it trains: live loss chart, speed, time left, preview")
    ap.add_argument("--steps", type=int, default=40, help="--live: training steps (default 40)")
    ap.add_argument("--preview-every", type=int, default=10, help="--live: preview every N steps (default 10)")
    ap.add_argument("--at", type=float, default=0.6, help="--live: capture after this fraction of the steps")
    ap.add_argument("--width", type=int, default=1920, help="viewport width in CSS px (default 1920)")
    ap.add_argument("--height", type=int, default=1200, help="viewport height in CSS px (default 1200)")
    ap.add_argument("--scale-factor", type=float, default=1.5,
                    help="device pixel ratio: the PNG is the viewport times this (default 1.5: 2880x1800)")
    ap.add_argument("--max-zoom", type=float, default=None,
                    help="largest canvas zoom when fitting (default 1; 1.6 with --live)")
    ap.add_argument("--pad", type=int, default=16, help="margin around the nodes, CSS px")
    ap.add_argument("--timeout", type=float, default=900, help="--live: seconds to wait for the training")
    ap.add_argument("--keep-base", action="store_true", help="keep the server's temporary base directory")
    args = ap.parse_args(argv)

    cb.reexec_under_host_venv(__file__)
    os.environ.update(cb.THREAD_ENV)  # also for the checkpoint builder in this process
    reason = cb.missing_reason()
    if reason:
        sys.exit(reason)
    workflow = json.loads(Path(args.workflow).read_text())
    out = Path(args.output or (DEFAULT_LIVE_OUT if args.live else DEFAULT_OUT)).resolve()
    max_zoom = args.max_zoom if args.max_zoom is not None else (1.6 if args.live else 1.0)
    base = Path(tempfile.mkdtemp(prefix="comfyui-screenshot-"))
    t0 = time.monotonic()
    try:
        cb.prepare_base(base, workflow)
        print(f"starting ComfyUI (base {base}) ...", flush=True)
        with cb.start_server(base) as server:
            if "IMPORT FAILED" in server.log():
                raise RuntimeError("the pack did not import:\n" + server.log()[-3000:])
            print(f"ComfyUI at {server.url} after {time.monotonic() - t0:.0f} s; opening Chromium ...", flush=True)
            with cb.open_page(server.url, args.width, args.height, args.scale_factor) as (page, info):
                nodes = cb.load_workflow(page, workflow, info["console"])
                page.wait_for_timeout(1000)
                focus = None
                if args.live:
                    cb.set_widgets(page, cb.live_settings(args.steps, args.preview_every))
                    prompt_id = cb.queue(page)
                    print(f"queued {prompt_id}; waiting for {args.at:.0%} of {args.steps} steps ...", flush=True)
                    state = wait_for_live_view(page, args.at, args.preview_every > 0, args.timeout)
                    print(f"live view: step {state['step']}/{state['total']}, {state['points']} points", flush=True)
                    focus = LIVE_NODES
                fit = cb.fit_view(page, args.pad, max_zoom, focus)
                out.parent.mkdir(parents=True, exist_ok=True)
                page.screenshot(path=str(out), animations="disabled")
        print(f"{len(nodes)} nodes: " + ", ".join(sorted({n['type'] for n in nodes})))
        print(f"canvas zoom {fit['fit']['scale']:.3f}, visible area {fit['area']}")
        if info["blocked"]:
            print(f"aborted {len(info['blocked'])} non-loopback request(s): " + ", ".join(sorted(set(info['blocked']))[:5]))
        print(f"wrote {out} in {time.monotonic() - t0:.0f} s")
    finally:
        if args.keep_base:
            print(f"kept {base}")
        else:
            shutil.rmtree(base, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
