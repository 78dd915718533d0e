"""Shared benchmark helpers: synchronised wall-clock timing."""

from __future__ import annotations

import time

import torch

from tmdcli.models.defaults import WAN21_TRANSFORMER_CONFIGS

WAN13B_CONFIG = WAN21_TRANSFORMER_CONFIGS["wan2.1-1.3b"]


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device):
    """(fn(), seconds) with the device synchronised before and after."""
    sync(device)
    t0 = time.perf_counter()
    out = fn()
    sync(device)
    return out, time.perf_counter() - t0
