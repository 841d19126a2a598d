"""The fast inference data path gives the same results as the plain one.

Streaming preprocessing (JPEG headers, in-plane resize in the reader threads, in-place z resize
and normalisation), the cv2 histogram and look-up table, the background reader, and the
channels-last model layout.
"""

from __future__ import annotations

import threading
import time
import warnings

import cv2
import numpy as np
import pytest
import torch

from kernel_lib.config import PipelineConfig
from kernel_lib.infer import INPUT_MEAN, INPUT_STD, Predictor, TomogramPrefetcher, model_input
from kernel_lib.model import build_model, pad_to_multiple
from kernel_lib.normalize import histogram_uint8, normalize
from kernel_lib.preprocess import preprocess_tomogram, reading_plan
from kernel_lib.resample import (Frame, area_depth_inplace, area_weights, box_depth_inplace,
                                 box_slices, decode_frame, nearest_slices, resample_to_spacing,
                                 resize_depth_inplace, resize_plane, resize_volume, z_sources,
                                 z_sources_of)
from kernel_lib.stacks import iter_stack_batches, slices_read, stack_offsets
from kernel_lib.tomogram import (ReadReport, SliceWarning, choose_reduction, jpeg_size,
                                 list_slices, read_tomogram, reduced_size, stored_slice_shape)


def _volume(depth=14, h=75, w=93, seed=0):
    rng = np.random.default_rng(seed)
    zz, yy, xx = np.meshgrid(np.arange(depth), np.arange(h), np.arange(w), indexing="ij")
    smooth = 120 + 60 * np.sin(yy / 9.0) * np.cos(xx / 7.0) + 3 * zz
    return (smooth + rng.normal(0, 12, (depth, h, w))).clip(0, 255).astype(np.uint8)


def _write(folder, volume, ext=".jpg"):
    folder.mkdir(parents=True, exist_ok=True)
    for z, plane in enumerate(volume):
        cv2.imwrite(str(folder / f"slice_{z:04d}{ext}"), plane)
    return folder


def _plain_preprocess(folder, spacing, cfg):
    """The reference: read everything, resample, normalise (what the code did before)."""
    reduction = choose_reduction(spacing, cfg.target_spacing)
    raw = read_tomogram(folder, reduction=reduction)
    volume, frame = resample_to_spacing(raw, (spacing, spacing * reduction,
                                              spacing * reduction), cfg.target_spacing,
                                        cfg.z_sampling)
    volume = normalize(volume, cfg.percentile_low, cfg.percentile_high,
                       per_slice=cfg.normalize_per == "slice", out="uint8")
    return volume, decode_frame(reduction).then(frame)


# --- JPEG headers ---------------------------------------------------------------------------

def test_jpeg_size_reads_the_header(tmp_path):
    for shape in [(75, 93), (1, 1), (928, 960)]:
        path = tmp_path / f"s{shape[0]}.jpg"
        cv2.imwrite(str(path), np.zeros(shape, np.uint8))
        assert jpeg_size(path) == shape
    progressive = tmp_path / "progressive.jpg"
    cv2.imwrite(str(progressive), np.zeros((33, 44), np.uint8), [cv2.IMWRITE_JPEG_PROGRESSIVE, 1])
    assert jpeg_size(progressive) == (33, 44)
    cv2.imwrite(str(tmp_path / "a.png"), np.zeros((5, 6), np.uint8))
    (tmp_path / "junk.jpg").write_bytes(b"\xff\xd8\xff\xe0\x00")
    (tmp_path / "empty.jpg").write_bytes(b"")
    assert jpeg_size(tmp_path / "a.png") is None
    assert jpeg_size(tmp_path / "junk.jpg") is None
    assert jpeg_size(tmp_path / "empty.jpg") is None
    assert jpeg_size(tmp_path / "missing.jpg") is None


@pytest.mark.parametrize("reduction", [1, 2, 4, 8])
def test_reduced_decode_size_is_rounded_up(tmp_path, reduction):
    folder = _write(tmp_path / "t", _volume(depth=2, h=75, w=93))
    stored = stored_slice_shape(list_slices(folder))
    assert stored == (75, 93)
    assert read_tomogram(folder, reduction).shape[1:] == reduced_size(stored, reduction)


# --- reading with an in-plane resize ---------------------------------------------------------

@pytest.mark.parametrize("plane", [(60, 70), (75, 93), (90, 120)])
@pytest.mark.parametrize("ext", [".jpg", ".png"])
def test_read_with_plane_resize_equals_read_then_resize(tmp_path, plane, ext):
    folder = _write(tmp_path / "t", _volume(), ext)
    full = read_tomogram(folder)
    expected = resize_volume(full, (full.shape[0],) + plane)
    report = ReadReport(folder)
    got = read_tomogram(folder, plane_shape=plane, report=report, workers=2)
    np.testing.assert_array_equal(got, expected)
    assert report.decoded_shape == (75, 93)


def test_read_into_a_buffer_with_spare_slices(tmp_path):
    folder = _write(tmp_path / "t", _volume())
    buffer = np.full((20, 50, 60), 7, np.uint8)
    got = read_tomogram(folder, plane_shape=(50, 60), out=buffer)
    assert got.shape == (14, 50, 60) and np.shares_memory(got, buffer)
    assert (buffer[14:] == 7).all()
    with pytest.raises(ValueError, match="out must be"):
        read_tomogram(folder, plane_shape=(50, 60), out=np.empty((10, 50, 60), np.uint8))


