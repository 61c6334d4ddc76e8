"""Distillation: a small edge student (numpy MLP) trained on a registered teacher's
temperature-softened probabilities plus the hard labels, exported with the edge models'
outputs (probabilities, embedding, trainable head) and registered with its teacher named.

Lineage: the student is a version of its own model, so ``parent_id`` (which the registry
keeps within one model) cannot point at a teacher in another, and ``source`` holds 32
characters; the teacher is recorded in the student's metrics (``teacher``: model and
version), which the API returns and the compression report shows. No migration needed.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import numpy.typing as npt

from cloud.context import CloudContext
from cloud.pipeline.compress.children import (
    Child,
    check_cloud_model,
    gate_child,
    measure_child,
    register_child,
    routing_for,
)
from cloud.pipeline.compress.data import CompressData, compress_data
from cloud.pipeline.compress.mlp import Mlp, StudentArch, TrainOptions, train
from cloud.pipeline.evaluate import accuracy, run_model
from cloud.pipeline.reference.graphs import HEAD_BIAS, HEAD_WEIGHT
from cloud.pipeline.service import ParentVersion, QuantizeOptions
from cloud.registry import repository
from shared.errors import InvalidInput, NotFound
from shared.messages import TensorSpec

__all__ = ["DistillOptions", "distill_version", "teacher_probabilities"]

Array = npt.NDArray[Any]
STUDENT_OUTPUTS = ("probabilities", "embedding")  # the edge models' outputs, in order


@dataclass(frozen=True, slots=True)
class DistillOptions:
    arch: StudentArch
    train: TrainOptions = field(
        default_factory=lambda: TrainOptions(epochs=150, temperature=8.0, alpha=0.9)
    )
    teacher_output: str = "probabilities"
    # Also train the same architecture on the hard labels alone and record its accuracy:
    # the figure that says whether the teacher helped.
    baseline: bool = True
    # A student is smaller than its teacher by design: the gate allows 2 pt by default.
    gate: QuantizeOptions = field(default_factory=lambda: QuantizeOptions(max_drop_pt=2.0))


def _teacher(context: CloudContext, name: str, version: int) -> ParentVersion:
    with context.database.session() as s:
        row = repository.get_version(s, model_name=name, version=version)
        return ParentVersion(
            model=name,
            version=version,
            task=row.model.task,
            precision=row.precision,
            data=context.artifacts.path(row.artifact_sha256).read_bytes(),
            inputs=[TensorSpec.model_validate(i) for i in row.inputs],
            outputs=[o["name"] for o in row.outputs],
            trainable=list(row.trainable),
            dataset=row.dataset,
        )


def _check_teacher(teacher: ParentVersion, output: str) -> TensorSpec:
    ref = f"{teacher.model}:{teacher.version}"
    if (
        len(teacher.inputs) != 1
        or teacher.inputs[0].datatype != "FP32"
        or len(teacher.inputs[0].shape) != 2
    ):
        got = [f"{i.name} {i.datatype} {i.shape}" for i in teacher.inputs]
        raise InvalidInput(
            f"teacher {ref} takes {got}: an MLP student needs a teacher with one "
            "[batch, features] FP32 input"
        )
    if output not in teacher.outputs:
        raise InvalidInput(
            f"teacher {ref} has no output {output!r} (its outputs: {teacher.outputs}): a "
            "student learns from class probabilities"
        )
    return teacher.inputs[0]


def _check_student_model(context: CloudContext, name: str, teacher: ParentVersion) -> None:
    """Refused before any training: the teacher's own model (the student would become
    its latest version, served in its place), an existing model of another task, or one
    whose versions take other inputs or give other outputs (its clients would break)."""
    if name == teacher.model:
        raise InvalidInput(
            f"model {name!r} is the teacher's model: a student there would become its latest "
            "version, served in its teacher's place; name another model"
        )
    with context.database.session() as s:
        try:
            model = repository.get_model(s, name=name)
        except NotFound:
            return
        task = model.task
        versions = repository.list_versions(s, model_name=name)
        latest = versions[-1] if versions else None
        takes = [TensorSpec.model_validate(i) for i in latest.inputs] if latest else []
        gives = [o["name"] for o in latest.outputs] if latest else []
    if task != "classification":
        raise InvalidInput(
            f"model {name!r} is a {task} model; a student is a classification model: name another"
        )
    if latest is not None and (takes != teacher.inputs or gives != list(STUDENT_OUTPUTS)):
        raise InvalidInput(
            f"model {name!r} takes {[i.name for i in takes]} and gives outputs {gives}; a "
            f"student of {teacher.model}:{teacher.version} takes "
            f"{[i.name for i in teacher.inputs]} and gives {list(STUDENT_OUTPUTS)}: name "
            "another model"
        )


def teacher_probabilities(teacher: bytes, inputs: dict[str, Array], output: str) -> Array:
    """The teacher's ``output`` on ``inputs``, checked to be class probabilities
    (InvalidInput otherwise)."""
    probs = run_model(teacher, inputs, output=output)
    if probs.ndim != 2 or probs.shape[1] < 2:
        raise InvalidInput(
            f"teacher output {output!r} is {list(probs.shape)}, not [batch, classes]"
        )
    sums = probs.sum(axis=1)
    if not np.isfinite(probs).all() or (probs < -1e-6).any() or np.abs(sums - 1).max() > 1e-3:
        raise InvalidInput(
            f"teacher output {output!r} is not class probabilities (rows sum to "
            f"{float(sums.min()):.3g}..{float(sums.max()):.3g}); name the softmax output"
        )
    return probs


def _train(
    data: CompressData,
    teacher: Array | None,
    spec: TensorSpec,
    classes: int,
    options: DistillOptions,
) -> Mlp:
    assert data.train_labels is not None
    x = data.train_inputs[spec.name].astype(np.float64)
    peak = float(np.abs(x).max())
    start = Mlp.init(
        options.arch,
        features=x.shape[1],
        classes=classes,
        scale=1.0 / peak if peak > 0 else 1.0,
        seed=options.train.seed,
    )
    return train(start, x, data.train_labels, teacher=teacher, options=options.train)


def distill_version(
    context: CloudContext,
    *,
    student_model: str,
    teacher: tuple[str, int],
    upload: bytes | None,
    options: DistillOptions,
    actor: str,
) -> int:
    """Train, gate (against the teacher, on held-out data), calibrate and register a
    student as the next version of ``student_model`` (a new model is created)."""
    parent = _teacher(context, *teacher)
    spec = _check_teacher(parent, options.teacher_output)
    _check_student_model(context, student_model, parent)
    gate_options, routing_note = options.gate, None
    if gate_options.cloud_model is not None:
        check_cloud_model(
            context, gate_options.cloud_model,
            output=gate_options.cloud_probabilities_output,
            inputs=[i.name for i in parent.inputs],
        )  # fmt: skip
    elif "probabilities" not in parent.outputs:
        # The edge router merges the cloud's answer under the student's output name.
        routing_note = (
            f"hard inputs go to {student_model}'s own cloud model: the teacher has no "
            "'probabilities' output for the edge router to merge"
        )
    elif parent.task == "classification":
        # Hard inputs go to the teacher unless told otherwise: it is the better model.
        gate_options = replace(gate_options, cloud_model=(parent.model, parent.version))
    data = compress_data(upload=upload, dataset=parent.dataset, inputs=parent.inputs)
    features = data.train_inputs[spec.name].shape[1]
    side, pool = round(features**0.5), options.arch.pool
    if pool and (side * side != features or side % pool):
        raise InvalidInput(
            f"a pooled student needs a square image whose side divides by {pool}, "
            f"not {features} features"
        )
    if data.train_labels is None or data.eval.test_labels is None:
        raise InvalidInput("distillation needs labels 'y' for the hard-label loss and the gate")
    soft = teacher_probabilities(parent.data, data.train_inputs, options.teacher_output)
    classes = soft.shape[1]
    data.check_labels(classes)  # the teacher's classes; every split, before training
    student = _train(data, soft, spec, classes, options)
    name = student_model.replace("-", "_")
    model = student.to_onnx(name, input_name=spec.name)
    test_x = data.eval.test_inputs[spec.name]
    details: dict[str, Any] = {
        "method": "distillation",
        "about": f"distilled from {parent.model}:{parent.version} ({options.arch})",
        "arch": str(options.arch),
        "parameters": student.parameters,
        "temperature": options.train.temperature,
        "alpha": options.train.alpha,
        "epochs": options.train.epochs,
        "train_examples": len(data.train_labels),
    }
    if routing_note is not None:
        details["routing"] = routing_note
    if options.baseline:
        hard = _train(data, None, spec, classes, options)
        details["hard_label_accuracy"] = round(
            accuracy(hard.probabilities(test_x), data.eval.test_labels), 6
        )
    child = Child(model, "fp32", "distill", f"distilled {options.arch}", details)
    gate = gate_child(
        parent,
        child,
        data,
        options.gate,
        parent_label="teacher",
        parent_output=options.teacher_output,
    )
    metrics: dict[str, Any] = {
        **gate,
        **measure_child(parent.data, model, data),
        "teacher": {"model": parent.model, "version": parent.version},
    }
    as_student = ParentVersion(
        model=student_model,
        version=0,
        task="classification",
        precision="fp32",
        data=model,
        inputs=parent.inputs,
        outputs=list(STUDENT_OUTPUTS),
        trainable=[HEAD_WEIGHT, HEAD_BIAS],
        dataset=data.name,
    )
    calibration, routing, area = routing_for(context, as_student, model, data, gate_options)
    if area is not None:
        metrics["apgr"] = area
    return register_child(
        context,
        model=student_model,
        parent_version=None,
        child=child,
        metrics=metrics,
        calibration=calibration,
        routing=routing,
        trainable=[HEAD_WEIGHT, HEAD_BIAS],
        dataset=data.name,
        golden_inputs=data.eval.test_inputs,
        actor=actor,
        create_task="classification",
    )
