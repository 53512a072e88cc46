"""GLUE data and metric helpers shared by the examples and the benchmarks.

Each task loads either from the Hub (`nyu-mll/glue`) or from a local folder in the GLUE download layout, with the same
schema either way. The metrics follow `evaluate`'s `glue` metric, which is a Hub script and so is not available offline.
"""

from __future__ import annotations

import csv
import logging
import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import datasets
import numpy as np


if TYPE_CHECKING:
    from accelerate import Accelerator
    from numpy.typing import ArrayLike
    from torch import nn
    from transformers import PreTrainedTokenizerBase


logger = logging.getLogger(__name__)

GLUE_HUB_DATASET = "nyu-mll/glue"


@dataclass(frozen=True)
class GlueTask:
    """Static description of one GLUE task.

    Args:
        name: Config name on the Hub, e.g. `"sst2"`.
        folder: Folder of the task in the GLUE download layout, e.g. `"SST-2"`.
        text_columns: Text columns as named on the Hub, in the order they are fed to the tokenizer.
        label_names: Class names in the Hub's label order; empty for the regression task (STS-B).
        eval_splits: Splits used for evaluation (MNLI has a matched and a mismatched one).
        metric_names: Keys returned by `compute_glue_metrics`, as `evaluate`'s `glue` metric names them.
        main_metric: The metric to select checkpoints on and to report.
        tsv_text_columns: Columns of the local tsv files holding `text_columns`, in the same order.
        tsv_label_column: Column of the local tsv files holding the label.
        tsv_column_names: Column names for local files that have no header row (CoLA), else `None`.
    """

    name: str
    folder: str
    text_columns: tuple[str, ...]
    label_names: tuple[str, ...]
    eval_splits: tuple[str, ...]
    metric_names: tuple[str, ...]
    main_metric: str
    tsv_text_columns: tuple[str, ...]
    tsv_label_column: str
    tsv_column_names: tuple[str, ...] | None = None

    @property
    def is_regression(self) -> bool:
        return not self.label_names

    @property
    def num_labels(self) -> int:
        return len(self.label_names) or 1

    @property
    def features(self) -> datasets.Features:
        """The Hub's schema for this task: text columns, `label` (class index, or float for STS-B), `idx`."""
        features = {column: datasets.Value("string") for column in self.text_columns}
        if self.is_regression:
            features["label"] = datasets.Value("float32")
        else:
            features["label"] = datasets.ClassLabel(names=list(self.label_names))
        features["idx"] = datasets.Value("int32")
        return datasets.Features(features)


_NLI_2 = ("entailment", "not_entailment")
_ACCURACY = ("accuracy",)
_ACCURACY_F1 = ("accuracy", "f1")