def test_repairs_are_the_same_with_a_plane_resize(tmp_path):
    volume = _volume()
    folder = _write(tmp_path / "t", volume)
    (folder / "slice_0003.jpg").write_bytes(b"not an image")
    (folder / "slice_0007.jpg").unlink()
    cv2.imwrite(str(folder / "slice_0005.jpg"), volume[5][:60, :80])
    with pytest.warns(SliceWarning):
        full = read_tomogram(folder)
    with pytest.warns(SliceWarning):
        got = read_tomogram(folder, plane_shape=(40, 50))
    np.testing.assert_array_equal(got, resize_volume(full, (14, 40, 50)))


# --- reading only some slices --------------------------------------------------------------

def _damaged_folder(tmp_path):
    volume = _volume(depth=16)
    folder = _write(tmp_path / "t", volume)
    (folder / "slice_0003.jpg").write_bytes(b"not an image")  # unreadable
    (folder / "slice_0004.jpg").write_bytes(b"\xff\xd8 cut short")  # unreadable too
    (folder / "slice_0009.jpg").unlink()  # a gap in the numbering
    cv2.imwrite(str(folder / "slice_0012.jpg"), volume[12][:60, :80])  # wrongly sized
    return folder


@pytest.mark.parametrize("plane", [None, (40, 50)])
@pytest.mark.parametrize("select", [[0, 2, 5, 7], [3, 9, 12, 15], [4, 4, 1, 9, 9], [9], [3]])
def test_read_selected_positions_equals_rows_of_the_full_read(tmp_path, plane, select):
    folder = _damaged_folder(tmp_path)
    with pytest.warns(SliceWarning):
        full = read_tomogram(folder, plane_shape=plane)
    report = ReadReport(folder)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SliceWarning)
        got = read_tomogram(folder, plane_shape=plane, z_select=select, report=report)
    np.testing.assert_array_equal(got, full[select])
    assert report.n_slices == len(select)
    assert set(report.gaps) == {9} & set(select)
    assert set(report.replaced) == {3, 4} & set(select)


def test_read_selected_decodes_only_what_it_needs(tmp_path, monkeypatch):
    import kernel_lib.tomogram as tomogram

    folder = _write(tmp_path / "t", _volume(depth=20))
    decoded = []
    real = tomogram.decode_slice
    monkeypatch.setattr(tomogram, "decode_slice",
                        lambda path, reduction=1: decoded.append(path.name) or real(path, reduction))
    buffer = np.empty((5, 40, 50), np.uint8)
    got = read_tomogram(folder, plane_shape=(40, 50), out=buffer, z_select=[1, 5, 9, 13, 17])
    assert sorted(decoded) == [f"slice_{z:04d}.jpg" for z in (1, 5, 9, 13, 17)]
    assert np.shares_memory(got, buffer)


def test_read_selected_falls_back_to_the_nearest_readable_slice_outside_the_selection(tmp_path):
    volume = _volume(depth=10)
    folder = _write(tmp_path / "t", volume)
    (folder / "slice_0004.jpg").write_bytes(b"not an image")
    with pytest.warns(SliceWarning, match="1 unreadable"):
        got = read_tomogram(folder, z_select=[4, 8])
    np.testing.assert_array_equal(got[0], read_tomogram(folder, z_select=[3])[0])


def test_read_selected_rejects_positions_outside_the_depth(tmp_path):
    folder = _write(tmp_path / "t", _volume(depth=6))
    for bad in ([6], [-1], []):
        with pytest.raises(ValueError, match="z_select must hold positions in \\[0, 6\\)"):
            read_tomogram(folder, z_select=bad)


# --- nearest-slice z sampling ---------------------------------------------------------------

@pytest.mark.parametrize("depth_in,depth_out", [(300, 146), (800, 390), (10, 4), (7, 7), (5, 9),
                                                (21, 20), (1, 1)])
def test_nearest_slices_are_within_half_a_slice_of_the_frame(depth_in, depth_out):
    frame = Frame.resize((depth_in, 1, 1), (depth_out, 1, 1))
    exact = frame.inverse().apply(np.c_[np.arange(depth_out), np.zeros((depth_out, 2))])[:, 0]
    got = nearest_slices(depth_in, depth_out)
    distance = np.abs(np.arange(depth_in)[None, :] - exact[:, None]).min(axis=1)
    np.testing.assert_allclose(np.abs(got - exact), distance, atol=1e-9)  # the nearest slice
    assert np.all(np.abs(got - np.clip(exact, 0, depth_in - 1)) <= 0.5 + 1e-9)
    assert np.all(np.diff(got) >= 0) and got.min() >= 0 and got.max() < depth_in
    sources = z_sources(depth_in, depth_out, "nearest")
    if depth_out < depth_in:  # shrinking picks slices; growing interpolates as "area" does
        np.testing.assert_array_equal(sources, got)
    else:
        assert sources is None
    assert z_sources(depth_in, depth_out, "area") is None
    with pytest.raises(ValueError, match="z_sampling"):
        z_sources(depth_in, depth_out, "cubic")


