"""The MAM adapter (prefix tuning on attention + scaled parallel adapter on the FFN) on tiny random transformers.

A table of model families runs through the same lifecycle checks; prefix-specific checks follow: the attention
arithmetic against a hand computation, padding and causality, generation, eager vs SDPA, folding the
reparameterisation, loading in a fresh process.
"""

from __future__ import annotations

import re
import subprocess
import sys
import textwrap

import pytest
import torch
from conftest import MODEL_CASES, REPO_ROOT, adapted_models, no_grad_logits
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn

from peft_diffprune import MAMConfig
from peft_diffprune.mam import PrefixAttention
from peft_diffprune.parallel_adapter import ParallelAdapterLayer


PREFIX_LENGTH = 3
TEST_CASES = [
    # (id, model family, MAMConfig kwargs)
    ("bert", "bert", {}),
    ("bert-plain-prefix", "bert", {"prefix_projection": False}),
    ("roberta", "roberta", {}),
    ("gpt2", "gpt2", {}),
    ("llama-gqa", "llama", {}),
    ("t5", "t5", {}),
    ("vit", "vit", {}),
]
CASE_PARAMS = [pytest.param(model_name, kwargs, id=case_id) for case_id, model_name, kwargs in TEST_CASES]

EXPECTED_ATTENTION = {
    "bert": r"bert\.encoder\.layer\.\d\.attention\.self",
    "roberta": r"roberta\.encoder\.layer\.\d\.attention\.self",
    "gpt2": r"transformer\.h\.\d\.attn",
    "llama": r"model\.layers\.\d\.self_attn",
    "t5": r"(encoder|decoder)\.block\.\d\.layer\.0\.SelfAttention",
    "vit": r"vit\.layers\.\d\.attention",
}
#: key width per layer: key/value heads x head size (Llama's tiny config has 1 key/value head for 2 query heads)
KV_DIM = {"bert": 16, "roberta": 16, "gpt2": 16, "llama": 8, "t5": 16, "vit": 16}


def make_config(model_name: str, adapter_kwargs: dict, **overrides) -> MAMConfig:
    kwargs = {
        "task_type": MODEL_CASES[model_name].task_type,
        "prefix_length": PREFIX_LENGTH,
        "r": 4,
        "scaling": 2.0,
        "prefix_hidden_size": 8,
        **adapter_kwargs,
        **overrides,
    }
    return MAMConfig(**kwargs)


def make_models(model_name: str, adapter_kwargs: dict, **overrides) -> tuple[nn.Module, PeftModel]:
    return adapted_models(model_name, make_config(model_name, adapter_kwargs, **overrides))


logits = no_grad_logits


def prefix_layers(model: nn.Module) -> dict[str, PrefixAttention]:
    return {
        name.removeprefix("base_model.model."): m
        for name, m in model.named_modules()
        if isinstance(m, PrefixAttention)
    }


