"""Hostile files: each is refused with its typed reason, before pydicom or a decoder sees it."""

from __future__ import annotations

import io
import os
import tracemalloc
import zlib
from pathlib import Path

import numpy as np
import pydicom
import pytest
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import SecondaryCaptureImageStorage

from common.dicom.read import DicomRejected, ReadLimits, read_image_bytes, read_image_frames
from tests.dicom_bytes import (
    DEFLATED,
    EXPLICIT_BE,
    EXPLICIT_LE,
    IMPLICIT_LE,
    UNDEFINED,
    element,
    image_dataset,
    item,
    part10,
    sequence_delimiter,
)


def reason_of(data: bytes, limits: ReadLimits | None = None) -> str:
    with pytest.raises(DicomRejected) as info:
        read_image_bytes(data, limits=limits)
    return info.value.reason


def bundled(name: str) -> Path:
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return Path(str(path))


@pytest.mark.parametrize(("syntax", "endian", "implicit"), [
    (EXPLICIT_LE, "<", False), (IMPLICIT_LE, "<", True), (EXPLICIT_BE, ">", False)])
def test_hand_built_image_loads_in_each_native_encoding(syntax: str, endian: str, implicit: bool) -> None:
    # prepare: 2 frames of 3 x 4, 16-bit ramp (i * 37)
    data = part10(syntax, image_dataset(3, 4, frames=2, endian=endian, implicit=implicit))
    # act
    image = read_image_bytes(data)
    # assert: min-max window of each frame over the ramp 0, 37, ..., 11 * 37 (frame 0)
    assert image.frames.shape == (2, 3, 4)
    np.testing.assert_allclose(image.frames[0].ravel(), np.arange(12) / 11, atol=1e-6)


def test_file_meta_without_preamble_is_accepted() -> None:
    image = read_image_bytes(part10(EXPLICIT_LE, image_dataset(2, 2), preamble=False))
    assert image.frames.shape == (1, 2, 2)


def test_missing_and_unknown_transfer_syntax() -> None:
    assert reason_of(part10(None, image_dataset(2, 2))) == "missing-transfer-syntax"
    assert reason_of(part10("1.2.3.4.5", image_dataset(2, 2))) == "unsupported-transfer-syntax"
    assert reason_of(part10("not a uid", image_dataset(2, 2))) == "unsupported-transfer-syntax"
    assert reason_of(bundled("meta_missing_tsyntax.dcm").read_bytes()) == "missing-transfer-syntax"


def test_jpeg_xl_is_named_as_a_real_syntax_the_installed_pydicom_cannot_read() -> None:
    # prepare: JPEG XL Lossless (PS3.5 A.4.14, 2024); pydicom 3.0.2 does not know the UID
    data = part10("1.2.840.10008.1.2.4.110", image_dataset(2, 2))
    # act
    with pytest.raises(DicomRejected) as info:
        read_image_bytes(data)
    # assert: not "unknown": what it is, why it fails, what to do
    assert info.value.reason == "unsupported-transfer-syntax"
    assert "JPEG XL Lossless" in info.value.message and f"pydicom {pydicom.__version__}" in info.value.message
    assert "re-export" in info.value.fix
    with pytest.raises(DicomRejected) as info:
        read_image_bytes(part10("1.2.3.4.5", image_dataset(2, 2)))
    assert "not a transfer syntax DICOM defines" in info.value.message


def mr_dataset(pixels: np.ndarray) -> Dataset:
    """A Secondary Capture MR image made by pydicom, 12 bits stored."""
    ds = Dataset()
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = "1.2.826.0.1.3680043.8.498.77"
    ds.Modality = "MR"
    ds.PatientID = "OLD-ARCHIVE-1"
    ds.set_pixel_data(pixels, "MONOCHROME2", 12)
    return ds


def dataset_bytes(ds: Dataset, **encoding: bool) -> bytes:
    buffer = io.BytesIO()
    ds.save_as(buffer, **encoding)
    return buffer.getvalue()


RAMP = np.array([[10, 400, 800], [1200, 3000, 4095]], dtype=np.uint16)
RAMP_UNIT = (RAMP - 10.0) / (4095.0 - 10.0)  # no window: the frame's range


