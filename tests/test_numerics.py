"""`jaxrepro.numerics`: one ArrayDiff for every comparison, and rank statistics."""

import numpy as np
import pytest

from jaxrepro.numerics import array_diff, ordered_bits, ranks, spearman, top_overlap, ulp_distance


def f32(*v):
    return np.array(v, dtype=np.float32)


def test_equal_arrays_have_zero_distances():
    a = f32(1.0, -2.0, 3.5)
    d = array_diff(a, a.copy(), histogram=True)
    assert d.equal and d.num_different == 0 and d.max_ulp == 0 and d.max_abs == 0.0
    assert d.ulp_histogram["[0,1)"] == 3


def test_signed_zero_differs_in_bits_but_not_in_ulp():
    d = array_diff(f32(0.0, 1.0), f32(-0.0, 1.0))
    assert not d.equal and d.num_different == 1 and d.max_ulp == 0 and d.max_abs == 0.0


def test_sizes_of_a_difference():
    a, b = f32(1.0, 2.0, 4.0), f32(1.0, 2.5, 4.0)
    d = array_diff(a, b)
    assert d.num_different == 1 and d.fraction_different == pytest.approx(1 / 3)
    assert d.max_abs == 0.5 and d.max_rel == pytest.approx(0.5 / 2.5)
    assert d.rel_to_max == pytest.approx(0.5 / 4.0)
    assert d.max_ulp == int(ulp_distance(f32(2.0), f32(2.5))[0]) == 2**21


def test_nan_is_counted_not_measured():
    d = array_diff(f32(np.nan, 1.0), f32(1.0, 1.0))
    assert not d.equal and d.nan_mismatches == 1 and d.max_ulp == 0


def test_integers_have_no_ulp():
    d = array_diff(np.array([1, 2, 3], np.int32), np.array([1, 5, 3], np.int32))
    assert d.max_ulp is None and d.max_abs == 3.0


def test_shape_or_dtype_mismatch_is_an_error():
    with pytest.raises(ValueError, match="dtype/shape"):
        array_diff(f32(1.0, 2.0), f32(1.0))
    with pytest.raises(ValueError, match="dtype/shape"):
        array_diff(f32(1.0), np.array([1.0], np.float64))


def test_ulp_works_in_float64_and_float16():
    for dtype in (np.float16, np.float64):
        x = np.array([1.0, -3.0], dtype)
        up = np.nextafter(x, np.array(np.inf, dtype))
        assert ulp_distance(x, up).tolist() == [1, 1]
    with pytest.raises(TypeError):
        ordered_bits(np.array([1, 2], np.int32))


def test_ranks_spearman_and_top_overlap():
    np.testing.assert_array_equal(ranks(np.array([3.0, 1.0, 3.0, 2.0])), [3.5, 1.0, 3.5, 2.0])
    x = np.random.default_rng(0).standard_normal(50)
    assert spearman(x, np.exp(x)) == pytest.approx(1.0)
    assert spearman(x, -x) == pytest.approx(-1.0)
    assert spearman(x, np.zeros(50)) is None
    a = np.arange(100.0)
    assert top_overlap(a, a) == 1.0
    assert top_overlap(a, -a) == 0.0
    assert top_overlap(a, np.r_[a[:95], a[95:] - 1000]) == 0.5
