"""Compression over REST against a running API: distil, prune and convert to FP16, each
child gated against its parent and registered with its figures; refusals are 4xx with the
reason (and the gate's figures) and change nothing."""

from __future__ import annotations

import io
import re

import numpy as np
import onnx
import pytest

from cloud.pipeline.reference.digits import digits_splits
from cloud.pipeline.service import load_version_bytes
from tests.cloud.api.helpers import snapshot, upload
from tests.conftest import RunningApi, seed_reference_cache

GATE_REFUSAL = (
    r"structured-pruned \(90%\) candidate refused: accuracy \d+\.\d\d% vs FP32 parent "
    r"\d+\.\d\d% \(\d+\.\d\d pt drop > 0\.5 pt allowed\) on 360 held-out examples"
)


@pytest.fixture
def reference(api: RunningApi, reference_onnx: dict[str, bytes]) -> RunningApi:
    """digits-cloud:1, digits-edge:1 (FP32) and :2 (INT8) registered."""
    seed_reference_cache(api.context.settings, reference_onnx)
    with api.client() as c:
        r = c.post("/v1/reference-models", json={"models": ["digits-edge"]})
        assert r.status_code == 201, r.text
    return api


def _cloud_bytes(api: RunningApi) -> bytes:
    """digits-cloud:1 as registered."""
    return load_version_bytes(api.context, "digits-cloud", 1)


def _npz(**arrays: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    np.savez(buffer, **arrays)
    return buffer.getvalue()


def _post(api: RunningApi, path: str, options: str, files: dict | None = None):  # type: ignore[no-untyped-def]
    with api.client() as c:
        c.timeout = 300
        return c.post(path, data={"options": options}, files=files)


def test_a_distilled_student_is_registered_with_its_teacher_named(reference: RunningApi) -> None:
    """mlp:16,16 from the cloud SVM: a new model whose version 1 has the edge interface,
    the teacher in its metrics (not as parent: that is another model), the gate's figures
    against the teacher, the hard-label baseline, its size and latency beside the teacher's,
    and routing calibrated against the teacher, with the APGR of that routing."""
    r = _post(
        reference, "/v1/models/digits-student/distill",
        '{"student": "mlp:16,16", "teacher": "digits-cloud:1"}',
    )  # fmt: skip
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["model"], body["version"], body["parent_version"]) == ("digits-student", 1, None)
    assert (body["precision"], body["source"]) == ("fp32", "distill")
    assert [o["name"] for o in body["outputs"]] == ["probabilities", "embedding"]
    assert body["outputs"][1]["shape"] == [-1, 16]
    assert body["trainable"] == ["head.weight", "head.bias"]
    metrics = body["metrics"]
    assert metrics["teacher"] == {"model": "digits-cloud", "version": 1}
    assert metrics["accuracy_drop_pt"] <= 2.0
    assert metrics["accuracy"] >= 0.95
    assert 0 < metrics["compression"]["hard_label_accuracy"] <= 1
    assert metrics["compression"]["arch"] == "mlp:16,16"
    assert metrics["size_ratio"] < 0.05  # 1.5 thousand weights against the SVM's 160 thousand
    assert metrics["latency"]["latency_ratio"] > 0
    assert body["routing"]["cloud_model"] == {"name": "digits-cloud", "version": 1}
    assert 0 < metrics["apgr"] <= 1.5


def test_distillation_from_an_uploaded_dataset(reference: RunningApi) -> None:
    s = digits_splits(0)
    data = _npz(x=np.concatenate([s.x_train, s.x_test]), y=np.concatenate([s.y_train, s.y_test]))
    r = _post(
        reference, "/v1/models/uploaded-student/distill",
        '{"student": "mlp:32,16", "teacher": "digits-cloud:1", "epochs": 60, "baseline": false}',
        files={"dataset": ("d.npz", data, "application/octet-stream")},
    )  # fmt: skip
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["metrics"]["gate_examples"] == round(0.2 * (len(s.y_train) + len(s.y_test)))
    assert "hard_label_accuracy" not in body["metrics"]["compression"]


