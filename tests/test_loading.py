"""Tests for sparse adapter files: what `save_pretrained` writes, atomic saves, loading through every PEFT and
transformers entry point, and the errors raised for wrong bases and corrupt files.

Round trips run in one fresh Python process (a module-scoped fixture): it first tries to load without importing
`peft_diffprune`, then imports it and loads the saved adapters every way a PEFT adapter loads, saving the outputs
for the tests here to compare with the outputs of the models that were saved.
"""

import copy
import json
import os
import re
from pathlib import Path

import peft.peft_model
import pytest
import safetensors.torch
import torch
from _sparse_helpers import (
    HEAD,
    VOCAB_SIZE,
    apply_sparse_diff,
    copy_adapter,
    edit_config,
    edit_weights,
    folder_bytes,
    logits,
    low_part_bytes,
    make_adapter,
    make_batch,
    raw_elias_fano,
    run_fresh,
    safetensors_header,
    sparse_entries,
    tensor_nbytes,
    tiny_bert,
    weight_key,
)
from peft import AutoPeftModelForSequenceClassification, PeftConfig, PeftModel, get_peft_model
from transformers import AutoModelForSequenceClassification, BertTokenizerFast, pipeline

from peft_diffprune import DiffPruningConfig, project_to_sparsity, sparsity_report
from peft_diffprune.diff_pruning.encoding import decode_positions, encode_positions, encoded_size
from peft_diffprune.diff_pruning.layer import DiffPruningLayer
from peft_diffprune.integrity import file_metadata
from peft_diffprune.recipe.hub import packaged_minilm_path
from peft_diffprune.serialization import LABELS_KEY


REPO_ROOT = Path(__file__).resolve().parents[1]
VALUES_DTYPES = {"a": "float32", "b": "float16", "c": "bfloat16"}
SAFETENSORS_DTYPES = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """A tiny base saved with save_pretrained (so `base_model_name_or_path` is a folder) and three adapters on it."""
    root = tmp_path_factory.mktemp("saved")
    base_dir = root / "base"
    tiny_bert(0).save_pretrained(base_dir)

    def load_base():
        return AutoModelForSequenceClassification.from_pretrained(base_dir).eval()

    models, folders, references = {}, {}, {}
    for seed, (name, values_dtype) in enumerate(VALUES_DTYPES.items(), start=1):
        models[name] = make_adapter(load_base(), seed, values_dtype)
        folders[name] = root / name
        models[name].save_pretrained(folders[name])
        references[name] = logits(models[name])
    batch = make_batch(with_labels=True)
    torch.save(batch, root / "batch.pt")
    return {
        "root": root,
        "base_dir": base_dir,
        "models": models,
        "folders": folders,
        "references": references,
        "base_logits": logits(load_base()),
        "batch": batch,
    }


# ----------------------------------------------------------------------------------------------------------------
# what save_pretrained writes