def test_nearest_z_resample_picks_whole_slices_and_keeps_the_frame():
    depth = 31
    ramp = np.broadcast_to(np.arange(depth, dtype=np.uint8)[:, None, None] * 8,
                           (depth, 12, 14)).copy()
    out, frame = resample_to_spacing(ramp, 15.6, 32.0, z_sampling="nearest")
    assert out.shape == (15, 6, 7)
    values = out[:, 3, 3] / 8  # each model slice is one source slice, untouched
    np.testing.assert_array_equal(values, np.round(values))
    centres = frame.inverse().apply(np.c_[np.arange(15), np.full(15, 3.0), np.full(15, 3.0)])
    assert np.all(np.abs(values - centres[:, 0]) <= 0.5 + 1e-9)  # original -> model round trip
    area, area_frame = resample_to_spacing(ramp, 15.6, 32.0)
    assert area_frame == frame and not np.array_equal(area, out)


# --- box z sampling -------------------------------------------------------------------------

@pytest.mark.parametrize("depth_in,depth_out", [(300, 146), (800, 390), (9, 4), (10, 4),
                                                (21, 10), (7, 1), (5, 4), (3, 2), (40, 13)])
def test_box_slices_are_round_s_neighbours_around_the_frame_centre(depth_in, depth_out):
    boxes = box_slices(depth_in, depth_out)
    scale = depth_in / depth_out
    assert boxes.shape == (depth_out, max(1, int(np.floor(scale + 0.5))))
    assert np.all(np.diff(boxes, axis=1) == 1)  # consecutive slices
    assert boxes.min() >= 0 and boxes.max() < depth_in
    frame = Frame.resize((depth_in, 1, 1), (depth_out, 1, 1))
    exact = frame.inverse().apply(np.c_[np.arange(depth_out), np.zeros((depth_out, 2))])[:, 0]
    assert np.all(np.abs(boxes.mean(axis=1) - exact) <= 0.5 + 1e-9)  # the frame still holds
    if boxes.shape[1] == 1:  # a box one slice wide is the nearest slice
        np.testing.assert_array_equal(boxes[:, 0], nearest_slices(depth_in, depth_out))
    # 15.6 -> 32 A: two slices per model slice, where an area resize blends about three.
    assert box_slices(300, 146).shape[1] == 2
    assert z_sources(depth_in, depth_out, "box") is None  # a blend, not one slice each


def test_box_writes_never_overwrite_a_later_box():
    # box_depth_inplace writes output j into row j in increasing order: every later box must
    # start after row j, for every shrinking depth pair.
    for depth_in in range(2, 401):
        for depth_out in range(1, depth_in):
            starts = box_slices(depth_in, depth_out)[:, 0]
            assert np.all(starts[1:] > np.arange(depth_out - 1)), (depth_in, depth_out)


@pytest.mark.parametrize("depth_in,depth_out", [(21, 10), (300, 146), (9, 4), (10, 4),
                                                (14, 13), (7, 1)])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_box_resize_is_the_mean_of_each_box(depth_in, depth_out, dtype):
    rng = np.random.default_rng(depth_in)
    volume = rng.integers(0, 256, (depth_in, 6, 7)).astype(dtype)
    boxes = box_slices(depth_in, depth_out)
    mean = volume[boxes].astype(np.float64).mean(axis=1)
    if dtype == np.uint8:  # rounded half up, never through a float that could wrap
        expected = np.floor(mean + 0.5).astype(np.uint8)
    else:
        expected = mean.astype(dtype)
    got = resize_volume(volume, (depth_out, 6, 7), "box")
    assert got.dtype == dtype
    np.testing.assert_allclose(got, expected, rtol=1e-6)
    buffer = volume.copy()
    inplace = box_depth_inplace(buffer, depth_in, depth_out)
    assert np.shares_memory(inplace, buffer)
    np.testing.assert_array_equal(inplace, got)
    # Only the asked outputs are written; only their boxes need to hold data.
    outputs = np.arange(0, depth_out, 2)
    partial = np.full_like(volume, 77)
    needed = z_sources_of(depth_in, depth_out, outputs, "box")
    partial[needed] = volume[needed]
    result = box_depth_inplace(partial, depth_in, depth_out, outputs)
    np.testing.assert_array_equal(result[outputs], got[outputs])
    others = np.setdiff1d(np.arange(depth_out), outputs)
    untouched = np.setdiff1d(others, needed)
    assert np.all(result[untouched] == 77)
    # Growing z interpolates as "area" does.
    np.testing.assert_array_equal(resize_volume(volume, (depth_in + 3, 6, 7), "box"),
                                  resize_volume(volume, (depth_in + 3, 6, 7), "area"))


def test_box_depth_inplace_refuses_what_it_cannot_do():
    buffer = np.zeros((10, 4, 4), np.uint8)
    with pytest.raises(ValueError, match="shrinks z"):
        box_depth_inplace(buffer, 10, 10)
    with pytest.raises(ValueError, match="shrinks z"):
        box_depth_inplace(buffer, 11, 5)
    with pytest.raises(ValueError, match="C-contiguous"):
        box_depth_inplace(buffer[:, :, ::2], 10, 5)
    with pytest.raises(ValueError, match=r"output slices must lie in \[0, 5\)"):
        box_depth_inplace(buffer, 10, 5, [5])


