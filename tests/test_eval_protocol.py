"""The eval protocol gives the same numbers whether its subjects run in one process or several."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from dreambooth_core import embedded
from dreambooth_core import toyworld as tw
from dreambooth_core.evaluation.protocol import Plan, run_eval

pytestmark = pytest.mark.skipif(not (embedded.EMBEDDED_MODEL_DIR / "model_index.json").is_file(),
                                reason="embedded model not built")

PLAN = Plan(subjects=tw.EVAL_SUBJECTS[1:3], steps=4, seeds=(0,), class_images=2, instance_images=2)


def test_parallel_subjects_give_the_serial_results_in_the_plan_order(tmp_path):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # what each worker uses, so both runs do the same arithmetic
    try:
        serial = run_eval(tmp_path / "serial", PLAN, log=lambda *_: None, workers=1)
    finally:
        torch.set_num_threads(threads)
    seen = []
    parallel = run_eval(tmp_path / "parallel", PLAN, log=seen.append, workers=2)

    assert parallel["workers"] == 2 and serial["workers"] == 1
    assert parallel["subjects"] == serial["subjects"] == [s.name for s in PLAN.subjects]
    assert len(seen) == 2 and {line.split("] ")[1].split(":")[0] for line in seen} == set(parallel["subjects"])
    for model in ("base", "prior", "no_prior"):
        for metric, values in serial["per_subject"][model].items():
            assert len(values) == 2
            np.testing.assert_allclose(parallel["per_subject"][model][metric], values, atol=1e-6,
                                       err_msg=f"{model} {metric}")
    assert (tmp_path / "parallel" / "samples.png").is_file()
