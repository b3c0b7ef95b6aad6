"""The live training view in the real front end: ComfyUI from ../shared/comfyui with this pack,
the page in headless Chromium, the example workflow queued through the page's own Queue path.

One scenario (one server start, one queue; ~1.5-2 min on a 2-core CPU):
- the example graph, shrunk (64 px, one-step samplers), plus a second DreamBooth Train node, so
  two Train nodes run in one graph;
- while node 6 trains, its panel's step counter advances, its chart receives one point per step
  (and draws them), speed and time left are shown, a preview appears;
- the page is reloaded mid-run and picks the same run up (curve restored from the server, then
  live events again);
- after the run each Train node shows its own final curve and LoRA path, the Class Images node how
  many images were generated and reused; a screenshot is saved as a test artifact.
"""
from __future__ import annotations

import copy
import time

import pytest

import comfyui_browser as cb

STEPS = 20  # enough that a reload (a few seconds) lands mid-run on a fast CPU too
PREVIEW_EVERY = 10
SECOND = "21"  # the second Train node added to the example
SECOND_STEPS = 3
RUN_TIMEOUT = 420  # s, the whole prompt on a busy 2-core CPU

# The instance-loss colour of js/loss_chart.js: pixels of it mean the curve was drawn.
JS_CHART_PIXELS = """(nodeId) => {
  const c = document.querySelector(`.dreambooth-live[data-node-id="${nodeId}"] canvas`);
  if (!c || !c.width) return -1;
  const d = c.getContext('2d').getImageData(0, 0, c.width, c.height).data;
  let n = 0;
  for (let i = 0; i < d.length; i += 4)
    if (Math.abs(d[i] - 0x4e) < 40 && Math.abs(d[i+1] - 0xa1) < 40 && Math.abs(d[i+2] - 0xff) < 40 && d[i+3] > 128) n++;
  return n;
}"""


def with_second_train_node(workflow: dict) -> dict:
    """The example plus a small second DreamBooth Train node (no prior) whose loss curve goes to a
    Preview Image node, so it runs in the same prompt."""
    wf = copy.deepcopy(workflow)
    nodes = {str(n["id"]): n for n in wf["nodes"]}
    next_link = max(link[0] for link in wf["links"]) + 1
    train = copy.deepcopy(nodes[cb.TRAIN_NODE])
    train.update(id=int(SECOND), pos=[1880, -560], size=[340, 500], title="DreamBooth Train (second)")
    train["inputs"] = [dict(i, link=None) for i in train["inputs"]]
    train["outputs"] = [dict(o, links=[]) for o in train["outputs"]]
    preview = {"id": int(SECOND) + 1, "type": "PreviewImage", "pos": [2260, -560], "size": [240, 240],
               "flags": {}, "order": 99, "mode": 0, "inputs": [{"name": "images", "type": "IMAGE", "link": None}],
               "outputs": [], "properties": {"Node name for S&R": "PreviewImage"}, "widgets_values": []}
    wf["nodes"] += [train, preview]
    wiring = [("1", 0, SECOND, 0, "MODEL"), ("1", 1, SECOND, 1, "CLIP"), ("1", 2, SECOND, 2, "VAE"),
              ("2", 0, SECOND, 3, "DREAMBOOTH_DATASET"), (SECOND, 3, str(int(SECOND) + 1), 0, "IMAGE")]
    nodes = {str(n["id"]): n for n in wf["nodes"]}
    for origin, oslot, target, tslot, kind in wiring:
        wf["links"].append([next_link, int(origin), oslot, int(target), tslot, kind])
        nodes[origin]["outputs"][oslot].setdefault("links", []).append(next_link)
        nodes[target]["inputs"][tslot]["link"] = next_link
        next_link += 1
    wf["last_link_id"] = next_link - 1
    wf["last_node_id"] = max(n["id"] for n in wf["nodes"])
    return wf


def live_state(page, node_id: str) -> dict:
    return page.evaluate("(id) => window.DreamBoothLive.state(id)", node_id)


def rendered(state: dict) -> bool:
    """The panel shows what the model holds: the view redraws on the next animation frame, so a
    state read between an event and that frame has a DOM one step behind."""
    dom = state.get("dom") or {}
    return (dom.get("status") == state.get("status") and dom.get("step") == str(state.get("step"))
            and dom.get("points") == str(state.get("points")))


def wait_state(page, node_id: str, predicate, what: str, timeout: float, server, info) -> dict:
    """Poll the node's live state until predicate(state); fail with the page's and server's logs."""
    deadline = time.monotonic() + timeout
    state: dict = {}
    while time.monotonic() < deadline:
        state = live_state(page, node_id)
        if predicate(state):
            return state
        if state.get("status") == "error":
            break
        page.wait_for_timeout(250)
    pytest.fail(f"node {node_id}: {what} not seen within {timeout:.0f} s; last state {state}\n"
                f"--- page console ---\n" + "\n".join(info["console"][-25:]) +
                f"\n--- server log ---\n{server.log()[-3000:]}")