class TestAdapterFiles:
    @pytest.mark.parametrize("name", list(VALUES_DTYPES))
    def test_weights_hold_only_positions_values_and_head(self, saved, name):
        folder, model = saved["folders"][name], saved["models"][name]
        assert sorted(p.name for p in folder.iterdir()) == [
            "README.md",
            "adapter_config.json",
            "adapter_model.safetensors",
        ]
        header = safetensors_header(folder / "adapter_model.safetensors")
        kept_pattern = model.peft_config["default"].kept_pattern
        head_keys = {f"base_model.model.{HEAD}.weight", f"base_model.model.{HEAD}.bias"}
        expected_keys = head_keys.copy()
        for key, count in kept_pattern.items():
            module_name, tensor = key.rsplit(".", 1)
            prefix = f"base_model.model.{module_name}.diff_pruning_state.{tensor}"
            expected_keys |= {f"{prefix}_positions", f"{prefix}_values"}
            assert header[f"{prefix}_values"]["dtype"] == SAFETENSORS_DTYPES[VALUES_DTYPES[name]]
            assert header[f"{prefix}_values"]["shape"] == [count]
            assert header[f"{prefix}_positions"]["dtype"] == "U8"
            numel = model.base_model.model.get_submodule(module_name).get_base_layer().get_parameter(tensor).numel()
            assert header[f"{prefix}_positions"]["shape"] == [encoded_size(numel, count)]
        assert set(header) == expected_keys
        assert all(header[key]["dtype"] == "F32" for key in head_keys)

    @pytest.mark.parametrize("name", list(VALUES_DTYPES))
    def test_config_records_the_sparse_format(self, saved, name):
        config = json.loads((saved["folders"][name] / "adapter_config.json").read_text())
        in_memory = saved["models"][name].peft_config["default"]
        assert config["peft_type"] == "DIFF_PRUNING"
        assert config["kept_pattern"] == in_memory.kept_pattern and sum(config["kept_pattern"].values()) > 0
        assert config["format_version"] == 1
        assert re.fullmatch("v1:[0-9a-f]{32}:[A-Za-z0-9+/]+=*", config["base_fingerprint"])
        assert config["values_dtype"] == VALUES_DTYPES[name]
        assert config["target_sparsity"] == 0.05
        assert config["base_model_name_or_path"] == str(saved["base_dir"])

    @pytest.mark.parametrize("name", list(VALUES_DTYPES))
    def test_bytes_per_kept_entry(self, saved, name):
        header = safetensors_header(saved["folders"][name] / "adapter_model.safetensors")
        kept = sparsity_report(saved["models"][name]).kept
        value_bytes, position_bytes = tensor_nbytes(header, "_values"), tensor_nbytes(header, "_positions")
        assert value_bytes == kept * {"float32": 4, "float16": 2, "bfloat16": 2}[VALUES_DTYPES[name]]
        tensors = [t for t in sparsity_report(saved["models"][name]).tensors if t.kept]
        assert position_bytes == sum(encoded_size(t.parameters, t.kept) for t in tensors)
        # tiny tensors at 5%: positions cost about 8 bits each here, padding of the small tensors included; each
        # tensor's code also carries a 4-byte checksum, which real models amortise over thousands of entries
        checksum_bytes = 4 * len(tensors)
        assert (position_bytes - checksum_bytes) / kept < 1.25
        assert (value_bytes + position_bytes - checksum_bytes) / kept < (5.25 if name == "a" else 3.25)

    def test_float16_at_one_percent_costs_at_most_four_bytes_per_entry(self, tmp_path):
        model = make_adapter(tiny_bert(0), seed=1, values_dtype="float16", target_sparsity=0.01)
        model.save_pretrained(tmp_path)
        header = safetensors_header(tmp_path / "adapter_model.safetensors")
        report = sparsity_report(model)
        kept = report.kept
        assert kept == round(0.01 * report.total_parameters) == 12
        # the 4-byte checksum per tensor code is left out: with 12 entries it is no measure of the format's cost
        # (on the packaged MiniLM it adds 0.004 bytes per entry; see test_packaged_minilm_round_trip)
        checksum_bytes = 4 * sum(1 for t in report.tensors if t.kept)
        assert (tensor_nbytes(header, "_positions") + tensor_nbytes(header, "_values") - checksum_bytes) / kept <= 4

    def test_loaded_adapter_wraps_only_modules_with_kept_entries(self, saved):
        model = PeftModel.from_pretrained(tiny_bert(0), saved["folders"]["a"])
        kept_pattern = saved["models"]["a"].peft_config["default"].kept_pattern
        wrapped = {
            name for name, module in model.base_model.model.named_modules() if isinstance(module, DiffPruningLayer)
        }
        assert wrapped == {key.rsplit(".", 1)[0] for key in kept_pattern}
        assert len(wrapped) < len(saved["models"]["a"].peft_config["default"].target_modules) - 1
        loaded, original = sparsity_report(model), sparsity_report(saved["models"]["a"])
        assert loaded.tensors == original.tensors and loaded.total_parameters == original.total_parameters

    def test_model_card_says_how_to_load(self, saved):
        card = (saved["folders"]["a"] / "README.md").read_text()
        assert "import peft_diffprune" in card
        assert str(saved["base_dir"]) in card
        kept = sparsity_report(saved["models"]["a"]).kept
        assert f"Kept entries: {kept:,}" in card


