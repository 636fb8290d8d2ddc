"""The CAM agreement harness (benchmarks/agreement_cam.py): its arithmetic and its report, without running
the peers (their agreement is measured by the benchmark, not asserted in unit tests)."""

import numpy as np

from benchmarks import agreement_cam


def test_pearson_per_image_and_flat_maps():
    a = np.array([[[1.0, 2.0], [3.0, 4.0]], [[1.0, 1.0], [1.0, 1.0]]])
    b = np.array([[[2.0, 4.0], [6.0, 8.0]], [[0.0, 1.0], [2.0, 3.0]]])
    r = agreement_cam.pearson_per_image(a, b)
    assert abs(r[0] - 1.0) < 1e-12 and r[1] is None  # a constant map has no correlation
    assert abs(agreement_cam.pearson_per_image(a[:1], -b[:1])[0] + 1.0) < 1e-12


def test_no_peer_no_case_and_the_report_says_what_passed():
    assert agreement_cam.cases({}) == [] and agreement_cam.fusion_cases({}, "resnet18") == []
    rows = [
        {"model": "m", "layer": "l", "method": "kpcacam", "options": {}, "library": "pgc", "peer": "KPCA_CAM",
         "note": "", "r_min": 0.9995, "r_mean": 0.9999},
        {"model": "m", "layer": "l", "method": "finercam", "options": {"alpha": 1}, "library": "pgc",
         "peer": "FinerCAM", "note": "why", "r_min": 0.99, "r_mean": 0.995},
        {"model": "m", "layer": "l", "method": "shapleycam", "options": {}, "library": "pgc", "peer": "ShapleyCAM",
         "note": "", "error": "RuntimeError: boom"},
    ]
    text = agreement_cam.render_markdown({"threshold": 0.999, "batch": 2, "size": 224, "rows": rows})
    lines = text.splitlines()
    assert "| m · l | kpcacam | pgc KPCA_CAM | 0.99950 | 0.99990 | yes |  |" in lines
    assert "| m · l | finercam alpha=1 | pgc FinerCAM | 0.99000 | 0.99500 | no | why |" in lines
    assert any("error" in line and "boom" in line for line in lines)
