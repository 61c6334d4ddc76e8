"""Drifted digits, the federated scenario of the demo, the tests and bench B6: the same 8x8
digits rotated (a tilted camera) or noisy (a worse sensor), and the built-in evaluation sets
made of them (``builtin:digits-rotated-<degrees>``, ``builtin:digits-noisy-<sigma>``)."""

from __future__ import annotations

import re
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from cloud.pipeline.datasets import EvalData
from shared.errors import InvalidInput

__all__ = ["DRIFT_DATASET", "device_shards", "drift_eval_data", "drifted", "mixed_drift"]

Array = npt.NDArray[Any]
DRIFT_DATASET = re.compile(r"^builtin:digits-(rotated|noisy)-(\d{1,3}(?:\.\d+)?)$")
Kind = Literal["rotated", "noisy"]


def drifted(x: Array, kind: Kind, amount: float, *, seed: int = 0) -> Array:
    """``x`` (rows of 64 pixels, 0..16) rotated by ``amount`` degrees, or with Gaussian
    noise of ``amount`` pixel levels."""
    images = np.asarray(x, dtype=np.float32).reshape(-1, 8, 8)
    if kind == "rotated":
        out = _rotate(images, amount)
    elif kind == "noisy":
        out = images + np.random.default_rng(seed).normal(0.0, amount, images.shape)
    else:
        raise InvalidInput(f"unknown drift {kind!r}; rotated or noisy")
    result: Array = np.clip(out, 0.0, 16.0).reshape(-1, 64).astype(np.float32)
    return result


def _rotate(images: Array, degrees: float) -> Array:
    """Rotate about the centre, bilinear, zero outside (as a camera tilted by ``degrees``)."""
    size = images.shape[-1]
    centre = (size - 1) / 2.0
    theta = -np.deg2rad(degrees)  # positive: counter-clockwise, as scipy.ndimage.rotate
    rows, cols = np.meshgrid(np.arange(size), np.arange(size), indexing="ij")
    # Where each output pixel comes from: the inverse rotation of its coordinates.
    y = np.cos(theta) * (rows - centre) - np.sin(theta) * (cols - centre) + centre
    x = np.sin(theta) * (rows - centre) + np.cos(theta) * (cols - centre) + centre
    y0, x0 = np.floor(y).astype(int), np.floor(x).astype(int)
    out = np.zeros_like(images, dtype=np.float32)
    for dy in (0, 1):
        for dx in (0, 1):
            yy, xx = y0 + dy, x0 + dx
            weight = (1 - np.abs(y - yy)) * (1 - np.abs(x - xx))
            inside = (yy >= 0) & (yy < size) & (xx >= 0) & (xx < size)
            sampled = images[:, np.clip(yy, 0, size - 1), np.clip(xx, 0, size - 1)]
            out += np.where(inside, weight, 0.0) * sampled
    return out


def mixed_drift(x: Array, kind: Kind, amount: float, share: float, *, seed: int = 0) -> Array:
    """A device's view: ``share`` of its inputs drifted, the rest as they were."""
    chosen = np.random.default_rng(seed).random(len(x)) < share
    out = np.asarray(x, dtype=np.float32).copy()
    if chosen.any():
        out[chosen] = drifted(out[chosen], kind, amount, seed=seed)
    return out


def drift_eval_data(name: str) -> EvalData | None:
    """The built-in drifted evaluation set ``name`` (the test split of the reference
    digits, drifted), or None when ``name`` is not one."""
    match = DRIFT_DATASET.match(name)
    if match is None:
        return None
    from cloud.pipeline.reference.digits import digits_splits

    kind: Kind = "rotated" if match.group(1) == "rotated" else "noisy"
    amount = float(match.group(2))
    splits = digits_splits(0)
    calib = drifted(splits.x_calib, kind, amount, seed=1)
    test = drifted(splits.x_test, kind, amount, seed=2)
    return EvalData({"input": calib}, splits.y_calib, {"input": test}, splits.y_test)


def device_shards(
    count: int,
    *,
    degrees: float = 20.0,
    share: float = 0.5,
    per_device: int | None = None,
    seed: int = 5,
) -> list[tuple[Array, Array]]:
    """The reference training split shared among ``count`` devices (every digit on each),
    ``share`` of each device's images rotated by ``degrees``: a field where some cameras
    are tilted. Never the held-out split the gate reads."""
    from cloud.pipeline.reference.digits import digits_splits

    splits = digits_splits(0)
    order = np.random.default_rng(seed).permutation(len(splits.y_train))
    shards = []
    for i, part in enumerate(np.array_split(order, count)):
        part = part[:per_device] if per_device is not None else part
        x = mixed_drift(splits.x_train[part], "rotated", degrees, share, seed=100 + i)
        shards.append((x, splits.y_train[part].astype(np.int64)))
    return shards