def test_box_resample_keeps_the_frame_and_halves_the_noise():
    depth = 31
    rng = np.random.default_rng(3)
    ramp = np.arange(depth, dtype=np.float32)[:, None, None] * 8 + np.zeros((1, 12, 14))
    out, frame = resample_to_spacing(ramp.astype(np.float32), 15.6, 32.0, z_sampling="box")
    _, area_frame = resample_to_spacing(ramp.astype(np.float32), 15.6, 32.0)
    assert out.shape == (15, 6, 7) and frame == area_frame
    centres = frame.inverse().apply(np.c_[np.arange(15), np.full(15, 3.0), np.full(15, 3.0)])
    assert np.all(np.abs(out[:, 3, 3] / 8 - centres[:, 0]) <= 0.5 + 1e-6)  # round trip
    noise = rng.normal(0, 10, (300, 16, 16)).astype(np.float32)
    box = resize_volume(noise, (146, 16, 16), "box")
    nearest = resize_volume(noise, (146, 16, 16), "nearest")
    assert 0.4 < box.var() / nearest.var() < 0.6  # two slices averaged, as area nearly does


def test_reading_plans_read_what_their_resize_needs():
    keep = np.arange(0, 146, 2)
    box = reading_plan(300, 146, keep, "box")
    area = reading_plan(300, 146, keep, "area")
    nearest = reading_plan(300, 146, keep, "nearest")
    assert len(box.select) == 146 and len(nearest.select) == 73  # 49 % and 24 % of the files
    assert 200 <= len(area.select) <= 230
    np.testing.assert_array_equal(box.rows, box.select)
    np.testing.assert_array_equal(nearest.rows, keep)
    assert box.buffer_depth == area.buffer_depth == 300 and nearest.buffer_depth == 146
    every = reading_plan(300, 146, None, "box")  # the training cache skips the unused slices
    assert 280 <= len(every.select) < 300
    assert reading_plan(300, 146, None, "area").select is None
    assert reading_plan(100, 140, keep[keep < 140], "box").buffer_depth == 140  # z grows


# --- resampling in place -------------------------------------------------------------------

@pytest.mark.parametrize("depth_out", [5, 13, 14, 23])
def test_resize_depth_inplace_equals_resize_volume(depth_out):
    volume = np.random.default_rng(1).integers(0, 256, (14, 150, 230), dtype=np.uint8)
    expected = resize_volume(volume, (depth_out, 150, 230))  # 34500 columns: two cv2 chunks
    buffer = np.zeros((max(14, depth_out), 150, 230), np.uint8)
    buffer[:14] = volume
    got = resize_depth_inplace(buffer, 14, depth_out)
    np.testing.assert_array_equal(got, expected)
    assert np.shares_memory(got, buffer)
    with pytest.raises(ValueError, match="cannot hold"):
        resize_depth_inplace(np.zeros((10, 4, 4), np.uint8), 10, 12)


def _cv2_area_z(volume, depth_out):
    flat = volume.reshape(volume.shape[0], -1)
    return cv2.resize(flat, (flat.shape[1], depth_out), interpolation=cv2.INTER_AREA
                      ).reshape((depth_out,) + volume.shape[1:])


@pytest.mark.parametrize("depth_in,depth_out", [(300, 146), (300, 150), (800, 390), (21, 10),
                                                (10, 4), (14, 13), (7, 1), (41, 40)])
def test_area_depth_is_opencvs_area_resize_to_within_a_level(depth_in, depth_out):
    rng = np.random.default_rng(depth_in + depth_out)
    smooth = np.linspace(0, 255, depth_in)[:, None, None] * np.ones((1, 20, 30))
    volume = (smooth + rng.normal(0, 40, (depth_in, 20, 30))).clip(0, 255).astype(np.uint8)
    expected = _cv2_area_z(volume, depth_out)
    buffer = volume.copy()
    got = area_depth_inplace(buffer, depth_in, depth_out)
    assert np.shares_memory(got, buffer) and got.shape == expected.shape
    diff = np.abs(got.astype(int) - expected.astype(int))
    assert diff.max() <= 1 and (diff > 0).mean() < 0.01
    # Only some outputs: the same values, and the rows of the other outputs left as they were.
    keep = np.arange(0, depth_out, 2)
    buffer = volume.copy()
    area_depth_inplace(buffer, depth_in, depth_out, keep)
    np.testing.assert_array_equal(buffer[keep], got[keep])
    others = np.setdiff1d(np.arange(depth_in), keep)
    np.testing.assert_array_equal(buffer[others], volume[others])


@pytest.mark.parametrize("depth_in,depth_out", [(300, 146), (300, 150), (21, 10), (5, 2),
                                                (9, 8), (100, 1)])
def test_area_weights_are_the_listed_sources_and_keep_the_frame(depth_in, depth_out):
    to_source = Frame.resize((depth_in, 1, 1), (depth_out, 1, 1)).inverse()
    for j in range(depth_out):
        sources, weights = area_weights(depth_in, depth_out, j)
        np.testing.assert_array_equal(sources, z_sources_of(depth_in, depth_out, [j]))
        assert weights.min() > 0 and weights.sum() == pytest.approx(1.0)
        # The sources' mean position, weighted by overlap, is the output's position in the
        # frame to within a quarter of a source slice (partly covered edge slices pull it).
        centre = np.sum(weights * sources)
        assert abs(centre - to_source.apply([[j, 0, 0]])[0, 0]) < 0.25


