"""B3's load generator, run as its own process: reads one JSON job per line on stdin
(model, inputs as {name: {data, datatype}}, transport, closed-loop concurrency or open-loop
rate, duration), answers one JSON line of latencies and counts. Transports: HTTP binary,
HTTP JSON (KServe v2), gRPC (tritonclient)."""

from __future__ import annotations

import json
import queue
import sys
import threading
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import httpx
import numpy as np

from shared.tensors import datatype_of, dtype_of, encode_request

Call = Callable[[], bool]
SENDERS = 32


def _caller(job: dict[str, Any]) -> Callable[[], Call]:
    """A factory of per-thread callers: each returns True when answered 200 / OK."""
    inputs = {
        name: np.asarray(spec["data"], dtype=dtype_of(spec["datatype"]))
        for name, spec in job["inputs"].items()
    }
    path = f"/v2/models/{job['model']}/infer"
    auth = {"Authorization": f"Bearer {job['token']}"}
    transport = job["transport"]
    if transport in ("http_binary", "http_json"):
        body, headers = encode_request(inputs, binary=transport == "http_binary")

        def http() -> Call:
            client = httpx.Client(base_url=job["url"], headers=auth, timeout=30)

            def call() -> bool:
                return client.post(path, content=body, headers=headers).status_code == 200

            return call

        return http
    import tritonclient.grpc as grpcclient

    def grpc() -> Call:
        client = grpcclient.InferenceServerClient(job["grpc"])
        tensors = []
        for name, array in inputs.items():
            tensor = grpcclient.InferInput(name, list(array.shape), datatype_of(array))
            tensor.set_data_from_numpy(array)
            tensors.append(tensor)
        metadata = {"authorization": auth["Authorization"]}

        def call() -> bool:
            try:
                client.infer(job["model"], tensors, headers=dict(metadata))
            except Exception:
                return False
            return True

        return call

    return grpc


def closed_loop(make: Callable[[], Call], concurrency: int, duration: float) -> dict[str, Any]:
    """``concurrency`` callers back to back for ``duration`` seconds, counted from the moment
    the last one is connected and warm (on a loaded machine, making 32 clients can take
    longer than a short run: a clock started before would measure the set-up)."""
    latencies: list[float] = []
    errors = [0]
    completed = [0]
    lock = threading.Lock()
    window: dict[str, float] = {}
    ready = threading.Barrier(
        concurrency, action=lambda: window.update(stop=time.perf_counter() + duration)
    )

    def worker() -> None:
        call = make()
        call()  # connect and warm up before the clock
        ready.wait()
        stop_at = window["stop"]
        mine: list[float] = []
        failed = done = 0
        while (now := time.perf_counter()) < stop_at:
            ok = call()
            end = time.perf_counter()
            mine.append(end - now)
            failed += not ok
            # Throughput counts what finished inside the window (steady state: rate x
            # window); the last call's latency still counts, however late it ends.
            done += end <= stop_at
        with lock:
            latencies.extend(mine)
            errors[0] += failed
            completed[0] += done

    threads = [threading.Thread(target=worker) for _ in range(concurrency)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {
        "latencies": latencies,
        "errors": errors[0],
        "seconds": duration,
        "completed": completed[0],
    }


def open_loop(make: Callable[[], Call], rate: float, duration: float) -> dict[str, Any]:
    """Poisson arrivals at ``rate``/s from ``SENDERS`` warm connections; latency counts from
    the scheduled arrival, so waiting for a free sender is queueing too."""
    rng = np.random.default_rng(0)
    arrivals = np.cumsum(rng.exponential(1 / rate, size=int(rate * duration * 1.5) + 10))
    arrivals = arrivals[arrivals < duration]
    senders: queue.Queue[Call] = queue.Queue()
    for _ in range(SENDERS):
        call = make()
        call()
        senders.put(call)
    latencies: list[float] = []
    errors = [0]
    lock = threading.Lock()

    def send(due: float) -> None:
        call = senders.get()
        try:
            ok = call()
        finally:
            senders.put(call)
        took = time.perf_counter() - due
        with lock:
            latencies.append(took)
            errors[0] += not ok

    with ThreadPoolExecutor(SENDERS) as pool:
        base = time.perf_counter() + 0.2
        for offset in arrivals:
            due = base + float(offset)
            delay = due - time.perf_counter()
            if delay > 0:
                time.sleep(delay)
            pool.submit(send, due)
    return {"latencies": latencies, "errors": errors[0], "seconds": duration}


def main() -> None:
    for line in sys.stdin:
        job = json.loads(line)
        make = _caller(job)
        cpu = time.process_time()
        if job["mode"] == "closed":
            result = closed_loop(make, job["concurrency"], job["duration"])
        else:
            result = open_loop(make, job["rate"], job["duration"])
        # What the load itself cost (it shares the machine with the server here).
        result["client_cpu_s"] = time.process_time() - cpu
        print(json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