class FailingWriter:
    """Stands in for a weights writer: writes half a file, then fails, as a full disk or a kill would."""

    def __init__(self):
        self.calls = 0

    def __call__(self, tensors, filename, metadata=None):
        self.calls += 1
        Path(filename).write_bytes(b"\x00" * 100)
        raise OSError("No space left on device (simulated)")


class TestAtomicSave:
    @pytest.fixture
    def existing(self, tmp_path):
        parent = tmp_path / "adapters"
        parent.mkdir()
        make_adapter(tiny_bert(0), seed=1).save_pretrained(parent / "task")
        return parent, parent / "task", folder_bytes(parent / "task")

    def test_failure_while_writing_weights_leaves_the_old_adapter(self, existing, monkeypatch):
        parent, target, before = existing
        writer = FailingWriter()
        monkeypatch.setattr(safetensors.torch, "save_file", writer)
        monkeypatch.setattr(peft.peft_model, "safe_save_file", writer)
        with pytest.raises(OSError, match="simulated"):
            make_adapter(tiny_bert(0), seed=2).save_pretrained(target)
        assert writer.calls == 1
        assert folder_bytes(target) == before
        assert [p.name for p in parent.iterdir()] == ["task"]  # no temporary folder left behind

    def test_failure_while_writing_the_config_leaves_the_old_adapter(self, existing, monkeypatch):
        parent, target, before = existing

        def fail(*args, **kwargs):
            raise OSError("config write failed (simulated)")

        monkeypatch.setattr(DiffPruningConfig, "save_pretrained", fail)
        with pytest.raises(OSError, match="simulated"):
            make_adapter(tiny_bert(0), seed=2).save_pretrained(target)
        assert folder_bytes(target) == before
        assert [p.name for p in parent.iterdir()] == ["task"]

    def test_failure_between_the_renames_fails_loudly_on_load(self, existing, monkeypatch):
        # documented in docs/format.md: new weights with the old config; their shapes disagree with kept_pattern
        parent, target, before = existing
        real_replace = os.replace

        def replace(source, destination):
            if Path(destination).name == "adapter_config.json":
                raise OSError("killed before the config was moved (simulated)")
            real_replace(source, destination)

        monkeypatch.setattr(os, "replace", replace)
        with pytest.raises(OSError, match="simulated"):
            make_adapter(tiny_bert(0), seed=2, target_sparsity=0.1).save_pretrained(target)
        monkeypatch.undo()
        after = folder_bytes(target)
        assert after["adapter_config.json"] == before["adapter_config.json"]
        assert after["adapter_model.safetensors"] != before["adapter_model.safetensors"]
        assert [p.name for p in parent.iterdir()] == ["task"]
        with pytest.raises(RuntimeError, match="size mismatch"):
            PeftModel.from_pretrained(tiny_bert(0), target)

    def test_successful_save_replaces_every_file(self, existing):
        parent, target, before = existing
        make_adapter(tiny_bert(0), seed=2, target_sparsity=0.1).save_pretrained(target)
        after = folder_bytes(target)
        assert after.keys() == before.keys()
        assert all(after[name] != before[name] for name in after)
        assert [p.name for p in parent.iterdir()] == ["task"]


# ----------------------------------------------------------------------------------------------------------------
# round trips in a fresh process

