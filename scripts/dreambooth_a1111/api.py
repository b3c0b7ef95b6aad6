"""API routes in the WebUI's style (FastAPI, JSON, like /sdapi/v1/*), added at app start.

  POST /dreambooth/v1/train    TrainConfig fields as JSON (+ instance_images: base64 list,
                               force_token) → the job's status; 400 names the bad input
  GET  /dreambooth/v1/status   ?id=JOB (default: the current/last job) → progress, loss, files
  POST /dreambooth/v1/cancel   {"id": JOB} → stops at the next step, keeps a resumable checkpoint
  POST /dreambooth/v1/token    {"token": "sks"} → how the loaded model's tokenizer splits it
"""
from __future__ import annotations

from typing import Any, Dict, Optional

PREFIX = "/dreambooth/v1"


def add_routes(app) -> None:
    from fastapi import Body, HTTPException

    from . import jobs

    def train(request: Dict[str, Any] = Body(...)) -> dict:
        try:
            return jobs.start(request).status()
        except RuntimeError as exc:  # a job is already running
            raise HTTPException(status_code=409, detail=str(exc)) from None
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None

    def status(id: Optional[str] = None) -> dict:  # noqa: A002 - the query parameter's name
        job = jobs.get(id)
        if job is None:
            raise HTTPException(status_code=404, detail=f"job {id!r}: no such DreamBooth job" if id else
                                "no DreamBooth job has run yet")
        return job.status()

    def cancel(request: Dict[str, Any] = Body(default={})) -> dict:
        try:
            return jobs.cancel((request or {}).get("id")).status()
        except KeyError as exc:
            raise HTTPException(status_code=404, detail=exc.args[0]) from None

    def token(request: Dict[str, Any] = Body(...)) -> dict:
        from dreambooth_core.dataset.tokens import check_token

        from .loaded import make_backend

        try:
            check = check_token(make_backend().tokenizers(), str(request.get("token", "")))
        except ValueError as exc:
            raise HTTPException(status_code=400, detail=str(exc)) from None
        return {"token": check.word, "pieces": check.pieces, "single": check.single, "common": check.common,
                "valid": check.valid and check.single, "message": check.message}

    app.add_api_route(f"{PREFIX}/train", train, methods=["POST"])
    app.add_api_route(f"{PREFIX}/status", status, methods=["GET"])
    app.add_api_route(f"{PREFIX}/cancel", cancel, methods=["POST"])
    app.add_api_route(f"{PREFIX}/token", token, methods=["POST"])
