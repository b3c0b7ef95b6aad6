"""dreambooth_core: host-independent DreamBooth training (dataset → class images → trainer → sampler).

Never imports a host (ComfyUI, the WebUI); hosts implement `backends.base.Backend`.
"""
__version__ = "0.1.0"
