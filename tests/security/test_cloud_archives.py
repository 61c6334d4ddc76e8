"""Hostile evaluation datasets (.npz): refused from their declarations, before inflating."""

from __future__ import annotations

import io
import struct
import tracemalloc
import zipfile
import zlib

import numpy as np
import pytest

from cloud.pipeline.datasets import from_npz, read_npz
from shared.errors import InvalidInput, PayloadTooLarge
from shared.messages import TensorSpec
from tests.cloud.api.helpers import snapshot, upload
from tests.conftest import RunningApi
from tests.onnx_models import tiny_classifier

GIB = 1 << 30
MIB = 1 << 20


def _npy_header(shape: tuple[int, ...], descr: str = "<f4") -> bytes:
    out = io.BytesIO()
    np.lib.format.write_array_header_1_0(
        out, {"descr": descr, "fortran_order": False, "shape": shape}
    )
    return out.getvalue()


def _zip(name: str, head: bytes, zeros: int, *, declare: int | None = None) -> bytes:
    """One deflated member: ``head`` then ``zeros`` zero bytes, compressed without ever
    holding them (a full-flushed block of zeros is the same bytes every time). ``declare``
    makes the zip directory lie about the inflated size."""
    packer = zlib.compressobj(9, zlib.DEFLATED, -15)
    full, rest = divmod(zeros, MIB)
    block = bytes(MIB)
    start = packer.compress(head) + packer.flush(zlib.Z_FULL_FLUSH)
    segment = packer.compress(block) + packer.flush(zlib.Z_FULL_FLUSH)
    deflated = start + segment * full + packer.compress(bytes(rest)) + packer.flush()
    crc = zlib.crc32(head)
    for _ in range(full):
        crc = zlib.crc32(block, crc)
    crc = zlib.crc32(bytes(rest), crc)
    size = declare if declare is not None else len(head) + zeros
    raw_name = name.encode()
    common = struct.pack("<HHHHHIII", 20, 0, 8, 0, 0x21, crc, len(deflated), size)
    local = struct.pack("<I", 0x04034B50) + common + struct.pack("<HH", len(raw_name), 0)
    central = (
        struct.pack("<IH", 0x02014B50, 20)
        + common
        + struct.pack("<HHHHHII", len(raw_name), 0, 0, 0, 0, 0, 0)
        + raw_name
    )
    body = local + raw_name + deflated
    end = struct.pack("<IHHHHIIH", 0x06054B50, 0, 0, 1, 1, len(central), len(body), 0)
    return body + central + end