# Main metrics follow the BERT paper (and the diff pruning paper, which reports the same ones): MCC for CoLA, F1 for
# MRPC and QQP, Spearman for STS-B, accuracy for the rest.
GLUE_TASKS: dict[str, GlueTask] = {
    task.name: task
    for task in (
        GlueTask(
            name="cola",
            folder="CoLA",
            text_columns=("sentence",),
            label_names=("unacceptable", "acceptable"),
            eval_splits=("validation",),
            metric_names=("matthews_correlation",),
            main_metric="matthews_correlation",
            tsv_text_columns=("sentence",),
            tsv_label_column="label",
            tsv_column_names=("source", "label", "original_label", "sentence"),
        ),
        GlueTask(
            name="sst2",
            folder="SST-2",
            text_columns=("sentence",),
            label_names=("negative", "positive"),
            eval_splits=("validation",),
            metric_names=_ACCURACY,
            main_metric="accuracy",
            tsv_text_columns=("sentence",),
            tsv_label_column="label",
        ),
        GlueTask(
            name="mrpc",
            folder="MRPC",
            text_columns=("sentence1", "sentence2"),
            label_names=("not_equivalent", "equivalent"),
            eval_splits=("validation",),
            metric_names=_ACCURACY_F1,
            main_metric="f1",
            tsv_text_columns=("#1 String", "#2 String"),
            tsv_label_column="Quality",
        ),
        GlueTask(
            name="qqp",
            folder="QQP",
            text_columns=("question1", "question2"),
            label_names=("not_duplicate", "duplicate"),
            eval_splits=("validation",),
            metric_names=_ACCURACY_F1,
            main_metric="f1",
            tsv_text_columns=("question1", "question2"),
            tsv_label_column="is_duplicate",
        ),
        GlueTask(
            name="stsb",
            folder="STS-B",
            text_columns=("sentence1", "sentence2"),
            label_names=(),
            eval_splits=("validation",),
            metric_names=("pearson", "spearmanr"),
            main_metric="spearmanr",
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="score",
        ),
        GlueTask(
            name="mnli",
            folder="MNLI",
            text_columns=("premise", "hypothesis"),
            label_names=("entailment", "neutral", "contradiction"),
            eval_splits=("validation_matched", "validation_mismatched"),
            metric_names=_ACCURACY,
            main_metric="accuracy",
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="gold_label",
        ),
        GlueTask(
            name="qnli",
            folder="QNLI",
            text_columns=("question", "sentence"),
            label_names=_NLI_2,
            eval_splits=("validation",),
            metric_names=_ACCURACY,
            main_metric="accuracy",
            tsv_text_columns=("question", "sentence"),
            tsv_label_column="label",
        ),
        GlueTask(
            name="rte",
            folder="RTE",
            text_columns=("sentence1", "sentence2"),
            label_names=_NLI_2,
            eval_splits=("validation",),
            metric_names=_ACCURACY,
            main_metric="accuracy",
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="label",
        ),
        GlueTask(
            name="wnli",
            folder="WNLI",
            text_columns=("sentence1", "sentence2"),
            # Not the RTE/QNLI order: the WNLI files store 1 for entailment.
            label_names=("not_entailment", "entailment"),
            eval_splits=("validation",),
            metric_names=_ACCURACY,
            main_metric="accuracy",
            tsv_text_columns=("sentence1", "sentence2"),
            tsv_label_column="label",
        ),
    )
}


def get_glue_task(task_name: str) -> GlueTask:
    """Return the `GlueTask` for a Hub config name such as `"sst2"`, or raise a `ValueError` listing the valid ones."""
    if task_name not in GLUE_TASKS:
        raise ValueError(f"Unknown GLUE task {task_name!r}; choose one of: {', '.join(GLUE_TASKS)}.")
    return GLUE_TASKS[task_name]


def _local_files(task: GlueTask, data_dir: str | os.PathLike) -> dict[str, Path]:
    folder = Path(data_dir) / task.folder
    # The GLUE download names dev files after the Hub's validation splits: dev.tsv, dev_matched.tsv, ...
    files = {"train": folder / "train.tsv"}
    files.update({split: folder / f"dev{split.removeprefix('validation')}.tsv" for split in task.eval_splits})
    missing = [str(path) for path in files.values() if not path.is_file()]
    if missing:
        where = f"the folder {folder} does not exist" if not folder.is_dir() else f"missing {', '.join(missing)}"
        raise FileNotFoundError(
            f"No local GLUE data for {task.name!r}: {where}. Point `--data_dir` (or `GLUE_DIR`) at a folder in the "
            f"GLUE download layout, which holds {task.folder}/train.tsv and the dev file(s), or leave it unset to "
            f"load {GLUE_HUB_DATASET!r} from the Hub."
        )
    return files


def _label_parser(task: GlueTask, path: Path) -> Callable[[str], int | float | None]:
    def parse(value: str) -> int | float | None:
        # A truncated line leaves the label empty; the Hub's loader drops such rows, so we do too.
        if value == "":
            return None
        if task.is_regression:
            return float(value)
        if value in task.label_names:
            return task.label_names.index(value)
        if value.isdigit() and int(value) < task.num_labels:
            return int(value)
        raise ValueError(
            f"Unexpected label {value!r} in {path}: expected one of {list(task.label_names)} or an index below "
            f"{task.num_labels}. Is this the {task.folder} file of the GLUE download?"
        )

    return parse