def test_live_training_view(comfy, example_workflow, artifacts):
    t0 = time.monotonic()
    workflow = with_second_train_node(example_workflow)
    with cb.open_page(comfy.url, 1600, 1000) as (page, info):
        cb.load_workflow(page, workflow, info["console"])
        # By name, not by position: a widget added to the node must not shift these values.
        settings = cb.live_settings(STEPS, PREVIEW_EVERY)
        settings[SECOND] = {"rank": 2, "steps": SECOND_STEPS, "learning_rate": 5e-3, "prior_weight": 0.0,
                            "save_name": "live_lora_b", "preview_every": 0}
        cb.set_widgets(page, settings)

        # Before the run: an idle panel on each Train node, a class-images panel, nothing else.
        for node in (cb.TRAIN_NODE, SECOND):
            idle = live_state(page, node)
            assert idle["status"] == "idle" and idle["dom"]["status"] == "idle", idle
        assert page.locator(".dreambooth-live").count() == 2
        assert page.locator(f'.dreambooth-classes[data-node-id="{cb.CLASS_IMAGES_NODE}"]').count() == 1

        prompt_id = cb.queue(page)

        # While it trains: the counter advances and every step lands in the chart.
        seen_steps = []

        def progressed(s):
            if s.get("status") == "running" and s.get("step"):
                if not seen_steps or s["step"] != seen_steps[-1]:
                    seen_steps.append(s["step"])
            return len(seen_steps) >= 2

        first = wait_state(page, cb.TRAIN_NODE, lambda s: progressed(s) and rendered(s), "two different steps",
                           RUN_TIMEOUT, comfy, info)
        assert first["status"] == "running" and first["total"] == STEPS
        assert first["step"] < STEPS - 2, f"training ran too fast to observe a reload mid-run: {first}"
        assert seen_steps == sorted(seen_steps), seen_steps
        assert first["points"] == first["step"], "one chart point per step"
        assert first["dom"]["step"] == str(first["step"]) and first["dom"]["points"] == str(first["points"])
        assert f"step {first['step']} / {STEPS}" in first["dom"]["text"]
        assert "left" in first["dom"]["text"] and ("s/step" in first["dom"]["text"] or "steps/s" in first["dom"]["text"])
        assert first["has_prior"], "node 6 trains with class images: the prior loss is charted"
        page.wait_for_timeout(300)  # one animation frame for the canvas
        assert page.evaluate(JS_CHART_PIXELS, cb.TRAIN_NODE) > 20, "the loss curve was not drawn"

        # Reload mid-run: the same run comes back with its curve, then live events continue.
        before = live_state(page, cb.TRAIN_NODE)
        page.reload(wait_until="domcontentloaded")
        cb.wait_ready(page)
        restored = wait_state(page, cb.TRAIN_NODE,
                              lambda s: (s.get("run_id") == before["run_id"] and s.get("points", 0) >= before["step"]
                                         and rendered(s)),
                              "the same run after the reload", 60, comfy, info)
        assert restored["points"] >= before["step"], (before, restored)
        assert restored["dom"]["runId"] == before["run_id"]
        assert restored["status"] == "running", f"the run ended during the reload (raise STEPS): {restored}"
        moved = wait_state(page, cb.TRAIN_NODE, lambda s: s.get("step", 0) > restored["step"],
                           "a step after the reload", RUN_TIMEOUT, comfy, info)
        assert moved["points"] == moved["step"], f"no step lost across the reload: {moved}"

        # After the run: final curve, LoRA path, preview; the second Train node has its own run.
        done = wait_state(page, cb.TRAIN_NODE, lambda s: s.get("status") == "completed" and rendered(s),
                          "completion", RUN_TIMEOUT, comfy, info)
        assert done["step"] == STEPS and done["points"] == STEPS, done
        assert done["lora_path"].endswith("live_lora.safetensors"), done
        assert (comfy.base / "models" / "loras" / "live_lora.safetensors").is_file()
        assert "LoRA saved" in done["dom"]["text"] and done["lora_path"] in done["dom"]["text"]
        assert done["preview"], "preview_every > 0: a preview image was shown"
        assert page.locator(f'.dreambooth-live[data-node-id="{cb.TRAIN_NODE}"] img.db-preview').is_visible()

        second = wait_state(page, SECOND, lambda s: s.get("status") == "completed" and rendered(s),
                            "the second node's run", RUN_TIMEOUT, comfy, info)
        assert second["run_id"] != done["run_id"]
        assert second["total"] == SECOND_STEPS and second["points"] == SECOND_STEPS, second
        assert second["lora_path"].endswith("live_lora_b.safetensors") and not second["has_prior"], second
        assert f"step {SECOND_STEPS} / {SECOND_STEPS}" in second["dom"]["text"]

        classes = page.evaluate(f"() => window.DreamBoothLive.classImages('{cb.CLASS_IMAGES_NODE}')")
        assert classes and classes["generated"] + classes["reused"] == classes["count"] == 2, classes
        assert classes["generated"] == 2 and classes["reused"] == 0, "a fresh cache: both images generated"
        text = page.locator(f'.dreambooth-classes[data-node-id="{cb.CLASS_IMAGES_NODE}"]').inner_text()
        assert "0 reused from the cache, 2 generated" in text, text

        entry = comfy.wait(prompt_id, timeout=RUN_TIMEOUT)
        assert entry["status"]["status_str"] == "success", entry["status"]

        cb.fit_view(page, node_ids=["2", "4", "6", "7", SECOND])
        shot = artifacts / "comfyui_live_training_test.png"
        page.screenshot(path=str(shot), animations="disabled")
        assert shot.stat().st_size > 10_000
    print(f"browser scenario took {time.monotonic() - t0:.0f} s; screenshot {shot}")