FRESH_SCRIPT = r"""
import sys
from pathlib import Path

import torch
from transformers import AutoModelForSequenceClassification

root = Path(sys.argv[1])
folders = {name: str(root / name) for name in "abc"}
batch = torch.load(root / "batch.pt")
inputs = {k: v for k, v in batch.items() if k != "labels"}
results = {}

def base():
    return AutoModelForSequenceClassification.from_pretrained(root / "base").eval()

@torch.no_grad()
def out(model):
    model.eval()
    return model(**inputs).logits

# 1. without `import peft_diffprune`
from peft import PeftModel
for label, load in [
    ("peft", lambda: PeftModel.from_pretrained(base(), folders["a"])),
    ("transformers", lambda: base().load_adapter(folders["a"])),
]:
    try:
        load()
        results[f"no_import_{label}"] = None
    except Exception as error:
        results[f"no_import_{label}"] = (type(error).__name__, str(error))

import peft_diffprune  # noqa: E402
from peft import AutoPeftModelForSequenceClassification  # noqa: E402

# 2. PeftModel.from_pretrained from a folder, plain and with low_cpu_mem_usage
results["base"] = out(base())
for name in "abc":
    results[f"folder_{name}"] = out(PeftModel.from_pretrained(base(), folders[name]))
    model = PeftModel.from_pretrained(base(), folders[name], low_cpu_mem_usage=True)
    results[f"low_cpu_{name}"] = out(model)
    results[f"low_cpu_values_dtypes_{name}"] = sorted(
        {str(p.dtype) for n, p in model.named_parameters() if n.endswith("_values")}
    )

# 3. is_trainable: the kept values train on
model = PeftModel.from_pretrained(base(), folders["a"], is_trainable=True)
results["trainable_names"] = sorted(n for n, p in model.named_parameters() if p.requires_grad)
results["trainable_dtypes"] = sorted({str(p.dtype) for p in model.parameters() if p.requires_grad})
results["trainable_before"] = out(model)
positions = {n: b.clone() for n, b in model.named_buffers() if n.endswith("_positions")}
optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.5)
model.train()
loss = model(**batch).loss
loss.backward()
optimizer.step()
results["trainable_loss"] = loss.detach()
results["trainable_after"] = out(model)
results["positions_unchanged"] = all(
    torch.equal(b, positions[n]) for n, b in model.named_buffers() if n.endswith("_positions")
)

# 4. AutoPeftModel: the base comes from base_model_name_or_path in adapter_config.json
results["auto"] = out(AutoPeftModelForSequenceClassification.from_pretrained(folders["a"]))

# 5. transformers' own loader on a plain model
model = base()
model.load_adapter(folders["a"])
results["transformers"] = out(model)
results["transformers_layer"] = type(model.bert.encoder.layer[0].intermediate.dense).__name__

# 6. several named adapters on one base
model = PeftModel.from_pretrained(base(), folders["a"], adapter_name="a")
model.load_adapter(folders["b"], adapter_name="b")
model.load_adapter(folders["c"], adapter_name="c")
for name in "bca":
    model.set_adapter(name)
    results[f"named_{name}"] = out(model)

torch.save(results, root / "fresh_results.pt")
"""


@pytest.fixture(scope="module")
def fresh(saved):
    run_fresh(FRESH_SCRIPT, str(saved["root"]))
    return torch.load(saved["root"] / "fresh_results.pt")


def assert_same_output(actual, expected):
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-6)