def _to_hub_schema(raw: datasets.Dataset, task: GlueTask, path: Path) -> datasets.Dataset:
    parse_label = _label_parser(task, path)

    def convert(batch: dict[str, list], indices: list[int]) -> dict[str, list]:
        converted = {column: batch[tsv] for column, tsv in zip(task.text_columns, task.tsv_text_columns, strict=True)}
        converted["label"] = [parse_label(value) for value in batch[task.tsv_label_column]]
        # As on the Hub, idx is the row number in the file, counted before dropping rows without a label.
        converted["idx"] = indices
        return converted

    dataset = raw.map(
        convert, batched=True, with_indices=True, remove_columns=raw.column_names, features=task.features
    )
    num_rows = dataset.num_rows
    dataset = dataset.filter(
        lambda labels: [label is not None for label in labels], input_columns="label", batched=True
    )
    if dataset.num_rows < num_rows:
        logger.warning(f"Dropped {num_rows - dataset.num_rows} rows without a label from {path}.")
    return dataset


def load_glue(task_name: str, data_dir: str | os.PathLike | None = None) -> datasets.DatasetDict:
    """Load the train and evaluation splits of a GLUE task with the schema of the Hub's `nyu-mll/glue`.

    Args:
        task_name: Hub config name, one of `GLUE_TASKS`.
        data_dir: Folder in the GLUE download layout (`<data_dir>/SST-2/train.tsv`, `dev.tsv`, ...). If `None`, the
            task is loaded from the Hub.

    Returns:
        A `DatasetDict` with `train` and the task's `eval_splits`, each with the columns of `GlueTask.features`. From
        local files, `idx` is the row number in the file; the Hub's MRPC counts rows of the MSR source file instead.
    """
    task = get_glue_task(task_name)
    if data_dir is None:
        hub = datasets.load_dataset(GLUE_HUB_DATASET, task.name)
        # The Hub's test splits carry no labels; drop them so both sources give the same splits.
        return datasets.DatasetDict({split: hub[split] for split in ("train", *task.eval_splits)})

    files = _local_files(task, data_dir)
    tsv_columns = [*task.tsv_text_columns, task.tsv_label_column]
    header = {"header": None, "column_names": list(task.tsv_column_names)} if task.tsv_column_names else {}
    # Going through the datasets csv builder (not pandas directly) gives local files the same Arrow-backed caching as
    # the Hub path.
    raw = datasets.load_dataset(
        "csv",
        data_files={split: str(path) for split, path in files.items()},
        delimiter="\t",
        # GLUE text contains unbalanced quote characters; quoting would merge rows.
        quoting=csv.QUOTE_NONE,
        # MRPC files start with a byte order mark. pandas' C parser drops it from plain utf-8 too, but naming the
        # encoding keeps it out of the first column name whatever parser datasets picks.
        encoding="utf-8-sig",
        # Sentences such as "NA" or "null" are text, not missing values.
        keep_default_na=False,
        usecols=tsv_columns,
        # Read every column as text so pandas' per-chunk type inference cannot turn a sentence like "1" into an int.
        features=datasets.Features({column: datasets.Value("string") for column in tsv_columns}),
        **header,
    )
    return datasets.DatasetDict({split: _to_hub_schema(raw[split], task, files[split]) for split in raw})


