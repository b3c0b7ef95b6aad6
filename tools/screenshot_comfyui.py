"""Screenshot of the example workflow in the real ComfyUI front end (headless Chromium).

    OMP_NUM_THREADS=1 .venv-comfyui/bin/python tools/screenshot_comfyui.py [docs/comfyui_graph.png]

What it does:
1. starts the real ComfyUI (`main.py --cpu` from ../shared/comfyui, read-only) on a free loopback
   port with the helpers of tests/integration/comfy_server.py: a temporary base directory whose
   custom_nodes/ links to this repository, whose models/checkpoints holds the seeded mini SD1.5
   checkpoint (tests/integration/mini_checkpoint.py) under the name the example asks for, and
   whose input/dog/ holds a few placeholder photos, so every combo of the graph resolves;
2. opens the front end in the system's headless Chromium (/usr/bin/chromium, through the Python
   `playwright` package; no browser is downloaded) with a fresh profile; every request that is not
   to the loopback server is aborted;
3. loads example_workflows/dreambooth.json with the front end's `app.loadGraphData`, checks that
   every node type is known (our pack loaded), fits the view to the nodes' bounding box inside the
   visible canvas area, closes dialogs and toasts;
4. writes the PNG and stops the server (and the browser) whatever happens.

Needs the host's venv (`bash tools/setup_comfyui_env.sh`, which installs playwright too); run
under another Python, the script re-runs itself with .venv-comfyui/bin/python when that exists.
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

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", REPO.parent / "shared" / "comfyui")).resolve()
WORKFLOW = REPO / "example_workflows" / "dreambooth.json"
DEFAULT_OUT = REPO / "docs" / "comfyui_graph.png"
HOST_VENV_PY = REPO / ".venv-comfyui" / "bin" / "python"
CHROMIUM = os.environ.get("CHROMIUM", "/usr/bin/chromium")
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "PYTHONDONTWRITEBYTECODE": "1"}

# Front-end settings written before the page opens: no first-run template browser, no
# missing-model dialog (the script checks the node types itself), text drawn at any zoom, no tab
# bar (the start-up "Unsaved Workflow" tab) and no zoom toolbar over the canvas.
FRONTEND_SETTINGS = {
    "Comfy.TutorialCompleted": True,
    "Comfy.Workflow.ShowMissingModelsWarning": False,
    "Comfy.Workflow.ShowMissingNodesWarning": False,
    "Comfy.Validation.Workflows": False,
    "LiteGraph.Canvas.LowQualityRenderingZoomThreshold": 0.1,
    "Comfy.Minimap.Visible": False,
    "Comfy.Graph.CanvasInfo": False,
    "Comfy.Graph.CanvasMenu": False,
    "Comfy.Workflow.WorkflowTabsPosition": "Sidebar",
}

sys.path.insert(0, str(REPO / "tests" / "integration"))  # comfy_server, mini_checkpoint


def _reexec_under_host_venv() -> None:
    """Run again under .venv-comfyui when this Python lacks playwright (the host's venv has it)."""
    try:
        import playwright  # noqa: F401
        return
    except ImportError:
        pass
    # (compare the prefixes: the venv's python is a symlink to the interpreter it was made from)
    if HOST_VENV_PY.is_file() and Path(sys.prefix).resolve() != HOST_VENV_PY.parents[1].resolve():
        os.execv(str(HOST_VENV_PY), [str(HOST_VENV_PY), __file__, *sys.argv[1:]])
    sys.exit(f"{sys.executable} lacks the `playwright` package: run `bash tools/setup_comfyui_env.sh`, then "
             f"{HOST_VENV_PY} {Path(__file__).relative_to(REPO)}")


def mini_checkpoint_path() -> Path:
    """The cached mini SD1.5 checkpoint; built once (needs ComfyUI's model classes) if missing."""
    import mini_checkpoint as mc

    path = mc.cache_dir() / mc.FILE_NAME
    if path.is_file():
        return path
    print("building the mini SD1.5 checkpoint (once, cached) ...", flush=True)
    sys.path.insert(0, str(COMFYUI_DIR))
    import comfy.cli_args

    comfy.cli_args.args.cpu = True
    import torch

    torch.set_num_threads(1)
    return mc.ensure_checkpoint()


def prepare_base(base: Path, workflow: dict) -> None:
    """custom_nodes -> this repository, the checkpoint the example names, input/<folder>/ photos,
    the front end's settings."""
    from PIL import Image

    (base / "custom_nodes").mkdir(parents=True)
    os.symlink(REPO, base / "custom_nodes" / "comfyui-dreambooth", target_is_directory=True)
    ckpt_dir = base / "models" / "checkpoints"
    ckpt_dir.mkdir(parents=True)
    nodes = {n["type"]: n for n in workflow["nodes"]}
    ckpt_name = (nodes.get("CheckpointLoaderSimple", {}).get("widgets_values") or ["mini_sd15.safetensors"])[0]
    os.symlink(mini_checkpoint_path(), ckpt_dir / ckpt_name)
    folder = (nodes.get("DreamBoothDataset", {}).get("widgets_values") or ["dog"])[0]
    photos = base / "input" / folder
    photos.mkdir(parents=True)
    for i in range(3):
        Image.new("RGB", (64, 64), (60 + 60 * i, 90, 120)).save(photos / f"photo_{i}.png")
    settings = base / "user" / "default" / "comfy.settings.json"
    settings.parent.mkdir(parents=True)
    settings.write_text(json.dumps(FRONTEND_SETTINGS, indent=1))


# JavaScript run in the page ----------------------------------------------------------------------

JS_READY = "() => !!(window.app && window.app.graph && window.app.canvas && window.app.canvas.ds)"

JS_LOAD = """async (wf) => {
  await window.app.loadGraphData(wf, true, false, 'dreambooth',
                                 {showMissingNodesDialog: false, showMissingModelsDialog: false});
  try {  // close the start-up "Unsaved Workflow": only the example stays open
    const store = window.app.extensionManager.workflow;
    for (const w of [...store.openWorkflows]) if (w !== store.activeWorkflow) await store.closeWorkflow(w);
  } catch (e) { console.warn('could not close the start-up workflow', e); }
  const nodes = window.app.graph.nodes || window.app.graph._nodes;
  return nodes.map(n => ({id: n.id, type: n.type, title: n.title,
                          known: !!(n.comfyClass || n.constructor.comfyClass) && !n.has_errors}));
}"""

# The part of the window where the canvas is not hidden by the menu, side bar, tabs or panels.
JS_VISIBLE_AREA = """() => {
  const W = window.innerWidth, H = window.innerHeight;
  let left = 0, top = 0, right = W, bottom = H;
  const sels = ['.side-tool-bar-container', '.comfyui-menu', '.comfy-menu-bar', '.workflow-tabs-container',
                '.actionbar', '.comfyui-body-top', '.comfyui-body-left', '.comfyui-body-bottom',
                '.comfyui-body-right', '.graph-canvas-panel .p-splitter-panel.side-bar-panel',
                '.bottom-panel', '.topbar', '.top-menubar'];
  for (const sel of sels) {
    for (const el of document.querySelectorAll(sel)) {
      const r = el.getBoundingClientRect();
      if (r.width < 2 || r.height < 2) continue;
      const st = getComputedStyle(el);
      if (st.display === 'none' || st.visibility === 'hidden') continue;
      if (r.height > H * 0.6 && r.left < W * 0.3 && r.width < W * 0.3) left = Math.max(left, r.right);
      else if (r.height > H * 0.6 && r.right > W * 0.7 && r.width < W * 0.3) right = Math.min(right, r.left);
      else if (r.width > W * 0.3 && r.top < H * 0.3 && r.height < H * 0.2) top = Math.max(top, r.bottom);
      else if (r.width > W * 0.3 && r.bottom > H * 0.7 && r.height < H * 0.3) bottom = Math.min(bottom, r.top);
    }
  }
  return {left, top, right, bottom, W, H};
}"""

JS_FIT = """(area) => {
  const app = window.app, canvas = app.canvas, ds = canvas.ds;
  const nodes = app.graph.nodes || app.graph._nodes;
  const titleH = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - titleH - area.badge);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  for (const g of (app.graph.groups || app.graph._groups || [])) {
    const b = g._bounding || g.bounding;
    if (b) { x0 = Math.min(x0, b[0]); y0 = Math.min(y0, b[1]); x1 = Math.max(x1, b[0] + b[2]); y1 = Math.max(y1, b[1] + b[3]); }
  }
  const rect = canvas.canvas.getBoundingClientRect();
  const pad = area.pad;
  const aw = area.right - area.left - 2 * pad, ah = area.bottom - area.top - 2 * pad;
  const scale = Math.min(aw / (x1 - x0), ah / (y1 - y0), area.maxScale);
  ds.scale = scale;
  // screen = (graph + offset) * scale, relative to the canvas element
  const cx = (area.left + area.right) / 2 - rect.left, cy = (area.top + area.bottom) / 2 - rect.top;
  ds.offset[0] = cx / scale - (x0 + x1) / 2;
  ds.offset[1] = cy / scale - (y0 + y1) / 2;
  canvas.setDirty(true, true);
  if (canvas.draw) canvas.draw(true, true);
  return {scale, bounds: [x0, y0, x1, y1], rect: [rect.left, rect.top, rect.width, rect.height]};
}"""

JS_DISMISS = """() => {
  let n = 0;
  const click = el => { try { el.click(); n++; } catch (e) {} };
  document.querySelectorAll('.p-toast-close-button, .p-toast-icon-close').forEach(click);
  document.querySelectorAll('.p-dialog-close-button, .p-dialog-header-close').forEach(click);
  document.querySelectorAll('.p-toast, .p-toast-message').forEach(el => { el.remove(); n++; });
  return n;
}"""


def take_screenshot(url: str, workflow: dict, out: Path, width: int, height: int, scale_factor: float,
                    max_zoom: float, pad: int) -> dict:
    from playwright.sync_api import sync_playwright

    blocked = []

    def only_loopback(route):
        host = route.request.url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost", "[::1]"):
            route.continue_()
        else:
            blocked.append(route.request.url)
            route.abort()

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height}, device_scale_factor=scale_factor,
            service_workers="block")
        try:
            context.route("**/*", only_loopback)
            page = context.pages[0] if context.pages else context.new_page()
            console = []
            page.on("console", lambda m: console.append(f"{m.type}: {m.text}"))
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            page.wait_for_function(JS_READY, timeout=180_000, polling=500)
            page.wait_for_timeout(2000)  # extensions finish their setup
            nodes = page.evaluate(JS_LOAD, workflow)
            unknown = [f"{n['id']}:{n['type']}" for n in nodes if not n["known"]]
            if len(nodes) != len(workflow["nodes"]) or unknown:
                raise RuntimeError(f"the front end did not load every node (unknown: {unknown}; "
                                   f"{len(nodes)}/{len(workflow['nodes'])} nodes)\n" + "\n".join(console[-30:]))
            page.wait_for_timeout(1000)
            page.evaluate(JS_DISMISS)
            page.keyboard.press("Escape")
            area = page.evaluate(JS_VISIBLE_AREA)
            area.update(pad=pad, maxScale=max_zoom, badge=20)  # badge: the node-source label above a title
            fit = page.evaluate(JS_FIT, area)
            # the pointer rests on the empty margin of the canvas: no hover highlight, no tooltip
            page.mouse.move(area["left"] + 3, area["bottom"] - 3)
            page.wait_for_timeout(1500)
            page.evaluate(JS_DISMISS)
            page.wait_for_timeout(500)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), animations="disabled")
            return {"nodes": nodes, "area": area, "fit": fit, "blocked": blocked, "console": console}
        finally:
            context.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", nargs="?", default=str(DEFAULT_OUT), help="PNG to write (default docs/comfyui_graph.png)")
    ap.add_argument("--workflow", default=str(WORKFLOW), help="front-end workflow JSON to show")
    ap.add_argument("--width", type=int, default=1920, help="viewport width in CSS px (default 1920)")
    ap.add_argument("--height", type=int, default=1200, help="viewport height in CSS px (default 1200)")
    ap.add_argument("--scale-factor", type=float, default=1.5,
                    help="device pixel ratio: the PNG is the viewport times this (default 1.5: 2880x1800)")
    ap.add_argument("--max-zoom", type=float, default=1.0, help="largest canvas zoom when fitting (default 1)")
    ap.add_argument("--pad", type=int, default=16, help="margin around the nodes, CSS px")
    ap.add_argument("--keep-base", action="store_true", help="keep the server's temporary base directory")
    args = ap.parse_args(argv)

    _reexec_under_host_venv()
    os.environ.update(THREAD_ENV)  # also for the checkpoint builder in this process
    from comfy_server import ComfyServer

    if not (COMFYUI_DIR / "main.py").is_file():
        sys.exit(f"ComfyUI source not found at {COMFYUI_DIR} (set COMFYUI_DIR)")
    workflow = json.loads(Path(args.workflow).read_text())
    out = Path(args.output).resolve()
    base = Path(tempfile.mkdtemp(prefix="comfyui-screenshot-"))
    t0 = time.monotonic()
    try:
        prepare_base(base, workflow)
        env = {k: v for k, v in os.environ.items() if k != "DREAMBOOTH_ALLOW_ANY_PATH"}
        env.update(THREAD_ENV)
        print(f"starting ComfyUI (base {base}) ...", flush=True)
        with ComfyServer(base, COMFYUI_DIR, sys.executable, env=env, start_timeout=300) as server:
            log = server.log()
            if "IMPORT FAILED" in log:
                raise RuntimeError("the pack did not import:\n" + log[-3000:])
            print(f"ComfyUI at {server.url} after {time.monotonic() - t0:.0f} s; opening Chromium ...", flush=True)
            info = take_screenshot(server.url, workflow, out, args.width, args.height, args.scale_factor,
                                   args.max_zoom, args.pad)
        print(f"{len(info['nodes'])} nodes: " + ", ".join(sorted({n['type'] for n in info['nodes']})))
        print(f"canvas zoom {info['fit']['scale']:.3f}, visible area {info['area']}")
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