def test_area_depth_refuses_what_it_cannot_do():
    with pytest.raises(ValueError, match="uint8"):
        area_depth_inplace(np.zeros((10, 4, 4), np.float32), 10, 5)
    with pytest.raises(ValueError, match="shrinks z"):
        area_depth_inplace(np.zeros((10, 4, 4), np.uint8), 5, 10)
    with pytest.raises(ValueError, match=r"lie in \[0, 5\)"):
        area_depth_inplace(np.zeros((10, 4, 4), np.uint8), 10, 5, [5])
    with pytest.raises(ValueError, match="depth_out < depth_in"):
        area_weights(4, 4, 0)


def test_resize_plane_writes_into_out():
    image = np.random.default_rng(2).integers(0, 256, (75, 93), dtype=np.uint8)
    out = np.empty((3, 40, 50), np.uint8)
    resize_plane(image, (40, 50), out=out[1])
    np.testing.assert_array_equal(out[1], cv2.resize(image, (50, 40),
                                                     interpolation=cv2.INTER_AREA))



@pytest.mark.parametrize("shape,interp", [
    ((452, 468), cv2.INTER_LINEAR),   # 15.6 A decoded at 1/2 (31.2 A) -> 32 A: 2.6 % smaller
    ((441, 456), cv2.INTER_LINEAR),   # 5 % smaller per side: still bilinear
    ((440, 480), cv2.INTER_AREA),     # one side more than 5 % smaller: area
    ((290, 300), cv2.INTER_AREA),     # 19.7 A -> 32 A at full decode: area
    ((500, 520), cv2.INTER_LINEAR),   # growing
    ((470, 470), cv2.INTER_LINEAR)])  # one side grows, the other shrinks by 2 %
def test_resize_plane_filters_near_identity_shrinks_bilinearly(shape, interp):
    image = np.random.default_rng(4).integers(0, 256, (464, 480), dtype=np.uint8)
    expected = cv2.resize(image, shape[::-1], interpolation=interp)
    np.testing.assert_array_equal(resize_plane(image, shape), expected)
    out = np.empty(shape, np.uint8)
    np.testing.assert_array_equal(resize_plane(image, shape, out=out), expected)
    if interp == cv2.INTER_LINEAR and shape[0] < 464:  # the two filters barely differ there
        area = cv2.resize(image, shape[::-1], interpolation=cv2.INTER_AREA)
        assert np.abs(area.astype(int) - expected).mean() < 2.0

# --- normalisation --------------------------------------------------------------------------

def test_histogram_of_a_plane_beyond_float32_counts():
    plane = np.zeros((4200, 4100), np.uint8)  # 17.2 M pixels of one value > 2**24
    plane[0, :5] = 3
    hist = histogram_uint8(plane)
    assert hist[0] == plane.size - 5 and hist[3] == 5 and hist.dtype == np.int64


@pytest.mark.parametrize("per_slice", [False, True])
def test_normalize_overwrite_equals_a_new_array(per_slice):
    volume = _volume()
    expected = normalize(volume, per_slice=per_slice, out="uint8")
    np.testing.assert_array_equal(expected, np.rint(normalize(
        volume.astype(np.float32), per_slice=per_slice) * 255).astype(np.uint8))
    work = volume.copy()
    got = normalize(work, per_slice=per_slice, out="uint8", overwrite=True)
    assert got is work
    np.testing.assert_array_equal(got, expected)
    strided = np.ascontiguousarray(np.repeat(volume, 2, axis=2))[:, :, ::2]  # a non-contiguous view
    np.testing.assert_array_equal(normalize(strided, per_slice=per_slice, out="uint8"), expected)
    with pytest.raises(ValueError, match="overwrite needs"):
        normalize(volume, out="float", overwrite=True)


# --- the whole preprocessing ----------------------------------------------------------------

@pytest.mark.parametrize("spacing,target,per,z_sampling", [
    (15.6, 16.0, "volume", "area"), (15.6, 32.0, "volume", "area"),
    (19.7, 16.0, "slice", "area"), (6.5, 16.0, "volume", "area"),
    (15.6, 32.0, "volume", "nearest"), (19.7, 32.0, "slice", "nearest"),
    (6.5, 16.0, "volume", "nearest"), (32.0, 16.0, "volume", "nearest"),
    (15.6, 32.0, "volume", "box"), (13.1, 32.0, "slice", "box"), (6.5, 16.0, "volume", "box"),
    (32.0, 16.0, "volume", "box")])
def test_streaming_preprocess_is_identical_to_the_plain_path(tmp_path, spacing, target, per,
                                                             z_sampling):
    folder = _write(tmp_path / "t", _volume(depth=21, h=150, w=131))
    cfg = PipelineConfig(target_spacing=target, normalize_per=per, z_sampling=z_sampling)
    prep = preprocess_tomogram(folder, spacing, cfg)
    volume, frame = _plain_preprocess(folder, spacing, cfg)
    np.testing.assert_array_equal(prep.volume, volume)
    assert prep.frame == frame and prep.original_shape == (21, 150, 131)


