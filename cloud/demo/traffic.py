"""Demo traffic: held-out digits, a share of them made hard (pixel noise, a small rotation),
sent to the demo agents' local KServe v2 APIs over HTTP, and one line every few seconds:
offload rate, cloud answers, degraded answers, accuracy against the labels (the edge model
alone vs. what the agents answered, edge and cloud joined), and the cloud's budget.

Over HTTP only, as an app on the device would call: cloud code never imports the agent."""

from __future__ import annotations

import itertools
import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import numpy.typing as npt
import onnxruntime as ort
import redis

from cloud.context import CloudContext
from cloud.inference.budget_store import BudgetStore
from cloud.pipeline.reference.digits import digits_splits
from cloud.registry import repository
from shared.errors import EdgeFleetError
from shared.tensors import HEADER_LENGTH, decode_response, encode_request

__all__ = [
    "Mix",
    "Tally",
    "Traffic",
    "budget_line",
    "digits_mix",
    "edge_predictions",
    "rotate",
    "start_traffic",
]

_LOGGER = logging.getLogger(__name__)
Array = npt.NDArray[Any]
INPUT = "input"
PROBABILITIES = "probabilities"


@dataclass(frozen=True, slots=True)
class Mix:
    """Rows to send (digits pixels, 0-16), their labels, and how each was made."""

    x: Array
    y: Array
    kinds: tuple[str, ...]


def rotate(image: Array, degrees: float) -> Array:
    """An 8x8 image turned about its centre (nearest pixel; what leaves the frame is 0)."""
    theta = np.deg2rad(degrees)
    rows, cols = np.mgrid[0:8, 0:8].astype(np.float64) - 3.5
    # Where each output pixel comes from: the inverse rotation.
    src_r = np.rint(np.cos(theta) * rows + np.sin(theta) * cols + 3.5).astype(int)
    src_c = np.rint(-np.sin(theta) * rows + np.cos(theta) * cols + 3.5).astype(int)
    inside = (src_r >= 0) & (src_r < 8) & (src_c >= 0) & (src_c < 8)
    out = np.zeros_like(image)
    out[inside] = image[src_r[inside], src_c[inside]]
    return out


def digits_mix(*, hard_share: float = 0.3, seed: int = 0) -> Mix:
    """The held-out digits, ``hard_share`` of them noisy (Gaussian, sigma 4 of 16) or turned
    by 15-35 degrees either way, in a seeded shuffled order."""
    if not 0.0 <= hard_share <= 1.0:
        raise ValueError(f"hard_share is a share in [0, 1], got {hard_share}")
    splits = digits_splits(0)
    rng = np.random.default_rng(seed)
    x = splits.x_test.astype(np.float32).copy()
    kinds = []
    for i in range(len(x)):
        draw = rng.random()
        if draw < hard_share / 2:
            x[i] = np.clip(x[i] + rng.normal(0, 4.0, 64), 0, 16)
            kinds.append("noisy")
        elif draw < hard_share:
            angle = rng.uniform(15, 35) * rng.choice([-1, 1])
            x[i] = rotate(x[i].reshape(8, 8), angle).reshape(64)
            kinds.append("rotated")
        else:
            kinds.append("clean")
    order = rng.permutation(len(x))
    return Mix(x[order], splits.y_test[order], tuple(kinds[i] for i in order))


def edge_predictions(onnx_path: Path, x: Array) -> Array:
    """The classes the edge model alone gives ``x`` (the accuracy the agents start from)."""
    session = ort.InferenceSession(str(onnx_path), providers=["CPUExecutionProvider"])
    probabilities = session.run([PROBABILITIES], {INPUT: x.astype(np.float32)})[0]
    predicted: Array = np.asarray(probabilities).argmax(axis=1)
    return predicted


@dataclass
class Tally:
    """What the agents answered; ``edge_correct`` counts only rows with an edge prediction."""

    requests: int = 0
    rows: int = 0
    offloaded: int = 0
    cloud: int = 0
    degraded: int = 0
    errors: int = 0
    correct: int = 0
    edge_scored: int = 0
    edge_correct: int = 0

    def add(self, other: Tally) -> None:
        for f in fields(self):
            setattr(self, f.name, getattr(self, f.name) + getattr(other, f.name))

    def line(self, seconds: float, budget: str) -> str:
        answered = self.rows or 1
        edge = f"{100 * self.edge_correct / self.edge_scored:.1f}%" if self.edge_scored else "n/a"
        errors = f", {self.errors} failed request(s)" if self.errors else ""
        offload = 100 * self.offloaded / answered
        return (
            f"traffic {seconds:.0f}s: {self.rows} rows, offload {offload:.1f}%, cloud answers "
            f"{self.cloud}, degraded {self.degraded}, accuracy edge-only {edge} vs joint "
            f"{100 * self.correct / answered:.1f}%, budget {budget}{errors}"
        )


