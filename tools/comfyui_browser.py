"""Drive the real ComfyUI front end in headless Chromium: shared by tools/screenshot_comfyui.py and
the browser tests (tests/browser/).

- `prepare_base` fills a temporary ComfyUI base directory: custom_nodes/ links to this repository,
  the seeded mini SD1.5 checkpoint (tests/integration/mini_checkpoint.py) under the name the
  example workflow asks for, a few placeholder photos in input/<folder>/, front-end settings that
  keep first-run dialogs away.
- `start_server` runs `main.py --cpu` from ../shared/comfyui (read-only) on a free loopback port
  (tests/integration/comfy_server.py).
- `open_page` opens the page in the system's Chromium (Debian's `chromium`, through the Python
  `playwright` package: no browser is ever downloaded) with a fresh profile, aborting every request
  that does not go to the loopback server.
- JavaScript helpers load a workflow with the front end's own `app.loadGraphData`, set widgets,
  queue with `app.queuePrompt`, and fit the view to some nodes.

Needs the host's venv (.venv-comfyui: `bash tools/setup_comfyui_env.sh` installs playwright) and
Chromium (`bash tools/setup_browser.sh` installs it from apt when missing).
"""
from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import shutil
import sys
import tempfile
from pathlib import Path
from typing import Dict, Iterator, List, Optional, Sequence

REPO = Path(__file__).resolve().parents[1]
COMFYUI_DIR = Path(os.environ.get("COMFYUI_DIR", REPO.parent / "shared" / "comfyui")).resolve()
WORKFLOW = REPO / "example_workflows" / "dreambooth.json"
HOST_VENV_PY = REPO / ".venv-comfyui" / "bin" / "python"
CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]
THREAD_ENV = {"OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1", "OPENBLAS_NUM_THREADS": "1",
              "PYTHONDONTWRITEBYTECODE": "1"}

# Front-end settings written before the page opens: no first-run template browser, no
# missing-model dialog (callers check the node types themselves), text drawn at any zoom, no tab
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

# The example workflow made small enough to run on a CPU in about a minute: 64 px, a couple of
# class images, one-step samplers (node id -> widget name -> value). Training steps and previews
# are the caller's (`live_settings`).
SMALL_SETTINGS: Dict[str, dict] = {
    "2": {"resolution": 64},
    "4": {"count": 2, "steps": 2, "sampler_name": "euler", "scheduler": "normal", "resolution": 64},
    "6": {"rank": 4, "learning_rate": 5e-3},
    "8": {"prompt_set": "custom", "custom_prompts": "a photo of {token} {class} on the beach", "seeds": "0",
          "steps": 1, "sampler_name": "euler", "scheduler": "normal", "resolution": 64},
    "12": {"width": 64, "height": 64},
    "13": {"steps": 1, "sampler_name": "euler", "scheduler": "normal"},
    "18": {"steps": 1, "sampler_name": "euler", "scheduler": "normal"},
}
TRAIN_NODE = "6"
CLASS_IMAGES_NODE = "4"

if str(REPO / "tests" / "integration") not in sys.path:  # comfy_server, mini_checkpoint
    sys.path.append(str(REPO / "tests" / "integration"))


def live_settings(steps: int, preview_every: int = 0, save_name: str = "live_lora") -> Dict[str, dict]:
    """SMALL_SETTINGS plus the Train node's steps, previews and save name."""
    settings = {k: dict(v) for k, v in SMALL_SETTINGS.items()}
    settings[TRAIN_NODE].update(steps=int(steps), preview_every=int(preview_every), save_name=save_name)
    return settings


# -- what is needed -------------------------------------------------------------------------------

def find_chromium() -> Optional[str]:
    """The system Chromium: $CHROMIUM, else `chromium` on PATH (Debian's package)."""
    env = os.environ.get("CHROMIUM")
    if env:
        return env if os.access(env, os.X_OK) else None
    for name in ("chromium", "chromium-browser"):
        found = shutil.which(name)
        if found:
            return found
    return None