def tokenize_glue(
    dataset_dict: datasets.DatasetDict,
    tokenizer: PreTrainedTokenizerBase,
    task_name: str,
    max_length: int = 128,
) -> datasets.DatasetDict:
    """Tokenize a GLUE `DatasetDict` as returned by `load_glue` for training.

    Texts are truncated to `max_length` tokens and not padded (pad per batch in the collator). The result keeps the
    tokenizer's outputs and `labels`; the text columns, `idx` and any other columns are removed.
    """
    task = get_glue_task(task_name)
    if max_length < 1:
        raise ValueError(f"max_length must be a positive number of tokens, got {max_length}.")
    for split, dataset in dataset_dict.items():
        missing = [column for column in (*task.text_columns, "label") if column not in dataset.column_names]
        if missing:
            raise ValueError(
                f"Split {split!r} has no column(s) {missing} needed for {task.name!r} (it has {dataset.column_names}); "
                f"pass the output of load_glue({task.name!r}, ...) or the matching task name."
            )

    def tokenize(batch: dict[str, list]) -> dict[str, list]:
        return tokenizer(*(batch[column] for column in task.text_columns), truncation=True, max_length=max_length)

    tokenized = datasets.DatasetDict(
        {
            split: dataset.map(
                tokenize, batched=True, remove_columns=[column for column in dataset.column_names if column != "label"]
            )
            for split, dataset in dataset_dict.items()
        }
    )
    return tokenized.rename_column("label", "labels")


def predictions_from_logits(task_name: str, logits: ArrayLike) -> np.ndarray:
    """Turn model outputs of shape `(n, num_labels)` into predictions: the argmax class, or the score for STS-B."""
    task = get_glue_task(task_name)
    logits = np.asarray(logits)
    if logits.ndim != 2 or logits.shape[1] != task.num_labels:
        raise ValueError(
            f"Expected logits of shape (num_examples, {task.num_labels}) for {task.name!r}, got {logits.shape}; "
            f"check that the model was built with num_labels={task.num_labels}."
        )
    return logits[:, 0] if task.is_regression else logits.argmax(axis=-1)


def _accuracy(predictions: np.ndarray, references: np.ndarray) -> float:
    return float(np.mean(predictions == references))


def _f1(predictions: np.ndarray, references: np.ndarray) -> float:
    # F1 of the positive class 1, set to 0.0 when there are no positives at all, like sklearn's default.
    true_positives = np.sum((predictions == 1) & (references == 1))
    false_positives = np.sum((predictions == 1) & (references != 1))
    false_negatives = np.sum((predictions != 1) & (references == 1))
    denominator = 2 * true_positives + false_positives + false_negatives
    return float(2 * true_positives / denominator) if denominator else 0.0


def _matthews_correlation(predictions: np.ndarray, references: np.ndarray) -> float:
    # sklearn's multiclass formula; float64 counts because the squared sample count overflows int64 on large sets.
    _, codes = np.unique(np.concatenate([references, predictions]), return_inverse=True)
    num_classes = codes.max() + 1
    true_counts = np.bincount(codes[: len(references)], minlength=num_classes).astype(np.float64)
    pred_counts = np.bincount(codes[len(references) :], minlength=num_classes).astype(np.float64)
    num_samples = float(len(references))
    num_correct = float(np.sum(predictions == references))
    cov_true_pred = num_correct * num_samples - true_counts @ pred_counts
    cov_pred_pred = num_samples**2 - pred_counts @ pred_counts
    cov_true_true = num_samples**2 - true_counts @ true_counts
    if cov_pred_pred * cov_true_true == 0:
        # A constant prediction or reference carries no correlation; sklearn returns 0.0 here too.
        return 0.0
    return float(cov_true_pred / np.sqrt(cov_true_true * cov_pred_pred))


def _pearson(x: np.ndarray, y: np.ndarray) -> float:
    x = x.astype(np.float64)
    y = y.astype(np.float64)
    # scipy returns nan (with a warning) when either input is constant: the correlation is undefined.
    if np.all(x == x[0]) or np.all(y == y[0]):
        return float("nan")
    x_centered = x - x.mean()
    y_centered = y - y.mean()
    r = (x_centered / np.linalg.norm(x_centered)) @ (y_centered / np.linalg.norm(y_centered))
    return float(np.clip(r, -1.0, 1.0))


