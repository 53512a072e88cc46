"""Scaled parallel adapters (He et al., ICLR 2022) on tiny random transformers, table-driven.

Every row of `TEST_CASES` runs through the same lifecycle checks: identity at init, which sub-layers are wrapped, the
adapter's exact contribution `h + s * act(x W_down) W_up`, a training step, disabling, several adapters, merge
refusal, unload and a save/load round trip.
"""

from __future__ import annotations

import json
import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MODEL_CASES, REPO_ROOT, adapted_models, no_grad_logits
from peft import PeftModel, get_peft_model
from torch import nn

from peft_diffprune import ParallelAdapterConfig
from peft_diffprune.parallel_adapter import OutputAdapter, ParallelAdapterLayer, ResidualInputAdapter


TEST_CASES = [
    # (id, model family, ParallelAdapterConfig kwargs)
    ("bert-ffn", "bert", {}),
    ("bert-attn", "bert", {"placement": ["attn"]}),
    ("bert-both-learned-scale", "bert", {"placement": ["ffn", "attn"], "learn_scaling": True}),
    ("roberta-ffn-gelu", "roberta", {"nonlinearity": "gelu"}),
    ("gpt2-ffn", "gpt2", {}),
    ("gpt2-both", "gpt2", {"placement": ["ffn", "attn"]}),
    ("llama-both", "llama", {"placement": ["ffn", "attn"]}),
    ("t5-ffn", "t5", {}),
    ("t5-attn", "t5", {"placement": ["attn"]}),
    ("vit-both", "vit", {"placement": ["ffn", "attn"]}),
]
CASE_PARAMS = [pytest.param(model_name, kwargs, id=case_id) for case_id, model_name, kwargs in TEST_CASES]

#: The modules each placement wraps, as names relative to the base model.
EXPECTED_SUBLAYERS = {
    ("bert", "ffn"): r"bert\.encoder\.layer\.\d\.output",
    ("bert", "attn"): r"bert\.encoder\.layer\.\d\.attention\.output",
    ("roberta", "ffn"): r"roberta\.encoder\.layer\.\d\.output",
    ("gpt2", "ffn"): r"transformer\.h\.\d\.mlp",
    ("gpt2", "attn"): r"transformer\.h\.\d\.attn",
    ("llama", "ffn"): r"model\.layers\.\d\.mlp",
    ("llama", "attn"): r"model\.layers\.\d\.self_attn",
    ("t5", "ffn"): r"(encoder|decoder)\.block\.\d\.layer\.\d\.DenseReluDense",
    ("t5", "attn"): r"(encoder|decoder)\.block\.\d\.layer\.0\.SelfAttention",
    ("vit", "ffn"): r"vit\.layers\.\d\.mlp",
    ("vit", "attn"): r"vit\.layers\.\d\.attention",
}


def make_config(model_name: str, adapter_kwargs: dict, **overrides) -> ParallelAdapterConfig:
    kwargs = {"task_type": MODEL_CASES[model_name].task_type, "r": 4, "scaling": 2.0, **adapter_kwargs, **overrides}
    return ParallelAdapterConfig(**kwargs)


def make_models(model_name: str, adapter_kwargs: dict, **overrides) -> tuple[nn.Module, PeftModel]:
    return adapted_models(model_name, make_config(model_name, adapter_kwargs, **overrides))


logits = no_grad_logits


def adapter_layers(model: nn.Module) -> dict[str, ParallelAdapterLayer]:
    return {
        name.removeprefix("base_model.model."): module
        for name, module in model.named_modules()
        if isinstance(module, ParallelAdapterLayer)
    }