@pytest.mark.slow
class TestFreshProcessRoundTrips:
    @pytest.mark.parametrize("name", list(VALUES_DTYPES))
    def test_peft_model_from_folder(self, saved, fresh, name):
        assert_same_output(fresh[f"folder_{name}"], saved["references"][name])
        assert_same_output(fresh["base"], saved["base_logits"])
        assert not torch.allclose(fresh[f"folder_{name}"], fresh["base"], atol=1e-3)

    @pytest.mark.parametrize("name", list(VALUES_DTYPES))
    def test_low_cpu_mem_usage(self, saved, fresh, name):
        assert_same_output(fresh[f"low_cpu_{name}"], saved["references"][name])

    def test_low_cpu_mem_usage_keeps_values_in_fp32(self, fresh):
        # the file holds fp16/bf16 values for b and c; assigned tensors are upcast, training stays in fp32
        for name in VALUES_DTYPES:
            assert fresh[f"low_cpu_values_dtypes_{name}"] == ["torch.float32"], name

    def test_is_trainable_continues_training(self, saved, fresh):
        model = saved["models"]["a"]
        expected_names = sorted(n for n, p in model.named_parameters() if p.requires_grad)
        assert fresh["trainable_names"] == expected_names
        assert all(n.endswith("_values") or ".modules_to_save.default." in n for n in expected_names)
        assert fresh["trainable_dtypes"] == ["torch.float32"]
        assert_same_output(fresh["trainable_before"], saved["references"]["a"])

        # the same step on the model that was saved
        twin = copy.deepcopy(model)
        optimizer = torch.optim.SGD([p for p in twin.parameters() if p.requires_grad], lr=0.5)
        twin.train()
        loss = twin(**saved["batch"]).loss
        loss.backward()
        optimizer.step()
        torch.testing.assert_close(fresh["trainable_loss"], loss.detach(), rtol=0, atol=1e-6)
        assert_same_output(fresh["trainable_after"], logits(twin))
        assert not torch.allclose(fresh["trainable_after"], fresh["trainable_before"], atol=1e-4)
        assert fresh["positions_unchanged"] is True

    def test_auto_peft_model(self, saved, fresh):
        assert_same_output(fresh["auto"], saved["references"]["a"])

    def test_transformers_load_adapter(self, saved, fresh):
        assert fresh["transformers_layer"] == "GenericLayer"
        assert_same_output(fresh["transformers"], saved["references"]["a"])
        assert not torch.allclose(fresh["transformers"], fresh["base"], atol=1e-3)

    def test_named_adapters_and_set_adapter(self, saved, fresh):
        for name in VALUES_DTYPES:
            assert_same_output(fresh[f"named_{name}"], saved["references"][name])
        assert not torch.allclose(fresh["named_a"], fresh["named_b"], atol=1e-3)

    def test_loading_without_importing_the_package_fails(self, fresh, saved):
        # PEFT has no plugin discovery: without `import peft_diffprune` the peft_type is unknown, and PEFT and
        # transformers fail with a bare KeyError naming it. The remedy is documented in the saved model card.
        for label in ("peft", "transformers"):
            assert fresh[f"no_import_{label}"] == ("KeyError", "'DIFF_PRUNING'")
        assert "import peft_diffprune" in (saved["folders"]["a"] / "README.md").read_text()
        concepts = (REPO_ROOT / "docs" / "concepts.md").read_text()
        assert "KeyError: 'DIFF_PRUNING'" in concepts and "import peft_diffprune" in concepts


# ----------------------------------------------------------------------------------------------------------------
# load errors


def load_peft(base, folder):
    return PeftModel.from_pretrained(base, folder)


def load_low_cpu(base, folder):
    return PeftModel.from_pretrained(base, folder, low_cpu_mem_usage=True)


def load_transformers(base, folder):
    base.load_adapter(str(folder))
    return base


LOADERS = [
    pytest.param(load_peft, id="PeftModel"),
    pytest.param(load_low_cpu, id="low_cpu_mem_usage"),
    pytest.param(load_transformers, id="transformers"),
]


def load_and_run(loader, folder, base=None):
    model = loader(tiny_bert(0) if base is None else base, folder)
    return logits(model)


@pytest.fixture
def adapter_copy(saved, tmp_path):
    """A writable copy of adapter `a` and the decoded kept positions of its word-embedding diff."""
    folder = copy_adapter(saved["folders"]["a"], tmp_path / "a")
    entries = sparse_entries(saved["models"]["a"])
    positions, _ = entries["bert.embeddings.word_embeddings.weight"]
    assert len(positions) > 4
    return folder, positions


def positions_of(state_dict):
    return weight_key(state_dict, "word_embeddings", "positions")


def values_of(state_dict):
    return weight_key(state_dict, "word_embeddings", "values")


