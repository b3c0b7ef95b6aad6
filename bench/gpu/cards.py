"""Datasheet bf16 dense tensor-core peaks, for the MFU column beside the measured matmul peak.

Why both: the datasheet number is what MFU is usually quoted against (boost clock, ideal shapes);
`bench.peak` measures what this torch build reaches on this card today (clocks, power, shapes).
Dense, no sparsity, bf16 inputs with fp32 accumulation (what torch's bf16 matmuls use; for GeForce
cards that is half the fp16-accumulate figure). Keyed by `torch.cuda.get_device_name()` patterns,
most specific first ("H100 PCIe" before "H100", "GH200" before "H200", "L40S" before "L4"); a card
not listed gets no datasheet MFU, only the measured one."""
from __future__ import annotations

import re
from typing import Optional, Tuple

# (pattern, card, bf16 dense TFLOP/s); None: the card has no bf16 tensor cores.
DATASHEET_BF16_TFLOPS: Tuple[Tuple[str, str, Optional[float]], ...] = (
    (r"H100.*PCIe", "H100 PCIe", 756.0),
    (r"H100.*NVL", "H100 NVL", 835.0),
    (r"H100", "H100 SXM", 989.4),
    (r"GH200", "GH200", 989.4),
    (r"H200.*NVL", "H200 NVL", 835.0),
    (r"H200", "H200 SXM", 989.4),
    (r"B200", "B200", 2250.0),
    (r"A100", "A100", 312.0),
    (r"A800", "A800", 312.0),
    (r"\bA10\b", "A10", 125.0),
    (r"L40S", "L40S", 362.1),
    (r"\bL40\b", "L40", 181.0),
    (r"\bL4\b", "L4", 121.0),
    (r"RTX A6000", "RTX A6000", 154.8),
    (r"RTX 6000 Ada", "RTX 6000 Ada", 364.2),
    (r"RTX 4090", "GeForce RTX 4090", 165.2),
    (r"RTX 3090", "GeForce RTX 3090", 71.0),
    (r"V100", "V100", None),
    (r"\bT4\b", "T4", None),
)


def datasheet_bf16_tflops(device_name: str) -> Tuple[Optional[str], Optional[float]]:
    """(card, bf16 dense TFLOP/s) of a `torch.cuda.get_device_name()`; (None, None) when unknown,
    (card, None) for a card without bf16 tensor cores."""
    for pattern, card, tflops in DATASHEET_BF16_TFLOPS:
        if re.search(pattern, device_name or "", flags=re.IGNORECASE):
            return card, tflops
    return None, None