class Traffic:
    """Sends ``rate`` rows per second, ``batch`` rows a request, to each URL in turn (one
    thread), and says a line every ``interval_s``. A failed request is counted, never the
    end of the traffic."""

    def __init__(
        self,
        urls: Sequence[str],
        mix: Mix,
        *,
        say: Callable[[str], None],
        budget: Callable[[], str] = lambda: "none",
        model: str = "digits-edge",
        rate: float = 20.0,
        batch: int = 4,
        interval_s: float = 5.0,
        edge: Array | None = None,
    ) -> None:
        """``edge``: the edge model's own predictions for ``mix.x`` (edge_predictions), for
        the edge-only accuracy; without it that figure is "n/a"."""
        if not urls:
            raise ValueError("traffic needs at least one agent URL")
        if rate <= 0 or not 1 <= batch <= len(mix.x):
            raise ValueError("traffic needs a positive rate and a batch the mix can fill")
        self.urls, self.mix, self.say, self.budget = list(urls), mix, say, budget
        self.model, self.rate, self.batch, self.interval_s = model, rate, batch, interval_s
        self.edge = edge
        self.total = Tally()
        self._client = httpx.Client(timeout=10.0)
        self._next = itertools.cycle(range(0, len(mix.x) - batch + 1, batch))
        self._agents = itertools.cycle(self.urls)
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def send(self, url: str, start: int) -> Tally:
        """One request of ``batch`` rows from ``start``; what it counts."""
        rows = slice(start, start + self.batch)
        tally = Tally(requests=1)
        body, headers = encode_request({INPUT: self.mix.x[rows]}, binary=True)
        try:
            response = self._client.post(
                f"{url}/v2/models/{self.model}/infer", content=body, headers=headers
            )
            if response.status_code != 200:
                raise EdgeFleetError(
                    f"{url} answered {response.status_code}: {response.text[:200]}"
                )
            length = response.headers.get(HEADER_LENGTH)
            answer = decode_response(response.content, int(length) if length else None)
            predicted = np.asarray(answer.outputs[PROBABILITIES]).argmax(axis=1)
            routes = answer.parameters["rows"]
        except (httpx.HTTPError, EdgeFleetError, KeyError, ValueError) as exc:
            _LOGGER.debug("traffic to %s failed: %s", url, exc)
            tally.errors = 1
            return tally
        labels = self.mix.y[rows]
        tally.rows = len(labels)
        tally.offloaded = int(answer.parameters.get("offloaded", 0))
        tally.cloud = sum(r.get("source") == "cloud" for r in routes)
        tally.degraded = sum(bool(r.get("degraded")) for r in routes)
        tally.correct = int((predicted == labels).sum())
        if self.edge is not None:
            tally.edge_scored = len(labels)
            tally.edge_correct = int((self.edge[rows] == labels).sum())
        return tally

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="demo-traffic", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(15)
        self._client.close()

    def _run(self) -> None:
        pace = self.batch / self.rate
        window, window_start = Tally(), time.monotonic()
        next_at = time.monotonic()
        while not self._stop.wait(max(0.0, next_at - time.monotonic())):
            next_at += pace
            try:
                tally = self.send(next(self._agents), next(self._next))
                window.add(tally)
                self.total.add(tally)
                now = time.monotonic()
                if now - window_start >= self.interval_s:
                    self.say(window.line(now - window_start, self.budget()))
                    window, window_start = Tally(), now
            except Exception:  # the traffic is the demo's, not the platform's: go on
                _LOGGER.exception("demo traffic: this request failed unexpectedly")
            next_at = max(next_at, time.monotonic() - pace)  # never a burst to catch up


def budget_line(client: redis.Redis) -> Callable[[], str]:
    """The cloud's budget as the traffic line says it, read where the replicas keep it."""
    store = BudgetStore(client, replica="demo-traffic", replica_ttl_s=0)

    def line() -> str:
        try:
            state, now = store.read(), store.now()
        except redis.RedisError:
            return "unknown (Redis unreachable)"
        if state is None or state.until <= now:
            return "none"
        return f"{100 * state.max_offload:.1f}% ({state.reason})"

    return line


def start_traffic(
    context: CloudContext,
    urls: Sequence[str],
    *,
    model: str,
    version: int,
    rate: float,
    say: Callable[[str], None],
    hard_share: float = 0.3,
) -> Traffic | None:
    """The demo's traffic to the agents serving ``model:version`` at ``urls`` (None: no
    agent to send to)."""
    if not urls:
        return None
    mix = digits_mix(hard_share=hard_share)
    with context.database.session() as session:
        sha256 = repository.get_version(session, model_name=model, version=version).artifact_sha256
    edge = edge_predictions(context.artifacts.path(sha256), mix.x)
    traffic = Traffic(
        urls, mix, say=say, budget=budget_line(context.redis), model=model, rate=rate, edge=edge
    )
    say(
        f"Traffic: {rate:g} held-out digits/s to the agents, {100 * hard_share:.0f}% of them "
        f"made hard (noise, rotation); a line every {traffic.interval_s:g}s (--traffic 0: none)"
    )
    traffic.start()
    return traffic
