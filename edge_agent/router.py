"""Router: answer every row locally, send only the hard rows to the cloud in one call, merge
the cloud's answers back in order — without ever making the app wait on a slow or absent
cloud (one overall latency budget + circuit breaker)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import numpy.typing as npt

from edge_agent.budget import BudgetFollower
from edge_agent.cloud_client import (
    CircuitBreaker,
    CloudAnswer,
    CloudBusy,
    CloudClient,
    DeadlineExceeded,
)
from edge_agent.runtime import Runtime
from shared.errors import EdgeFleetError
from shared.messages import RoutingPolicy, RoutingSpec
from shared.routing import spec_confidence
from shared.second_opinion import second_opinion_confidence

__all__ = [
    "Answer",
    "CircuitBreaker",
    "CloudBusy",
    "CloudClient",
    "DeadlineExceeded",
    "Router",
    "RowRoute",
]

_LOGGER = logging.getLogger(__name__)
# Bounds the memory of which second-opinion failures were logged already.
_MAX_WARNED = 256
Array = npt.NDArray[Any]
Source = Literal["edge", "cloud"]


@dataclass(slots=True)
class RowRoute:
    """Where one row's answer came from."""

    source: Source
    model: str
    version: int | None
    latency_ms: float
    confidence: float | None = None
    hard: bool = False
    degraded: bool = False
    # Hard under the calibrated threshold, answered here because of the cloud's budget.
    over_budget: bool = False


@dataclass
class Answer:
    """What every inference returns: the outputs, and where each row came from.

    The batch-level fields summarise the rows: ``source`` is ``mixed`` when some rows came
    from the cloud and some from the edge; ``confidence`` is the lowest row's; ``model`` and
    ``version`` are the cloud's only when every row came from the cloud."""

    outputs: dict[str, Array]
    source: Literal["edge", "cloud", "mixed"]
    model: str
    version: int
    latency_ms: float
    confidence: float | None = None
    degraded: bool = False
    reason: str | None = None
    rows: list[RowRoute] = field(default_factory=list)
    # Why the spec's plain policy ranked the rows in place of its second opinion.
    routing_fallback: str | None = None

    @property
    def hard_rows(self) -> int:
        return sum(r.hard for r in self.rows)

    @property
    def cloud_rows(self) -> int:
        return sum(r.source == "cloud" for r in self.rows)

    @property
    def degraded_rows(self) -> int:
        return sum(r.degraded for r in self.rows)

    @property
    def over_budget_rows(self) -> int:
        return sum(r.over_budget for r in self.rows)


def _merge(local: dict[str, Array], cloud: dict[str, Array], rows: Array, name: str) -> None:
    """Put the cloud's answers into the hard ``rows`` of ``local``, output by output.

    Outputs the cloud does not give (an edge embedding) keep the edge's values; the
    probabilities must be there, as many rows as were sent, in the edge's trailing shape.
    Nothing changes unless every output merges."""
    sent = len(rows)
    wanted = cloud.get(name)
    if wanted is None or name not in local or wanted.shape != (sent, *local[name].shape[1:]):
        got = "nothing" if wanted is None else list(wanted.shape)
        raise EdgeFleetError(f"the cloud's {name!r} is {got} for {sent} rows sent")
    merged = {}
    for key, value in cloud.items():
        mine = local.get(key)
        if mine is not None and value.shape == (sent, *mine.shape[1:]):
            updated = mine.copy()
            updated[rows] = value.astype(mine.dtype, copy=False)
            merged[key] = updated
    local.update(merged)


