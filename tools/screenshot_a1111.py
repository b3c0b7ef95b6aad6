"""A screenshot of the DreamBooth tab in the real Automatic1111 WebUI (headless Chromium).

    .venv-comfyui/bin/python tools/screenshot_a1111.py [docs/a1111_tab.png]

1. builds the seeded mini SD1.5 checkpoint of tests/a1111 with the WebUI's Python (.venv-a1111);
2. starts the WebUI with its UI (a temporary copy of ../shared/a1111 with this extension, as the
   tests do) on a free loopback port;
3. opens it in the system's Chromium through the Python `playwright` package (the browser
   environment of .venv-comfyui; no browser is downloaded; non-loopback requests are aborted),
   opens the DreamBooth tab, fills in a small job and starts it from the tab's Train button;
4. waits until the tab's status panel shows training progress, writes the PNG, cancels the job
   and stops the server whatever happens.

Needs `bash tools/setup_a1111_env.sh`, `bash tools/setup_comfyui_env.sh` (playwright),
`bash tools/setup_browser.sh` (Chromium) and the WebUI's repositories (A1111_REPOSITORIES).
"""
from __future__ import annotations

import argparse
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "tools"))
sys.path.insert(0, str(REPO / "tests" / "a1111"))
import comfyui_browser as cb  # noqa: E402  (Chromium discovery and flags)
import webui_server as ws  # noqa: E402

DEFAULT_OUT = REPO / "docs" / "a1111_tab.png"


def build_checkpoint(python: Path) -> Path:
    """The test checkpoint, built (once, cached) by the WebUI's Python, which has its ldm classes."""
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from pathlib import Path; "
            "from a1111_checkpoint import ensure_checkpoint; "
            "print(ensure_checkpoint(Path(sys.argv[2]), Path(sys.argv[3]), Path(sys.argv[4])))")
    out = subprocess.run([str(python), "-c", code, str(REPO / "tests" / "a1111"), str(ws.A1111_DIR),
                          str(ws.repositories_dir()), str(ws.CLIP_CONFIG)], capture_output=True, text=True,
                         check=True, timeout=900)
    return Path(out.stdout.strip().splitlines()[-1])


def subject(folder: Path) -> Path:
    from PIL import Image, ImageDraw

    folder.mkdir(parents=True, exist_ok=True)
    for i, bg in enumerate([(30, 90, 200), (40, 160, 60), (220, 210, 190)]):
        im = Image.new("RGB", (64, 64), bg)
        ImageDraw.Draw(im).ellipse((12 + 4 * i, 14, 50 + 4 * i, 52), fill=(200, 30, 30))
        im.save(folder / f"subject_{i}.png")
    return folder


def fill(page, elem: str, value: str) -> None:
    box = page.locator(f"#dreambooth_{elem} textarea, #dreambooth_{elem} input[type=text], "
                       f"#dreambooth_{elem} input[type=number]").first
    box.fill(value)
    box.dispatch_event("input")
    box.blur()


def shoot(url: str, photos: Path, out: Path, timeout_s: float, min_steps: int = 12) -> None:
    from playwright.sync_api import sync_playwright

    chromium = cb.find_chromium()
    if chromium is None:
        raise RuntimeError("no Chromium: run `bash tools/setup_browser.sh`")

    def only_loopback(route):
        host = route.request.url.split("://", 1)[-1].split("/", 1)[0].rsplit(":", 1)[0]
        ok = route.request.url.startswith(("data:", "blob:")) or host in ("127.0.0.1", "localhost")
        route.continue_() if ok else route.abort()

    with tempfile.TemporaryDirectory(prefix="chromium-profile-") as profile, sync_playwright() as pw:
        context = pw.chromium.launch_persistent_context(profile, executable_path=chromium, headless=True,
                                                        args=cb.CHROMIUM_ARGS, viewport={"width": 1500, "height": 1050})
        try:
            context.route("**/*", only_loopback)
            page = context.pages[0] if context.pages else context.new_page()
            page.goto(url, wait_until="domcontentloaded", timeout=300_000)
            tab = page.locator("#tabs > .tab-nav > button", has_text="DreamBooth")
            tab.wait_for(timeout=300_000)
            tab.click()
            page.locator("#dreambooth_instance_dir").wait_for(timeout=60_000)
            fill(page, "instance_dir", str(photos))
            fill(page, "class_noun", "ball")
            fill(page, "num_class", "2")
            fill(page, "class_steps", "2")
            fill(page, "steps", "400")
            fill(page, "learning_rate", "0.001")
            fill(page, "resolution", "64")
            fill(page, "save_name", "red_ball")
            fill(page, "token", "skss")
            fill(page, "token", "sks")  # a change: the tab checks the token against the tokenizer
            page.locator("#dreambooth_token_info").get_by_text("a good identifier").wait_for(timeout=60_000)
            page.locator("#dreambooth_train").click()
            deadline = time.monotonic() + timeout_s
            panel = page.locator("#dreambooth_status_panel").last  # gradio gives the id to two nested divs
            while time.monotonic() < deadline:
                text = panel.inner_text()
                done = re.search(r"step (\d+)/", text)
                if "training" in text and done and int(done.group(1)) >= min_steps:
                    break
                if "error" in text.lower():
                    raise RuntimeError(f"the job failed: {text}")
                page.wait_for_timeout(1000)
            else:
                raise TimeoutError(f"no training progress in the tab after {timeout_s:.0f} s: {panel.inner_text()}")
            page.locator("#dreambooth_refresh").click()
            page.wait_for_timeout(3000)
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out), full_page=False)
            page.locator("#dreambooth_cancel").click()
            page.wait_for_timeout(1000)
        finally:
            context.close()


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("output", nargs="?", default=str(DEFAULT_OUT))
    ap.add_argument("--timeout", type=float, default=600, help="seconds to wait for training progress")
    args = ap.parse_args(argv)
    python = ws.venv_python()
    if not python.is_file():
        print("error: no .venv-a1111: run `bash tools/setup_a1111_env.sh`", file=sys.stderr)
        return 1
    checkpoint = build_checkpoint(python)
    with tempfile.TemporaryDirectory(prefix="a1111-shot-") as tmp:
        server = ws.start_webui(Path(tmp), checkpoint, ui=True, python=python, start_timeout=args.timeout)
        try:
            shoot(server.url, subject(Path(tmp) / "photos"), Path(args.output), args.timeout)
        except Exception:
            print(server.log()[-3000:], file=sys.stderr)
            raise
        finally:
            ws.stop_webui(server)
    print(f"wrote {args.output}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