def _bomb(inflated: int, *, declare: int | None = None) -> bytes:
    """``x.npy``: a float32 vector of ``inflated`` bytes, all zeros."""
    return _zip("x.npy", _npy_header((inflated // 4,)), inflated, declare=declare)


def _npz(**arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez_compressed(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()


@pytest.fixture
def with_version(api: RunningApi) -> RunningApi:
    with api.client() as c:
        assert c.post("/v1/models", json={"name": "tiny"}).status_code == 201
        assert upload(c, "tiny", tiny_classifier()).status_code == 201
    return api


def _quantize_with(api: RunningApi, dataset: bytes) -> tuple[int, str]:
    with api.client() as c:
        r = c.post(
            "/v1/models/tiny/versions/1/quantize",
            files={"dataset": ("d.npz", dataset, "application/octet-stream")},
        )
    return r.status_code, r.json()["error"]


def _peak_bytes(data: bytes) -> tuple[BaseException, int]:
    """What ``from_npz`` raises for ``data``, and the most memory it held meanwhile."""
    tracemalloc.start()
    try:
        with pytest.raises((InvalidInput, PayloadTooLarge)) as raised:
            from_npz(data, [TensorSpec(name="input", datatype="FP32", shape=[-1, 4])])
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    return raised.value, peak


def test_a_one_megabyte_npz_that_inflates_to_a_gibibyte_is_refused_before_inflating(
    with_version: RunningApi,
) -> None:
    """The cloud allocated and filled the whole 1 GiB array before finding the data unusable
    (a 400 after +1 GiB); the zip directory's declared size now refuses it with a 413."""
    bomb = _bomb(GIB)
    assert len(bomb) < 1.1 * MIB
    before = snapshot(with_version.context)
    status, error = _quantize_with(with_version, bomb)
    assert status == 413, error
    assert "inflates to" in error
    assert snapshot(with_version.context) == before
    # And the reading itself holds next to nothing.
    refused, peak = _peak_bytes(bomb)
    assert isinstance(refused, PayloadTooLarge)
    assert peak < 16 * MIB


def test_an_npy_header_declaring_ten_billion_floats_is_a_413_not_a_500(
    with_version: RunningApi,
) -> None:
    """A tiny member whose header declares 10^10 float64 made numpy allocate 80 GB
    (MemoryError, 500); the header's shape times item size is now checked first."""
    header_only = _zip("x.npy", _npy_header((10**10,), "<f8"), 0)
    before = snapshot(with_version.context)
    status, error = _quantize_with(with_version, header_only)
    assert status == 413, error
    assert "declares 80000000000 bytes" in error
    assert snapshot(with_version.context) == before
    refused, peak = _peak_bytes(header_only)
    assert isinstance(refused, PayloadTooLarge)
    assert peak < 16 * MIB


def test_a_single_npy_instead_of_an_npz_is_a_clear_400(with_version: RunningApi) -> None:
    """A bare .npy loaded as one array and then failed on ``.files`` (500)."""
    out = io.BytesIO()
    np.save(out, np.zeros((8, 4), np.float32))
    status, error = _quantize_with(with_version, out.getvalue())
    assert status == 400
    assert "not a readable .npz" in error


def test_a_zip_directory_that_understates_a_member_is_caught_without_reading_past_it() -> None:
    """The directory says 1 KiB, the deflate stream holds 256 MiB: reading stops at what was
    declared and the size or CRC check refuses the member."""
    lying = _zip("x.npy", _npy_header((224,)), 256 * MIB, declare=1024)
    tracemalloc.start()
    try:
        with pytest.raises(InvalidInput, match=r"not a readable \.npz"):
            read_npz(lying)
        _, peak = tracemalloc.get_traced_memory()
    finally:
        tracemalloc.stop()
    assert peak < 8 * MIB


def test_an_array_is_checked_against_the_cap_from_its_header_alone() -> None:
    """The member holds 16 bytes, so the directory passes; its header declares 4000."""
    small_member = _zip("x.npy", _npy_header((1000,)), 16)
    with pytest.raises(PayloadTooLarge, match="declares 4000 bytes"):
        read_npz(small_member, max_bytes=3000)


@pytest.mark.parametrize(
    ("archive", "match"),
    [
        (_zip("x.npy", _npy_header((4,), "|O"), 32), "Python objects"),
        (_zip("x.txt", _npy_header((4,)), 16), r"not one distinct \.npy array"),
        (_zip("x.npy", b"\x93NUMPY\x03\x00" + b"\x00" * 8, 0), "format"),
        (_zip("x.npy", b"\x93NUMPY\x02\x00" + struct.pack("<I", 1 << 31), 0), r"byte \.npy header"),
        (_zip("x.npy", _npy_header((4,)), 8), "does not hold the 16 bytes"),
        (_zip("x.npy", _npy_header((4,)), 32), "does not hold the 16 bytes"),
        (b"PK\x03\x04 not really a zip", "not a readable .npz"),
    ],
    ids=["objects", "not npy", "npy v3", "huge header", "short", "trailing", "broken zip"],
)
def test_malformed_members_are_invalid_input(archive: bytes, match: str) -> None:
    """Each malformed archive is an InvalidInput (400) naming what is wrong, never a crash."""
    with pytest.raises(InvalidInput, match=match):
        read_npz(archive)


def test_too_many_members_are_refused_from_the_directory() -> None:
    out = io.BytesIO()
    with zipfile.ZipFile(out, "w") as archive:
        for i in range(65):
            archive.writestr(f"a{i}.npy", b"")
    with pytest.raises(InvalidInput, match="65 members"):
        read_npz(out.getvalue())


def test_an_honest_npz_reads_as_before() -> None:
    """Stored and deflated members, C and Fortran order, labels: the same arrays np.load gives."""
    x = np.asfortranarray(np.arange(24, dtype=np.float32).reshape(6, 4))
    y = np.arange(6, dtype=np.int64)
    for data in (_npz(x=x, y=y), _stored_npz(x=x, y=y)):
        arrays = read_npz(data)
        assert sorted(arrays) == ["x", "y"]
        np.testing.assert_array_equal(arrays["x"], x)
        np.testing.assert_array_equal(arrays["y"], y)


def _stored_npz(**arrays: np.ndarray) -> bytes:
    out = io.BytesIO()
    np.savez(out, **arrays)  # type: ignore[arg-type]
    return out.getvalue()