def test_png_slices_take_the_plain_path(tmp_path):
    folder = _write(tmp_path / "t", _volume(), ".png")
    cfg = PipelineConfig(target_spacing=32.0)
    prep = preprocess_tomogram(folder, 15.6, cfg)
    volume, frame = _plain_preprocess(folder, 15.6, cfg)
    np.testing.assert_array_equal(prep.volume, volume)
    assert prep.frame == frame and prep.original_shape == (14, 75, 93)


# --- background reading and layout ----------------------------------------------------------

def test_prefetcher_keeps_order_passes_errors_and_bounds_memory(tmp_path, monkeypatch):
    import kernel_lib.infer as infer

    in_flight, peak, lock = [0], [0], threading.Lock()

    def fake_preprocess(folder, spacing, cfg, z_stride=None):
        with lock:
            in_flight[0] += 1
            peak[0] = max(peak[0], in_flight[0])
        time.sleep(0.01)
        if folder.name == "bad":
            raise ValueError("broken tomogram")
        return folder.name

    monkeypatch.setattr(infer, "preprocess_tomogram", fake_preprocess)
    names = ["a", "b", "bad", "c", "d", "e"]
    jobs = [(name, tmp_path / name, 15.6) for name in names]
    reader = TomogramPrefetcher(jobs, PipelineConfig(), ahead=1)
    seen = []
    for tomo_id, prep, error, _ in reader:
        time.sleep(0.03)  # the model is slower than the reader: it must wait, not pile up
        seen.append((tomo_id, prep, type(error).__name__ if error else None))
        with lock:
            in_flight[0] -= 1
    reader.close()
    assert [s[0] for s in seen] == names
    assert seen[2] == ("bad", None, "ValueError") and seen[0][1] == "a"
    assert peak[0] <= 2  # the one being predicted + one read ahead


@pytest.mark.parametrize("shape", [(2, 5, 70, 90), (3, 5, 64, 64), (1, 3, 1, 40), (2, 9, 1, 1)])
@pytest.mark.parametrize("multiple", [1, 32])
@pytest.mark.parametrize("channels_last", [False, True])
def test_model_input_is_scaling_then_edge_padding_in_one_buffer(shape, multiple, channels_last):
    stacks = torch.from_numpy(np.random.default_rng(1).integers(0, 256, shape, dtype=np.uint8))
    x = model_input(stacks, multiple, channels_last)
    expected = (stacks.double() / 255.0 - INPUT_MEAN) / INPUT_STD
    h, w = shape[-2:]
    # The edge values continue to the padded size (what pad_to_multiple's replicate mode does,
    # row and column by row and column, for any size including a single row).
    rows = torch.arange(x.shape[-2]).clamp(max=h - 1)
    cols = torch.arange(x.shape[-1]).clamp(max=w - 1)
    expected = expected[..., rows, :][..., cols]
    assert x.dtype == torch.float32 and x.shape[-2] % multiple == 0 and x.shape[-1] % multiple == 0
    assert x.shape[-2] - h < multiple and x.shape[-1] - w < multiple
    assert x.is_contiguous(memory_format=torch.channels_last if channels_last
                           else torch.contiguous_format)
    torch.testing.assert_close(x.double(), expected, atol=1e-6, rtol=0)
    if min(h, w) > 1 and multiple > 1:  # the padding the model was trained with
        old, _ = pad_to_multiple(expected[..., :h, :w].float(), multiple)
        torch.testing.assert_close(x, old, atol=1e-6, rtol=0)


def test_model_input_keeps_any_leading_shape_and_refuses_a_bad_multiple():
    crops = torch.full((2, 9, 40, 40), 255, dtype=torch.uint8)
    x = model_input(crops)
    assert x.shape == crops.shape
    torch.testing.assert_close(x, torch.full_like(x, (1 - INPUT_MEAN) / INPUT_STD))
    with pytest.raises(ValueError, match="multiple must be >= 1"):
        model_input(crops, 0)


def test_channels_last_predictor_matches_contiguous():
    torch.manual_seed(0)
    cfg = PipelineConfig(assumed_test_spacing=15.6)
    model = build_model(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.1)  # the zero-initialised head hides layout
    volume = np.random.default_rng(3).integers(0, 256, (6, 70, 90), dtype=np.uint8)
    layouts = []
    model.register_forward_pre_hook(lambda module, args: layouts.append(
        args[0].is_contiguous(memory_format=torch.channels_last) and args[0].stride(1) == 1))
    heat_cl = Predictor([model], cfg, channels_last=True, amp=False).heatmap(volume)
    assert layouts and all(layouts)  # the input reaches the model channels-last
    layouts.clear()
    heat = Predictor([model], cfg, channels_last=False, amp=False).heatmap(volume)
    assert layouts and not any(layouts)
    assert heat.std() > 0
    torch.testing.assert_close(heat_cl, heat, atol=1e-4, rtol=1e-4)


