"""Coverage-guided fuzzing of the DICOM reader with atheris (libFuzzer), for long runs outside CI.

Every input goes through ``common.dicom.read.read_image_bytes`` with small caps. Any exception other
than ``DicomRejected`` is a finding (libFuzzer saves the input as ``crash-*``); hangs and memory
blow-ups are findings through libFuzzer's ``-timeout`` and ``-rss_limit_mb``. Half of the
mutations are structure-aware (Image Pixel values, item and element lengths, the Transfer Syntax
UID), the rest are libFuzzer's own byte mutations. See fuzz/README.md.
"""

from __future__ import annotations

import random
import struct
import sys

import atheris

with atheris.instrument_imports(include=["common", "pydicom"]):
    from common.dicom.errors import DicomRejected
    from common.dicom.read import ReadLimits, read_image_bytes

LIMITS = ReadLimits(max_decoded_bytes=16 * 2**20, max_file_bytes=8 * 2**20,
                    max_inflated_bytes=16 * 2**20)
# (0028,xxxx) US attributes that fix the decoded size, as explicit VR little-endian headers.
_IMAGE_PIXEL_US = [struct.pack("<HH", 0x0028, e) + b"US\x02\x00" for e in (0x0002, 0x0010, 0x0011,
                                                                              0x0100, 0x0101, 0x0102)]
_ITEM = b"\xfe\xff\x00\xe0"
_SYNTAXES = [b"1.2.840.10008.1.2\0", b"1.2.840.10008.1.2.1\0", b"1.2.840.10008.1.2.2\0",
             b"1.2.840.10008.1.2.1.99", b"1.2.840.10008.1.2.4.50", b"1.2.840.10008.1.2.4.90",
             b"1.2.840.10008.1.2.4.80", b"1.2.840.10008.1.2.5\0"]
_INTERESTING = [0, 1, 2, 3, 7, 8, 15, 16, 255, 256, 4096, 32767, 65535]


def mutate_structure(data: bytes, rng: random.Random) -> bytes:
    """One structure-aware change: an Image Pixel value, an item length or the syntax UID."""
    choice = rng.randrange(3)
    if choice == 0:
        spots = [i for pattern in _IMAGE_PIXEL_US if (i := data.find(pattern)) >= 0]
        if spots:
            at = rng.choice(spots) + 8
            return data[:at] + struct.pack("<H", rng.choice(_INTERESTING)) + data[at + 2:]
    if choice == 1:
        spots = [i for i in range(len(data) - 8) if data[i:i + 4] == _ITEM][:256]
        if spots:
            at = rng.choice(spots) + 4
            length = rng.choice([0, 2, 0xFFFFFFFF, 0xFFFFFFF0, rng.randrange(2**32)])
            return data[:at] + struct.pack("<I", length) + data[at + 4:]
    at = data.find(b"\x02\x00\x10\x00UI")
    if at >= 0:
        old = struct.unpack_from("<H", data, at + 6)[0]
        new = rng.choice(_SYNTAXES)
        return data[:at + 6] + struct.pack("<H", len(new)) + new + data[at + 8 + old:]
    return data


def custom_mutator(data: bytes, max_size: int, seed: int) -> bytes:
    rng = random.Random(seed)
    if rng.random() < 0.5:
        return mutate_structure(data, rng)[:max_size]
    return bytes(atheris.Mutate(data, max_size))


def test_one_input(data: bytes) -> None:
    try:
        image = read_image_bytes(data, limits=LIMITS)
    except DicomRejected:
        return
    frames = image.frames
    if frames.ndim != 3 or not (0.0 <= float(frames.min()) <= float(frames.max()) <= 1.0):
        raise AssertionError(f"accepted image out of contract: {frames.shape} "
                             f"[{frames.min()}, {frames.max()}]")


def main() -> None:
    atheris.Setup(sys.argv, test_one_input, custom_mutator=custom_mutator)
    atheris.Fuzz()


if __name__ == "__main__":
    main()
