"""The frames source on damaged frame dumps: a video's JPEGs must share one size, and an
empty, corrupt or missing JPEG fails only the segments that sample it, each naming its file."""

from __future__ import annotations

import io
import tarfile
import warnings
from pathlib import Path

import numpy as np
import pytest

from ekx.extract import sources
from ekx.extract.sources.frames import NAME
from ekx.extract.video import Request
from ekx.synth import _stamp

K = 4
SMALL, LARGE = (96, 128), (120, 160)


def jpeg(number: int, size: tuple[int, int]) -> bytes:
    import torch
    from torchvision.io import encode_jpeg

    img = np.full((*size, 3), 90, np.uint8)
    _stamp(img, number)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        return encode_jpeg(torch.from_numpy(img).permute(2, 0, 1).contiguous(), quality=95).numpy().tobytes()


def dump(out: Path, sizes: dict[int, tuple[int, int]], edit: dict[int, bytes | None] | None = None) -> Path:
    """Official-style JPEGs (each stamped with its number) in a folder, or a tar where ``out``
    ends in .tar; ``edit`` replaces a JPEG's bytes (None: leaves it out)."""
    files = {n: jpeg(n, size) for n, size in sizes.items()}
    for n, data in (edit or {}).items():
        files.pop(n) if data is None else files.__setitem__(n, data)
    if out.suffix == ".tar":
        with tarfile.open(out, "w") as tar:
            for n, data in sorted(files.items()):
                info = tarfile.TarInfo("./" + NAME.format(n))
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))
    else:
        out.mkdir(parents=True)
        for n, data in files.items():
            (out / NAME.format(n)).write_bytes(data)
    return out


def segment(row: int, first: int, last: int) -> Request:
    return Request(row, first / 50, last / 50, first, last)  # 50 fps numbering


def sampled(path: Path, req: Request) -> list[int]:
    """The JPEG numbers a segment samples."""
    reader = sources.get("frames").open(path)
    try:
        return (reader.positions(req, K)[0] + 1).tolist()
    finally:
        reader.close()


def decode(path: Path, reqs: list[Request]) -> dict[int, tuple[np.ndarray | None, str | None]]:
    size = lambda h, w: (48, 64)  # noqa: E731 - a backbone's resize: frames of any size come out alike
    return {r.row: (r.frames, r.error) for r in sources.get("frames").decode(path, reqs, K, 1, size)}


@pytest.fixture(params=["folder", "tar"])
def layout(request) -> str:
    return request.param


def where(path: Path, number: int) -> str:
    """How an error names a JPEG: its path, or its member name and the tar."""
    return str(path / NAME.format(number)) if path.suffix != ".tar" else f"{NAME.format(number)} in {path}"


def test_jpeg_size_reads_the_header():
    from ekx.extract.sources.frames import jpeg_size

    assert jpeg_size(jpeg(1, SMALL)) == SMALL and jpeg_size(jpeg(1, LARGE)) == LARGE
    assert jpeg_size(b"") is None and jpeg_size(b"\xff\xd8 truncated") is None


def test_frames_that_change_size_fail_the_segments_naming_the_frame(layout, tmp_path):
    # JPEGs 1-20 at 96x128, 21-40 at 120x160 (a dump re-extracted half-way at another size)
    path = dump(
        tmp_path / ("v.tar" if layout == "tar" else "v"), {n: SMALL if n <= 20 else LARGE for n in range(1, 41)}
    )
    a, b, c = segment(0, 1, 10), segment(1, 15, 25), segment(2, 28, 38)
    # alone, c's frames share a size: resized to the same 48x64, they once passed unnoticed
    got = decode(path, [a, c])
    assert got[0][1] is None and got[0][0].shape == (K, 48, 64, 3)
    first_c = sampled(path, c)[0]
    assert got[2][0] is None and got[2][1] == (
        f"{where(path, first_c)} is 160x120, the video's frames are 128x96 ({NAME.format(1)}): a video's "
        "frames must share one size - extract this video's frames again"
    )
    got = decode(path, [a, b, c])
    assert got[0][1] is None
    first_b = next(n for n in sampled(path, b) if n > 20)
    assert got[1][0] is None and f"{where(path, first_b)} is 160x120" in got[1][1]
    assert f"{where(path, first_c)} is 160x120" in got[2][1]  # its own message, not b's


def test_an_empty_corrupt_or_missing_jpeg_fails_only_the_segments_sampling_it(layout, tmp_path):
    segs = [segment(0, 1, 10), segment(1, 11, 20), segment(2, 21, 30), segment(3, 31, 40)]
    clean = dump(tmp_path / ("clean.tar" if layout == "tar" else "clean"), dict.fromkeys(range(1, 41), SMALL))
    empty, corrupt, gone = sampled(clean, segs[0])[0], sampled(clean, segs[1])[2], sampled(clean, segs[3])[1]
    path = dump(
        tmp_path / ("v.tar" if layout == "tar" else "v"),
        dict.fromkeys(range(1, 41), SMALL),
        {empty: b"", corrupt: b"\xff\xd8 truncated" + bytes(100), gone: None},
    )
    got = decode(path, segs)
    assert got[0][1] == (f"{where(path, empty)} is empty (0 bytes): extract or download this video's frames again")
    assert got[1][1].startswith(f"{where(path, corrupt)} is a corrupt JPEG (")
    assert got[1][1].endswith("extract or download this video's frames again")
    assert got[2][1] is None and np.array_equal(got[2][0], decode(clean, segs)[2][0])  # the same frames
    assert got[3][1] == f"{where(path, gone)} is missing: extract or download this video's frames again"
    assert all(got[r][0] is None for r in (0, 1, 3))
