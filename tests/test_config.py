"""Tests for `DiffPruningConfig`, the registration with PEFT and the errors raised when choosing target modules."""

import importlib
import math
import subprocess
import sys

import pytest
import torch
from conftest import MODEL_CASES
from peft import PeftConfig, get_peft_model
from peft.utils import PeftType
from peft.utils.error import NoMatchingPeftModuleError
from torch import nn

import peft_diffprune
from peft_diffprune import DiffPruningConfig
from peft_diffprune.diff_pruning.layer import DiffPruningLayer


class TestDefaults:
    def test_paper_hyperparameters(self):
        config = DiffPruningConfig()
        assert config.target_sparsity == 0.005
        assert config.l0_lambda == 1.25e-7
        assert config.alpha_init == 5.0
        assert config.stretch == (-1.5, 1.5)
        assert config.structured is False
        assert config.group_penalty == "product"
        assert config.init_weights is True
        assert config.target_modules is None
        assert config.peft_type == PeftType.DIFF_PRUNING

    @pytest.mark.parametrize("target_sparsity", [1.0, 1, 1e-6, 0.005])
    def test_valid_target_sparsity(self, target_sparsity):
        assert DiffPruningConfig(target_sparsity=target_sparsity).target_sparsity == target_sparsity

    def test_stretch_list_becomes_tuple(self):
        # JSON round trips give a list
        assert DiffPruningConfig(stretch=[-0.1, 1.1]).stretch == (-0.1, 1.1)


class TestValidation:
    @pytest.mark.parametrize(
        "kwargs, bad_value",
        [
            pytest.param({"target_sparsity": 0}, "0", id="sparsity-zero"),
            pytest.param({"target_sparsity": -0.1}, "-0.1", id="sparsity-negative"),
            pytest.param({"target_sparsity": 1.5}, "1.5", id="sparsity-above-one"),
            pytest.param({"target_sparsity": math.nan}, "nan", id="sparsity-nan"),
            pytest.param({"stretch": (0.0, 1.5)}, "(0.0, 1.5)", id="stretch-left-zero"),
            pytest.param({"stretch": (0.2, 1.5)}, "(0.2, 1.5)", id="stretch-left-positive"),
            pytest.param({"stretch": (-1.5, 1.0)}, "(-1.5, 1.0)", id="stretch-right-one"),
            pytest.param({"stretch": (-1.5, 0.5)}, "(-1.5, 0.5)", id="stretch-right-below-one"),
            pytest.param({"stretch": (-1.5, math.inf)}, "(-1.5, inf)", id="stretch-infinite"),
            pytest.param({"stretch": (-1.5, 0.0, 1.5)}, "(-1.5, 0.0, 1.5)", id="stretch-three-values"),
            pytest.param({"alpha_init": math.nan}, "nan", id="alpha-nan"),
            pytest.param({"alpha_init": math.inf}, "inf", id="alpha-inf"),
            pytest.param({"alpha_init": -math.inf}, "-inf", id="alpha-minus-inf"),
            pytest.param({"l0_lambda": math.nan}, "nan", id="lambda-nan"),
            pytest.param({"l0_lambda": math.inf}, "inf", id="lambda-inf"),
            pytest.param({"l0_lambda": -1e-7}, "-1e-07", id="lambda-negative"),
            pytest.param({"group_penalty": "mean"}, "'mean'", id="group-penalty"),
            pytest.param({"kept_pattern": {"a.weight": -1}}, "-1", id="kept-pattern-negative"),
        ],
    )
    def test_bad_value_raises_value_error_naming_it(self, kwargs, bad_value):
        with pytest.raises(ValueError) as error:
            DiffPruningConfig(**kwargs)
        assert bad_value in str(error.value)
        assert next(iter(kwargs)) in str(error.value)


