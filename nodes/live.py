"""Live training events for the front-end extension (js/dreambooth_live.js).

The Train node reports through a `LiveRun`: it sends websocket events with
`PromptServer.instance.send_sync` (at most `MIN_INTERVAL` apart, so a fast run cannot flood the
socket; the first and last step always go out, and every step's losses travel in the `points` of
the next event, so the chart misses nothing), and keeps the run's state in this process so that a
page reloaded mid-run gets it back from `GET /dreambooth/runs`.

Events (every one carries `run_id` and `node`, the executing node's id, so several Train nodes in
one graph each draw their own run):
- `dreambooth.train.start`  {prompt_id, total, started}
- `dreambooth.train.step`   {step, total, loss, instance_loss, prior_loss, lr, seconds_per_step,
                             eta_seconds, points: [[step, loss, instance_loss, prior_loss], ...]}
- `dreambooth.train.preview` {step, image: "data:image/png;base64,..."}
- `dreambooth.train.done`   {status: completed|interrupted|error, prompt_id, step, total, lora_path, seconds,
                             message, points (the whole curve, at most MAX_POINTS)}
- `dreambooth.class_images` {count, generated, reused, done, folder}

Nothing here may fail a run: without a server (in-process tests, scripts) events go nowhere and
the state is still kept.
"""
from __future__ import annotations

import logging
import math
import sys
import threading
import time
from typing import Any, Dict, List, Optional, Sequence

log = logging.getLogger("dreambooth")

MIN_INTERVAL = 0.25  # seconds between step events (~4/s)
MAX_POINTS = 1000  # points in a snapshot / final event; the live events carry every step
MAX_RUNS = 32  # finished runs remembered for reloaded pages
PREVIEW_SIZE = 256  # longest side of a preview sent to the page, px
ROUTE = "/dreambooth/runs"

_lock = threading.Lock()
_runs: Dict[str, dict] = {}  # run_id -> state (insertion order = start order)
_class_sets: Dict[str, dict] = {}  # node id -> last class-image report


def _server():
    """The running PromptServer, or None. Looked up in sys.modules only: importing `server`
    outside ComfyUI's main.py would drag in the whole host."""
    module = sys.modules.get("server")
    return getattr(getattr(module, "PromptServer", None), "instance", None)


def send(event: str, data: dict, sid: Optional[str] = None) -> None:
    """Send one websocket event to the client that queued the prompt; never raises."""
    try:
        inst = _server()
        if inst is not None:
            inst.send_sync(event, data, sid if sid is not None else inst.client_id)
    except Exception as exc:  # a dead socket must not stop training
        log.debug("DreamBooth: could not send %s: %s", event, exc)


def executing_ids(unique_id: Optional[str] = None) -> tuple:
    """(prompt_id, node_id) of the node now running, from the host's execution context."""
    prompt_id = node_id = None
    try:
        from comfy_execution.utils import get_executing_context

        ctx = get_executing_context()
        if ctx is not None:
            prompt_id, node_id = ctx.prompt_id, ctx.node_id
    except Exception:
        pass
    return prompt_id, str(unique_id if unique_id is not None else node_id or "")


def _finite(value) -> Optional[float]:
    """A float for JSON, or None: NaN/inf would make the page's JSON.parse drop the whole event."""
    if value is None:
        return None
    value = float(value)
    return value if math.isfinite(value) else None