def missing_reason() -> str:
    """Why a browser session cannot run here ('' when it can)."""
    if not (COMFYUI_DIR / "main.py").is_file():
        return f"ComfyUI source not found at {COMFYUI_DIR} (set COMFYUI_DIR)"
    if importlib.util.find_spec("playwright") is None:
        return (f"{sys.executable} lacks the `playwright` package: run `bash tools/setup_comfyui_env.sh` and use "
                f"{HOST_VENV_PY}")
    if importlib.util.find_spec("aiohttp") is None or importlib.util.find_spec("torchsde") is None:
        return f"{sys.executable} is not the host's Python: use {HOST_VENV_PY}"
    if find_chromium() is None:
        return ("no Chromium found (looked for $CHROMIUM, `chromium` on PATH): run `bash tools/setup_browser.sh` "
                "(installs Debian's chromium with apt-get)")
    return ""


def reexec_under_host_venv(script: str) -> None:
    """Run `script` again under .venv-comfyui when this Python lacks playwright (the host's venv has it)."""
    if importlib.util.find_spec("playwright") is not None:
        return
    # (compare the prefixes: the venv's python is a symlink to the interpreter it was made from)
    if HOST_VENV_PY.is_file() and Path(sys.prefix).resolve() != HOST_VENV_PY.parents[1].resolve():
        os.execv(str(HOST_VENV_PY), [str(HOST_VENV_PY), script, *sys.argv[1:]])
    sys.exit(f"{sys.executable} lacks the `playwright` package: run `bash tools/setup_comfyui_env.sh`, then "
             f"{HOST_VENV_PY} {Path(script).resolve().relative_to(REPO)}")


# -- the server -----------------------------------------------------------------------------------

def mini_checkpoint_path() -> Path:
    """The cached mini SD1.5 checkpoint; built once (needs ComfyUI's model classes) if missing."""
    import mini_checkpoint as mc

    path = mc.cache_dir() / mc.FILE_NAME
    if path.is_file():
        return path
    print("building the mini SD1.5 checkpoint (once, cached) ...", flush=True)
    if str(COMFYUI_DIR) not in sys.path:
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


def start_server(base: Path, start_timeout: float = 300):
    """A ComfyServer (not yet started) for `base`, with one thread per op so the CPU is shared."""
    from comfy_server import ComfyServer

    env = {k: v for k, v in os.environ.items() if k != "DREAMBOOTH_ALLOW_ANY_PATH"}
    env.update(THREAD_ENV)
    return ComfyServer(base, COMFYUI_DIR, sys.executable, env=env, start_timeout=start_timeout)


# -- the page -------------------------------------------------------------------------------------

@contextlib.contextmanager
def open_page(url: str, width: int = 1600, height: int = 1000, scale_factor: float = 1.0,
              chromium: Optional[str] = None) -> Iterator[tuple]:
    """(page, info) in a fresh headless Chromium profile; info['console'] collects the page's
    console, info['blocked'] the aborted non-loopback requests. The page is at `url`, with the
    front end's app ready."""
    from playwright.sync_api import sync_playwright

    executable = chromium or find_chromium()
    if not executable:
        raise RuntimeError(missing_reason() or "no Chromium")
    info: Dict[str, List[str]] = {"console": [], "blocked": []}

    def only_loopback(route):
        host = route.request.url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        if route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost", "[::1]"):
            route.continue_()
        else:
            info["blocked"].append(route.request.url)
            route.abort()

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(
            profile, executable_path=executable, headless=True, args=CHROMIUM_ARGS,
            viewport={"width": width, "height": height}, device_scale_factor=scale_factor,
            service_workers="block")
        try:
            context.route("**/*", only_loopback)
            page = context.pages[0] if context.pages else context.new_page()
            page.on("console", lambda m: info["console"].append(f"{m.type}: {m.text}"))
            page.on("pageerror", lambda e: info["console"].append(f"pageerror: {e}"))
            page.goto(url, wait_until="domcontentloaded", timeout=120_000)
            wait_ready(page)
            yield page, info
        finally:
            context.close()