class TestRegistration:
    def test_peft_type_member(self):
        assert PeftType.DIFF_PRUNING is PeftType["DIFF_PRUNING"]
        assert PeftType("DIFF_PRUNING") is PeftType.DIFF_PRUNING
        assert PeftType.DIFF_PRUNING == "DIFF_PRUNING"
        assert PeftType.DIFF_PRUNING in list(PeftType)

    def test_import_twice_and_reload(self):
        import peft_diffprune as again

        assert again is peft_diffprune
        reloaded = importlib.reload(peft_diffprune)
        assert reloaded.DiffPruningConfig is DiffPruningConfig
        assert DiffPruningConfig().peft_type == PeftType.DIFF_PRUNING
        assert list(PeftType).count(PeftType.DIFF_PRUNING) == 1

    def test_reload_submodules(self):
        # in a subprocess: a failing reload would leave this process with two DiffPruningConfig classes
        code = (
            "import importlib, peft_diffprune, peft_diffprune.diff_pruning.config, peft_diffprune.diff_pruning.model\n"
            "importlib.reload(peft_diffprune.diff_pruning.config)\n"
            "importlib.reload(peft_diffprune.diff_pruning.model)\n"
            "importlib.reload(peft_diffprune)\n"
            "from peft import PeftConfig\n"
            "from peft.mapping import PEFT_TYPE_TO_CONFIG_MAPPING\n"
            "assert PEFT_TYPE_TO_CONFIG_MAPPING['DIFF_PRUNING'] is peft_diffprune.DiffPruningConfig\n"
        )
        result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr[-2000:]

    def test_save_and_load_round_trip(self, tmp_path):
        config = DiffPruningConfig(
            target_modules=["query", "value"],
            exclude_modules=["layer.1.attention.self.query"],
            modules_to_save=["classifier"],
            target_sparsity=0.01,
            l0_lambda=1e-6,
            alpha_init=3.0,
            stretch=(-0.1, 1.1),
            structured=True,
            group_penalty="sum",
            init_weights=False,
            task_type="SEQ_CLS",
        )
        config.save_pretrained(tmp_path)

        loaded = PeftConfig.from_pretrained(tmp_path)

        assert isinstance(loaded, DiffPruningConfig)
        assert loaded.peft_type == PeftType.DIFF_PRUNING
        assert loaded.to_dict() == config.to_dict()
        assert loaded.stretch == (-0.1, 1.1)
        assert loaded.target_modules == {"query", "value"}
        assert DiffPruningConfig.from_pretrained(tmp_path).to_dict() == config.to_dict()


def wrap_bert(**config_kwargs) -> nn.Module:
    return get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(task_type="SEQ_CLS", **config_kwargs))


class TestTargetModules:
    @pytest.mark.parametrize("target_modules", [["not_a_module"], r".*not_a_module"], ids=["list", "regex"])
    def test_no_match_raises_naming_the_targets(self, target_modules):
        with pytest.raises(NoMatchingPeftModuleError, match="not_a_module"):
            get_peft_model(MODEL_CASES["bert"].model(), DiffPruningConfig(target_modules=target_modules))

    def test_no_match_with_task_head_raises(self):
        # with a task head in modules_to_save PEFT's message is a generic one (the same for LoRA)
        with pytest.raises(ValueError, match="No modules were targeted"):
            wrap_bert(target_modules=["not_a_module"])

    @pytest.mark.parametrize(
        "target, module_name, type_name",
        [
            pytest.param("pooler.activation", "bert.pooler.activation", "Tanh", id="tanh"),
            pytest.param("embeddings.dropout", "bert.embeddings.dropout", "Dropout", id="dropout"),
            pytest.param("layer.0.attention", "bert.encoder.layer.0.attention", "BertAttention", id="block"),
        ],
    )
    def test_unsupported_module_raises_type_error(self, target, module_name, type_name):
        with pytest.raises(TypeError) as error:
            wrap_bert(target_modules=[target])
        assert module_name in str(error.value) and type_name in str(error.value)

    @pytest.mark.filterwarnings("ignore:Model has `tie_word_embeddings=True`")
    @pytest.mark.parametrize("target", ["lm_head", "wte"])
    def test_tied_module_raises(self, target):
        with pytest.raises(ValueError, match="tied weights"):
            get_peft_model(MODEL_CASES["gpt2"].model(), DiffPruningConfig(target_modules=[target]))

    def test_tied_modules_share_one_diff_by_default(self):
        model = get_peft_model(MODEL_CASES["gpt2"].model(), DiffPruningConfig(task_type="CAUSAL_LM"))
        names = [name for name, _ in model.named_parameters()]
        assert any("wte.diff_pruning_state" in name for name in names)
        assert not any("lm_head.diff_pruning_state" in name for name in names)  # it applies the embedding's diff
        assert isinstance(model.base_model.model.lm_head, DiffPruningLayer)
        assert any("wpe.diff_pruning_state" in name for name in names)

    def test_exclude_modules(self):
        model = wrap_bert(exclude_modules=["query", "word_embeddings"])
        diffs = [name for name, _ in model.named_parameters() if name.endswith("_diff")]
        assert diffs and not any(".query." in name or "word_embeddings" in name for name in diffs)
        assert any(".key." in name for name in diffs)

    def test_nothing_wrappable_raises(self):
        model = nn.Sequential(nn.ReLU(), nn.Dropout())
        with pytest.raises(ValueError, match="target_modules"):
            get_peft_model(model, DiffPruningConfig())

    def test_custom_model_with_explicit_targets(self):
        torch.manual_seed(0)
        model = nn.Sequential(nn.Linear(4, 5), nn.ReLU(), nn.Linear(5, 2))
        peft_model = get_peft_model(model, DiffPruningConfig(target_modules=["0"]))
        trainable = {name for name, param in peft_model.named_parameters() if param.requires_grad}
        assert trainable == {
            f"base_model.model.0.diff_pruning_state.default.{tensor}_{kind}"
            for tensor in ("weight", "bias")
            for kind in ("diff", "alpha")
        }
