"""Adapters and their file format: `base` (what an adapter is, the registry), one module per kind
(`lora`: LoRA and LoCon), `network` (the adapters of a run, put into a model), `kohya` (the file:
keys, metadata, reading and writing)."""
from .base import ADAPTER_ATTR, ADAPTERS, Adapter, LoRAError, make_adapter, register
from .kohya import check_replaceable, load_lora, read_lora_file, save_lora
from .lora import LoRAModule
from .network import LoRANetwork

__all__ = ["ADAPTER_ATTR", "ADAPTERS", "Adapter", "LoRAError", "LoRAModule", "LoRANetwork", "check_replaceable",
           "load_lora", "make_adapter", "read_lora_file", "register", "save_lora"]
