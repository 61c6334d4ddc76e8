"""Concurrent changes to one device's desired state, on SQLite and PostgreSQL: serialized."""

from __future__ import annotations

import threading
from pathlib import Path

from cloud.embedded.services import ServiceUrls
from cloud.fleet.desired import stored_state
from cloud.fleet.keeper import DesiredStateKeeper
from cloud.registry import repository
from shared import topics
from shared.messages import DesiredState
from shared.signing import verify_desired_state
from shared.topics import DeviceTopic
from tests.cloud.fleet.desired_support import (
    Watcher,
    add_models,
    audit_of,
    enroll,
    flush_link,
    open_context,
    retained_desired,
    running_fleet,
)

WRITERS = 20


def test_parallel_deploys_to_one_device_get_one_increasing_rev_sequence(
    tmp_path: Path, database_url: str, embedded: ServiceUrls
) -> None:
    """Twenty threads deploy alternating models and versions to one device at once. Each
    change is committed under the device's row lock: revs 1..20 are each issued once, every
    rev's model set is the previous one plus that writer's change (no lost update), the
    stored document is the last writer's set, and the broker ends holding rev 20."""
    context = open_context(
        tmp_path, database_url=database_url, mqtt_url=embedded.mqtt_url,
        redis_url=embedded.redis_url,
    )  # fmt: skip
    try:
        add_models(context, ("alpha", "beta"))
        device_id = enroll(context)
        topic = topics.device_topic(device_id, DeviceTopic.DESIRED)
        plan = [(("alpha", "beta")[i % 2], 1 + (i // 2) % 2) for i in range(WRITERS)]
        results: list[tuple[int, str, int]] = []
        errors: list[BaseException] = []
        start = threading.Barrier(WRITERS)
        with running_fleet(context, [device_id]) as fleet:
            watcher = Watcher(context.urls.mqtt_url)
            watcher.watch(topic)

            def deploy(model: str, version: int) -> None:
                start.wait()
                try:
                    state = fleet.deploy(device_id=device_id, model=model, version=version)
                    results.append((state.rev, model, version))
                except BaseException as exc:
                    errors.append(exc)

            threads = [threading.Thread(target=deploy, args=step) for step in plan]
            for thread in threads:
                thread.start()
            for thread in threads:
                thread.join(60)
            flush_link(fleet, context.urls.mqtt_url)
            last_sent = watcher.messages(topic)[-1]
            watcher.close()
            retained = retained_desired(context.urls.mqtt_url, device_id)

        assert errors == []
        assert sorted(rev for rev, _m, _v in results) == list(range(1, WRITERS + 1))
        signed = audit_of(context, device_id, "desired.sign")
        assert [entry["rev"] for entry in signed] == list(range(1, WRITERS + 1))
        expected: dict[str, int] = {}
        for (rev, model, version), entry in zip(sorted(results), signed, strict=True):
            expected = expected | {model: version}
            assert entry["models"] == expected, f"rev {rev} lost an earlier change"

        with context.database.session() as s:
            device = repository.get_device(s, device_id=device_id)
            stored = stored_state(device)
            document = device.desired_document
        assert device.desired_rev == WRITERS
        assert stored is not None
        assert stored.rev == WRITERS
        assert {d.manifest.model: d.manifest.version for d in stored.deployments} == expected

        public_key = context.signing_key.public_key()
        for payload in (last_sent, retained):
            state: DesiredState = verify_desired_state(payload, public_key, device_id=device_id)
            assert state.rev == WRITERS
        assert retained.decode() == document
    finally:
        context.close()


def test_a_slow_publish_never_leaves_an_older_rev_on_the_broker(
    tmp_path: Path, database_url: str, embedded: ServiceUrls
) -> None:
    """Writer A commits rev 1 and is slow to hand it to the broker; writer B commits rev 2
    meanwhile. Publishing in commit order is not enough (A's rev 1 would land after B's
    rev 2 and stay retained): B's publish waits for A's and reads the newest document."""
    context = open_context(
        tmp_path, database_url=database_url, mqtt_url=embedded.mqtt_url,
        redis_url=embedded.redis_url,
    )  # fmt: skip
    try:
        add_models(context, ("alpha",))
        device_id = enroll(context)
        public_key = context.signing_key.public_key()
        sent: list[int] = []
        second_done = threading.Event()

        def second_writer() -> None:
            keeper.deploy(device_id=device_id, model="alpha", version=2)
            second_done.set()

        def slow_publish(_topic: str, document: str) -> bool:
            rev = verify_desired_state(document, public_key, device_id=device_id).rev
            if rev == 1 and not sent:
                threading.Thread(target=second_writer).start()
                # Give B every chance to overtake: it can only if publishing is unordered.
                second_done.wait(0.5)
            sent.append(rev)
            return True

        keeper = DesiredStateKeeper(context, slow_publish)
        keeper.deploy(device_id=device_id, model="alpha", version=1)
        assert second_done.wait(10)
        assert sent[-1] == 2
        assert sent == sorted(sent)
    finally:
        context.close()