def test_megabytes_of_zero_padding_after_the_last_element_are_ignored() -> None:
    # prepare: a Part 10 file padded with 3 MiB + 3 zero bytes (archives pad to block sizes)
    ds = mr_dataset(RAMP)
    ds.file_meta.MediaStorageSOPClassUID = ds.SOPClassUID
    ds.file_meta.MediaStorageSOPInstanceUID = ds.SOPInstanceUID
    padded = dataset_bytes(ds, enforce_file_format=True) + b"\0" * (3 * 2**20 + 3)
    # act
    image = read_image_bytes(padded)
    # assert: kept, same pixels, and the padding is reported as a warning, not as an element
    np.testing.assert_allclose(image.frames[0], RAMP_UNIT, atol=1e-6)
    assert any(f"{3 * 2**20 + 3} bytes of zero padding" in w for w in image.warnings), image.warnings
    # a non-zero byte after the padding is not padding: still refused
    assert reason_of(padded + b"\x01" + b"\0" * 7) == "malformed"


@pytest.mark.parametrize(("implicit_vr", "little_endian", "name"), [
    (True, True, "Implicit VR Little Endian"), (False, False, "Explicit VR Big Endian")])
def test_dataset_without_file_meta_is_read_when_its_structure_proves_it(implicit_vr: bool, little_endian: bool,
                                                                        name: str) -> None:
    # prepare: no preamble, no File Meta group, just the dataset, as older archives hold them
    ds = mr_dataset(RAMP)
    ds.file_meta = FileMetaDataset()
    if not little_endian:  # pydicom writes Pixel Data bytes as they are: give it big-endian words
        ds.PixelData = RAMP.astype(">u2").tobytes()
    data = dataset_bytes(ds, implicit_vr=implicit_vr, little_endian=little_endian)
    assert data[128:132] != b"DICM" and data[:2] in (b"\x08\x00", b"\x00\x08")
    # act
    image = read_image_bytes(data + b"\0" * 10)
    # assert
    np.testing.assert_allclose(image.frames[0], RAMP_UNIT, atol=1e-6)
    assert image.patient_id == "OLD-ARCHIVE-1"
    assert any(f"read as a bare {name} dataset" in w for w in image.warnings), image.warnings


def test_bare_bytes_that_do_not_walk_as_a_dataset_are_not_dicom() -> None:
    # prepare: a bare dataset without SOP Class UID, one with descending tags, one cut short,
    # and text that happens to start with the bytes 08 00
    ds = mr_dataset(RAMP)
    ds.file_meta = FileMetaDataset()
    good = dataset_bytes(ds, implicit_vr=True, little_endian=True)
    del ds.SOPClassUID
    no_sop = dataset_bytes(ds, implicit_vr=True, little_endian=True)
    modality = element(0x0008, 0x0060, b"CS", b"MR", implicit=True)
    sop = element(0x0008, 0x0016, b"UI", b"1.2\0", implicit=True)
    descending = modality + sop
    # act / assert
    for data in (no_sop, descending, good[:-5], b"\x08\x00 looks like DICOM, is a note"):
        with pytest.raises(DicomRejected) as info:
            read_image_bytes(data)
        assert info.value.reason == "not-dicom", info.value


def test_bad_vr_is_malformed() -> None:
    # prepare: one element with a non-letter VR and one with an unknown two-letter VR
    junk = element(0x0009, 0x0010, b"\x01\x02", b"ab")
    unknown = element(0x0009, 0x0010, b"ZZ", b"ab")
    # act / assert
    assert reason_of(part10(EXPLICIT_LE, image_dataset(2, 2, extra=junk))) == "malformed"
    assert reason_of(part10(EXPLICIT_LE, image_dataset(2, 2, extra=unknown))) == "malformed"