def test_cpu_predictor_autocasts_to_bf16_where_native_and_stays_close(monkeypatch):
    import kernel_lib.infer as infer

    torch.manual_seed(0)
    cfg = PipelineConfig(assumed_test_spacing=15.6)
    model = build_model(cfg)
    torch.nn.init.normal_(model.head.weight, std=0.1)
    seen: list[torch.dtype] = []
    first_conv = next(m for m in model.modules() if isinstance(m, torch.nn.Conv2d))
    first_conv.register_forward_hook(lambda module, args, out: seen.append(out.dtype))
    volume = np.random.default_rng(3).integers(0, 256, (6, 70, 90), dtype=np.uint8)
    monkeypatch.setattr(infer, "autocast_dtype", lambda device: torch.bfloat16)
    fast = Predictor([model], cfg).heatmap(volume)
    assert set(seen) == {torch.bfloat16}
    seen.clear()
    exact = Predictor([model], cfg, amp=False).heatmap(volume)
    assert set(seen) == {torch.float32}
    assert fast.dtype == exact.dtype == torch.float32 and exact.std() > 0
    torch.testing.assert_close(fast, exact, atol=2e-2, rtol=0)  # bf16 keeps 8 bits
    monkeypatch.setattr(infer, "autocast_dtype", lambda device: None)  # a CPU without bf16
    seen.clear()
    Predictor([model], cfg).heatmap(volume)
    assert set(seen) == {torch.float32}


# --- preparing only the slices the stacks read ----------------------------------------------

@pytest.mark.parametrize("depth_in,depth_out", [(300, 146), (300, 150), (800, 390), (21, 10),
                                                (20, 10), (10, 4), (9, 9), (5, 9), (14, 23),
                                                (7, 1)])
@pytest.mark.parametrize("z_sampling", ["area", "nearest", "box"])
def test_unlisted_sources_do_not_change_the_outputs(depth_in, depth_out, z_sampling):
    rng = np.random.default_rng(depth_in * 1000 + depth_out)
    volume = rng.integers(0, 256, (depth_in, 3, 5), dtype=np.uint8)
    for outputs in (np.arange(0, depth_out, 2), np.arange(1, depth_out, 3), [depth_out - 1]):
        sources = z_sources_of(depth_in, depth_out, outputs, z_sampling)
        if len(outputs) == 0:
            assert len(sources) == 0
            continue
        assert np.all(np.diff(sources) > 0) and sources[0] >= 0 and sources[-1] < depth_in
        garbled = rng.integers(0, 256, volume.shape, dtype=np.uint8)
        garbled[sources] = volume[sources]  # only the listed sources are right
        expected = resize_volume(volume, (depth_out, 3, 5), z_sampling)[outputs]
        got = resize_volume(garbled, (depth_out, 3, 5), z_sampling)[outputs]
        np.testing.assert_array_equal(got, expected)
    every = z_sources_of(depth_in, depth_out, np.arange(depth_out), z_sampling)
    assert len(every) <= depth_in


def test_sources_of_every_other_slice_at_the_default_spacing():
    # 300 slices of 15.6 A -> 146 of 32 A; the even model slices need 3 of every 4.1 sources.
    sources = z_sources_of(300, 146, np.arange(0, 146, 2))
    assert 200 <= len(sources) <= 230
    assert len(z_sources_of(300, 146, np.arange(0, 146, 2), "nearest")) == 73
    # A whole ratio: each even model slice is exactly two sources, no touching neighbours.
    np.testing.assert_array_equal(z_sources_of(300, 150, np.arange(0, 150, 2)),
                                  np.flatnonzero(np.arange(300) % 4 < 2))
    with pytest.raises(ValueError, match="output slices must lie in \\[0, 146\\)"):
        z_sources_of(300, 146, [146])
    with pytest.raises(ValueError, match="z_sampling"):
        z_sources_of(300, 146, [0], "cubic")


@pytest.mark.parametrize("depth", [1, 2, 9, 10, 146])
@pytest.mark.parametrize("half,step,z_stride", [(2, 2, 2), (1, 1, 2), (2, 2, 3), (1, 2, 1),
                                                (0, 1, 4)])
def test_slices_read_are_what_the_stack_batches_gather(depth, half, step, z_stride):
    index = np.arange(depth, dtype=np.int64)[:, None, None]  # each slice holds its own index
    offsets = stack_offsets(half, step)
    seen = set()
    for _, stacks in iter_stack_batches(index, offsets, batch_size=3, z_stride=z_stride):
        seen.update(stacks.reshape(-1).tolist())
    np.testing.assert_array_equal(slices_read(depth, offsets, z_stride), sorted(seen))


@pytest.mark.parametrize("plane", [None, (40, 50)])
def test_read_into_rows_places_positions_and_leaves_the_rest(tmp_path, plane):
    folder = _damaged_folder(tmp_path)
    with pytest.warns(SliceWarning):
        full = read_tomogram(folder, plane_shape=plane)
    shape = (20,) + full.shape[1:]
    select, rows = [3, 9, 0, 12, 15], [19, 1, 0, 12, 7]
    buffer = np.full(shape, 7, np.uint8)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", SliceWarning)
        got = read_tomogram(folder, plane_shape=plane, out=buffer, z_select=select, rows=rows)
    assert got.shape == shape and np.shares_memory(got, buffer)
    np.testing.assert_array_equal(buffer[rows], full[select])
    untouched = np.setdiff1d(np.arange(20), rows)
    assert np.all(buffer[untouched] == 7)


def test_read_into_rows_rejects_rows_that_do_not_fit(tmp_path):
    folder = _write(tmp_path / "t", _volume(depth=6))
    buffer = np.empty((6, 75, 93), np.uint8)
    for bad in ([0, 0], [0, 6], [0], [-1, 2]):
        with pytest.raises(ValueError, match="rows must be 2 different rows of out"):
            read_tomogram(folder, out=buffer, z_select=[1, 2], rows=bad)
    with pytest.raises(ValueError, match="rows needs an out buffer"):
        read_tomogram(folder, z_select=[1, 2], rows=[0, 1])


