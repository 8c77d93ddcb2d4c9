"""Structure-aware fuzzing of the DICOM reader with hypothesis, through the sandboxed worker.

Valid seeds (hand-built native encodings, deflate, pydicom's RLE encoder, and pydicom's small
JPEG / JPEG-LS / JPEG 2000 / RLE test files) are mutated where it hurts: Image Pixel values
(Rows, Columns, Bits, Samples, Photometric Interpretation, Number of Frames), the Transfer
Syntax UID, truncation, item lengths, element lengths and random bytes. Each mutant goes
through ``client.prepare.workers`` with small caps, a 30 s time limit and a 512 MiB memory
allowance. The properties: the outcome is an image in [-1, 1] or a typed rejection, and never
``internal-error`` (an exception we did not type), ``timeout`` (a hang), ``out-of-memory`` or
``worker-crashed`` (unbounded memory or a native crash). Longer runs: fuzz/README.md.
"""

from __future__ import annotations

import struct
import zlib
from collections.abc import Callable, Iterator
from io import BytesIO
from pathlib import Path

import numpy as np
import pydicom
import pytest
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.uid import RLELossless

from client.prepare.labels import LabelRule
from client.prepare.workers import FileJob, PrepareSettings, SandboxPool
from common.dicom.errors import REJECTION_REASONS
from common.dicom.read import ReadLimits
from common.dicom.structure import rewrite_transfer_syntax
from tests.dicom_bytes import DEFLATED, EXPLICIT_BE, EXPLICIT_LE, IMPLICIT_LE, image_dataset, part10

NEVER = {"internal-error", "timeout", "out-of-memory", "worker-crashed"}
BUNDLED_SEEDS = ("MR_small_jp2klossless.dcm", "MR_small_jpeg_ls_lossless.dcm", "SC_rgb_jpeg_dcmtk.dcm",
                 "MR_small_RLE.dcm", "JPEGLSNearLossless_08.dcm", "SC_rgb_rle_2frame.dcm",
                 "SC_rgb_small_odd_jpeg.dcm", "JPEG2000.dcm")
SYNTAXES = (EXPLICIT_LE, IMPLICIT_LE, EXPLICIT_BE, DEFLATED, "1.2.840.10008.1.2.4.50",
            "1.2.840.10008.1.2.4.51", "1.2.840.10008.1.2.4.57", "1.2.840.10008.1.2.4.70",
            "1.2.840.10008.1.2.4.80", "1.2.840.10008.1.2.4.81", "1.2.840.10008.1.2.4.90",
            "1.2.840.10008.1.2.4.91", "1.2.840.10008.1.2.4.201", "1.2.840.10008.1.2.4.203",
            "1.2.840.10008.1.2.5", "1.2.840.10008.1.2.4.100", "1.2.3.4", "")
US_TAGS = {"Rows": 0x0010, "Columns": 0x0011, "BitsAllocated": 0x0100, "BitsStored": 0x0101,
           "HighBit": 0x0102, "PixelRepresentation": 0x0103, "SamplesPerPixel": 0x0002}
PHOTOMETRICS = ("MONOCHROME1", "MONOCHROME2", "RGB", "YBR_FULL", "YBR_FULL_422", "PALETTE COLOR",
                "YBR_ICT", "", "X" * 16)


def _deflated_seed() -> bytes:
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    return part10(DEFLATED, packer.compress(image_dataset(6, 5, frames=2)) + packer.flush())


def _rle_seed() -> bytes:
    ds = pydicom.dcmread(BytesIO(part10(EXPLICIT_LE, image_dataset(8, 8, frames=2))))
    ds.compress(RLELossless)
    out = BytesIO()
    ds.save_as(out, enforce_file_format=True)
    return out.getvalue()


def seeds() -> list[bytes]:
    """Valid files in every encoding the reader supports."""
    built = [
        part10(EXPLICIT_LE, image_dataset(8, 8, frames=2)),
        part10(IMPLICIT_LE, image_dataset(5, 7, implicit=True)),
        part10(EXPLICIT_BE, image_dataset(4, 4, frames=3, endian=">")),
        part10(EXPLICIT_LE, image_dataset(6, 6, bits=8, samples=3, photometric="RGB")),
        part10(EXPLICIT_LE, image_dataset(6, 6, bits=8, photometric="MONOCHROME1")),
        _deflated_seed(),
        _rle_seed(),
    ]
    for name in BUNDLED_SEEDS:
        path = get_testdata_file(name)
        if path is not None:
            built.append(Path(str(path)).read_bytes())
    return built


SEEDS = seeds()
Mutation = Callable[[bytes], bytes]


def _element_value(data: bytes, group: int, elem: int) -> tuple[int, int, int] | None:
    """(header start, value start, value length) of a top-level short-VR or implicit element."""
    for endian, implicit in (("<", False), (">", False), ("<", True)):
        tag = struct.pack(endian + "HH", group, elem)
        at = data.find(tag, 132)
        while 0 <= at <= len(data) - 8:  # a header cut by a truncation is not an element to rewrite
            if implicit:
                return at, at + 8, struct.unpack_from("<I", data, at + 4)[0]
            if data[at + 4:at + 6].isalpha():
                return at, at + 8, struct.unpack_from(endian + "H", data, at + 6)[0]
            at = data.find(tag, at + 1)
    return None


def set_us(name: str, value: int) -> Mutation:
    def mutate(data: bytes) -> bytes:
        found = _element_value(data, 0x0028, US_TAGS[name])
        if found is None or found[2] != 2:
            return data
        endian = ">" if data[found[0]:found[0] + 2] == b"\x00\x28" else "<"
        return data[:found[1]] + struct.pack(endian + "H", value) + data[found[1] + 2:]
    return mutate


