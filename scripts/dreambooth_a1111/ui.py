"""The DreamBooth tab (gradio, as the WebUI builds its own tabs). It only collects settings and
calls the same job functions as the API; the status panel polls the running job."""
from __future__ import annotations

import html
from typing import Any, Dict, List, Optional


def _status_html(status: Optional[dict]) -> str:
    if status is None:
        return "<p>No DreamBooth job yet.</p>"
    parts = [f"<b>{html.escape(status['state'])}</b>"]
    if status["class_images_total"] and status["state"] == "class_images":
        parts.append(f"class images {status['class_images_done']}/{status['class_images_total']}")
    if status["total"]:
        parts.append(f"step {status['step']}/{status['total']}")
    if status["loss"] is not None:
        parts.append(f"loss {status['loss']:.4f}")
    if status["eta_seconds"] and status["running"]:
        parts.append(f"{status['eta_seconds']:.0f} s left")
    text = " · ".join(parts)
    bar = f"<progress value='{status['progress']:.3f}' max='1' style='width:100%'></progress>"
    note = html.escape(status["error"] or status["message"] or "")
    return f"<div id='dreambooth_status'>{bar}<p>{text}</p><p>{note}</p></div>"


def _poll():
    from dreambooth_core.plots import loss_curve_image

    from . import jobs

    job = jobs.get()
    status = job.status() if job else None
    curve = loss_curve_image(status["history"]) if status and status["history"] else None
    previews = list(status["previews"]) if status else []
    return _status_html(status), curve, previews


def _check_token(token: str) -> str:
    from dreambooth_core.dataset.tokens import check_token

    from .loaded import make_backend

    try:
        return check_token(make_backend().tokenizers(), token).message
    except ValueError as exc:
        return str(exc)


def _start(*values) -> str:
    from . import jobs

    names = ["instance_dir", "uploads", "token", "class_noun", "instance_prompt", "prior", "class_prompt",
             "num_class_images", "class_steps", "prior_weight", "mode", "rank", "train_text_encoder", "caption_dropout",
             "steps", "learning_rate", "resolution", "seed", "save_name", "resume", "checkpoint_every", "sample_every"]
    request: Dict[str, Any] = dict(zip(names, values))
    uploads: List[Any] = request.pop("uploads") or []
    if uploads:  # gradio's temporary files, passed as paths (sidecar captions do not come along)
        from pathlib import Path

        request["instance_images"] = [Path(getattr(f, "name", f)) for f in uploads]
        request["instance_dir"] = None
    for key in ("num_class_images", "class_steps", "rank", "steps", "resolution", "seed", "checkpoint_every",
                "sample_every"):
        request[key] = int(request[key])
    request["class_prompt"] = request["class_prompt"] or None
    try:
        job = jobs.start(request)
    except (ValueError, RuntimeError) as exc:
        return f"<p style='color:var(--color-error, red)'>{html.escape(str(exc))}</p>"
    return _status_html(job.status())


def _cancel() -> str:
    from . import jobs

    try:
        return _status_html(jobs.cancel().status())
    except KeyError as exc:
        return html.escape(exc.args[0])


def create_tab():
    """[(blocks, title, elem_id)] for script_callbacks.on_ui_tabs."""
    import gradio as gr

    def eid(name: str) -> str:
        return f"dreambooth_{name}"

    with gr.Blocks(analytics_enabled=False) as tab:
        with gr.Row():
            with gr.Column():
                gr.Markdown("### Subject")
                instance_dir = gr.Textbox(label="Instance images folder (on the WebUI's machine)",
                                          placeholder="/path/to/3-30 photos of the subject",
                                          elem_id=eid("instance_dir"))
                uploads = gr.File(label="…or upload the photos", file_count="multiple", file_types=["image"])
                with gr.Row():
                    token = gr.Textbox(label="Identifier token (one rare token)", value="sks", elem_id=eid("token"))
                    class_noun = gr.Textbox(label="Class noun", value="dog", elem_id=eid("class_noun"))
                token_info = gr.Markdown(elem_id=eid("token_info"))
                instance_prompt = gr.Textbox(label="Caption template", value="a photo of {token} {class}")
                gr.Markdown("### Class images (prior preservation)")
                prior = gr.Checkbox(label="Prior preservation (class images from this checkpoint, cached)", value=True)
                class_prompt = gr.Textbox(label="Class prompt", value="a photo of a {class}")
                with gr.Row():
                    num_class = gr.Slider(1, 1000, value=100, step=1, label="Class images", elem_id=eid("num_class"))
                    class_steps = gr.Slider(1, 150, value=25, step=1, label="Sampling steps",
                                            elem_id=eid("class_steps"))
                    prior_weight = gr.Slider(0.0, 2.0, value=1.0, step=0.05, label="Prior weight")
            with gr.Column():
                gr.Markdown("### Training")
                with gr.Row():
                    mode = gr.Radio(["lora", "full"], value="lora", label="Method")
                    rank = gr.Slider(1, 128, value=4, step=1, label="LoRA rank")
                    train_te = gr.Checkbox(label="Train text encoder", value=False)
                    caption_dropout = gr.Slider(0.0, 0.5, value=0.0, step=0.05,
                                                label="Caption dropout (share of empty captions)")
                with gr.Row():
                    steps = gr.Number(label="Steps", value=400, precision=0, elem_id=eid("steps"))
                    lr = gr.Number(label="Learning rate", value=1e-4, elem_id=eid("learning_rate"))
                    resolution = gr.Number(label="Resolution", value=512, precision=0, elem_id=eid("resolution"))
                    seed = gr.Number(label="Seed", value=0, precision=0)
                with gr.Row():
                    save_name = gr.Textbox(label="Save name (models/Lora/NAME.safetensors)", value="my_subject",
                                           elem_id=eid("save_name"))
                    resume = gr.Checkbox(label="Resume from the checkpoint", value=False)
                    checkpoint_every = gr.Number(label="Checkpoint every (steps)", value=0, precision=0)
                    sample_every = gr.Number(label="Sample every (steps)", value=0, precision=0)
                with gr.Row():
                    start = gr.Button("Train", variant="primary", elem_id=eid("train"))
                    cancel = gr.Button("Cancel", elem_id=eid("cancel"))
                    refresh = gr.Button("Refresh", elem_id=eid("refresh"))
                status = gr.HTML(value=lambda: _poll()[0], every=2, elem_id=eid("status_panel"))
                curve = gr.Image(label="Loss", interactive=False, elem_id=eid("loss"))
                previews = gr.Gallery(label="Samples", columns=4)
        token.change(_check_token, inputs=[token], outputs=[token_info])
        inputs = [instance_dir, uploads, token, class_noun, instance_prompt, prior, class_prompt, num_class,
                  class_steps, prior_weight, mode, rank, train_te, caption_dropout, steps, lr, resolution, seed,
                  save_name, resume, checkpoint_every, sample_every]
        start.click(_start, inputs=inputs, outputs=[status])
        cancel.click(_cancel, outputs=[status])
        refresh.click(_poll, outputs=[status, curve, previews])
    return [(tab, "DreamBooth", "dreambooth")]