@pytest.mark.parametrize("per_slice", [False, True])
@pytest.mark.parametrize("dtype", [np.uint8, np.float32])
def test_normalize_only_some_slices(per_slice, dtype):
    volume = _volume(depth=9).astype(dtype)
    volume[1] = 0  # an unlisted slice that would change the volume's percentiles
    slices = np.array([0, 2, 3, 8])
    expected = normalize(volume[slices], per_slice=per_slice, out="uint8")
    got = normalize(volume, per_slice=per_slice, out="uint8", slices=slices)
    np.testing.assert_array_equal(got[slices], expected)
    assert not got[np.setdiff1d(np.arange(9), slices)].any()
    if dtype == np.uint8:
        work = volume.copy()
        assert normalize(work, per_slice=per_slice, out="uint8", overwrite=True,
                         slices=slices) is work
        np.testing.assert_array_equal(work[slices], expected)
        np.testing.assert_array_equal(work[[1, 4, 5, 6, 7]], volume[[1, 4, 5, 6, 7]])
    for bad in ([2, 0], [0, 0], [9], []):
        with pytest.raises(ValueError, match="slices must be sorted, different slices"):
            normalize(volume, slices=bad)
    with pytest.raises(ValueError, match="slices needs a 3D volume"):
        normalize(volume[0], slices=[0])


@pytest.mark.parametrize("spacing,target,per,z_sampling,half,step", [
    (15.6, 32.0, "volume", "area", 2, 64.0), (13.1, 32.0, "slice", "area", 2, 64.0),
    (19.7, 32.0, "volume", "area", 1, 32.0), (15.6, 32.0, "volume", "nearest", 2, 64.0),
    (6.5, 16.0, "slice", "area", 2, 64.0), (40.0, 32.0, "volume", "area", 2, 64.0),
    (15.6, 32.0, "volume", "box", 2, 64.0), (13.1, 32.0, "slice", "box", 1, 32.0)])
def test_inference_prepares_only_the_slices_the_stacks_read(tmp_path, monkeypatch, spacing,
                                                          target, per, z_sampling, half, step):
    import kernel_lib.tomogram as tomogram

    folder = _write(tmp_path / "t", _volume(depth=41, h=150, w=131))
    cfg = PipelineConfig(target_spacing=target, normalize_per=per, z_sampling=z_sampling,
                         stack_half=half, stack_step_angstrom=step, z_stride=2)
    full = preprocess_tomogram(folder, spacing, cfg)
    decoded = []
    real = tomogram.decode_slice
    monkeypatch.setattr(tomogram, "decode_slice",
                        lambda path, reduction=1: decoded.append(path.name) or real(path, reduction))
    part = preprocess_tomogram(folder, spacing, cfg, z_stride=2)
    n_decoded = len(decoded)
    depth = full.volume.shape[0]
    keep = slices_read(depth, stack_offsets(half, cfg.stack_step_slices), 2)
    assert full.model_slices is None and part.frame == full.frame
    assert part.volume.shape == full.volume.shape
    if len(keep) == depth:  # every slice is read: nothing to skip
        assert part.model_slices is None
        np.testing.assert_array_equal(part.volume, full.volume)
        return
    np.testing.assert_array_equal(part.model_slices, keep)
    reduction = choose_reduction(spacing, target)
    raw = read_tomogram(folder, reduction=reduction)
    resampled, _ = resample_to_spacing(raw, (spacing, spacing * reduction, spacing * reduction),
                                       target, z_sampling)
    expected = normalize(resampled[keep], per_slice=per == "slice", out="uint8")
    np.testing.assert_array_equal(part.volume[keep], expected)  # the same slices, measured alone
    assert not part.volume[np.setdiff1d(np.arange(depth), keep)].any()
    assert n_decoded == len(z_sources_of(41, depth, keep, z_sampling))
    assert n_decoded < 41 or depth > 41  # z shrinks: fewer files; z grows: every file is used
    # The normalisation bounds move by at most a gray level or two on this volume.
    assert np.abs(part.volume[keep].astype(int) - full.volume[keep]).max() <= 3


def test_partly_prepared_volume_gives_the_full_heatmap_and_guards_its_gaps(tmp_path):
    torch.manual_seed(0)
    cfg = PipelineConfig(encoder="resnet18", z_stride=2)
    predictor = Predictor([build_model(cfg)], cfg, amp=False)
    folder = _write(tmp_path / "t", _volume(depth=41, h=150, w=131))
    part = preprocess_tomogram(folder, 15.6, cfg, z_stride=2)
    assert part.model_slices is not None
    heat = predictor.heatmap(part.volume, model_slices=part.model_slices)
    filled = part.volume.copy()
    filled[np.setdiff1d(np.arange(len(filled)), part.model_slices)] = 255
    torch.testing.assert_close(predictor.heatmap(filled), heat, rtol=0, atol=0)
    with pytest.raises(ValueError, match="that were not prepared: preprocess with z_stride=1"):
        predictor.heatmap(part.volume, z_stride=1, model_slices=part.model_slices)
