"""The parity arithmetic: tolerances, flips, NaN and shape mismatches."""

from __future__ import annotations

import numpy as np

from modelship.export.parity import Check, compare, table


def test_within_tolerance_passes_with_exact_numbers() -> None:
    ref = np.array([[1.0, -2.0, 3.0]], np.float32)
    got = ref + np.array([[1e-5, -2e-5, 0.0]], np.float32)
    r = compare(ref, got, atol=1e-4, rtol=1e-3)
    assert r["passed"] and r["flips"] == 0 and r["top1_agreement"] == 1.0
    assert abs(r["max_abs_err"] - 2e-5) < 1e-7 and abs(r["max_rel_err"] - 1e-5) < 1e-6


def test_error_beyond_atol_plus_rtol_fails() -> None:
    ref = np.array([[10.0, 0.0]], np.float32)
    assert compare(ref, ref + np.float32(0.0105), atol=1e-4, rtol=1e-3)["passed"] is False  # 0.0105 > 1e-4 + 0.01
    assert compare(ref, ref + np.array([[0.0100, 0.0]], np.float32), atol=1e-4, rtol=1e-3)["passed"] is True


def test_a_swap_inside_the_tolerance_is_a_tie_not_a_flip() -> None:
    ref = np.array([[1.0, 1.00005, 0.0]], np.float32)  # eager top-2 margin 5e-5 < tolerance
    got = np.array([[1.00006, 1.00005, 0.0]], np.float32)
    r = compare(ref, got, atol=1e-4, rtol=1e-3)
    assert r["top1_agreement"] == 0.0 and r["flips"] == 0 and r["passed"]


def test_a_real_flip_fails() -> None:
    ref = np.array([[2.0, 1.0], [0.0, 3.0]], np.float32)
    got = np.array([[1.0, 2.0], [0.0, 3.0]], np.float32)
    r = compare(ref, got, atol=1e-4, rtol=1e-3)
    assert r["flips"] == 1 and r["top1_agreement"] == 0.5 and not r["passed"]


def test_nan_and_shape_mismatch_fail() -> None:
    ref = np.ones((2, 3), np.float32)
    got = ref.copy()
    got[1, 1] = np.nan
    assert compare(ref, got, 1e-4, 1e-3)["passed"] is False
    assert compare(ref, np.ones((2, 4), np.float32), 1e-4, 1e-3)["passed"] is False


def test_table_and_description_name_artifact_runtime_and_batch() -> None:
    c = Check("onnx", "onnxruntime-cpu", "random", 7, 0.5, 0.1, 0.2, 0.5, 3, 1e-4, 1e-3, False)
    assert (
        c.describe()
        == "onnx on onnxruntime-cpu at batch 7 (random inputs): max_abs_err 0.5 (atol 0.0001, rtol 0.001), "
        "3 top-1 flips"
    )
    lines = table([c]).splitlines()
    assert lines[0].split() == [
        "artifact",
        "runtime",
        "inputs",
        "batch",
        "max_abs",
        "mean_abs",
        "max_rel",
        "top1",
        "tol",
        "ok",
    ]
    assert lines[1].split()[:4] == ["onnx", "onnxruntime-cpu", "random", "7"] and lines[1].endswith("FAIL")