@pytest.mark.parametrize("model_name, adapter_kwargs", CASE_PARAMS)
class TestLifecycle:
    def test_wraps_attention_and_ffn(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        base = MODEL_CASES[model_name].model()
        expected = {n for n, _ in base.named_modules() if re.fullmatch(EXPECTED_ATTENTION[model_name], n)}
        assert expected and set(prefix_layers(model)) == expected
        adapters = [m for m in model.modules() if isinstance(m, ParallelAdapterLayer)]
        assert len(adapters) == len(expected)  # one FFN per attention layer in these models
        for layer in prefix_layers(model).values():
            assert layer.mam_prefix_key["default"].shape == (PREFIX_LENGTH, KV_DIM[model_name])

    def test_prefix_changes_output_disable_and_unload_restore_base(self, model_name, adapter_kwargs):
        reference, model = make_models(model_name, adapter_kwargs)
        batch = MODEL_CASES[model_name].batch()
        assert model.config._attn_implementation == "mam_prefix_sdpa"
        # the FFN adapters start at zero, so any change comes from the prefixes
        assert not torch.allclose(logits(model, batch), logits(reference, batch))
        with model.disable_adapter():
            torch.testing.assert_close(logits(model, batch), logits(reference, batch))
        unloaded = model.unload()
        assert unloaded.config._attn_implementation == "sdpa"
        assert not any(isinstance(m, (PrefixAttention, ParallelAdapterLayer)) for m in unloaded.modules())
        torch.testing.assert_close(logits(unloaded, batch), logits(reference, batch))

    def test_training_step(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        model.train()
        batch = MODEL_CASES[model_name].batch()
        projection = adapter_kwargs.get("prefix_projection", True)
        trainable = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
        plain = [n for n in trainable if ".mam_prefix_key." in n or ".mam_prefix_value." in n]
        projected = [n for n in trainable if ".mam_prefix_head." in n or ".mam_prefix_trunk." in n]
        # while the reparameterisation trains, the plain prefixes are frozen (and vice versa)
        assert (not plain, bool(projected)) == (projection, projection)
        frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
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
        changed = {n for n, p in model.named_parameters() if n in trainable and not torch.equal(p, trainable[n])}
        assert any(".mam_up." in n for n in changed)
        assert any(n in changed for n in (projected if projection else plain))

    def test_save_folds_and_loads(self, model_name, adapter_kwargs, tmp_path):
        _, model = make_models(model_name, adapter_kwargs, init_weights=False)
        batch = MODEL_CASES[model_name].batch()
        expected = logits(model, batch)
        model.save_pretrained(tmp_path)
        saved = load_file(tmp_path / "adapter_model.safetensors")
        assert not any("trunk" in k or "head" in k for k in saved)
        prefix_keys = [k for k in saved if k.endswith("mam_prefix_key")]
        assert len(prefix_keys) == len(prefix_layers(model))
        assert all(saved[k].shape == (PREFIX_LENGTH, KV_DIM[model_name]) for k in prefix_keys)

        loaded = PeftModel.from_pretrained(MODEL_CASES[model_name].model(), tmp_path).eval()
        torch.testing.assert_close(logits(loaded, batch), expected)
        assert not any(p.requires_grad for n, p in loaded.named_parameters() if ".mam_" in n)

        # loading for more training drops the fresh (random) reparameterisation in favour of the saved prefixes
        trainable = PeftModel.from_pretrained(MODEL_CASES[model_name].model(), tmp_path, is_trainable=True).eval()
        torch.testing.assert_close(logits(trainable, batch), expected)
        names = [n for n, p in trainable.named_parameters() if p.requires_grad]
        assert not any("trunk" in n or "head" in n for n in names)
        assert sum(".mam_prefix_key." in n for n in names) == len(prefix_keys)

    def test_two_adapters_switch(self, model_name, adapter_kwargs):
        _, model = make_models(model_name, adapter_kwargs)
        batch = MODEL_CASES[model_name].batch()
        first = logits(model, batch)
        torch.manual_seed(3)
        model.add_adapter("other", make_config(model_name, adapter_kwargs))
        model.set_adapter("other")
        assert not torch.allclose(logits(model, batch), first)
        model.set_adapter("default")
        torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)
        model.delete_adapter("other")
        assert "other" not in model.base_model.mam_prefix_trunk
        torch.testing.assert_close(logits(model, batch), first, rtol=0, atol=0)


def test_prefix_attention_matches_hand_computation():
    """softmax(q [P_k; K]^T / sqrt(d)) [P_v; V] per head, through a real BERT self-attention layer."""
    _, model = make_models("bert", {"prefix_projection": False}, init_weights=False)
    layer = model.base_model.model.bert.encoder.layer[0].attention.self
    attention = layer.base_layer
    x = torch.randn(2, 5, 16)
    with torch.no_grad():
        for name in ("mam_prefix_key", "mam_prefix_value"):
            getattr(layer, name)["default"].normal_()
        actual = layer(x)[0]
        heads, size = 2, 8

        def split(t: torch.Tensor) -> torch.Tensor:
            return t.view(t.shape[0], -1, heads, size).transpose(1, 2)

        q = split(attention.query(x))
        k = split(torch.cat([layer.mam_prefix_key["default"].expand(2, -1, -1), attention.key(x)], dim=1))
        v = split(torch.cat([layer.mam_prefix_value["default"].expand(2, -1, -1), attention.value(x)], dim=1))
        weights = torch.softmax(q @ k.transpose(-1, -2) / size**0.5, dim=-1)
        expected = (weights @ v).transpose(1, 2).reshape(2, 5, 16)
    torch.testing.assert_close(actual, expected)


def test_padding_does_not_leak():
    _, model = make_models("bert", {}, init_weights=False)
    batch = MODEL_CASES["bert"].batch()  # row 0 has two padding positions
    padded = logits(model, batch)[0]
    unpadded = logits(model, {"input_ids": batch["input_ids"][:1, :-2]})[0]
    torch.testing.assert_close(padded, unpadded)


@pytest.mark.parametrize("model_name", ["gpt2", "llama"])
def test_causal_models_keep_causality_and_generate(model_name):
    _, model = make_models(model_name, {}, init_weights=False)
    ids = MODEL_CASES[model_name].batch()["input_ids"][1:]
    changed = ids.clone()
    changed[0, -1] = (changed[0, -1] + 1) % 100
    with torch.no_grad():
        out, out_changed = model(input_ids=ids).logits, model(input_ids=changed).logits
    torch.testing.assert_close(out[:, :-1], out_changed[:, :-1])
    assert not torch.allclose(out[:, -1], out_changed[:, -1])
    # generation with the key/value cache equals greedy decoding without it
    generated = model.generate(input_ids=ids[:, :4], max_new_tokens=4, do_sample=False, pad_token_id=0)
    sequence = ids[:, :4]
    with torch.no_grad():
        for _ in range(4):
            next_token = model(input_ids=sequence).logits[:, -1].argmax(-1, keepdim=True)
            sequence = torch.cat([sequence, next_token], dim=1)
    assert torch.equal(generated, sequence)


@pytest.mark.parametrize("model_name", ["bert", "gpt2"])
def test_eager_and_sdpa_agree(model_name):
    outputs = {}
    for implementation in ("sdpa", "eager"):
        base = MODEL_CASES[model_name].model()
        base.set_attn_implementation(implementation)
        torch.manual_seed(1)
        model = get_peft_model(base, make_config(model_name, {}, init_weights=False)).eval()
        assert model.config._attn_implementation == f"mam_prefix_{implementation}"
        outputs[implementation] = logits(model, MODEL_CASES[model_name].batch())
    torch.testing.assert_close(outputs["eager"], outputs["sdpa"], rtol=1e-5, atol=1e-5)


def test_fold_prefixes_keeps_the_function():
    _, model = make_models("gpt2", {})
    batch = MODEL_CASES["gpt2"].batch()
    before = logits(model, batch)
    model.base_model.fold_prefixes()
    assert not model.base_model.mam_prefix_trunk
    assert all(not layer.mam_prefix_head for layer in prefix_layers(model).values())
    torch.testing.assert_close(logits(model, batch), before)
    assert all(p.requires_grad for n, p in model.named_parameters() if ".mam_prefix_key." in n)


def test_fresh_process_round_trip(tmp_path):
    _, model = make_models("gpt2", {}, init_weights=False)
    batch = MODEL_CASES["gpt2"].batch()
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
        model = PeftModel.from_pretrained(MODEL_CASES["gpt2"].model(), {str(tmp_path / "adapter")!r}).eval()
        with torch.no_grad():
            torch.testing.assert_close(model(**expected["batch"]).logits, expected["logits"])
        print("OK")
        """
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=300)
    assert result.stdout.strip().endswith("OK"), result.stderr[-2000:]


def test_paper_defaults():
    config = MAMConfig()
    assert (config.prefix_length, config.r, config.scaling, config.prefix_hidden_size) == (30, 512, 4.0, 800)
    assert config.placement == ["ffn"] and config.nonlinearity == "relu" and config.prefix_projection


@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"prefix_length": 0}, "`prefix_length` must be a positive integer"),
        ({"prefix_hidden_size": -1}, "`prefix_hidden_size` must be a positive integer"),
        ({"placement": ["attn"]}, "puts its parallel adapter on the feed-forward blocks"),
    ],
)
def test_config_errors(kwargs, message):
    with pytest.raises(ValueError, match=message):
        MAMConfig(**kwargs)


def test_unsupported_attention_implementation():
    base = MODEL_CASES["bert"].model()
    base.config._attn_implementation = "flex_attention"
    with pytest.raises(ValueError, match="attn_implementation='sdpa'"):
        get_peft_model(base, make_config("bert", {}))


def test_unknown_architecture_names_the_fix():
    net = nn.Sequential(nn.Linear(4, 4))
    with pytest.raises(ValueError, match="pass `prefix_modules`"):
        get_peft_model(net, MAMConfig(r=2, prefix_length=2))


@pytest.mark.parametrize("loader", ["low_cpu_mem_usage", "transformers"])
def test_other_loaders(loader, tmp_path):
    _, model = make_models("gpt2", {}, init_weights=False)
    batch = MODEL_CASES["gpt2"].batch()
    expected = logits(model, batch)
    model.save_pretrained(tmp_path)
    if loader == "transformers":
        loaded = MODEL_CASES["gpt2"].model()
        loaded.load_adapter(str(tmp_path))
    else:
        loaded = PeftModel.from_pretrained(MODEL_CASES["gpt2"].model(), tmp_path, low_cpu_mem_usage=True)
    torch.testing.assert_close(logits(loaded.eval(), batch), expected)


def test_prefixes_do_not_shift_positions():
    """Unlike prefixes passed as past_key_values, MAM's leave the real tokens' position ids alone: a sequence as
    long as the model's position table still fits, and the first token's logits equal those of a hand-built run
    with position ids 0..n-1."""
    _, model = make_models("bert", {}, init_weights=False)
    full_length = model.config.max_position_embeddings
    input_ids = torch.randint(3, 100, (1, full_length), generator=torch.Generator().manual_seed(0))
    positions = torch.arange(full_length).unsqueeze(0)
    with torch.no_grad():
        implicit = model(input_ids=input_ids).logits
        explicit = model(input_ids=input_ids, position_ids=positions).logits
    torch.testing.assert_close(implicit, explicit, rtol=0, atol=0)