def test_bad_distillation_requests_are_4xx_and_change_nothing(reference: RunningApi) -> None:
    before = snapshot(reference.context)
    cases = [
        ('{"student": "mlp:16", "teacher": "nope:1"}', 404, "unknown model 'nope'"),
        ('{"student": "mlp:16", "teacher": "digits-cloud:7"}', 404, "no version 7"),
        ('{"student": "cnn:3x3", "teacher": "digits-cloud:1"}', 400, "architecture"),
        ('{"student": "mlp:16", "teacher": "digits-cloud:1", "teacher_output": "logits"}', 400,
         "has no output 'logits'"),
        ('{"student": "mlp:16", "teacher": "digits-edge:1", "teacher_output": "embedding"}',
         400, "not class probabilities"),
        ('{"student": "mlp:16:pool3", "teacher": "digits-cloud:1"}', 400, "architecture"),
        ('{"student": "mlp:16", "teacher": "digits-cloud"}', 400, "options"),
        ('{"student": "mlp:16", "teacher": "digits-cloud:1", "alpha": 2}', 400, "options"),
    ]  # fmt: skip
    for options, code, reason in cases:
        r = _post(reference, "/v1/models/student/distill", options)
        assert r.status_code == code, (options, r.text)
        assert reason in r.json()["error"], (options, r.text)
    # An existing model of another task cannot take a student.
    with reference.client() as c:
        c.post("/v1/models", json={"name": "vectors", "task": "embedding"})
    before = snapshot(reference.context)
    r = _post(
        reference,
        "/v1/models/vectors/distill",
        '{"student": "mlp:8", "teacher": "digits-cloud:1", "epochs": 2}',
    )
    assert r.status_code == 400
    assert "embedding model" in r.json()["error"]
    assert snapshot(reference.context) == before


def test_structured_pruning_at_half_is_smaller_and_passes_the_gate(reference: RunningApi) -> None:
    """50 % of the edge MLP's neurons removed, fine-tuned from its parent: under half the
    bytes, within the gate, routing recalibrated; then pruned and quantized in one go."""
    options = (
        '{"sparsity": 0.5, "method": "structured", "fine_tune": true, '
        '"cloud_model": "digits-cloud:1"}'
    )
    r = _post(reference, "/v1/models/digits-edge/versions/1/prune", options)
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["version"], body["parent_version"]) == (3, 1)
    assert (body["precision"], body["source"]) == ("fp32", "prune:structured")
    metrics = body["metrics"]
    assert metrics["accuracy_drop_pt"] <= 0.5
    assert metrics["size_ratio"] < 0.5
    assert metrics["compression"]["pruning"]["achieved_sparsity"] == 0.5
    assert "distilled from the parent" in metrics["compression"]["fine_tune"]
    assert body["outputs"][1]["shape"] == [-1, 16]  # the embedding shrank with its layer
    assert body["routing"]["threshold"] is not None
    assert metrics["latency"]["parent_p50_ms"] > 0
    both = _post(
        reference, "/v1/models/digits-edge/versions/1/prune",
        '{"sparsity": 0.5, "fine_tune": true, "quantize": true}',
    )  # fmt: skip
    assert both.status_code == 201, both.text
    assert (both.json()["precision"], both.json()["source"]) == ("int8", "prune:structured+int8")
    assert both.json()["size"] < body["size"]


def test_a_child_that_loses_too_much_is_refused_with_the_figures(reference: RunningApi) -> None:
    before = snapshot(reference.context)
    r = _post(reference, "/v1/models/digits-edge/versions/1/prune", '{"sparsity": 0.9}')
    assert r.status_code == 422
    assert re.search(GATE_REFUSAL, r.json()["error"]), r.json()["error"]
    assert snapshot(reference.context) == before


