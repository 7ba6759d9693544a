"""The worker's device: which one, how much memory it offers, and a health probe that touches it."""

from __future__ import annotations

import logging
import os

import torch

log = logging.getLogger(__name__)


def choose_device(name: str) -> torch.device:
    """"auto" -> cuda if available else cpu; otherwise the named device, refused if absent."""
    if name == "auto":
        return torch.device("cuda:0" if torch.cuda.is_available() else "cpu")
    device = torch.device(name)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ValueError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
        index = 0 if device.index is None else device.index
        if index >= torch.cuda.device_count():
            raise ValueError(f"--device {name}: only {torch.cuda.device_count()} CUDA device(s) present")
        return torch.device("cuda", index)
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"--device {name}: MPS is not available; use --device cpu or auto")
    return device


def device_total_memory(device: torch.device) -> int:
    """Bytes of the device: a GPU's memory, or half the host's RAM for the CPU (the rest is the OS's)."""
    if device.type == "cuda":
        return int(torch.cuda.get_device_properties(device).total_memory)
    try:
        return int(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")) // 2
    except (ValueError, OSError, AttributeError):
        return 8 * 1024**3


def device_free_memory(device: torch.device) -> int | None:
    """What the device itself says is free (CUDA only); None where it cannot tell."""
    if device.type == "cuda":
        free, _total = torch.cuda.mem_get_info(device)
        return int(free)
    return None


class DeviceProbe:
    """A tiny tensor op on the device: proves the device still computes (for the health check)."""

    def __init__(self, device: torch.device) -> None:
        self.device = device

    def __call__(self) -> bool:
        try:
            x = torch.arange(4, dtype=torch.float32, device=self.device)
            ok = float((x * 2).sum().item()) == 12.0  # .item() synchronises with the device
        except Exception:  # a lost GPU raises all sorts of errors; all mean "not healthy"
            log.exception("device probe on %s failed", self.device)
            return False
        if not ok:
            log.error("device probe on %s computed a wrong result", self.device)
        return ok
