"""streamgru.compact: the float16 and int8 weight forms, checked against their definitions."""

import numpy as np
import pytest

from streamgru import compact


def matrices(seed, n=300):
    rng = np.random.default_rng(seed)
    for _ in range(n):
        W = (rng.normal(size=(int(rng.integers(1, 40)), int(rng.integers(1, 40))))
             * rng.uniform(1e-4, 50)).astype(np.float32)
        if rng.random() < 0.3:
            W[rng.integers(0, W.shape[0])] = 0.0  # an all-zero row
        yield W


def test_int8_is_symmetric_per_row_within_half_a_step():
    for W in matrices(0):
        q, s = compact.quantize_int8(W)
        assert q.dtype == np.int8 and s.dtype == np.float32 and s.shape == (W.shape[0],)
        assert np.abs(q.astype(int)).max() <= 127
        top = np.abs(W).max(axis=1)
        # the scale is the row's largest magnitude over 127 (to float32 rounding), 1 for zeros
        np.testing.assert_allclose(s[top > 0], top[top > 0] / 127, rtol=3e-7)
        assert (s[top == 0] == 1).all() and not q[top == 0].any()
        # every weight within half a step of its dequantized value (and float32 rounding)
        err = np.abs(W.astype(np.float64) - q.astype(np.float64) * s[:, None])
        assert (err <= s[:, None] * (0.5 + 1e-5)).all()
        # the largest weight of each nonzero row uses the full range
        assert (np.abs(q[top > 0].astype(int)).max(axis=1) == 127).all()


@pytest.mark.parametrize("fmt", ["int8", "float16", "float32"])
def test_dequantized_weights_quantize_back_to_the_same_bits(fmt):
    """A compact file stores the quantized form and loads as its float32 dequantization: an
    engine quantizing that again must get exactly the stored values."""
    for W in matrices(1):
        stored, scales = compact.quantize(W, fmt)
        again, scales2 = compact.quantize(compact.dequantize(stored, scales), fmt)
        np.testing.assert_array_equal(again, stored)
        if fmt == "int8":
            np.testing.assert_array_equal(scales2, scales)
        else:
            assert scales is None and scales2 is None


def test_float16_rounds_to_nearest_and_refuses_values_past_its_range():
    W = np.array([[1.0, 1 + 2 ** -11, 1 + 3 * 2 ** -11, 65504.0]], np.float32)
    h, _ = compact.quantize(W, "float16")
    assert h.dtype == np.float16
    assert h.astype(np.float32).tolist() == [[1.0, 1.0, 1 + 2 ** -9, 65504.0]]  # ties to even
    with pytest.raises(ValueError, match=r"W: expected values within float16's range .*got max "
                                         r"\|v\| = 7e\+04; use weights=\"int8\""):
        compact.quantize(np.array([[70000.0]]), "float16")


def test_weights_format_names_the_argument():
    assert compact.weights_format("float16") == "float16"
    with pytest.raises(ValueError, match=r"weights: expected one of 'float32', 'float16', "
                                         r"'int8', got 'int4'"):
        compact.weights_format("int4")
    with pytest.raises(TypeError, match=r"weights: expected one of .*got type np.float16|"
                                        r"weights: expected one of .*got type"):
        compact.weights_format(np.float16)


def test_stored_bytes():
    assert compact.stored_bytes((12, 5), "float32") == 240
    assert compact.stored_bytes((12, 5), "float16") == 120
    assert compact.stored_bytes((12, 5), "int8") == 60 + 48