class TestWrongBase:
    @pytest.mark.parametrize("loader", LOADERS[::2])
    def test_other_base_weights_raise(self, saved, loader):
        with pytest.raises(ValueError, match="fingerprint"):
            load_and_run(loader, saved["folders"]["a"], base=tiny_bert(seed=5))

    def test_verify_base_fingerprint_false_loads_anyway(self, saved):
        config = PeftConfig.from_pretrained(saved["folders"]["a"])
        config.verify_base_fingerprint = False
        model = PeftModel.from_pretrained(tiny_bert(seed=5), saved["folders"]["a"], config=config)

        reference = apply_sparse_diff(tiny_bert(seed=5), sparse_entries(saved["models"]["a"]))
        reference.classifier.load_state_dict(
            saved["models"]["a"].base_model.model.classifier.modules_to_save["default"].state_dict()
        )
        assert_same_output(logits(model), logits(reference))

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
    def test_same_base_in_half_precision_loads(self, saved, dtype):
        model = PeftModel.from_pretrained(tiny_bert(0, dtype=dtype), saved["folders"]["a"])
        torch.testing.assert_close(logits(model).float(), saved["references"]["a"], rtol=0, atol=1e-2)


class TestCorruptFiles:
    @pytest.mark.parametrize("keep", [0.5, 0.9, 0.999])
    def test_truncated_weights_raise(self, adapter_copy, keep):
        folder, _ = adapter_copy
        path = folder / "adapter_model.safetensors"
        data = path.read_bytes()
        path.write_bytes(data[: int(keep * len(data))])
        with pytest.raises(Exception):  # noqa: B017 - any error, as long as no model comes out
            load_and_run(load_peft, folder)

    @pytest.mark.parametrize("loader", LOADERS)
    @pytest.mark.parametrize("corruption", ["zeroed", "unary-bit-flip", "duplicate", "out-of-range", "larger-tensor"])
    def test_corrupt_positions_raise(self, adapter_copy, loader, corruption):
        folder, positions = adapter_copy
        n, k = 50 * 8, len(positions)

        def corrupt(state_dict):
            key = positions_of(state_dict)
            code = state_dict[key]
            if corruption == "zeroed":
                code = torch.zeros_like(code)
            elif corruption == "unary-bit-flip":
                code = code.clone()
                code[low_part_bytes(n, k)] ^= 0b0100_0000
            elif corruption == "duplicate":
                code = raw_elias_fano([*positions[:2], positions[1], *positions[3:]], n)
            elif corruption == "out-of-range":
                code = raw_elias_fano([*positions[:-1], n], n)
            else:  # a code made for a tensor with one more entry, of the same byte length
                code = encode_positions(torch.arange(n + 1 - k, n + 1), n + 1)
            assert code.shape == state_dict[key].shape and not torch.equal(code, state_dict[key])
            state_dict[key] = code

        edit_weights(folder, corrupt)
        with pytest.raises(ValueError, match="corrupt"):
            load_and_run(loader, folder)

    def test_bit_flip_in_low_bits_raises(self, adapter_copy):
        folder, positions = adapter_copy
        n, k = 50 * 8, len(positions)

        def corrupt(state_dict):
            key = positions_of(state_dict)
            code = state_dict[key].clone()
            code[0] ^= 0b0000_0001
            # without the checksum this would decode to another valid position set
            with pytest.raises(ValueError, match="fails its checksum"):
                decode_positions(code, n, k)
            state_dict[key] = code

        edit_weights(folder, corrupt)
        with pytest.raises(ValueError, match="fails its checksum"):
            load_and_run(load_peft, folder)

    @pytest.mark.parametrize("loader", LOADERS)
    @pytest.mark.parametrize("bad", [float("nan"), float("inf"), float("-inf")])
    def test_non_finite_values_raise(self, adapter_copy, loader, bad):
        folder, _ = adapter_copy

        def corrupt(state_dict):
            key = values_of(state_dict)
            state_dict[key] = state_dict[key].clone()
            state_dict[key][1] = bad

        edit_weights(folder, corrupt)
        with pytest.raises(ValueError, match="non-finite"):
            load_and_run(loader, folder)

    def test_merging_a_corrupt_adapter_raises(self, adapter_copy):
        folder, _ = adapter_copy
        edit_weights(folder, lambda sd: sd.__setitem__(positions_of(sd), torch.zeros_like(sd[positions_of(sd)])))
        model = PeftModel.from_pretrained(tiny_bert(0), folder)
        with pytest.raises(ValueError, match="corrupt"):
            model.merge_and_unload()

    @pytest.mark.parametrize("loader", LOADERS)
    def test_missing_positions_raise(self, adapter_copy, loader):
        # projection records init_weights=True, so a code the file does not provide stays invalid (all zero)
        folder, _ = adapter_copy
        assert json.loads((folder / "adapter_config.json").read_text())["init_weights"] is True
        edit_weights(folder, lambda sd: sd.pop(positions_of(sd)))
        with pytest.raises(ValueError, match="fails its checksum"):
            load_and_run(loader, folder)

    def test_missing_values_raise(self, adapter_copy):
        folder, _ = adapter_copy
        edit_weights(folder, lambda sd: sd.pop(values_of(sd)))
        with pytest.raises(ValueError):
            load_and_run(load_peft, folder)

    def test_unknown_format_version_asks_for_an_upgrade(self, adapter_copy):
        folder, _ = adapter_copy
        edit_config(folder, format_version=99)
        with pytest.raises(ValueError, match="upgrade") as error:
            load_and_run(load_peft, folder)
        assert "99" in str(error.value)