@pytest.mark.parametrize("model_name, adapter_kwargs", CASE_PARAMS)
class TestLifecycle:
    def test_identity_at_init(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs)
        batch = MODEL_CASES[model_name].batch()
        torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)

    def test_wraps_the_placed_sublayers(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        placement = adapter_kwargs.get("placement", ["ffn"])
        pattern = "|".join(f"(?:{EXPECTED_SUBLAYERS[(model_name, p)]})" for p in placement)
        base = MODEL_CASES[model_name].model()
        expected = {name for name, _ in base.named_modules() if re.fullmatch(pattern, name)}
        assert expected and set(adapter_layers(model)) == expected

    def test_adds_scaled_bottleneck_of_the_sublayer_input(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs, init_weights=False)
        config = model.peft_config["default"]
        act = {"relu": torch.relu, "gelu": torch.nn.functional.gelu}[config.nonlinearity]
        # Llama's attention needs rotary position embeddings as an argument: test a layer that does not
        layer = next(m for n, m in adapter_layers(model).items() if not n.endswith("self_attn"))
        x = torch.randn(2, 3, layer.hidden_size)
        down, up = layer._down["default"], layer._up["default"]
        expected_delta = config.scaling * up(act(down(x)))
        with torch.no_grad():
            if isinstance(layer, ResidualInputAdapter):
                hidden = torch.randn(2, 3, layer.base_layer.dense.in_features)
                actual = layer(hidden, x)
                expected = layer.base_layer(hidden, x + expected_delta)
            else:
                assert isinstance(layer, OutputAdapter)
                actual = layer(x)
                base_out = layer.base_layer(x)
                actual = actual[0] if isinstance(actual, tuple) else actual
                expected = (base_out[0] if isinstance(base_out, tuple) else base_out) + expected_delta
        torch.testing.assert_close(actual, expected)

    def test_training_step_changes_only_adapters_and_head(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        model.train()
        batch = MODEL_CASES[model_name].batch()
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
        assert trainable and all(".parallel_adapter_" in n or ".modules_to_save." in n for n in trainable), sorted(
            trainable
        )
        optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
        losses = []
        for _ in range(5):
            loss = model(**batch).loss
            losses.append(loss.item())
            loss.backward()
            optimizer.step()
            optimizer.zero_grad()
        assert losses[-1] < losses[0]
        for n, p in model.named_parameters():
            if n in frozen:
                torch.testing.assert_close(p, frozen[n], rtol=0, atol=0)
        changed = [n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])]
        assert any(".parallel_adapter_up." in n for n in changed)
        if adapter_kwargs.get("learn_scaling"):
            assert any(".parallel_adapter_scale." in n for n in changed)

    def test_disable_gives_the_base_model(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs, init_weights=False)
        batch = MODEL_CASES[model_name].batch()
        adapted = logits(model, batch)
        assert not torch.allclose(adapted, logits(reference, batch))
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, batch), logits(reference, batch), rtol=0, atol=0)
        torch.testing.assert_close(logits(model, batch), adapted, rtol=0, atol=0)

    def test_merge_refused_unload_returns_base(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs, init_weights=False)
        batch = MODEL_CASES[model_name].batch()
        with pytest.raises(ValueError, match="cannot merge"):
            model.merge_and_unload()
        unloaded = model.unload()
        assert not any(isinstance(m, ParallelAdapterLayer) for m in unloaded.modules())
        torch.testing.assert_close(logits(unloaded, batch), logits(reference, batch), rtol=0, atol=0)

    def test_two_adapters_switch_and_delete(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs, init_weights=False)
        batch = MODEL_CASES[model_name].batch()
        first = logits(model, batch)
        torch.manual_seed(5)
        model.add_adapter("other", make_config(model_name, adapter_kwargs, init_weights=False))
        model.set_adapter("other")
        other = logits(model, batch)
        assert not torch.allclose(first, other)
        model.set_adapter("default")
        torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)
        model.delete_adapter("other")
        assert all("other" not in layer._down for layer in adapter_layers(model).values())
        torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)

    def test_save_load_round_trip(self, model_name, adapter_kwargs, tmp_path):
        _, model = make_models(model_name, adapter_kwargs, init_weights=False)
        batch = MODEL_CASES[model_name].batch()
        expected = logits(model, batch)
        model.save_pretrained(tmp_path)
        assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "PARALLEL_ADAPTER"
        loaded = PeftModel.from_pretrained(MODEL_CASES[model_name].model(), tmp_path).eval()
        torch.testing.assert_close(logits(loaded, batch), expected, rtol=0, atol=0)
        assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".parallel_adapter_" in n)


def test_two_active_adapters_add_their_deltas():
    reference, model = make_models("gpt2", {}, init_weights=False)
    torch.manual_seed(7)
    model.add_adapter("other", make_config("gpt2", {}, init_weights=False))
    layer = model.base_model.model.transformer.h[0].mlp
    x = torch.randn(2, 3, 16)
    with torch.no_grad():
        layer.set_adapter(["default", "other"])
        both = layer(x)
        deltas = []
        for name in ("default", "other"):
            layer.set_adapter(name)
            deltas.append(layer(x) - layer.base_layer(x))
    torch.testing.assert_close(both, layer.base_layer(x) + deltas[0] + deltas[1])


