"""The Flower ClientApp every device's SuperNode runs: ``query`` says who the device is,
``train`` trains the head it is sent on the device's own samples and sends back the head,
the number of examples and the loss. It reads the agent's files (node config ``data-dir``)
and writes nothing: the samples never leave the device, only the head does.

Imported by ``flwr-clientapp`` processes (the ``edge-federated`` extra), never by the agent.
"""

from __future__ import annotations

import logging
from pathlib import Path

import numpy as np
from flwr.app import (
    Array,
    ArrayRecord,
    ConfigRecord,
    Context,
    Error,
    Message,
    MetricRecord,
    RecordDict,
)
from flwr.clientapp import ClientApp

from edge_agent.federated.local import (
    Refused,
    device_view,
    local_update,
    plan_from_config,
)

__all__ = ["REFUSED", "app"]

_LOGGER = logging.getLogger(__name__)
# The error code of a reply from a device that does not take part (the reason says why).
REFUSED = 4090

app = ClientApp()


def _node(context: Context) -> tuple[Path, str]:
    data_dir = context.node_config.get("data-dir")
    device_id = context.node_config.get("device-id")
    if not isinstance(data_dir, str) or not isinstance(device_id, str):
        raise Refused("the SuperNode's node config lacks data-dir or device-id")
    return Path(data_dir), device_id


def _config(message: Message) -> dict[str, object]:
    record = message.content.config_records.get("config")
    if record is None:
        raise Refused("the message carries no ConfigRecord 'config'")
    return dict(record)


@app.query()
def identify(message: Message, context: Context) -> Message:
    """Device id, the version of the model it serves and how many samples it holds."""
    try:
        data_dir, device_id = _node(context)
        model = str(_config(message).get("model", ""))
        view = device_view(data_dir, device_id, model)
    except Refused as exc:
        return Message(Error(REFUSED, exc.message), reply_to=message)
    info = ConfigRecord(
        {"device-id": view.device_id, "version": view.version or 0, "samples": view.samples}
    )
    return Message(RecordDict({"device": info}), reply_to=message)


@app.train()
def train(message: Message, context: Context) -> Message:
    """One local update of the head; an error reply (with the reason) when this device
    does not take part."""
    try:
        data_dir, device_id = _node(context)
        config = _config(message)
        plan = plan_from_config(config)
        arrays = message.content.array_records.get("arrays")
        if arrays is None or {plan.weight_name, plan.bias_name} - set(arrays):
            raise Refused(f"the message lacks the head {plan.weight_name!r}, {plan.bias_name!r}")
        weight = arrays[plan.weight_name].numpy()
        bias = arrays[plan.bias_name].numpy()
        server_round = int(str(config.get("server-round", 0)))
        update, sources = local_update(data_dir, device_id, plan, weight, bias, server_round)
    except Refused as exc:
        _LOGGER.info("not taking part in this round: %s", exc.message)
        return Message(Error(REFUSED, exc.message), reply_to=message)
    head = ArrayRecord(
        {
            plan.weight_name: Array(np.ascontiguousarray(update.weight)),
            plan.bias_name: Array(np.ascontiguousarray(update.bias)),
        }
    )
    metrics = MetricRecord(
        {
            "num-examples": update.examples,
            "train-loss": update.loss_after,
            "loss-before": update.loss_before,
            "accuracy-before": update.accuracy_before,
            "accuracy-after": update.accuracy_after,
            **sources,
        }
    )
    return Message(RecordDict({"arrays": head, "metrics": metrics}), reply_to=message)