# ----------------------------------------------------------------------------------------------------------------
# a real pretrained model


@pytest.mark.slow
def test_packaged_minilm_at_half_a_percent(tmp_path):
    def load_minilm():
        torch.manual_seed(0)  # the classifier head is new: same seed, same head
        return AutoModelForSequenceClassification.from_pretrained(packaged_minilm_path(), num_labels=2).eval()

    base = load_minilm()
    total = sum(p.numel() for name, p in base.named_parameters() if not name.startswith(f"{HEAD}."))
    generator = torch.Generator().manual_seed(0)
    batch = {"input_ids": torch.randint(1000, 20000, (2, 16), generator=generator)}
    batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    with torch.no_grad():
        base_hidden = base(**batch, output_hidden_states=True).hidden_states[-1]

    torch.manual_seed(0)
    model = get_peft_model(base, DiffPruningConfig(task_type="SEQ_CLS", init_weights=False, values_dtype="float16"))
    report = project_to_sparsity(model, 0.005)
    assert report.total_parameters == total
    assert report.kept == round(0.005 * total)

    def hidden(peft_model):
        with torch.no_grad():
            return peft_model(**batch, output_hidden_states=True).hidden_states[-1]

    before_save = hidden(model)
    model.save_pretrained(tmp_path)
    header = safetensors_header(tmp_path / "adapter_model.safetensors")
    bytes_per_entry = (tensor_nbytes(header, "_positions") + tensor_nbytes(header, "_values")) / report.kept
    print(f"MiniLM, 0.5% global, float16 values: {report.kept} kept, {bytes_per_entry:.3f} bytes per kept entry")
    assert tensor_nbytes(header, "_values") == 2 * report.kept
    assert bytes_per_entry <= 4

    loaded = PeftModel.from_pretrained(load_minilm(), tmp_path)
    after_load = hidden(loaded)
    # values are stored in fp16 (about 3 significant digits): compare within that precision, and against base
    # outputs that the diff moved much further
    torch.testing.assert_close(after_load, before_save, rtol=0, atol=2e-3)
    assert (before_save - base_hidden).abs().max() > 50 * (after_load - before_save).abs().max()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("_values"):
                param.copy_(param.half().float())
    torch.testing.assert_close(after_load, hidden(model), rtol=0, atol=1e-5)


# ----------------------------------------------------------------------------------------------------------------
# label names


LABELS = {0: "entailment", 1: "not_entailment"}
SST2_LABELS = {0: "negative", 1: "positive"}


