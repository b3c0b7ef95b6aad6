"""nodes/live.py without a host: the throttling of step events, the state a reloaded page gets,
the final event, class-image reports. A fake `server` module stands in for ComfyUI's PromptServer
(live.py looks the server up in sys.modules only). Runs under any Python."""
from __future__ import annotations

import importlib.util
import sys
import types
from pathlib import Path

import numpy as np
import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture
def live():
    spec = importlib.util.spec_from_file_location("dreambooth_live_under_test", REPO / "nodes" / "live.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # a fresh registry per test
    return module


class FakeServer:
    def __init__(self):
        self.client_id = "client-1"
        self.sent = []

    def send_sync(self, event, data, sid=None):
        self.sent.append((event, data, sid))

    def events(self, name):
        return [d for e, d, _ in self.sent if e == name]


@pytest.fixture
def server(monkeypatch):
    fake = FakeServer()
    monkeypatch.setitem(sys.modules, "server", types.SimpleNamespace(PromptServer=types.SimpleNamespace(instance=fake)))
    return fake


class Clock:
    def __init__(self):
        self.t = 0.0

    def __call__(self):
        return self.t


def test_step_events_are_throttled_but_carry_every_point(live, server):
    clock = Clock()
    run = live.LiveRun("6", 100, "prompt-1", label="x", min_interval=0.25, clock=clock)
    sent_now = []
    for step in range(1, 101):
        clock.t += 0.01  # 100 steps/s: far faster than the page needs
        sent_now.append(run.step(step, 100, 0.5, 0.4, 0.1, 1e-4, 0.01, (100 - step) * 0.01))
    steps = server.events("dreambooth.train.step")
    assert sent_now[0] and sent_now[-1], "the first and the last step always go out"
    assert 3 <= len(steps) <= 6, f"~4 events/s over 1 s of training, got {len(steps)}"
    points = [p for e in steps for p in e["points"]]
    assert [p[0] for p in points] == list(range(1, 101)), "every step reaches the page once, in order"
    assert steps[-1]["step"] == 100 and steps[-1]["eta_seconds"] == 0
    assert all(e["run_id"] == run.run_id and e["node"] == "6" for e in steps)
    assert all(sid == "client-1" for _, _, sid in server.sent), "events go to the client that queued"
    start = server.events("dreambooth.train.start")
    assert start == [{"run_id": run.run_id, "node": "6", "prompt_id": "prompt-1", "total": 100,
                      "started": run.state["started"], "label": "x"}]


def test_slow_runs_send_every_step(live, server):
    clock = Clock()
    run = live.LiveRun("6", 5, clock=clock)
    for step in range(1, 6):
        clock.t += 1.0
        run.step(step, 5, 0.5, 0.5, None, 1e-4, 1.0, 5 - step)
    assert [e["step"] for e in server.events("dreambooth.train.step")] == [1, 2, 3, 4, 5]


def test_snapshot_gives_a_reloaded_page_the_running_and_finished_runs(live, server):
    a = live.LiveRun("6", 3000)
    b = live.LiveRun("21", 2)
    for step in range(1, 2001):
        a.step(step, 3000, 1.0 / step, 1.0 / step, 0.2, 1e-4, 0.5, 500)
    b.step(1, 2, 0.3, 0.3, None, 1e-4, 0.5, 0.5)
    b.step(2, 2, 0.2, 0.2, None, 1e-4, 0.5, 0.0)
    b.finish("completed", lora_path="/loras/b.safetensors", message="ok")
    snap = live.snapshot()
    runs = {r["node"]: r for r in snap["runs"]}
    assert runs["6"]["status"] == "running" and runs["6"]["step"] == 2000 and runs["6"]["total"] == 3000
    assert len(runs["6"]["points"]) <= live.MAX_POINTS and runs["6"]["points"][-1][0] == 2000
    assert runs["6"]["points"][0][0] == 1
    assert runs["21"]["status"] == "completed" and runs["21"]["lora_path"] == "/loras/b.safetensors"
    assert [p[0] for p in runs["21"]["points"]] == [1, 2] and runs["21"]["points"][0][3] is None
    done = server.events("dreambooth.train.done")
    assert done[0]["node"] == "21" and done[0]["points"] == [[1, 0.3, 0.3, None], [2, 0.2, 0.2, None]]
    assert done[0]["seconds"] >= 0 and done[0]["lora_path"] == "/loras/b.safetensors"


def test_a_run_left_by_an_exception_is_closed(live, server):
    class InterruptProcessingException(Exception):  # the host's Cancel, by name
        pass

    with pytest.raises(RuntimeError):
        with live.LiveRun("6", 10) as run:
            run.step(1, 10, 0.5, 0.5, None, 1e-4, 1.0, 9.0)
            raise RuntimeError("out of memory")
    assert run.state["status"] == "error" and "out of memory" in run.state["message"]
    with pytest.raises(InterruptProcessingException):
        with live.LiveRun("7", 10) as cancelled:
            raise InterruptProcessingException()
    assert cancelled.state["status"] == "interrupted"
    assert [e["status"] for e in server.events("dreambooth.train.done")] == ["error", "interrupted"]
    assert not [r for r in live.snapshot()["runs"] if r["status"] == "running"]


def test_preview_is_a_small_png_data_url(live, server):
    run = live.LiveRun("6", 10)
    run.preview(5, [np.full((512, 384, 3), 200, np.uint8)])
    (event,) = server.events("dreambooth.train.preview")
    assert event["step"] == 5 and event["image"].startswith("data:image/png;base64,")
    import base64
    import io

    from PIL import Image

    im = Image.open(io.BytesIO(base64.b64decode(event["image"].split(",", 1)[1])))
    assert max(im.size) == live.PREVIEW_SIZE and im.size[0] < im.size[1]
    assert live.snapshot()["runs"][0]["preview"] == event["image"]


def test_class_image_reports(live, server):
    live.report_class_images("4", 10, 0, 6, 6)
    live.report_class_images("4", 10, 4, 6, 10, "/cache/x")
    (report,) = live.snapshot()["class_images"]
    assert (report["count"], report["generated"], report["reused"], report["done"]) == (10, 4, 6, 10)
    assert len(server.events("dreambooth.class_images")) == 2


def test_no_server_no_events_but_state(live, monkeypatch):
    monkeypatch.delitem(sys.modules, "server", raising=False)
    run = live.LiveRun("6", 2)
    run.step(1, 2, 0.5, 0.5, None, 1e-4, 1.0, 1.0)
    assert live.snapshot()["runs"][0]["step"] == 1
    assert live.register_routes() is False


def test_finished_runs_are_forgotten_beyond_the_limit(live, server):
    for i in range(live.MAX_RUNS + 10):
        live.LiveRun(str(i), 1).finish("completed")
    running = live.LiveRun("last", 5)
    runs = live.snapshot()["runs"]
    assert len(runs) <= live.MAX_RUNS + 1 and runs[-1]["run_id"] == running.run_id


def test_non_finite_losses_become_null(live, server):
    import json

    run = live.LiveRun("6", 2)
    run.step(1, 2, float("nan"), float("inf"), None, 1e-4, 1.0, 1.0)
    (event,) = server.events("dreambooth.train.step")
    assert event["points"] == [[1, None, None, None]] and event["loss"] is None
    json.dumps(live.snapshot(), allow_nan=False)  # what the page parses stays valid JSON


def test_decimate_keeps_the_ends(live):
    pts = [[i, float(i), float(i), None] for i in range(1, 5001)]
    out = live.decimate(pts, 100)
    assert len(out) <= 101 and out[0] == pts[0] and out[-1] == pts[-1]
    assert live.decimate(pts[:10], 100) == pts[:10]
