"""common.dicom.read: one file -> frames in [0, 1] or a typed rejection."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pydicom
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian, SecondaryCaptureImageStorage, generate_uid

from common.dicom.lut import (
    DEFAULT_WINDOWS,
    apply_modality_lut,
    apply_voi_lut,
    frame_transform_dataset,
    to_unit_frames,
)
from common.dicom.read import DicomRejected, read_image_frames


def bundled(name: str) -> Path:
    """A test file shipped inside the pydicom wheel."""
    path = get_testdata_file(name)
    if path is None:
        pytest.skip(f"pydicom test file {name} not available")
    return Path(str(path))


def make_dataset(pixels: np.ndarray, photometric: str = "MONOCHROME2", bits_stored: int | None = None,
                 **attrs: Any) -> Dataset:
    """An in-memory Secondary Capture dataset with ``pixels`` and extra attributes."""
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = SecondaryCaptureImageStorage
    meta.MediaStorageSOPInstanceUID = generate_uid()
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = SecondaryCaptureImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.Modality = "OT"
    ds.set_pixel_data(pixels, photometric, bits_stored or pixels.dtype.itemsize * 8)
    for keyword, value in attrs.items():
        setattr(ds, keyword, value)
    return ds


def write_dicom(path: Path, pixels: np.ndarray, **kwargs: Any) -> Path:
    make_dataset(pixels, **kwargs).save_as(path, enforce_file_format=True)
    return path


def test_modality_lut_is_slope_times_raw_plus_intercept_on_ct_small() -> None:
    # prepare
    ds = pydicom.dcmread(bundled("CT_small.dcm"))
    raw = ds.pixel_array
    # act
    hu = apply_modality_lut(raw, ds)
    # assert: RescaleSlope 1, RescaleIntercept -1024; golden raw values at fixed pixels
    assert (float(ds.RescaleSlope), float(ds.RescaleIntercept)) == (1.0, -1024.0)
    for (r, c), stored in {(0, 0): 175, (64, 64): 1928, (127, 127): 909, (30, 90): 223}.items():
        assert raw[r, c] == stored
        assert hu[r, c] == stored * 1.0 - 1024.0
    assert hu.dtype == np.float64


def test_ct_small_without_window_gets_the_ct_default_window() -> None:
    # prepare: CT_small has no VOI attributes; HU = raw - 1024; default CT window L 40 / W 400
    path = bundled("CT_small.dcm")
    # act
    image = read_image_frames(path)
    frame = image.frames[0]
    # assert: LINEAR window (HU - 39.5) / 399 + 0.5, clipped
    assert DEFAULT_WINDOWS["CT"] == (40.0, 400.0)
    assert image.frames.shape == (1, 128, 128) and image.frames.dtype == np.float32
    assert frame[0, 48] == pytest.approx((958 - 1024 - 39.5) / 399 + 0.5, abs=1e-6)  # HU -66
    assert frame[0, 0] == 0.0 and frame[64, 64] == 1.0  # HU -849 (air), HU 904 (bone)
    assert (image.patient_id, image.modality) == ("1CT1", "CT")


def test_mr_without_window_is_min_max_normalised(tmp_path: Path) -> None:
    # prepare: MR has no absolute unit, so no default window: the frame's range is the window
    pixels = np.array([[100, 300, 500, 400]], dtype=np.uint16)
    path = write_dicom(tmp_path / "mr.dcm", pixels, bits_stored=12, Modality="MR")
    # act
    frame = read_image_frames(path).frames[0, 0]
    # assert
    assert "MR" not in DEFAULT_WINDOWS
    np.testing.assert_allclose(frame, [0.0, 0.5, 1.0, 0.75], atol=1e-6)


def test_window_width_zero_means_no_window_and_the_frame_range_is_used(tmp_path: Path) -> None:
    # prepare: an MR slice as scanners write it when no window was set: WC = WW = 0
    pixels = np.array([[0, 120, 480, 4095], [7, 300, 999, 2048]], dtype=np.uint16)
    path = write_dicom(tmp_path / "mr.dcm", pixels, bits_stored=12, Modality="MR",
                       WindowCenter="0", WindowWidth="0")
    # act
    image = read_image_frames(path)
    # assert: kept, min-max over the frame, and the file carries a warning saying why
    expected = (pixels - 0.0) / (4095.0 - 0.0)
    np.testing.assert_allclose(image.frames[0], expected, atol=1e-6)
    assert any("Window Width (0028,1051) is 0" in w for w in image.warnings), image.warnings


def test_lut_sequences_with_one_empty_item_are_treated_as_absent(tmp_path: Path) -> None:
    # prepare: Modality LUT Sequence and VOI LUT Sequence each holding one empty item, next to a
    # Rescale (slope 2, intercept -10) and a window (WC 100 / WW 201) that then apply
    pixels = np.array([[0, 30, 55, 80, 200]], dtype=np.uint16)
    path = write_dicom(tmp_path / "x.dcm", pixels, bits_stored=12, Modality="MR",
                       ModalityLUTSequence=[Dataset()], VOILUTSequence=[Dataset()],
                       RescaleSlope="2", RescaleIntercept="-10", WindowCenter="100", WindowWidth="201")
    assert len(pydicom.dcmread(path).ModalityLUTSequence) == 1  # written as one empty item
    # act
    image = read_image_frames(path)
    # assert: y = 2x - 10, then LINEAR (y - 99.5) / 200 + 0.5 clipped (PS3.3 C.11.2.1.2.1)
    rescaled = 2.0 * pixels[0] - 10.0
    expected = np.clip((rescaled - 99.5) / 200.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(image.frames[0, 0], expected, atol=1e-6)
    assert sum("holds no LUT" in w for w in image.warnings) == 2, image.warnings


def test_ct_default_window_only_where_values_are_hounsfield_units(tmp_path: Path) -> None:
    # prepare: the same 8-bit picture as a Secondary Capture with Modality CT (a scanned film),
    # as CT Image Storage without a rescale, and as CT Image Storage with a rescale (HU)
    film = np.array([[0, 40, 128, 255]], dtype=np.uint8)
    scanned = write_dicom(tmp_path / "sc.dcm", film, Modality="CT")
    no_rescale = write_dicom(tmp_path / "ct8.dcm", film, Modality="CT", SOPClassUID=CTImageStorage)
    stored = np.array([[0, 1000, 1064, 2000]], dtype=np.uint16)
    hounsfield = write_dicom(tmp_path / "hu.dcm", stored, bits_stored=12, Modality="CT",
                             SOPClassUID=CTImageStorage, RescaleSlope="1", RescaleIntercept="-1024")
    # act
    frames = [read_image_frames(p).frames[0, 0] for p in (scanned, no_rescale, hounsfield)]
    # assert: the first two use their own range; only HU gets W 400 / L 40
    np.testing.assert_allclose(frames[0], film[0] / 255.0, atol=1e-6)
    np.testing.assert_allclose(frames[1], film[0] / 255.0, atol=1e-6)
    hu = stored[0] - 1024.0
    np.testing.assert_allclose(frames[2], np.clip((hu - 39.5) / 399.0 + 0.5, 0.0, 1.0), atol=1e-6)
    assert frames[2][0] == 0.0 and 0.0 < frames[2][2] < 1.0  # air black, HU 40 mid-grey


def test_linear_window_golden_values(tmp_path: Path) -> None:
    # prepare: 8-bit unsigned, Window Center 100 / Width 201 -> c' = 99.5, w' = 200 (PS3.3 C.11.2.1.2.1)
    pixels = np.array([[0, 50, 100, 150, 250]], dtype=np.uint8)
    path = write_dicom(tmp_path / "w.dcm", pixels, WindowCenter="100", WindowWidth="201")
    # act
    frame = read_image_frames(path).frames[0, 0]
    # assert: (x - 99.5) / 200 + 0.5, clipped to [0, 1]
    np.testing.assert_allclose(frame, [0.0025, 0.2525, 0.5025, 0.7525, 1.0], atol=1e-6)


def test_monochrome1_is_the_inverse_of_monochrome2(tmp_path: Path) -> None:
    pixels = np.arange(64, dtype=np.uint16).reshape(8, 8) * 37
    for window in ({}, {"WindowCenter": "1000", "WindowWidth": "1500"}):
        mono2 = read_image_frames(write_dicom(tmp_path / "m2.dcm", pixels, bits_stored=12, **window))
        mono1 = read_image_frames(write_dicom(tmp_path / "m1.dcm", pixels, bits_stored=12,
                                              photometric="MONOCHROME1", **window))
        np.testing.assert_allclose(mono1.frames, 1.0 - mono2.frames, atol=1e-6)
        assert mono1.frames[0, 0, 0] == 1.0  # lowest stored value is white in MONOCHROME1


def test_synthetic_multiframe_keeps_frame_order(tmp_path: Path) -> None:
    ramp = np.arange(16, dtype=np.uint16).reshape(4, 4)
    pixels = np.stack([ramp + 100 * k for k in range(3)])  # (3, 4, 4)
    path = write_dicom(tmp_path / "mf.dcm", pixels, bits_stored=12,
                       WindowCenter="150", WindowWidth="300")
    frames = read_image_frames(path).frames
    assert frames.shape == (3, 4, 4)
    assert frames[:, 0, 0].tolist() == sorted(frames[:, 0, 0].tolist())  # brighter frame by frame
    assert frames[0, 0, 0] < frames[1, 0, 0] < frames[2, 0, 0]


def test_enhanced_multiframe_files_yield_all_frames(shared_data_dir: Path) -> None:
    mri = read_image_frames(shared_data_dir / "dicom/pydicom-data/emri_small.dcm")
    assert mri.frames.shape == (10, 64, 64)
    assert all(frame.max() == 1.0 and frame.min() == 0.0 for frame in mri.frames)


def test_shared_functional_groups_supply_rescale_and_window(shared_data_dir: Path) -> None:
    # prepare: Enhanced CT with Pixel Value Transformation and Frame VOI LUT only in (5200,9229)
    path = shared_data_dir / "dicom/pydicom-data/eCT_Supplemental.dcm"
    ds = pydicom.dcmread(path)
    raw = ds.pixel_array  # (2, 512, 512)
    # act
    view = frame_transform_dataset(ds, 1)
    frames = read_image_frames(path).frames
    # assert: window 49/102 over HU = raw - 1024 (LINEAR: c' = 48.5, w' = 101)
    assert "WindowCenter" not in ds and float(view.WindowCenter) == 49.0
    assert float(view.RescaleIntercept) == -1024.0
    expected = np.clip((raw[1].astype(np.float64) - 1024.0 - 48.5) / 101.0 + 0.5, 0.0, 1.0)
    np.testing.assert_allclose(frames[1], expected, atol=1e-5)


def test_rgb_becomes_bt601_luminance(tmp_path: Path) -> None:
    pixels = np.array([[[255, 0, 0], [0, 255, 0], [0, 0, 255], [255, 255, 255]]], dtype=np.uint8)
    frame = read_image_frames(write_dicom(tmp_path / "rgb.dcm", pixels, photometric="RGB")).frames[0, 0]
    np.testing.assert_allclose(frame, [0.299, 0.587, 0.114, 1.0], atol=1e-6)


def test_ybr_full_422_file_is_read_as_luminance() -> None:
    image = read_image_frames(bundled("SC_ybr_full_422_uncompressed.dcm"))
    assert image.frames.shape == (1, 100, 100)
    assert 0.0 <= image.frames.min() < image.frames.max() <= 1.0


@pytest.mark.parametrize("name", ["test-SR.dcm", "rtdose.dcm", "liver_1frame.dcm"])
def test_bundled_non_images_are_rejected(name: str) -> None:
    with pytest.raises(DicomRejected) as info:
        read_image_frames(bundled(name))
    assert info.value.reason == "not-an-image"


def test_not_an_image_names_the_sop_class(tmp_path: Path) -> None:
    # prepare: a segmentation (binary mask frames) and an unregistered SOP Class, both with pixels
    mask = np.array([[0, 1], [1, 1]], dtype=np.uint8)
    seg = write_dicom(tmp_path / "seg.dcm", mask, SOPClassUID="1.2.840.10008.5.1.4.1.1.66.4")
    private = write_dicom(tmp_path / "p.dcm", mask, SOPClassUID="1.2.840.10008.5.1.4.1.1.88.999")
    # act
    with pytest.raises(DicomRejected) as seg_info:
        read_image_frames(seg)
    with pytest.raises(DicomRejected) as private_info:
        read_image_frames(private)
    # assert: the registry name where pydicom has one, the UID alone otherwise
    assert seg_info.value.reason == private_info.value.reason == "not-an-image"
    assert "1.2.840.10008.5.1.4.1.1.66.4 (Segmentation Storage)" in seg_info.value.message
    assert "1.2.840.10008.5.1.4.1.1.88.999 is not an image" in private_info.value.message


@pytest.mark.parametrize("name", ["sr_document.dcm", "seg_image_ct_binary.dcm", "sm_annotations.dcm"])
def test_highdicom_sr_and_seg_are_rejected(shared_data_dir: Path, name: str) -> None:
    with pytest.raises(DicomRejected) as info:
        read_image_frames(shared_data_dir / "dicom/highdicom" / name)
    assert info.value.reason == "not-an-image"


def test_palette_color_is_unsupported() -> None:
    with pytest.raises(DicomRejected) as info:
        read_image_frames(bundled("examples_palette.dcm"))
    assert info.value.reason == "unsupported-photometric"


def test_truncated_and_garbage_files_are_rejected(tmp_path: Path) -> None:
    # prepare
    data = bundled("CT_small.dcm").read_bytes()
    cut_in_pixels = tmp_path / "cut.dcm"
    cut_in_pixels.write_bytes(data[: len(data) - 5000])
    garbage = tmp_path / "garbage.dcm"
    garbage.write_bytes(b"\x00" * 128 + b"DICM" + bytes(range(256)) * 4)
    empty = tmp_path / "empty.dcm"
    empty.write_bytes(b"")
    # act / assert
    expected = {cut_in_pixels: "truncated", garbage: "not-dicom", empty: "not-dicom",
                bundled("MR_truncated.dcm"): "truncated", tmp_path / "missing.dcm": "unreadable"}
    for path, reason in expected.items():
        with pytest.raises(DicomRejected) as info:
            read_image_frames(path)
        assert info.value.reason == reason, (path.name, info.value)


def test_size_cap_is_checked_before_decoding(tmp_path: Path) -> None:
    # prepare: a header declaring 60000 x 60000 x 1000 16-bit frames over 2 bytes of pixel data
    ds = make_dataset(np.zeros((2, 2), dtype=np.uint16))
    ds.Rows, ds.Columns, ds.NumberOfFrames = 60000, 60000, 1000
    ds.PixelData = b"\x00\x00"
    bomb = tmp_path / "bomb.dcm"
    ds.save_as(bomb, enforce_file_format=True)
    ct = bundled("CT_small.dcm")  # 128 x 128 x 16 bit = 32768 bytes
    # act / assert: the 2-byte Pixel Data is also truncated; the cap answers first
    with pytest.raises(DicomRejected) as info:
        read_image_frames(bomb)
    assert info.value.reason == "too-large"
    with pytest.raises(DicomRejected) as info:
        read_image_frames(ct, max_decoded_bytes=32767)
    assert info.value.reason == "too-large"
    assert read_image_frames(ct, max_decoded_bytes=32768).frames.shape == (1, 128, 128)


def test_patient_id_and_study_uid_are_both_read_blank_as_none(tmp_path: Path) -> None:
    pixels = np.arange(4, dtype=np.uint8).reshape(2, 2)
    with_id = write_dicom(tmp_path / "a.dcm", pixels, PatientID="P-7", StudyInstanceUID="1.2.3")
    study_only = write_dicom(tmp_path / "b.dcm", pixels, PatientID="  ", StudyInstanceUID="1.2.3")
    neither = write_dicom(tmp_path / "c.dcm", pixels)
    images = [read_image_frames(p) for p in (with_id, study_only, neither)]
    assert [(i.patient_id, i.study_uid) for i in images] == [("P-7", "1.2.3"), (None, "1.2.3"), (None, None)]


def test_wide_8bit_voi_lut_sequence_is_not_wrapped() -> None:
    # prepare: 4096 entries of 8 bits, entry i = i // 16 (pydicom 3.0.2 alone wraps at 256)
    item = Dataset()
    item.LUTDescriptor = [4096, 0, 8]
    item.LUTData = (np.arange(4096) // 16).tolist()
    ds = Dataset()
    ds.VOILUTSequence = [item]
    # act
    out = apply_voi_lut(np.array([0.0, 255.0, 256.0, 300.0, 4095.0, 9999.0]), ds)
    # assert
    assert out.values.tolist() == [0, 15, 16, 18, 255, 255]
    assert (out.low, out.high) == (0.0, 255.0)


@settings(max_examples=60, deadline=None)
@given(
    values=st.lists(st.integers(0, 4095), min_size=2, max_size=40),
    center=st.floats(-500, 4500),
    width=st.floats(1, 5000),
    monochrome1=st.booleans(),
)
def test_pipeline_output_is_unit_range_and_monotone(values: list[int], center: float, width: float,
                                                    monochrome1: bool) -> None:
    # prepare: one sorted row through Rescale + Window, either photometric
    raw = np.array(sorted(values), dtype=np.uint16).reshape(1, 1, -1)
    ds = make_dataset(raw[0], photometric="MONOCHROME1" if monochrome1 else "MONOCHROME2",
                      bits_stored=12, RescaleSlope="1", RescaleIntercept="-1024",
                      WindowCenter=f"{center:.4f}", WindowWidth=f"{width:.4f}")
    # act
    out = to_unit_frames(raw, ds)[0, 0]
    # assert
    assert out.dtype == np.float32 and out.min() >= 0.0 and out.max() <= 1.0
    steps = np.diff(out.astype(np.float64))
    assert (steps <= 1e-6).all() if monochrome1 else (steps >= -1e-6).all()


def test_every_rejection_reason_has_a_fix_and_the_fix_crosses_processes() -> None:
    # prepare
    import pickle

    from common.dicom.errors import REJECTION_FIXES, REJECTION_REASONS
    # act
    default = pickle.loads(pickle.dumps(DicomRejected("truncated", "cut at byte 9")))
    specific = pickle.loads(pickle.dumps(DicomRejected("decode-failed", "x", "install y")))
    # assert
    assert set(REJECTION_FIXES) == set(REJECTION_REASONS) and all(REJECTION_FIXES.values())
    assert (default.reason, default.message, default.fix) == ("truncated", "cut at byte 9",
                                                              REJECTION_FIXES["truncated"])
    assert specific.fix == "install y"


def encode_jpeg_extended_12bit(source: Path, target: Path) -> None:
    """``source`` (12 bits stored in 16) re-encoded by GDCM as lossy JPEG Extended (Process 4),
    12-bit precision in the SOF1 segment, then its header restored to Bits Allocated 16."""
    import gdcm

    reader = gdcm.ImageReader()
    reader.SetFileName(str(source))
    assert reader.Read()
    image = reader.GetImage()
    image.SetPixelFormat(gdcm.PixelFormat(1, 12, 12, 11, 0))  # GDCM picks its 12-bit IJG codec
    codec = gdcm.JPEGCodec()
    codec.SetLossless(False)
    codec.SetQuality(90)
    change = gdcm.ImageChangeTransferSyntax()
    change.SetTransferSyntax(gdcm.TransferSyntax(gdcm.TransferSyntax.JPEGExtendedProcess2_4))
    change.SetUserCodec(codec)
    change.SetInput(image)
    assert change.Change()
    writer = gdcm.ImageWriter()
    writer.SetFileName(str(target))
    writer.SetFile(reader.GetFile())
    writer.SetImage(change.GetOutput())
    assert writer.Write()
    ds = pydicom.dcmread(target)
    ds.BitsAllocated = 16
    ds.save_as(target)


def test_12bit_lossy_jpeg_with_a_nonstandard_scan_header_is_decoded_by_gdcm(tmp_path: Path) -> None:
    # prepare: a 12-bit MR image made with pydicom, encoded as JPEG Extended (Process 4); a twin
    # whose SOS declares Se = 0 instead of 63 (ITU-T T.81 B.2.3), as old 12-bit encoders wrote
    y, x = np.mgrid[0:40, 0:48]
    pixels = (x * 60 + y * 30).astype(np.uint16)  # a smooth ramp 0 .. 3990
    raw = write_dicom(tmp_path / "raw.dcm", pixels, bits_stored=12, Modality="MR")
    good = tmp_path / "jpeg12.dcm"
    encode_jpeg_extended_12bit(raw, good)
    sos = b"\xff\xda\x00\x08\x01\x01\x00\x00\x3f\x00"  # Ns 1, Cs 1, Td/Ta 0, Ss 0, Se 63, Ah/Al 0
    assert good.read_bytes().count(sos) == 1
    quirky = tmp_path / "jpeg12_se0.dcm"
    quirky.write_bytes(good.read_bytes().replace(sos, sos[:-2] + b"\x00\x00"))
    expected = pixels / 3990.0  # no window: the frame's range
    # act
    well_formed, decoded_by_gdcm = read_image_frames(good), read_image_frames(quirky)
    # assert: both kept within the lossy error of the original; pylibjpeg decodes the
    # well-formed one, GDCM (with its complaint recorded) the one libjpeg refuses
    assert str(pydicom.dcmread(good).file_meta.TransferSyntaxUID) == "1.2.840.10008.1.2.4.51"
    for image in (well_formed, decoded_by_gdcm):
        error = np.abs(image.frames[0] - expected) * 3990  # in stored levels
        assert error.mean() < 2.0 and error.max() < 16.0, (error.mean(), error.max())
    assert not any("GDCM" in w for w in well_formed.warnings), well_formed.warnings
    assert any(w.startswith("decoded by GDCM: pylibjpeg: ") for w in decoded_by_gdcm.warnings)
    assert any("Invalid SOS parameters" in w for w in decoded_by_gdcm.warnings), decoded_by_gdcm.warnings


def test_pydicom_jpeg_lossy_file_decodes_to_the_reference_values() -> None:
    # prepare: pydicom's 12-bit JPEG Extended test file (Se = 0 in its SOS); the reference
    # values at two pixels are pydicom's own, read in the OsiriX viewer
    from common.dicom.header import read_pixel_geometry
    from common.dicom.read import decode_pixel_data

    path = bundled("JPEG-lossy.dcm")
    ds = pydicom.dcmread(path)
    # act
    raw = decode_pixel_data(ds, read_pixel_geometry(ds))[0]
    frame = read_image_frames(path).frames[0]
    # assert
    assert (raw[420, 140], raw[230, 120]) == (244, 95)
    low, high = float(raw.min()), float(raw.max())
    np.testing.assert_allclose(frame, (raw - low) / (high - low), atol=1e-6)


def test_installed_gdcm_does_not_take_over_decoding_from_pylibjpeg() -> None:
    # prepare: a JPEG Baseline file pydicom alone would now hand to GDCM first
    from pydicom.pixels.utils import pixel_array

    from common.dicom.header import read_pixel_geometry
    from common.dicom.read import decode_pixel_data

    ds = pydicom.dcmread(bundled("SC_jpeg_no_color_transform.dcm"))
    # act
    ours = decode_pixel_data(ds, read_pixel_geometry(ds))[0]
    # assert: identical to pylibjpeg's decode; GDCM's differs (the reason for fixing the order)
    np.testing.assert_array_equal(ours, pixel_array(ds, decoding_plugin="pylibjpeg"))
    assert not np.array_equal(ours, pixel_array(ds, decoding_plugin="gdcm"))


def test_blank_frames_are_left_out_and_a_blank_file_is_rejected(tmp_path: Path) -> None:
    # prepare: a constant frame; a frame whose window covers none of its values; a 3-frame
    # file whose middle frame is constant
    constant = write_dicom(tmp_path / "c.dcm", np.full((4, 4), 512, dtype=np.uint16), bits_stored=12)
    ramp = np.arange(16, dtype=np.uint16).reshape(4, 4) + 100
    off_window = write_dicom(tmp_path / "w.dcm", ramp, bits_stored=12,
                             WindowCenter="3000", WindowWidth="10")
    stack = np.stack([ramp, np.full((4, 4), 7, dtype=np.uint16), ramp * 2])
    multi = write_dicom(tmp_path / "m.dcm", stack, bits_stored=12)
    # act
    with pytest.raises(DicomRejected) as blank:
        read_image_frames(constant)
    with pytest.raises(DicomRejected) as windowed:
        read_image_frames(off_window)
    image = read_image_frames(multi)
    # assert: the two rejections say which case it is; the multi-frame keeps frames 0 and 2
    assert blank.value.reason == windowed.value.reason == "blank"
    assert "same stored value (512)" in blank.value.message
    assert "window covers none" in windowed.value.message and "Window Center" in windowed.value.fix
    assert image.frames.shape == (2, 4, 4)
    for got, source in zip(image.frames, (ramp, ramp * 2), strict=True):
        low, high = float(source.min()), float(source.max())
        np.testing.assert_allclose(got, (source - low) / (high - low), atol=1e-6)
    assert "1 of 3 frames are blank (one constant grey) and were left out" in image.warnings
