"""The prepared accelerator script, run on the CPU at its tiny size."""

from __future__ import annotations

import json

from benchmarks import gpu_check


def test_tiny_run_certifies_every_case_and_distills(tmp_path):
    # Each branch of a case: a single solve, an R-FISTA path, an ADMM path (every variant's
    # options are solved against CVXPY in the reference table).
    cases = (("fista-ws", "bf16"), ("path-ws", "highest"), ("admm-eigh-path", "highest"))
    assert {variant for variant, _ in gpu_check.CASES} == set(gpu_check.VARIANTS)
    payload = gpu_check.run(tmp_path, size="tiny", budget_s=600, cases=cases)
    assert json.loads((tmp_path / "gpu_check.json").read_text()) == json.loads(json.dumps(payload))
    assert [(r["variant"], r["precision"]) for r in payload["solves"]] == list(cases)
    for record in payload["solves"]:
        assert record["status"] == "ok", record
        assert record["converged"], record["message"]
        # Re-certified with float32 GEMMs, bf16 solves included.
        assert record["float32_gap"] <= gpu_check.TARGET_GAP * 1.01
        assert record["steady_s"] > 0 and record["iterations"] >= 1
    working_set = payload["solves"][0]
    assert 0 < working_set["working_set"] <= gpu_check.SIZES["tiny"]["P"]
    assert working_set["iteration_equivalents"] > 0
    target = payload["target"]
    assert target["best"] is not None and isinstance(target["target_met"], bool)
    (distilled,) = payload["distill"]
    assert distilled["status"] == "ok", distilled
    result = distilled["result"]
    assert 0.5 < result["accuracy"] <= 1.0 and 0.5 < result["agreement"] <= 1.0
    assert result["block_params"] > 0 and distilled["stages"][0]["stage"] == "stage3"