@pytest.fixture(scope="module")
def labelled(tmp_path_factory):
    """A tiny two-label base saved with transformers' default labels, an adapter trained with the task's label
    names on its config, and a tokenizer for the tiny vocabulary."""
    root = tmp_path_factory.mktemp("labelled")
    tiny_bert(0, num_labels=2).save_pretrained(root / "base")
    base = AutoModelForSequenceClassification.from_pretrained(root / "base").eval()
    assert base.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}
    base.config.id2label, base.config.label2id = LABELS, {name: i for i, name in LABELS.items()}
    make_adapter(base, seed=1).save_pretrained(root / "adapter")
    base = AutoModelForSequenceClassification.from_pretrained(root / "base").eval()
    base.config.id2label, base.config.label2id = SST2_LABELS, {name: i for i, name in SST2_LABELS.items()}
    make_adapter(base, seed=2).save_pretrained(root / "sst2")
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"] + [f"w{i}" for i in range(VOCAB_SIZE - 5)]
    (root / "vocab.txt").write_text("\n".join(words) + "\n")
    return {"root": root, "tokenizer": BertTokenizerFast(vocab_file=str(root / "vocab.txt"))}


def fresh_base(root):
    return AutoModelForSequenceClassification.from_pretrained(root / "base").eval()


class TestLabelNames:
    TEXTS = ["w1 w2 w3", "w40 w7", "w12 w13 w14 w44"]

    def test_saved_in_the_weights_header(self, labelled):
        metadata = file_metadata(labelled["root"] / "adapter" / "adapter_model.safetensors")
        assert json.loads(metadata[LABELS_KEY]) == {
            "id2label": {"0": "entailment", "1": "not_entailment"},
            "label2id": {"entailment": 0, "not_entailment": 1},
        }

    def test_default_labels_are_not_saved(self, tmp_path):
        make_adapter(tiny_bert(0), seed=1).save_pretrained(tmp_path)
        assert LABELS_KEY not in file_metadata(tmp_path / "adapter_model.safetensors")

    @pytest.mark.parametrize(
        "load",
        [
            pytest.param(lambda root: PeftModel.from_pretrained(fresh_base(root), root / "adapter"), id="PeftModel"),
            pytest.param(
                lambda root: AutoPeftModelForSequenceClassification.from_pretrained(root / "adapter"),
                id="AutoPeftModelForSequenceClassification",
            ),
        ],
    )
    def test_pipeline_answers_the_task_labels(self, labelled, load):
        model = load(labelled["root"]).eval()
        assert model.config.id2label == LABELS
        assert model.config.label2id == {"entailment": 0, "not_entailment": 1}
        classifier = pipeline("text-classification", model=model, tokenizer=labelled["tokenizer"])
        answers = [answer["label"] for answer in classifier(self.TEXTS)]
        with torch.no_grad():
            predicted = model(**labelled["tokenizer"](self.TEXTS, padding=True, return_tensors="pt")).logits
        assert answers == [LABELS[int(i)] for i in predicted.argmax(-1)]

    def test_set_adapter_switches_the_labels(self, labelled, saved):
        root = labelled["root"]
        model = PeftModel.from_pretrained(fresh_base(root), root / "adapter")
        model.load_adapter(root / "sst2", adapter_name="sst2")
        model.load_adapter(saved["folders"]["a"], adapter_name="plain")  # saved with the default labels
        assert model.config.id2label == LABELS  # inactive adapters leave the names alone
        model.set_adapter("sst2")
        assert model.config.id2label == SST2_LABELS and model.config.label2id == {"negative": 0, "positive": 1}
        model.set_adapter("plain")
        assert model.config.id2label == {0: "LABEL_0", 1: "LABEL_1"}  # the base model's own
        model.set_adapter("default")
        assert model.config.id2label == LABELS

    def test_each_adapter_saves_its_own_labels(self, labelled, tmp_path):
        root = labelled["root"]
        model = PeftModel.from_pretrained(fresh_base(root), root / "adapter")
        model.load_adapter(root / "sst2", adapter_name="sst2")
        model.save_pretrained(tmp_path)  # "default" is active: the config holds its names, not SST-2's
        for folder, labels in ((tmp_path, LABELS), (tmp_path / "sst2", SST2_LABELS)):
            saved_labels = json.loads(file_metadata(folder / "adapter_model.safetensors")[LABELS_KEY])
            assert saved_labels["id2label"] == {str(i): name for i, name in labels.items()}