def wait_ready(page, timeout_ms: int = 180_000) -> None:
    """Until the front end's app, graph and canvas exist, plus a moment for extensions' setup."""
    page.wait_for_function(JS_READY, timeout=timeout_ms, polling=500)
    page.wait_for_timeout(1500)


def load_workflow(page, workflow: dict, console: Sequence[str] = ()) -> List[dict]:
    """Load `workflow` with the front end's loader; raises unless every node type is known."""
    nodes = page.evaluate(JS_LOAD, workflow)
    unknown = [f"{n['id']}:{n['type']}" for n in nodes if not n["known"]]
    if len(nodes) != len(workflow["nodes"]) or unknown:
        raise RuntimeError(f"the front end did not load every node (unknown: {unknown}; "
                           f"{len(nodes)}/{len(workflow['nodes'])} nodes)\n" + "\n".join(list(console)[-30:]))
    return nodes


def set_widgets(page, values: Dict[str, dict]) -> None:
    """Set node widgets (node id -> widget name -> value) as a user would; raises on a missing one."""
    missing = page.evaluate(JS_SET_WIDGETS, values)
    if missing:
        raise RuntimeError(f"widgets not found on the page: {missing}")


def queue(page, timeout_ms: int = 60_000) -> str:
    """Queue the graph through the front end's own Queue path; returns the prompt id, raises with
    the server's node errors if it refused the graph."""
    def is_prompt_post(response) -> bool:
        return response.request.method == "POST" and response.url.split("?")[0].endswith("/prompt")

    with page.expect_response(is_prompt_post, timeout=timeout_ms) as answer:
        page.evaluate("() => { window.app.queuePrompt(0, 1); }")
    response = answer.value
    body = response.json()
    if response.status != 200 or body.get("node_errors"):
        raise RuntimeError(f"the server refused the graph ({response.status}): {json.dumps(body)[:2000]}")
    return body["prompt_id"]


def fit_view(page, pad: int = 16, max_zoom: float = 1.0, node_ids: Optional[Sequence[str]] = None) -> dict:
    """Close dialogs and toasts, then zoom the canvas so `node_ids` (default: all) fill the part of
    the window that no menu or panel covers; the pointer rests on an empty margin."""
    page.evaluate(JS_DISMISS)
    page.keyboard.press("Escape")
    area = page.evaluate(JS_VISIBLE_AREA)
    area.update(pad=pad, maxScale=max_zoom, badge=20,  # badge: the node-source label above a title
                ids=[str(i) for i in node_ids] if node_ids else None)
    fit = page.evaluate(JS_FIT, area)
    page.mouse.move(area["left"] + 3, area["bottom"] - 3)
    page.wait_for_timeout(1500)
    page.evaluate(JS_DISMISS)
    page.wait_for_timeout(500)
    return {"area": area, "fit": fit}


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

JS_SET_WIDGETS = """(values) => {
  const missing = [];
  for (const [id, widgets] of Object.entries(values)) {
    const node = window.app.graph.getNodeById(Number(id));
    for (const [name, value] of Object.entries(widgets)) {
      const w = node && (node.widgets || []).find(x => x.name === name);
      if (!w) { missing.push(`${id}.${name}`); continue; }
      w.value = value;
      w.callback?.(value);
    }
  }
  window.app.graph.setDirtyCanvas(true, true);
  return missing;
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
  let nodes = app.graph.nodes || app.graph._nodes;
  if (area.ids) nodes = nodes.filter(n => area.ids.includes(String(n.id)));
  const titleH = (window.LiteGraph && window.LiteGraph.NODE_TITLE_HEIGHT) || 30;
  let x0 = Infinity, y0 = Infinity, x1 = -Infinity, y1 = -Infinity;
  for (const n of nodes) {
    x0 = Math.min(x0, n.pos[0]); y0 = Math.min(y0, n.pos[1] - titleH - area.badge);
    x1 = Math.max(x1, n.pos[0] + n.size[0]); y1 = Math.max(y1, n.pos[1] + n.size[1]);
  }
  if (!area.ids) for (const g of (app.graph.groups || app.graph._groups || [])) {
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
