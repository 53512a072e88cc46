"""The design-space ablation of diff pruning (issue 6): the same budget on attention only, FFN only, or everything.

`examples/glue.py --diff_placement attn|ffn|all` picks the modules with regexes on BERT-style names; these tests check
that each placement wraps exactly its sub-layers and that projection keeps the same number of entries whatever the
placement (the budget is a fraction of the whole model).
"""

from __future__ import annotations

import importlib.util
import re

import pytest
import torch
from conftest import MODEL_CASES, REPO_ROOT
from peft import get_peft_model

from peft_diffprune import DiffPruningConfig, project_to_sparsity
from peft_diffprune.diff_pruning.layer import DiffPruningLayer


def _example_module():
    spec = importlib.util.spec_from_file_location("glue_example", REPO_ROOT / "examples" / "glue.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


DIFF_PLACEMENTS = _example_module().DIFF_PLACEMENTS
ATTENTION = r"bert\.encoder\.layer\.\d\.attention\.(self\.(query|key|value)|output\.(dense|LayerNorm))"
FFN = r"bert\.encoder\.layer\.\d\.(intermediate\.dense|output\.(dense|LayerNorm))"


@pytest.mark.parametrize("placement, expected", [("attn", ATTENTION), ("ffn", FFN)])
def test_placement_wraps_exactly_its_sublayers(placement, expected):
    base = MODEL_CASES["bert"].model()
    wanted = {name for name, _ in base.named_modules() if re.fullmatch(expected, name)}
    model = get_peft_model(base, DiffPruningConfig(task_type="SEQ_CLS", target_modules=DIFF_PLACEMENTS[placement]))
    wrapped = {
        name.removeprefix("base_model.model.")
        for name, module in model.named_modules()
        if isinstance(module, DiffPruningLayer)
    }
    assert wanted and wrapped == wanted


def test_budget_is_the_same_for_every_placement():
    kept = {}
    for placement, regex in DIFF_PLACEMENTS.items():
        base = MODEL_CASES["bert"].model()
        total = sum(p.numel() for n, p in base.named_parameters() if not n.startswith("classifier."))
        model = get_peft_model(base, DiffPruningConfig(task_type="SEQ_CLS", target_modules=regex, init_weights=False))
        torch.manual_seed(0)
        kept[placement] = project_to_sparsity(model, target_sparsity=0.05).kept
    assert set(kept.values()) == {round(0.05 * total)}, kept
