from __future__ import annotations

import cv2
import numpy as np
import pytest

from kernel_lib.tomogram import (SliceWarning, TomogramError, choose_reduction, list_slices,
                                 read_tomogram, slice_number)


def _write_volume(folder, volume, ext=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    for z, plane in enumerate(volume):
        cv2.imwrite(str(folder / f"slice_{z:04d}{ext}"), plane)


def _volume(depth=12, h=40, w=56, seed=0):
    rng = np.random.default_rng(seed)
    base = np.linspace(20, 230, depth)[:, None, None]
    return (base + rng.normal(0, 3, (depth, h, w))).clip(0, 255).astype(np.uint8)


def test_slices_sorted_by_number_not_string(tmp_path):
    for n in (10, 9, 2, 100, 1):
        cv2.imwrite(str(tmp_path / f"slice_{n}.jpg"), np.full((4, 4), n, np.uint8))
    assert [slice_number(p) for p in list_slices(tmp_path)] == [1, 2, 9, 10, 100]


def test_read_roundtrip_shape_dtype_order(tmp_path):
    volume = _volume()
    _write_volume(tmp_path / "t", volume, ".png")
    read = read_tomogram(tmp_path / "t", workers=2)
    assert read.dtype == np.uint8 and read.shape == volume.shape
    np.testing.assert_array_equal(read, volume)  # PNG is lossless: exact order and content


def test_reduced_decode_matches_area_resize(tmp_path):
    volume = _volume(depth=3, h=64, w=96)
    _write_volume(tmp_path / "t", volume)
    full = read_tomogram(tmp_path / "t")
    for r in (2, 4, 8):
        reduced = read_tomogram(tmp_path / "t", reduction=r)
        assert reduced.shape == (3, 64 // r, 96 // r)
        expected = np.stack([cv2.resize(p, (96 // r, 64 // r), interpolation=cv2.INTER_AREA)
                             for p in full])
        assert np.abs(reduced.astype(int) - expected).mean() < 3


@pytest.mark.parametrize("source,target,expected", [(15.6, 16.0, 1), (6.5, 16.0, 2),
                                                    (3.9, 16.0, 4), (1.9, 16.0, 8),
                                                    (19.7, 16.0, 1), (8.0, 16.0, 2)])
def test_choose_reduction(source, target, expected):
    assert choose_reduction(source, target) == expected


def test_missing_and_empty_folders_are_named(tmp_path):
    with pytest.raises(TomogramError, match="does not exist"):
        read_tomogram(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TomogramError, match="no slice images"):
        read_tomogram(tmp_path / "empty")


def test_corrupt_and_missing_slices_are_repaired(tmp_path):
    volume = _volume()
    folder = tmp_path / "t"
    _write_volume(folder, volume, ".png")
    (folder / "slice_0003.png").write_bytes(b"not an image")
    (folder / "slice_0007.png").unlink()
    with pytest.warns(SliceWarning, match="repaired"):
        read = read_tomogram(folder)
    assert read.shape == volume.shape
    np.testing.assert_array_equal(read[3], volume[2])  # nearest good neighbour (ties go down)
    np.testing.assert_array_equal(read[7], volume[6])
    np.testing.assert_array_equal(read[5], volume[5])


def test_rgb_and_odd_size_slices(tmp_path):
    volume = _volume(depth=4)
    folder = tmp_path / "t"
    _write_volume(folder, volume, ".png")
    cv2.imwrite(str(folder / "slice_0001.png"), cv2.cvtColor(volume[1], cv2.COLOR_GRAY2BGR))
    cv2.imwrite(str(folder / "slice_0002.png"), volume[2][:30, :50])
    with pytest.warns(SliceWarning):
        read = read_tomogram(folder)
    assert read.shape == volume.shape
    np.testing.assert_array_equal(read[1], volume[1])
    np.testing.assert_array_equal(read[2][:30, :50], volume[2][:30, :50])


def test_nothing_decodable(tmp_path):
    (tmp_path / "slice_0000.jpg").write_bytes(b"")
    with pytest.raises(TomogramError, match="could be decoded"):
        read_tomogram(tmp_path)


def test_truncated_jpeg_is_replaced_not_half_decoded(tmp_path):
    volume = _volume(depth=5)
    _write_volume(tmp_path, volume)
    data = (tmp_path / "slice_0002.jpg").read_bytes()
    (tmp_path / "slice_0002.jpg").write_bytes(data[: len(data) // 2])
    with pytest.warns(SliceWarning, match="1 unreadable"):
        read = read_tomogram(tmp_path)
    np.testing.assert_array_equal(read[2], read[1])  # the neighbour, not a half-grey slice


def test_16bit_png_with_8bit_values_keeps_them(tmp_path):
    volume = _volume(depth=3)
    _write_volume(tmp_path, volume, ".png")
    cv2.imwrite(str(tmp_path / "slice_0001.png"), volume[1].astype(np.uint16))
    cv2.imwrite(str(tmp_path / "slice_0002.png"), volume[2].astype(np.uint16) * 257)
    read = read_tomogram(tmp_path)
    np.testing.assert_array_equal(read, volume)
