"""The layer-density table and plot: the gated and the projected report of one model share one grid."""

import pytest
import torch
from conftest import MODEL_CASES
from peft import get_peft_model

from peft_diffprune import DiffPruningConfig, project_to_sparsity, sparsity_report
from peft_diffprune.recipe.plots import layer_density_table, plot_layer_density


#: BERT's module types in a layer, in model order
BERT_MODULES = [
    "attention.self.query",
    "attention.self.key",
    "attention.self.value",
    "attention.output.dense",
    "attention.output.LayerNorm",
    "intermediate.dense",
    "output.dense",
    "output.LayerNorm",
]


@pytest.fixture(scope="module")
def reports():
    """The tiny BERT's reports after the gated stage (every gate open) and after projection to 1%, which keeps
    nothing of several tensors: those are missing from the projected report."""
    torch.manual_seed(0)
    model = get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(task_type="SEQ_CLS", init_weights=False))
    gated = sparsity_report(model)
    projected = project_to_sparsity(model, 0.01)
    assert len(projected.tensors) < len(gated.tensors)
    return {"after stage 1": gated, "after projection": projected}


def test_both_reports_get_the_same_grid(reports):
    grid = list(reports.values())
    gated = layer_density_table(reports["after stage 1"], grid)
    projected = layer_density_table(reports["after projection"], grid)
    assert gated[0] == projected[0] == [0, 1]
    assert gated[1] == projected[1] == BERT_MODULES
    assert gated[2].keys() == projected[2].keys() == {(layer, m) for layer in (0, 1) for m in BERT_MODULES}
    assert (
        list(gated[3])
        == list(projected[3])
        == [
            "bert.embeddings.word_embeddings",
            "bert.embeddings.position_embeddings",
            "bert.embeddings.token_type_embeddings",
            "bert.embeddings.LayerNorm",
            "bert.pooler.dense",
        ]
    )
    # on its own, the projected report drops the cells with nothing kept
    alone = layer_density_table(reports["after projection"])
    assert len(alone[2]) + len(alone[3]) < len(projected[2]) + len(projected[3])


def test_cells_count_kept_entries_over_every_parameter_of_the_cell(reports):
    grid = list(reports.values())
    _, _, density, outside = layer_density_table(reports["after projection"], grid)
    parameters = {t.name: t.parameters for t in reports["after stage 1"].tensors}
    kept = {t.name: t.nonzero for t in reports["after projection"].tensors}
    for (layer, module), value in density.items():
        names = [f"bert.encoder.layer.{layer}.{module}.{p}" for p in ("weight", "bias")]
        assert value == sum(kept.get(n, 0) for n in names) / sum(parameters[n] for n in names)
    assert 0.0 in density.values() and max(density.values()) > 0.0
    # every gate of the gated stage is open: density 1 everywhere
    _, _, gated, gated_outside = layer_density_table(reports["after stage 1"], grid)
    assert set(gated.values()) == set(gated_outside.values()) == {1.0}


def test_plot_writes_both_panels(reports, tmp_path):
    pytest.importorskip("matplotlib")
    path = tmp_path / "layer_density.png"
    plot_layer_density(reports, path)
    assert path.read_bytes().startswith(b"\x89PNG")
