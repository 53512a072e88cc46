"""A short real training run: diff pruning on the packaged pretrained MiniLM with GLUE SST-2.

Thirty steps are enough to see the two things the method promises: the task loss falls while the gate logits, pushed
by the L0 penalty, close gates (the expected density falls). `l0_lambda` is raised from the paper's 1.25e-7 so that
the density moves within thirty steps, and the diff learning rate from 1e-5 so that the loss does.
"""

import statistics

import datasets
import pytest
import torch
import torch.nn.functional as F
from conftest import GLUE_DIR
from peft import get_peft_model
from transformers import AutoModelForSequenceClassification, AutoTokenizer, DataCollatorWithPadding
from transformers.utils import logging as transformers_logging

from peft_diffprune import DiffPruningConfig, expected_l0, param_groups
from peft_diffprune.recipe.glue import load_glue, tokenize_glue
from peft_diffprune.recipe.hub import packaged_minilm_path


NUM_STEPS = 30
BATCH_SIZE = 16
MAX_LENGTH = 64
LR = 2e-4
ALPHA_LR = 0.1
L0_LAMBDA = 1e-5
NUM_EVAL = 256

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def sst2() -> datasets.DatasetDict:
    if not (GLUE_DIR / "SST-2" / "train.tsv").is_file():
        pytest.skip(f"GLUE SST-2 not found under {GLUE_DIR}; set GLUE_DIR to a folder in the GLUE download layout")
    data = load_glue("sst2", GLUE_DIR)
    return datasets.DatasetDict(
        {
            "train": data["train"].shuffle(seed=0).select(range(NUM_STEPS * BATCH_SIZE)),
            "validation": data["validation"].shuffle(seed=0).select(range(NUM_EVAL)),
        }
    )


def test_short_sst2_run(sst2):
    path = packaged_minilm_path()
    tokenizer = AutoTokenizer.from_pretrained(path)
    tokenized = tokenize_glue(sst2, tokenizer, "sst2", max_length=MAX_LENGTH)
    collate = DataCollatorWithPadding(tokenizer, return_tensors="pt")
    torch.manual_seed(0)
    verbosity = transformers_logging.get_verbosity()
    transformers_logging.set_verbosity_error()  # the new classifier's "newly initialized" report
    try:
        base = AutoModelForSequenceClassification.from_pretrained(path, num_labels=2)
    finally:
        transformers_logging.set_verbosity(verbosity)
    model = get_peft_model(base, DiffPruningConfig(task_type="SEQ_CLS", l0_lambda=L0_LAMBDA))
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    num_entries = sum(p.numel() for n, p in model.named_parameters() if n.endswith("_diff"))
    optimizer = torch.optim.AdamW(param_groups(model, lr=LR, alpha_lr=ALPHA_LR))

    model.train()
    task_losses, densities = [], []
    for step in range(NUM_STEPS):
        batch = collate([tokenized["train"][i] for i in range(step * BATCH_SIZE, (step + 1) * BATCH_SIZE)])
        outputs = model(**batch)
        penalty = L0_LAMBDA * expected_l0(model)
        task_loss = F.cross_entropy(outputs.logits, batch["labels"])
        # the returned loss is the task loss plus the L0 term, at the same weights
        assert outputs.loss.item() == pytest.approx(task_loss.item() + penalty.item(), rel=1e-5)
        task_losses.append(task_loss.item())
        densities.append(penalty.item() / L0_LAMBDA / num_entries)
        outputs.loss.backward()
        optimizer.step()
        optimizer.zero_grad()

    first, last = statistics.mean(task_losses[:10]), statistics.mean(task_losses[-10:])
    assert last < first - 0.1, (first, last)
    assert densities[0] == pytest.approx(torch.sigmoid(torch.tensor(5.0)).item(), rel=1e-4)
    assert densities[-1] < densities[0] - 0.05, densities
    assert all(torch.equal(p, frozen[n]) for n, p in model.named_parameters() if n in frozen)

    # evaluation uses the deterministic gates; the adapted model must have learnt the task
    model.eval()
    correct = 0
    with torch.no_grad():
        for start in range(0, NUM_EVAL, 64):
            batch = collate([tokenized["validation"][i] for i in range(start, start + 64)])
            correct += (model(**batch).logits.argmax(-1) == batch["labels"]).sum().item()
    # chance is 0.5 +- 0.03 on 256 examples
    assert correct / NUM_EVAL > 0.65