def test_fresh_process_round_trip(tmp_path):
    """Save here, load in a new interpreter (registration by import only), compare logits."""
    _, model = make_models("bert", {"placement": ["ffn", "attn"]}, init_weights=False)
    batch = MODEL_CASES["bert"].batch()
    torch.save({"batch": batch, "logits": logits(model, batch)}, tmp_path / "expected.pt")
    model.save_pretrained(tmp_path / "adapter")
    script = textwrap.dedent(
        f"""
        import sys, torch
        sys.path.insert(0, {str(REPO_ROOT / "tests")!r})
        import peft_diffprune
        from conftest import MODEL_CASES
        from peft import PeftModel
        expected = torch.load({str(tmp_path / "expected.pt")!r})
        model = PeftModel.from_pretrained(MODEL_CASES["bert"].model(), {str(tmp_path / "adapter")!r}).eval()
        batch = {{k: v for k, v in expected["batch"].items() if k != "labels"}}
        with torch.no_grad():
            torch.testing.assert_close(model(**batch).logits, expected["logits"], rtol=0, atol=0)
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("OK"), result.stderr[-2000:]


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"r": 0}, "`r` must be a positive integer"),
        ({"placement": ["mlp"]}, "`placement` must be a non-empty subset"),
        ({"placement": []}, "`placement` must be a non-empty subset"),
        ({"nonlinearity": "swish"}, "`nonlinearity` must be one of"),
        ({"dropout": 1.0}, r"`dropout` must be in \[0, 1\)"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        ParallelAdapterConfig(**kwargs)


class TinyBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(16)
        self.ffn = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.ffn(self.norm(x))


class TinyNet(nn.Module):
    """A model that is not a transformers model: no `model_type` to look sub-layers up by."""

    def __init__(self) -> None:
        super().__init__()
        self.blocks = nn.Sequential(TinyBlock(), TinyBlock())

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.blocks(x)


def test_unknown_architecture_names_the_fix():
    with pytest.raises(ValueError, match="pass `target_modules`"):
        get_peft_model(TinyNet(), ParallelAdapterConfig(r=4))


def test_explicit_targets_on_an_unknown_architecture():
    torch.manual_seed(0)
    net = TinyNet()
    x = torch.randn(2, 3, 16)
    expected_base = net(x)
    model = get_peft_model(net, ParallelAdapterConfig(r=4, target_modules=["ffn"], init_weights=False))
    assert [n for n, m in model.named_modules() if isinstance(m, OutputAdapter)] == [
        "base_model.model.blocks.0.ffn",
        "base_model.model.blocks.1.ffn",
    ]
    with torch.no_grad():
        assert not torch.allclose(model(x), expected_base)
        with model.disable_adapter():
            torch.testing.assert_close(model(x), expected_base, rtol=0, atol=0)


def test_linear_with_different_widths_is_refused():
    bert = MODEL_CASES["bert"].model()
    with pytest.raises(ValueError, match="Point `target_modules` at the sub-layer module"):
        get_peft_model(bert, ParallelAdapterConfig(r=4, target_modules=["intermediate.dense"]))


def test_trainable_parameter_count():
    _, model = make_models("bert", {"placement": ["ffn", "attn"], "learn_scaling": True})
    hidden, r, sublayers = 16, 4, 4
    per_adapter = hidden * r + r + r * hidden + hidden + 1
    head = sum(p.numel() for n, p in model.named_parameters() if ".modules_to_save." in n and p.requires_grad)
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    assert trainable == sublayers * per_adapter + head


@pytest.mark.parametrize("loader", ["low_cpu_mem_usage", "transformers"])
def test_other_loaders(loader, tmp_path):
    _, model = make_models("gpt2", {"placement": ["ffn", "attn"]}, init_weights=False)
    batch = MODEL_CASES["gpt2"].batch()
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    if loader == "transformers":
        loaded = MODEL_CASES["gpt2"].model()
        loaded.load_adapter(str(tmp_path))
    else:
        loaded = PeftModel.from_pretrained(MODEL_CASES["gpt2"].model(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(loaded.eval(), batch), expected, rtol=0, atol=0)