def set_text(elem: int, value: str) -> Mutation:
    """Replace a (0028,elem) text value, re-declaring its length (explicit short VR only)."""
    def mutate(data: bytes) -> bytes:
        found = _element_value(data, 0x0028, elem)
        if found is None or not data[found[0] + 4:found[0] + 6].isalpha():
            return data
        start, value_start, length = found
        endian = ">" if data[start:start + 2] == b"\x00\x28" else "<"
        raw = value.encode("ascii") + b" " * (len(value) % 2)
        return data[:start + 6] + struct.pack(endian + "H", len(raw)) + raw + data[value_start + length:]
    return mutate


def set_syntax(uid: str) -> Mutation:
    def mutate(data: bytes) -> bytes:
        if data[128:132] != b"DICM":
            return data
        end = 132
        while data[end:end + 2] == b"\x02\x00":
            long_vr = data[end + 4:end + 6] in (b"OB", b"UN", b"OW", b"UT")
            if end + (12 if long_vr else 8) > len(data):  # the meta group was cut by a truncation
                return data
            length = struct.unpack_from("<I" if long_vr else "<H", data, end + (8 if long_vr else 6))[0]
            end += (12 if long_vr else 8) + length
        return data[:132] + rewrite_transfer_syntax(data[132:end], uid) + data[end:]
    return mutate


def truncate(fraction: float) -> Mutation:
    return lambda data: data[:int(len(data) * fraction)]


def corrupt_item_length(which: int, length: int) -> Mutation:
    def mutate(data: bytes) -> bytes:
        spots = [i for i in range(132, len(data) - 8) if data[i:i + 4] in (b"\xfe\xff\x00\xe0",
                                                                         b"\xff\xfe\xe0\x00")]
        if not spots:
            return data
        at = spots[which % len(spots)] + 4
        return data[:at] + struct.pack("<I", length) + data[at + 4:]
    return mutate


def overwrite(position: float, chunk: bytes) -> Mutation:
    def mutate(data: bytes) -> bytes:
        at = 132 + int((len(data) - 132) * position)
        return data[:at] + chunk + data[at + len(chunk):]
    return mutate


LENGTHS = st.one_of(st.integers(0, 64), st.sampled_from([0xFFFFFFFF, 0xFFFFFFF0, 0x7FFFFFFF, 2**20]),
                    st.integers(0, 2**32 - 1))
MUTATIONS = st.one_of(
    st.builds(set_us, st.sampled_from(sorted(US_TAGS)),
              st.one_of(st.integers(0, 70), st.sampled_from([255, 4096, 32768, 65535]))),
    st.builds(set_text, st.just(0x0004), st.sampled_from(PHOTOMETRICS)),
    st.builds(set_text, st.just(0x0008), st.sampled_from(["0", "1", "2", "3", "-1", "999999", "1.5", "x"])),
    st.builds(set_syntax, st.sampled_from(SYNTAXES)),
    st.builds(truncate, st.floats(0.0, 1.0)),
    st.builds(corrupt_item_length, st.integers(0, 64), LENGTHS),
    st.builds(overwrite, st.floats(0.0, 1.0), st.binary(min_size=1, max_size=8)),
    st.builds(overwrite, st.floats(0.0, 1.0), LENGTHS.map(lambda n: struct.pack("<I", n))),
)


@pytest.fixture(scope="module")
def sandbox(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[SandboxPool, Path]]:
    root = tmp_path_factory.mktemp("fuzz")
    (root / "case").mkdir()
    limits = ReadLimits(max_decoded_bytes=8 * 2**20, max_file_bytes=4 * 2**20,
                        max_inflated_bytes=8 * 2**20)
    config = PrepareSettings(root=root, image_size=16, labels=LabelRule("folder", ("case",)),
                             limits=limits, time_limit_s=30.0, memory_limit_bytes=512 * 2**20)
    with SandboxPool(config, workers=1) as pool:
        yield pool, root


def outcome_of(sandbox: tuple[SandboxPool, Path], data: bytes) -> tuple[str | None, str, np.ndarray | None]:
    pool, root = sandbox
    path = root / "case" / "mutant.dcm"
    path.write_bytes(data)
    (outcome,) = list(pool.run([FileJob("case/mutant.dcm", path.lstat())]))
    return outcome.reason, outcome.message, outcome.images


def test_every_seed_loads(sandbox: tuple[SandboxPool, Path]) -> None:
    for index, seed in enumerate(SEEDS):
        reason, message, images = outcome_of(sandbox, seed)
        assert reason is None, (index, reason, message)
        assert images is not None and np.isfinite(images).all()


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(seed=st.sampled_from(range(len(SEEDS))), mutations=st.lists(MUTATIONS, min_size=1, max_size=3))
def test_mutants_load_or_are_rejected_with_a_typed_reason(sandbox: tuple[SandboxPool, Path], seed: int,
                                                          mutations: list[Mutation]) -> None:
    # prepare
    data = SEEDS[seed]
    for mutate in mutations:
        data = mutate(data)
    # act
    reason, message, images = outcome_of(sandbox, data)
    event(reason or "loaded")
    # assert
    if reason is None:
        assert images is not None and images.ndim == 3 and images.shape[1:] == (16, 16)
        assert np.isfinite(images).all() and -1.0 <= images.min() <= images.max() <= 1.0
    else:
        assert reason in REJECTION_REASONS and reason not in NEVER, (reason, message)