def decimate(points: Sequence[Sequence[Any]], limit: int = MAX_POINTS) -> List[list]:
    """At most `limit` points, evenly strided, always keeping the last one (the final loss)."""
    points = [list(p) for p in points]
    if len(points) <= limit:
        return points
    stride = -(-len(points) // (limit - 1))
    out = points[::stride]
    if out[-1] != points[-1]:
        out.append(points[-1])
    return out


def preview_data_url(image) -> str:
    """A uint8 H×W×3 array (or PIL image) as a small PNG data URL for an <img>."""
    import base64
    import io

    import numpy as np
    from PIL import Image

    im = image if isinstance(image, Image.Image) else Image.fromarray(np.asarray(image, dtype=np.uint8))
    im = im.convert("RGB")
    im.thumbnail((PREVIEW_SIZE, PREVIEW_SIZE), Image.Resampling.LANCZOS)
    buf = io.BytesIO()
    im.save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode("ascii")


class LiveRun:
    """One training run as the page sees it: throttled step events plus a state for reloads."""

    def __init__(self, node_id: str, total: int, prompt_id: Optional[str] = None, label: str = "",
                 min_interval: float = MIN_INTERVAL, clock=time.monotonic):
        import uuid

        inst = _server()
        self.sid = getattr(inst, "client_id", None)  # the client that queued this prompt
        self.run_id = uuid.uuid4().hex[:12]
        self.min_interval, self.clock = min_interval, clock
        self._last_sent = -float("inf")
        self._pending: List[list] = []
        self.state = {"run_id": self.run_id, "node": str(node_id), "prompt_id": prompt_id, "label": label,
                      "status": "running", "step": 0, "total": int(total), "loss": None, "instance_loss": None,
                      "prior_loss": None, "lr": None, "seconds_per_step": None, "eta_seconds": None,
                      "started": time.time(), "points": [], "preview": None, "preview_step": None,
                      "lora_path": None, "message": ""}
        with _lock:
            _runs[self.run_id] = self.state
            finished = [k for k, v in _runs.items() if v["status"] != "running"]
            for old in finished[:max(0, len(finished) - MAX_RUNS)]:  # the oldest go first
                del _runs[old]
        self._send("dreambooth.train.start", {"prompt_id": prompt_id, "total": int(total),
                                              "started": self.state["started"], "label": label})

    def __enter__(self) -> "LiveRun":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        """A run that ends without finish() (an error, Cancel) is closed so no page waits on it."""
        if self.state["status"] != "running":
            return
        if exc_type is None:
            self.finish("completed")
        elif exc_type.__name__ == "InterruptProcessingException":
            self.finish("interrupted", message=cancelled_text(self.state["step"]))
        else:
            self.finish("error", message=f"{exc_type.__name__}: {exc}")

    def _send(self, event: str, data: dict) -> None:
        send(event, {"run_id": self.run_id, "node": self.state["node"], **data}, self.sid)

    def step(self, step: int, total: int, loss: float, instance_loss: float, prior_loss: Optional[float],
             lr: float, seconds_per_step: float, eta_seconds: float) -> bool:
        """Record one optimizer step; returns whether an event went out now."""
        point = [int(step), _finite(loss), _finite(instance_loss), _finite(prior_loss)]
        info = {"step": int(step), "total": int(total), "loss": point[1], "instance_loss": point[2],
                "prior_loss": point[3], "lr": _finite(lr), "seconds_per_step": _finite(seconds_per_step),
                "eta_seconds": _finite(eta_seconds)}
        with _lock:
            self.state.update(info)
            self.state["points"].append(point)
        self._pending.append(point)
        now = self.clock()
        if step < total and now - self._last_sent < self.min_interval:
            return False
        self._last_sent = now
        points, self._pending = self._pending, []
        self._send("dreambooth.train.step", {**info, "points": points})
        return True

    def preview(self, step: int, images: Sequence) -> None:
        """Show the first preview image of this step on the node."""
        if not images:
            return
        try:
            url = preview_data_url(images[0])
        except Exception as exc:
            log.warning("DreamBooth Train: preview not shown: %s", exc)
            return
        with _lock:
            self.state.update(preview=url, preview_step=int(step))
        self._send("dreambooth.train.preview", {"step": int(step), "image": url})

    def finish(self, status: str, lora_path: Optional[str] = None, message: str = "") -> None:
        """The last event: the whole (decimated) curve and where the result was saved."""
        finished = time.time()
        with _lock:
            self.state.update(status=status, lora_path=lora_path, message=message, finished=finished,
                              seconds=finished - self.state["started"])
            points = decimate(self.state["points"])
        self._pending = []
        self._send("dreambooth.train.done", {"status": status, "prompt_id": self.state["prompt_id"],
                                             "step": self.state["step"],
                                             "total": self.state["total"], "lora_path": lora_path,
                                             "message": message, "seconds": self.state["seconds"],
                                             "points": points})


def cancelled_text(step: int, checkpoint=None) -> str:
    """What the Train node says after Cancel, however the host delivered it."""
    where = f" (queue again with resume on; checkpoint {checkpoint})" if checkpoint else ""
    return f"cancelled at step {step}, resume to continue{where}"


def report_class_images(node_id: str, count: int, generated: int, reused: int, done: int, folder: str = "") -> None:
    """How many class images were reused from the cache and how many generated (sent and kept)."""
    data = {"node": str(node_id), "count": int(count), "generated": int(generated), "reused": int(reused),
            "done": int(done), "folder": str(folder), "time": time.time()}
    with _lock:
        _class_sets[str(node_id)] = data
    send("dreambooth.class_images", data)


def snapshot() -> dict:
    """What a (re)loaded page needs: every remembered run (curves decimated) and class-image report."""
    with _lock:
        runs = [{**state, "points": decimate(state["points"])} for state in _runs.values()]
        class_sets = list(_class_sets.values())
    return {"runs": runs, "class_images": class_sets, "time": time.time()}


_routes_registered = False


def register_routes() -> bool:
    """`GET /dreambooth/runs` (also under /api) on the host's server; a no-op without one."""
    global _routes_registered
    inst = _server()
    if inst is None or _routes_registered:
        return _routes_registered
    try:
        from aiohttp import web

        @inst.routes.get(ROUTE)
        async def dreambooth_runs(request):  # noqa: ARG001 (aiohttp handler signature)
            return web.json_response(snapshot(), headers={"Cache-Control": "no-store"})

        _routes_registered = True
    except Exception as exc:
        log.warning("DreamBooth: %s not registered (a reloaded page will not pick up a running training): %s",
                    ROUTE, exc)
    return _routes_registered
