"""Device, precision and memory-format choices; one code path whether the device is a CPU or a GPU."""
from __future__ import annotations

import contextlib
from typing import Any, Mapping

import torch

from transfer_cli.errors import TransferCliError

PRECISIONS = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise TransferCliError(f"trainer.device={name} but no CUDA device is available; use trainer.device=auto or cpu")
    try:
        return torch.device(name)
    except RuntimeError:
        raise TransferCliError(f"trainer.device={name!r} is not a device; use auto, cpu or cuda[:N]") from None


def resolve_precision(name: str, device: torch.device) -> str:
    if name == "auto":
        if device.type != "cuda":
            return "fp32"
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if name not in PRECISIONS:
        raise TransferCliError(f"trainer.precision={name!r}; choose one of: auto, {', '.join(PRECISIONS)}")
    return name


def autocast(device: torch.device, precision: str):
    dtype = PRECISIONS[precision]
    if dtype is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type=device.type, dtype=dtype)


def to_device(batch: Mapping[str, torch.Tensor], device: torch.device, channels_last: bool = False) -> dict:
    out = {}
    for key, value in batch.items():
        value = value.to(device, non_blocking=True)
        if channels_last and value.dim() == 4:
            value = value.contiguous(memory_format=torch.channels_last)
        out[key] = value
    return out


def use_channels_last(setting: Any, device: torch.device, modality: str) -> bool:
    """trainer.channels_last: auto is on for image models on CUDA, where convolutions run faster in it."""
    if setting == "auto":
        return device.type == "cuda" and modality == "image"
    return bool(setting)