def test_bad_pruning_requests_are_4xx_and_change_nothing(reference: RunningApi) -> None:
    before = snapshot(reference.context)
    cases = [
        ("digits-edge/versions/1", '{"sparsity": 1.0}', 400, "sparsity"),
        ("digits-edge/versions/1", '{"sparsity": -0.2}', 400, "sparsity"),
        ("digits-edge/versions/1", '{"sparsity": 0.5, "method": "random"}', 400, "method"),
        ("digits-edge/versions/1", "{}", 400, "sparsity"),
        ("digits-edge/versions/2", '{"sparsity": 0.5}', 409, "prune an fp32 version"),
        ("digits-edge/versions/9", '{"sparsity": 0.5}', 404, "no version 9"),
        ("digits-cloud/versions/1", '{"sparsity": 0.5}', 400, "no neurons"),
        ("digits-cloud/versions/1", '{"sparsity": 0.5, "method": "magnitude", '
         '"fine_tune": true}', 400, "fine-tuning after magnitude pruning"),
    ]  # fmt: skip
    for where, options, code, reason in cases:
        r = _post(reference, f"/v1/models/{where}/prune", options)
        assert r.status_code == code, (where, options, r.text)
        assert reason in r.json()["error"], (where, options, r.text)
    assert snapshot(reference.context) == before


def test_fp16_keeps_the_io_types_and_passes_the_gate(reference: RunningApi) -> None:
    r = _post(reference, "/v1/models/digits-cloud/versions/1/fp16", "{}")
    assert r.status_code == 201, r.text
    body = r.json()
    assert (body["precision"], body["parent_version"], body["source"]) == ("fp16", 1, "fp16")
    assert [(t["name"], t["datatype"]) for t in body["inputs"] + body["outputs"]] == [
        ("input", "FP32"), ("probabilities", "FP32"),
    ]  # fmt: skip
    assert body["metrics"]["accuracy_drop_pt"] <= 0.5
    assert 0.45 < body["metrics"]["size_ratio"] < 0.6
    assert body["routing"] is None
    again = _post(reference, "/v1/models/digits-cloud/versions/2/fp16", "{}")
    assert again.status_code == 409


def test_the_compression_report_lists_every_version(reference: RunningApi) -> None:
    """After a pruned child: each version's size ratio and latency ratio to its parent, its
    accuracy, and with a cloud model named, the APGR of every classifier version."""
    assert _post(
        reference, "/v1/models/digits-edge/versions/1/prune", '{"sparsity": 0.3, "fine_tune": true}'
    ).status_code == 201  # fmt: skip
    with reference.client() as c:
        r = c.get("/v1/models/digits-edge/compression", params={"cloud_model": "digits-cloud:1"})
        assert r.status_code == 200, r.text
        rows = {v["version"]: v for v in r.json()["versions"]}
        assert c.get("/v1/models/nope/compression").status_code == 404
        assert c.get("/v1/models/digits-edge/compression?cloud_model=x:0").status_code == 400
        assert c.get("/v1/models/digits-edge/compression?cloud_model=x").status_code == 422
    assert set(rows) == {1, 2, 3}
    assert rows[1]["size_ratio"] is None
    assert rows[1]["latency_ratio"] is None
    for version in (2, 3):
        assert rows[version]["parent_version"] == 1
        assert 0 < rows[version]["size_ratio"] < 1
        assert rows[version]["latency_ratio"] > 0
        assert rows[version]["accuracy"] > 0.9
    for row in rows.values():
        assert 0 < row["apgr"] <= 1.5
        assert row["apgr_cloud_model"] == "digits-cloud:1"


def _renamed(model: bytes, old: str, new: str) -> bytes:
    """``model`` with its graph input or output ``old`` called ``new``."""
    proto = onnx.load_from_string(model)
    for value in [*proto.graph.input, *proto.graph.output]:
        if value.name == old:
            value.name = new
    for node in proto.graph.node:
        node.input[:] = [new if i == old else i for i in node.input]
        node.output[:] = [new if o == old else o for o in node.output]
    return proto.SerializeToString()


def _register(api: RunningApi, name: str, model: bytes) -> None:
    with api.client() as c:
        assert c.post("/v1/models", json={"name": name}).status_code == 201
        r = upload(c, name, model)
        assert r.status_code == 201, r.text


def _digits_npz(labels: np.ndarray | None = None) -> dict[str, tuple[str, bytes, str]]:
    s = digits_splits(0)
    y = np.concatenate([s.y_train, s.y_test]) if labels is None else labels
    data = _npz(x=np.concatenate([s.x_train, s.x_test]), y=y)
    return {"dataset": ("d.npz", data, "application/octet-stream")}