def test_huge_element_length_is_refused_without_allocating() -> None:
    # prepare: a private OB element declaring 4 GiB - 16 in a file of a few hundred bytes
    huge = element(0x0009, 0x1001, b"OB", b"\0" * 16, length=0xFFFFFFF0)
    data = part10(EXPLICIT_LE, image_dataset(2, 2, extra=huge))
    # act
    tracemalloc.start()
    reason = reason_of(data)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # assert: more than any accepted file -> malformed (not "truncated"), a few MiB at most
    assert reason == "malformed" and peak < 8 * 2**20


def test_truncations_anywhere_are_truncated() -> None:
    data = part10(EXPLICIT_LE, image_dataset(8, 8))
    for cut in (200, len(data) - 64, len(data) - 1):
        assert reason_of(data[:cut]) == "truncated", cut
    short_pixels = image_dataset(8, 8, pixels=b"\0" * 64)  # 8 x 8 x 16 bit needs 128 bytes
    assert reason_of(part10(EXPLICIT_LE, short_pixels)) == "truncated"


def test_corrupted_item_length_inside_a_sequence_is_malformed() -> None:
    # prepare: a defined-length SQ whose only item claims more bytes than the SQ holds
    inner = element(0x0008, 0x0100, b"SH", b"CODE01")
    bad_item = item(inner, length=len(inner) + 100)
    sequence = element(0x0008, 0x1140, b"SQ", bad_item)  # Referenced Image Sequence
    # act / assert
    assert reason_of(part10(EXPLICIT_LE, image_dataset(2, 2, extra=sequence))) == "malformed"


def test_sequence_nesting_bomb_is_malformed() -> None:
    # prepare: 200 nested undefined-length sequences (pydicom would recurse ~1000 frames deep)
    nested = b""
    for _ in range(200):
        nested = element(0x0008, 0x1140, b"SQ", item(nested, length=UNDEFINED) + b"", length=UNDEFINED)
    data = part10(EXPLICIT_LE, image_dataset(2, 2, extra=nested))
    # act / assert
    with pytest.raises(DicomRejected) as info:
        read_image_bytes(data)
    assert info.value.reason in ("malformed", "truncated") and "nested deeper" in info.value.message


def test_deflate_bomb_stops_at_the_cap_with_bounded_memory() -> None:
    # prepare: an Explicit VR LE dataset of 256 MiB (a private OB of zeros), deflated to ~256 KiB
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    body = [packer.compress(element(0x0009, 0x1001, b"OB", b"", length=256 * 2**20))]
    zeros = b"\0" * 2**20
    body += [packer.compress(zeros) for _ in range(256)]
    body.append(packer.flush())
    data = part10(DEFLATED, b"".join(body))
    # act
    tracemalloc.start()
    reason = reason_of(data, ReadLimits(max_inflated_bytes=8 * 2**20))
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    # assert: refused once 8 MiB were inflated; never near 256 MiB in memory
    assert len(data) < 2 * 2**20
    assert reason == "inflated-too-large" and peak < 32 * 2**20


def test_deflated_image_loads_and_a_cut_stream_is_truncated() -> None:
    # prepare
    packer = zlib.compressobj(9, zlib.DEFLATED, -zlib.MAX_WBITS)
    stream = packer.compress(image_dataset(4, 4)) + packer.flush()
    # act / assert
    assert read_image_bytes(part10(DEFLATED, stream)).frames.shape == (1, 4, 4)
    assert reason_of(part10(DEFLATED, stream[:-6])) == "truncated"
    assert reason_of(part10(DEFLATED, b"\xff" * 64)) == "malformed"


def test_fragment_containing_the_sequence_delimiter_is_malformed() -> None:
    assert reason_of(bundled("JPEG2000-embedded-sequence-delimiter.dcm").read_bytes()) == "malformed"


def test_encapsulated_pixel_data_without_delimiter_is_truncated() -> None:
    fragments = item(b"") + item(b"\xff\xd8\xff\xd9")  # no Sequence Delimitation: the file ends
    pixel = element(0x7FE0, 0x0010, b"OB", fragments, length=UNDEFINED)
    dataset = image_dataset(2, 2, bits=8)
    dataset = dataset[:dataset.rindex(b"\xe0\x7f\x10\x00")] + pixel
    assert reason_of(part10("1.2.840.10008.1.2.4.50", dataset)) == "truncated"
    closed = dataset + sequence_delimiter()
    assert reason_of(part10("1.2.840.10008.1.2.4.50", closed)) == "decode-failed"


