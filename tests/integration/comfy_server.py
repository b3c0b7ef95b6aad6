"""Start the real ComfyUI (read-only source) in a subprocess and drive it over HTTP.

    with ComfyServer(base_dir, python=sys.executable) as server:
        prompt_id = server.queue(api_graph)
        entry = server.wait(prompt_id)

The server runs `main.py --cpu` on a free loopback port, with every folder (models, input, output,
custom_nodes, user, temp, database) under `base_dir`; its log goes to base_dir/server.log. It is
always stopped (SIGINT, then SIGKILL) when the block ends.
"""
from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import threading
import time
import urllib.error
import urllib.request
import uuid
from pathlib import Path
from typing import Callable, List, Optional


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class ComfyServer:
    def __init__(self, base_dir: Path, comfy_dir: Path, python: str, env: Optional[dict] = None,
                 start_timeout: float = 180.0):
        self.base_dir, self.comfy_dir, self.python = Path(base_dir), Path(comfy_dir), python
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.env = dict(env) if env is not None else dict(os.environ)  # the server's whole environment
        self.start_timeout = start_timeout
        self.log_path = self.base_dir / "server.log"
        self.proc: Optional[subprocess.Popen] = None
        self.client_id = uuid.uuid4().hex
        self.messages: List[dict] = []
        self._ws_thread: Optional[threading.Thread] = None
        self._ws_stop = threading.Event()

    # -- life cycle ----------------------------------------------------------------------------
    def __enter__(self) -> "ComfyServer":
        self.start()
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def start(self) -> None:
        cmd = [self.python, "-B", str(self.comfy_dir / "main.py"), "--cpu", "--listen", "127.0.0.1",
               "--port", str(self.port), "--base-directory", str(self.base_dir),
               "--database-url", f"sqlite:///{self.base_dir / 'comfyui.db'}", "--disable-auto-launch"]
        self._log = open(self.log_path, "ab")
        self.proc = subprocess.Popen(cmd, stdout=self._log, stderr=subprocess.STDOUT, env=self.env,
                                     cwd=str(self.base_dir), start_new_session=True)
        deadline = time.monotonic() + self.start_timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI exited with {self.proc.returncode} while starting:\n{self.log()[-4000:]}")
            try:
                self.get("/system_stats", timeout=2)
                break
            except (urllib.error.URLError, ConnectionError, OSError):
                time.sleep(0.5)
        else:
            self.stop()
            raise RuntimeError(f"ComfyUI did not answer within {self.start_timeout:.0f} s:\n{self.log()[-4000:]}")
        self._start_ws()

    def stop(self) -> None:
        self._ws_stop.set()
        if self.proc is not None and self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, signal.SIGINT)
                self.proc.wait(timeout=15)
            except (subprocess.TimeoutExpired, ProcessLookupError):
                try:
                    os.killpg(self.proc.pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
                self.proc.wait(timeout=15)
        if self._ws_thread is not None:
            self._ws_thread.join(timeout=5)
        if getattr(self, "_log", None):
            self._log.close()

    def alive(self) -> bool:
        try:
            return self.proc is not None and self.proc.poll() is None and "system" in self.get("/system_stats")
        except Exception:
            return False

    def log(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    # -- HTTP ----------------------------------------------------------------------------------
    def _request(self, method: str, path: str, body=None, timeout: float = 30.0):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=timeout) as resp:
            raw = resp.read()
        return json.loads(raw) if raw.strip() else None

    def get(self, path: str, timeout: float = 30.0):
        return self._request("GET", path, timeout=timeout)

    def post(self, path: str, body=None, timeout: float = 30.0):
        return self._request("POST", path, body if body is not None else {}, timeout=timeout)

    def queue(self, graph: dict) -> str:
        try:
            out = self.post("/prompt", {"prompt": graph, "client_id": self.client_id})
        except urllib.error.HTTPError as exc:
            raise AssertionError(f"/prompt refused the graph: {exc.read().decode(errors='replace')}") from None
        return out["prompt_id"]

    def history(self, prompt_id: str) -> Optional[dict]:
        return (self.get(f"/history/{prompt_id}") or {}).get(prompt_id)

    def wait(self, prompt_id: str, timeout: float = 600.0) -> dict:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            entry = self.history(prompt_id)
            if entry and entry.get("status", {}).get("completed") is not None and (
                    entry["status"].get("status_str") in ("success", "error") or entry["status"].get("completed")):
                return entry
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died while running {prompt_id}:\n{self.log()[-4000:]}")
            time.sleep(0.5)
        raise TimeoutError(f"prompt {prompt_id} did not finish within {timeout:.0f} s")

    # -- websocket: progress messages ----------------------------------------------------------
    def _start_ws(self) -> None:
        import asyncio

        import aiohttp

        async def listen():
            async with aiohttp.ClientSession() as session:
                async with session.ws_connect(f"{self.url.replace('http', 'ws')}/ws?clientId={self.client_id}") as ws:
                    while not self._ws_stop.is_set():
                        try:
                            msg = await ws.receive(timeout=0.5)
                        except asyncio.TimeoutError:
                            continue
                        if msg.type == aiohttp.WSMsgType.TEXT:
                            data = json.loads(msg.data)
                            data["_t"] = time.monotonic()
                            self.messages.append(data)
                        elif msg.type in (aiohttp.WSMsgType.CLOSED, aiohttp.WSMsgType.ERROR):
                            break

        def run():
            try:
                asyncio.run(listen())
            except Exception:
                pass

        self._ws_thread = threading.Thread(target=run, daemon=True)
        self._ws_thread.start()
        time.sleep(0.5)

    def wait_for_message(self, predicate: Callable[[dict], bool], timeout: float = 300.0) -> dict:
        deadline = time.monotonic() + timeout
        seen = 0
        while time.monotonic() < deadline:
            for msg in self.messages[seen:]:
                if predicate(msg):
                    return msg
            seen = len(self.messages)
            if self.proc.poll() is not None:
                raise RuntimeError(f"ComfyUI died:\n{self.log()[-4000:]}")
            time.sleep(0.1)
        raise TimeoutError("no matching websocket message")


# -- graphs ------------------------------------------------------------------------------------

WIDGET_TYPES = {"INT", "FLOAT", "STRING", "BOOLEAN", "COMBO"}


def is_widget(spec) -> bool:
    """Does this input spec show as a widget on the node (rather than a link socket)?"""
    kind, opts = spec[0], (spec[1] if len(spec) > 1 else {})
    return (isinstance(kind, list) or kind in WIDGET_TYPES) and not opts.get("forceInput")


def ui_to_api(workflow: dict, object_info: dict) -> dict:
    """A front-end workflow (nodes + links, widgets_values) as an API graph, the way the front end
    converts it on Queue: widget values in the order of the node's inputs (required, then
    optional), a seed's "control after generate" value skipped."""
    links = {link[0]: link for link in workflow.get("links", [])}
    graph = {}
    for node in workflow["nodes"]:
        if node.get("mode", 0) in (2, 4):  # muted / bypassed
            continue
        info = object_info[node["type"]]
        linked = {i["name"]: i.get("link") for i in node.get("inputs", []) if i.get("link") is not None}
        values = list(node.get("widgets_values") or [])
        inputs = {}
        order = info.get("input_order") or {s: list(info["input"].get(s, {})) for s in ("required", "optional")}
        for section in ("required", "optional"):
            for name in order.get(section, []):
                spec = info["input"][section][name]
                opts = spec[1] if len(spec) > 1 else {}
                if is_widget(spec) and values:
                    value = values.pop(0)
                    # The front end adds a control widget when asked, and by legacy convention to
                    # inputs named seed / noise_seed unless control_after_generate is given.
                    control = opts.get("control_after_generate", name in ("seed", "noise_seed"))
                    if control and values and values[0] in ("fixed", "increment", "decrement", "randomize"):
                        values.pop(0)
                    inputs[name] = value
                if name in linked:
                    link = links[linked[name]]
                    inputs[name] = [str(link[1]), link[2]]
        graph[str(node["id"])] = {"class_type": node["type"], "inputs": inputs,
                                  "_meta": {"title": node.get("title") or node["type"]}}
    return graph