def test_labels_outside_the_classes_are_400_and_change_nothing(reference: RunningApi) -> None:
    """An uploaded y with a 10 (ten classes: 0..9) or a -1 is refused before any training,
    for a fine-tune after pruning and for distillation alike, with the classes named: a
    -1 would otherwise train as class 9, a 10 would fail deep in training."""
    s = digits_splits(0)
    labels = np.concatenate([s.y_train, s.y_test])
    before = snapshot(reference.context)
    for bad in (10, -1):
        y = labels.copy()
        y[7] = bad
        prune = _post(
            reference, "/v1/models/digits-edge/versions/1/prune",
            '{"sparsity": 0.3, "fine_tune": true}', files=_digits_npz(y),
        )  # fmt: skip
        distil = _post(
            reference, "/v1/models/student/distill",
            '{"student": "mlp:8", "teacher": "digits-cloud:1", "epochs": 2, "baseline": false}',
            files=_digits_npz(y),
        )  # fmt: skip
        for r in (prune, distil):
            assert r.status_code == 400, (bad, r.text)
            assert f"labels must be class indices 0 to 9, got {bad}" in r.json()["error"], r.text
    assert snapshot(reference.context) == before


def test_a_teacher_with_another_output_name_distils(reference: RunningApi) -> None:
    """The cloud SVM registered with its softmax output called "scores": distilled from it
    by naming that output, the student is registered. Its routing does not send hard inputs
    to that teacher (the edge router merges the cloud's "probabilities", which it does not
    give) but to the student's own cloud model, and says so."""
    _register(reference, "scorer", _renamed(_cloud_bytes(reference), "probabilities", "scores"))
    r = _post(
        reference, "/v1/models/scored-student/distill",
        '{"student": "mlp:16", "teacher": "scorer:1", "teacher_output": "scores", '
        '"epochs": 40, "baseline": false, "max_drop_pt": 100}',
        files=_digits_npz(),
    )  # fmt: skip
    assert r.status_code == 201, r.text
    body = r.json()
    assert body["metrics"]["teacher"] == {"model": "scorer", "version": 1}
    assert body["routing"]["cloud_model"] is None
    assert body["routing"]["threshold"] is not None
    assert "no 'probabilities' output" in body["metrics"]["compression"]["routing"]


def test_report_against_a_model_without_probabilities_is_400(reference: RunningApi) -> None:
    """The report computes APGR from the named cloud model's "probabilities" on the
    version's inputs: a cloud model without that output, or taking another input, is a
    400 that says so."""
    cloud = _cloud_bytes(reference)
    _register(reference, "scorer", _renamed(cloud, "probabilities", "scores"))
    _register(reference, "pixels", _renamed(cloud, "input", "pixels"))
    with reference.client() as c:
        for ref, reason in (
            ("scorer:1", "has no output 'probabilities'"),
            ("pixels:1", "takes inputs ['pixels']"),
        ):
            r = c.get("/v1/models/digits-edge/compression", params={"cloud_model": ref})
            assert r.status_code == 400, r.text
            assert reason in r.json()["error"], r.text


def test_distilling_into_the_teachers_model_is_refused(reference: RunningApi) -> None:
    """A student as the next version of its own teacher's model would become that model's
    "latest"; a student into a model with another interface would break its clients. Both
    are refused before training, and nothing changes."""
    _register(reference, "scorer", _renamed(_cloud_bytes(reference), "probabilities", "scores"))
    before = snapshot(reference.context)
    cases = [
        ("digits-cloud", "digits-cloud:1", 400, "is the teacher's model"),
        ("scorer", "digits-cloud:1", 400, "gives outputs ['scores']"),
        # The edge model's interface is the student's: only the gate stops 2 epochs.
        ("digits-edge", "digits-cloud:1", 422, "candidate refused"),
    ]
    for student, teacher, code, reason in cases:
        r = _post(
            reference, f"/v1/models/{student}/distill",
            f'{{"student": "mlp:8", "teacher": "{teacher}", "epochs": 2}}',
        )  # fmt: skip
        assert r.status_code == code, (student, r.text)
        assert reason in r.json()["error"], (student, r.text)
    assert snapshot(reference.context) == before