def _average_ranks(values: np.ndarray) -> np.ndarray:
    # 1-based ranks where tied values share the mean of their ranks, as scipy.stats.rankdata(method="average").
    order = np.argsort(values, kind="mergesort")
    sorted_values = values[order]
    starts_group = np.concatenate([[True], sorted_values[1:] != sorted_values[:-1]])
    group_of_sorted = np.cumsum(starts_group) - 1
    group_bounds = np.concatenate([np.flatnonzero(starts_group), [len(values)]])
    group_rank = (group_bounds[:-1] + group_bounds[1:] + 1) / 2
    ranks = np.empty(len(values), dtype=np.float64)
    ranks[order] = group_rank[group_of_sorted]
    return ranks


def _spearman(predictions: np.ndarray, references: np.ndarray) -> float:
    return _pearson(_average_ranks(predictions), _average_ranks(references))


_METRICS: dict[str, Callable[[np.ndarray, np.ndarray], float]] = {
    "accuracy": _accuracy,
    "f1": _f1,
    "matthews_correlation": _matthews_correlation,
    "pearson": _pearson,
    "spearmanr": _spearman,
}


def compute_glue_metrics(task_name: str, predictions: ArrayLike, references: ArrayLike) -> dict[str, float]:
    """Compute a task's metrics with the keys and definitions of `evaluate`'s `glue` metric, in plain numpy.

    CoLA gives `matthews_correlation`, STS-B `pearson` and `spearmanr` (both `nan` for constant inputs, as scipy's),
    MRPC and QQP `accuracy` and `f1` (of class 1), the other tasks `accuracy`. Predictions are class indices, or
    scores for STS-B (see `predictions_from_logits`).
    """
    task = get_glue_task(task_name)
    predictions = np.asarray(predictions)
    references = np.asarray(references)
    if predictions.ndim != 1 or predictions.shape != references.shape or predictions.size == 0:
        raise ValueError(
            f"predictions and references must be non-empty 1-D arrays of the same length, got shapes "
            f"{predictions.shape} and {references.shape}; for logits, use predictions_from_logits first."
        )
    return {name: _METRICS[name](predictions, references) for name in task.metric_names}


def evaluate_glue(
    accelerator: Accelerator, model: nn.Module, eval_dataloaders: dict, task: GlueTask
) -> dict[str, dict[str, float]]:
    """The task's metrics and mean loss on each evaluation split (`{split: dataloader}`), gathered over all processes.

    The loss is the cross-entropy (MSE for STS-B) of the logits, without any penalty the model adds in training mode.
    """
    import torch
    import torch.nn.functional as F

    model.eval()
    results = {}
    for split, dataloader in eval_dataloaders.items():
        logits, labels = [], []
        for batch in dataloader:
            with torch.no_grad():
                outputs = model(**batch)
            batch_logits, batch_labels = accelerator.gather_for_metrics((outputs.logits, batch["labels"]))
            logits.append(batch_logits.float().cpu())
            labels.append(batch_labels.cpu())
        logits, labels = torch.cat(logits), torch.cat(labels)
        metrics = compute_glue_metrics(task.name, predictions_from_logits(task.name, logits.numpy()), labels.numpy())
        if task.is_regression:
            metrics["loss"] = F.mse_loss(logits.squeeze(-1), labels.float()).item()
        else:
            metrics["loss"] = F.cross_entropy(logits, labels).item()
        results[split] = metrics
    model.train()
    return results


def label_maps(task: GlueTask) -> dict[str, dict]:
    """`id2label` and `label2id` of a classification task's label names, for the model config (empty for STS-B), so
    that a saved model or adapter answers `entailment` rather than `LABEL_0`."""
    if task.is_regression:
        return {}
    return {
        "id2label": dict(enumerate(task.label_names)),
        "label2id": {label: i for i, label in enumerate(task.label_names)},
    }
