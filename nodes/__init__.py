"""ComfyUI adapters of the DreamBooth pack: node classes and the "comfy" backend.

The only code in the repository that imports ComfyUI (always inside functions, so importing the
pack costs nothing at the host's start).
"""
from . import dreambooth_nodes, subject_nodes

NODE_CLASS_MAPPINGS = {**dreambooth_nodes.NODE_CLASS_MAPPINGS, **subject_nodes.NODE_CLASS_MAPPINGS}
NODE_DISPLAY_NAME_MAPPINGS = {**dreambooth_nodes.NODE_DISPLAY_NAME_MAPPINGS,
                              **subject_nodes.NODE_DISPLAY_NAME_MAPPINGS}

__all__ = ["NODE_CLASS_MAPPINGS", "NODE_DISPLAY_NAME_MAPPINGS"]