def test_a_named_cloud_model_that_cannot_route_is_400(reference: RunningApi) -> None:
    """Pruning or distilling with a cloud model (for routing) that lacks "probabilities"
    or takes other inputs is refused before any work, not a 500 after it."""
    cloud = _cloud_bytes(reference)
    _register(reference, "scorer", _renamed(cloud, "probabilities", "scores"))
    _register(reference, "pixels", _renamed(cloud, "input", "pixels"))
    before = snapshot(reference.context)
    for ref, reason in (
        ("scorer:1", "has no output 'probabilities'"),
        ("pixels:1", "takes inputs ['pixels']"),
    ):
        prune = _post(
            reference, "/v1/models/digits-edge/versions/1/prune",
            f'{{"sparsity": 0.3, "fine_tune": true, "cloud_model": "{ref}"}}',
        )  # fmt: skip
        distil = _post(
            reference, "/v1/models/student/distill",
            f'{{"student": "mlp:8", "teacher": "digits-cloud:1", "cloud_model": "{ref}"}}',
        )  # fmt: skip
        for r in (prune, distil):
            assert r.status_code == 400, (ref, r.text)
            assert reason in r.json()["error"], (ref, r.text)
    assert snapshot(reference.context) == before


def test_fp16_is_for_cloud_models_and_its_cpu_latency_is_not_reported(
    reference: RunningApi,
) -> None:
    """An edge model (trainable head, routing; devices run it on their CPUs) is not
    converted to FP16: refused, nothing changes. A cloud model's FP16 child keeps its
    latency figures labelled with the provider they were timed on (the CPU here, where FP16
    runs through casts), and the report shows no latency ratio for it."""
    before = snapshot(reference.context)
    r = _post(reference, "/v1/models/digits-edge/versions/1/fp16", "{}")
    assert r.status_code == 400, r.text
    assert "FP16 is for cloud models" in r.json()["error"]
    assert snapshot(reference.context) == before
    r = _post(reference, "/v1/models/digits-cloud/versions/1/fp16", "{}")
    assert r.status_code == 201, r.text
    assert r.json()["metrics"]["latency"]["provider"] == "CPUExecutionProvider"
    with reference.client() as c:
        rows = c.get("/v1/models/digits-cloud/compression").json()["versions"]
    assert [(v["version"], v["precision"], v["latency_ratio"]) for v in rows] == [
        (1, "fp32", None),
        (2, "fp16", None),
    ]


def test_compression_jobs_are_admitted_one_per_model_and_a_few_at_a_time(
    reference: RunningApi,
) -> None:
    """A job writing a model (held in Redis, across API replicas) turns a second one for
    the same model away at once (409), not after all its work; with every job slot of this
    process taken, a job is a 503 with Retry-After. Refusals and failures give their slots
    back."""
    from cloud.pipeline.compress import jobs

    before = snapshot(reference.context)
    lock = reference.context.redis.lock(jobs.lock_name("digits-edge"), timeout=60)
    assert lock.acquire(blocking=False)
    try:
        r = _post(reference, "/v1/models/digits-edge/versions/1/prune", '{"sparsity": 0.3}')
        assert r.status_code == 409, r.text
        assert "a compression job is writing model 'digits-edge'" in r.json()["error"]
        other = _post(reference, "/v1/models/digits-cloud/versions/9/fp16", "{}")
        assert other.status_code == 404, other.text  # another model: admitted
    finally:
        lock.release()
    taken = [jobs.SLOTS.acquire(blocking=False) for _ in range(jobs.MAX_JOBS)]
    assert all(taken)
    try:
        r = _post(reference, "/v1/models/digits-edge/versions/1/prune", '{"sparsity": 0.3}')
        assert r.status_code == 503, r.text
        assert int(r.headers["Retry-After"]) > 0
        assert f"{jobs.MAX_JOBS} compression jobs are running" in r.json()["error"]
    finally:
        for _ in taken:
            jobs.SLOTS.release()
    for _ in range(jobs.MAX_JOBS + 1):  # each admitted, fails inside, frees its slot
        r = _post(reference, "/v1/models/digits-edge/versions/9/prune", '{"sparsity": 0.3}')
        assert r.status_code == 404, r.text
    assert snapshot(reference.context) == before