@pytest.mark.parametrize("name", ["SC_rgb_jpeg_dcmtk.dcm", "MR_small_jp2klossless.dcm",
                                  "MR_small_jpeg_ls_lossless.dcm"])
def test_codestream_larger_than_the_header_is_refused_before_decoding(name: str, tmp_path: Path) -> None:
    # prepare: the header says half the rows; the codestream still declares the full frame
    ds = pydicom.dcmread(bundled(name))
    rows, columns = int(ds.Rows), int(ds.Columns)
    ds.Rows = rows // 2
    path = tmp_path / name
    ds.save_as(path)
    # act
    with pytest.raises(DicomRejected) as info:
        read_image_frames(path)
    # assert
    assert info.value.reason == "decode-failed"
    assert f"declares a {rows}x{columns} codestream" in info.value.message


def test_file_over_the_size_cap_is_refused_before_reading(tmp_path: Path) -> None:
    path = tmp_path / "big.dcm"
    path.write_bytes(part10(EXPLICIT_LE, image_dataset(64, 64)))
    with pytest.raises(DicomRejected) as info:
        read_image_frames(path, limits=ReadLimits(max_file_bytes=1024))
    assert info.value.reason == "too-large"


def test_symlink_fifo_outside_root_and_replaced_files(tmp_path: Path) -> None:
    # prepare: a real image outside the data root, a link to it inside, a FIFO, a swapped file
    outside = tmp_path / "outside.dcm"
    outside.write_bytes(part10(EXPLICIT_LE, image_dataset(2, 2)))
    root = tmp_path / "data"
    root.mkdir()
    link = root / "link.dcm"
    link.symlink_to(outside)
    fifo = root / "pipe.dcm"
    os.mkfifo(fifo)
    inside = root / "inside.dcm"
    inside.write_bytes(outside.read_bytes())
    listed = outside.lstat()  # the lstat of another file: as if inside.dcm had been swapped
    # act / assert
    cases = {
        "symlink": lambda: read_image_frames(link, root=root),
        "not-a-regular-file": lambda: read_image_frames(fifo, root=root),
        "outside-root": lambda: read_image_frames(outside, root=root),
        "file-changed": lambda: read_image_frames(inside, root=root, expected=listed),
    }
    for reason, call in cases.items():
        with pytest.raises(DicomRejected) as info:
            call()
        assert info.value.reason == reason
    assert read_image_frames(inside, root=root, expected=inside.lstat()).frames.shape == (1, 2, 2)


def test_dicomdir_references_must_stay_inside_the_root(tmp_path: Path) -> None:
    # prepare: pydicom's DICOMDIR as is; with a reference climbing out; with one through a link
    ds = pydicom.dcmread(bundled("dicomdirtests/DICOMDIR"))
    root = tmp_path / "media"
    root.mkdir()
    good = root / "DICOMDIR"
    ds.save_as(good)
    record = next(r for r in ds.DirectoryRecordSequence if "ReferencedFileID" in r)
    with pytest.warns(UserWarning, match="Invalid value for VR CS"):  # ".." is not a valid CS
        record.ReferencedFileID = ["..", "..", "etc", "passwd"]
    climbing = root / "DICOMDIR2"
    ds.save_as(climbing)
    record.ReferencedFileID = ["ELSEWHERE", "FILE"]
    (root / "ELSEWHERE").symlink_to(tmp_path)
    linked = root / "DICOMDIR3"
    ds.save_as(linked)
    # act / assert: a DICOMDIR is never an image; escaping references are flagged as such
    with pytest.raises(DicomRejected) as info:
        read_image_frames(good, root=root)
    assert info.value.reason == "not-an-image" and "DICOMDIR" in info.value.message
    for path, shown in ((climbing, "'../../etc/passwd'"), (linked, "'ELSEWHERE/FILE'")):
        with pytest.raises(DicomRejected) as info:
            read_image_frames(path, root=root)
        assert info.value.reason == "outside-root" and shown in info.value.message