class Router:
    def __init__(
        self,
        runtime: Runtime,
        *,
        cloud: CloudClient | None = None,
        override: RoutingSpec | None = None,
        budget: BudgetFollower | None = None,
    ) -> None:
        self.runtime = runtime
        self.cloud = cloud
        self.override = override
        self.budget = budget
        # Second opinions that could not run, by (model, version, why): warned about once.
        self._fallbacks_warned: set[tuple[str, int, str]] = set()

    def _spec(self, manifest_routing: RoutingSpec | None) -> RoutingSpec:
        return self.override or manifest_routing or RoutingSpec(policy=RoutingPolicy.ALWAYS_EDGE)

    def specs(self) -> dict[str, RoutingSpec]:
        """The routing spec each served model follows (the device's override, if set)."""
        return {name: self._spec(m.manifest.routing) for name, m in self.runtime.models().items()}

    def infer(self, model: str, inputs: dict[str, Array]) -> Answer:
        start = time.perf_counter()
        loaded = self.runtime.get(model)
        checked = loaded.check_inputs(inputs)
        outputs = loaded.run(checked)
        n = len(next(iter(checked.values())))
        spec = self._spec(loaded.manifest.routing)
        second, fallback = self._second_opinion(model, loaded.version, spec, checked, outputs)
        conf, hard, reason = self._decide(spec, checked, outputs, n, second)
        kept = None
        if self.budget is not None:
            limited = self.budget.limit(model, spec, conf, hard)
            hard, kept = limited.hard, limited.kept
        local_ms = (time.perf_counter() - start) * 1000
        rows = [
            RowRoute(
                "edge",
                model,
                loaded.version,
                local_ms,
                None if conf is None else float(conf[i]),
                bool(hard[i]),
            )
            for i in range(n)
        ]
        if kept is not None:
            for i in np.flatnonzero(kept):
                rows[i].over_budget = True
            reason = f"cloud budget: {int(kept.sum())} hard row(s) answered here"
        if hard.any():
            reason = self._offload(model, spec, checked, outputs, hard, rows) or reason
        total_ms = (time.perf_counter() - start) * 1000
        for row in rows:
            if row.source == "cloud":
                row.latency_ms = total_ms
        sources = {r.source for r in rows}
        all_cloud = sources == {"cloud"}
        return Answer(
            outputs=outputs,
            source="cloud" if all_cloud else "edge" if sources == {"edge"} else "mixed",
            model=rows[0].model if all_cloud else model,
            version=(rows[0].version or loaded.version) if all_cloud else loaded.version,
            latency_ms=total_ms,
            confidence=None if conf is None else float(conf.min()),
            degraded=any(r.degraded for r in rows),
            reason=reason,
            rows=rows,
            routing_fallback=fallback,
        )

    def _second_opinion(
        self,
        model: str,
        version: int,
        spec: RoutingSpec,
        inputs: dict[str, Array],
        outputs: dict[str, Array],
    ) -> tuple[Array | None, str | None]:
        """The second opinion's per-row confidence (None: the spec has none), or, when it
        cannot run (an input the model lacks, weights for another model, no number out),
        None and why: the spec's plain policy then ranks the rows on the same threshold and
        curve. A broken second opinion must cost neither the app its answer nor the cloud
        its hard rows."""
        opinion = spec.second_opinion
        if opinion is None or spec.probabilities_output not in outputs:
            return None, None
        try:
            if opinion.input not in inputs:
                raise EdgeFleetError(f"the second opinion needs input {opinion.input!r}")
            conf: Array = second_opinion_confidence(
                opinion, outputs[spec.probabilities_output], inputs[opinion.input], spec.curve
            )
            if not np.isfinite(conf).all():
                raise EdgeFleetError("the second opinion's confidence is not a number")
        except Exception as exc:  # whatever it is, the plain policy still routes
            why = exc.message if isinstance(exc, EdgeFleetError) else f"{type(exc).__name__}: {exc}"
            fallback = f"second opinion unusable ({why}): routed by {spec.policy.value}"
            key = (model, version, why)
            if key not in self._fallbacks_warned and len(self._fallbacks_warned) < _MAX_WARNED:
                self._fallbacks_warned.add(key)
                _LOGGER.warning("%s:%s: %s", model, version, fallback)
            return None, fallback
        return conf, None

    def _decide(
        self,
        spec: RoutingSpec,
        inputs: dict[str, Array],
        outputs: dict[str, Array],
        n: int,
        second: Array | None,
    ) -> tuple[Array | None, npt.NDArray[np.bool_], str | None]:
        """Per-row confidence (``second``, the second opinion's, when it ran) and hard mask;
        a spec the outputs cannot feed keeps all local."""
        if spec.policy is RoutingPolicy.ALWAYS_EDGE:
            return None, np.zeros(n, dtype=bool), None
        if spec.policy is RoutingPolicy.ALWAYS_CLOUD:
            return None, np.ones(n, dtype=bool), None
        try:
            # Without the inputs, spec_confidence ranks by the spec's plain policy.
            conf = second if second is not None else spec_confidence(spec, outputs)
        except EdgeFleetError as exc:
            # A routing spec that does not fit the model is the deployment's bug, not the
            # app's: answer locally and say why.
            _LOGGER.debug("routing skipped: %s", exc.message)
            return None, np.zeros(n, dtype=bool), f"routing skipped: {exc.message}"
        if spec.threshold is None:
            return conf, np.zeros(n, dtype=bool), None
        hard: npt.NDArray[np.bool_] = conf < spec.threshold
        return conf, hard, None

    def _offload(
        self,
        model: str,
        spec: RoutingSpec,
        inputs: dict[str, Array],
        outputs: dict[str, Array],
        hard: npt.NDArray[np.bool_],
        rows: list[RowRoute],
    ) -> str | None:
        """Ask the cloud about the hard rows only; on success their answers replace the
        edge's, otherwise they keep the edge's, flagged degraded. Returns the reason."""
        index = np.flatnonzero(hard)
        target = spec.cloud_model
        # Without a named cloud model (a manifest from before it was named) the cloud is
        # asked for the edge model's own name, as it always was.
        name = target.name if target is not None else model
        version = target.version if target is not None else "latest"
        reason: str | None = None
        answer: CloudAnswer | None = None
        if self.cloud is None:
            reason = "hard input, no cloud configured"
        elif not self.cloud.breaker.allow():
            reason = "hard input, cloud circuit open"
        else:
            try:
                answer = self.cloud.infer(
                    name, {k: v[index] for k, v in inputs.items()}, version=version
                )
                _merge(outputs, answer.outputs, index, spec.probabilities_output)
            except Exception as exc:
                # Any cloud failure (network, status, deadline, a body that does not parse
                # or does not fit) is the same thing to the app: the local answer, flagged,
                # never an error.
                self.cloud.breaker.failure()
                _LOGGER.debug("offload of %s rows of %s failed: %r", len(index), model, exc)
                reason, answer = f"hard input, cloud failed: {type(exc).__name__}", None
            else:
                self.cloud.breaker.success()
        pinned = version if isinstance(version, int) else None
        for i in index:
            row = rows[i]
            if answer is None:
                row.degraded = True
            else:
                row.source, row.model = "cloud", answer.model or name
                row.version = answer.version if answer.version is not None else pinned
        return reason
