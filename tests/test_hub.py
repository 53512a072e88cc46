"""Tests for sharing sparse adapters through the Hugging Face Hub, without a network.

`push_to_hub` is intercepted at huggingface_hub's API layer: in this transformers version `PeftModel.push_to_hub`
(transformers' `PushToHubMixin`) calls `HfApi.create_repo`, reads an existing model card through
`huggingface_hub.repocard.hf_hub_download`, saves into a temporary folder and uploads it with one
`HfApi.create_commit`. Loading from the Hub is tested against a cache laid out as huggingface_hub writes it
(`models--<org>--<name>/{blobs,snapshots/<commit>,refs/main}`), read in a fresh process with `HF_HUB_OFFLINE=1`
and `HF_HUB_CACHE` pointing at it.
"""

import hashlib
import json
import socket
from pathlib import Path

import huggingface_hub
import huggingface_hub.repocard
import pytest
import torch
from _sparse_helpers import HEAD, logits, make_adapter, make_batch, run_fresh, tiny_bert
from huggingface_hub import HfApi
from huggingface_hub.errors import EntryNotFoundError
from transformers import AutoModelForSequenceClassification

from peft_diffprune import sparsity_report
from peft_diffprune.integrity import file_metadata, verify_file
from peft_diffprune.serialization import LABELS_KEY


REPO_ID = "diffprune-tests/tiny-sst2"
DAMAGED_REPO_ID = "diffprune-tests/tiny-sst2-damaged"
LABELS = {0: "negative", 1: "neutral", 2: "positive"}
COMMIT = "4f3c2b1a0e9d8c7b6a5f4e3d2c1b0a9f8e7d6c5b"


class HubRecorder:
    """Stands in for the Hub: records repo creation and the files of every commit."""

    def __init__(self):
        self.created: list[dict] = []
        self.commits: list[dict] = []

    def create_repo(self, repo_id, **kwargs):
        self.created.append({"repo_id": repo_id, **kwargs})

        class RepoUrl(str):
            pass

        url = RepoUrl(f"https://huggingface.co/{repo_id}")
        url.repo_id = repo_id
        return url

    def create_commit(self, repo_id, operations, **kwargs):
        files = {}
        for operation in operations:
            source = operation.path_or_fileobj
            files[operation.path_in_repo] = Path(source).read_bytes() if isinstance(source, str) else bytes(source)
        self.commits.append({"repo_id": repo_id, "files": files, **kwargs})
        return f"https://huggingface.co/{repo_id}/commit/{COMMIT}"


def refuse(name):
    def call(*args, **kwargs):
        raise AssertionError(f"{name} must not be called by push_to_hub")

    return call


@pytest.fixture(scope="module")
def pushed(tmp_path_factory):
    root = tmp_path_factory.mktemp("hub")
    tiny_bert(0).save_pretrained(root / "base")
    base = AutoModelForSequenceClassification.from_pretrained(root / "base").eval()
    base.config.id2label, base.config.label2id = LABELS, {name: i for i, name in LABELS.items()}
    model = make_adapter(base, seed=1, values_dtype="float16")
    model.save_pretrained(root / "local")

    hub = HubRecorder()
    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(HfApi, "create_repo", lambda api, *args, **kwargs: hub.create_repo(*args, **kwargs))
        patch.setattr(HfApi, "create_commit", lambda api, *args, **kwargs: hub.create_commit(*args, **kwargs))
        for name in ("upload_folder", "upload_file", "create_branch"):
            patch.setattr(HfApi, name, refuse(name))

        def no_card_yet(*args, **kwargs):
            raise EntryNotFoundError("README.md not found (new repository)")

        patch.setattr(huggingface_hub.repocard, "hf_hub_download", no_card_yet)

        def no_network(*args, **kwargs):
            raise OSError("network access in a test")

        patch.setattr(socket, "create_connection", no_network)
        patch.setattr(socket.socket, "connect", no_network)
        model.push_to_hub(REPO_ID)
    torch.save(make_batch(), root / "batch.pt")
    return {"root": root, "model": model, "hub": hub, "reference": logits(model)}


class TestPushToHub:
    def test_one_commit_with_the_adapter_files(self, pushed):
        hub = pushed["hub"]
        assert [c["repo_id"] for c in hub.created] == [REPO_ID]
        assert hub.created[0]["exist_ok"] is True
        assert len(hub.commits) == 1 and hub.commits[0]["repo_id"] == REPO_ID
        assert sorted(hub.commits[0]["files"]) == ["README.md", "adapter_config.json", "adapter_model.safetensors"]

    def test_uploaded_adapter_is_the_sparse_one_save_pretrained_writes(self, pushed):
        files = pushed["hub"].commits[0]["files"]
        local = pushed["root"] / "local"
        assert files["adapter_model.safetensors"] == (local / "adapter_model.safetensors").read_bytes()
        config = json.loads(files["adapter_config.json"])
        assert config == json.loads((local / "adapter_config.json").read_text())
        assert config["kept_pattern"] == pushed["model"].peft_config["default"].kept_pattern
        assert config["values_dtype"] == "float16" and config["format_version"] == 1

        from safetensors.torch import load

        tensors = load(files["adapter_model.safetensors"])
        for key, tensor in tensors.items():
            if key.endswith("_positions"):
                assert tensor.dtype == torch.uint8
            elif key.endswith("_values"):
                assert tensor.dtype == torch.float16
            else:
                assert key.startswith(f"base_model.model.{HEAD}."), key
        assert (
            sum(t.numel() for k, t in tensors.items() if k.endswith("_values"))
            == sparsity_report(pushed["model"]).kept
        )

    def test_uploaded_weights_carry_checksums_and_labels(self, pushed, tmp_path):
        path = tmp_path / "adapter_model.safetensors"
        path.write_bytes(pushed["hub"].commits[0]["files"]["adapter_model.safetensors"])
        assert verify_file(path) is True
        assert json.loads(file_metadata(path)[LABELS_KEY])["id2label"] == {str(i): n for i, n in LABELS.items()}

    def test_model_card_describes_the_sparse_adapter(self, pushed):
        card = pushed["hub"].commits[0]["files"]["README.md"].decode()
        report = sparsity_report(pushed["model"])
        assert str(pushed["root"] / "base") in card  # base model
        assert "SEQ_CLS" in card  # task
        assert "Target sparsity: 5.0000%" in card
        assert f"Kept entries: {report.kept:,}" in card
        assert "bytes per kept entry" in card
        assert "density" in card and "bert.encoder.layer.0" in card  # per-layer density
        assert "import peft_diffprune" in card


# ----------------------------------------------------------------------------------------------------------------
# loading from a Hub cache


def git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def write_hub_cache(cache: Path, repo_id: str, files: dict[str, bytes]) -> Path:
    """Lay files out as huggingface_hub's cache does: content in `blobs/<etag>` (sha256 for LFS files, the git blob
    sha1 otherwise), `snapshots/<commit>/<name>` symlinks to them, and `refs/main` holding the commit hash."""
    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / COMMIT
    (repo / "blobs").mkdir(parents=True)
    snapshot.mkdir(parents=True)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(COMMIT)
    for name, data in files.items():
        etag = hashlib.sha256(data).hexdigest() if name.endswith(".safetensors") else git_blob_sha1(data)
        (repo / "blobs" / etag).write_bytes(data)
        (snapshot / name).symlink_to(Path("..") / ".." / "blobs" / etag)
    return repo


HUB_SCRIPT = r"""
import sys
from pathlib import Path

import huggingface_hub.constants as constants
import torch
from transformers import AutoModelForSequenceClassification

root, repo_id, commit = Path(sys.argv[1]), sys.argv[2], sys.argv[3]
assert constants.HF_HUB_OFFLINE, "HF_HUB_OFFLINE was not picked up"
assert Path(constants.HF_HUB_CACHE) == root / "cache", constants.HF_HUB_CACHE

import peft_diffprune  # noqa: F401
from peft import AutoPeftModelForSequenceClassification, PeftModel

inputs = torch.load(root / "batch.pt")
results = {}

def base():
    return AutoModelForSequenceClassification.from_pretrained(root / "base").eval()

@torch.no_grad()
def out(model):
    return model.eval()(**inputs).logits

model = PeftModel.from_pretrained(base(), repo_id)
results["peft"], results["peft_labels"] = out(model), model.config.id2label
results["peft_at_commit"] = out(PeftModel.from_pretrained(base(), repo_id, revision=commit))
model = AutoPeftModelForSequenceClassification.from_pretrained(repo_id)
results["auto"], results["auto_labels"] = out(model), model.config.id2label
try:
    PeftModel.from_pretrained(base(), repo_id + "-damaged")
    results["damaged"] = None
except Exception as error:
    results["damaged"] = (type(error).__name__, str(error))
try:
    PeftModel.from_pretrained(base(), "diffprune-tests/not-in-cache")
    results["missing"] = None
except Exception as error:
    results["missing"] = type(error).__name__
torch.save(results, root / "hub_results.pt")
"""


@pytest.mark.slow
def test_load_from_hub_cache_offline_in_fresh_process(pushed):
    root = pushed["root"]
    files = pushed["hub"].commits[0]["files"]
    files = {k: v for k, v in files.items() if k != "README.md"}
    write_hub_cache(root / "cache", REPO_ID, files)
    damaged = bytearray(files["adapter_model.safetensors"])
    damaged[-1] ^= 0x10  # the last byte of the last tensor's data
    write_hub_cache(root / "cache", DAMAGED_REPO_ID, {**files, "adapter_model.safetensors": bytes(damaged)})

    run_fresh(
        HUB_SCRIPT,
        str(root),
        REPO_ID,
        COMMIT,
        env={"HF_HUB_OFFLINE": "1", "HF_HUB_CACHE": str(root / "cache"), "HF_HOME": str(root / "hf_home")},
    )
    results = torch.load(root / "hub_results.pt")

    for key in ("peft", "peft_at_commit", "auto"):
        torch.testing.assert_close(results[key], pushed["reference"], rtol=0, atol=1e-6, msg=key)
    assert not torch.allclose(results["peft"], logits(tiny_bert(0)), atol=1e-3)
    # an id that is not cached fails offline instead of reaching for the network
    assert results["missing"] is not None
    # the label names travel with the weights; a damaged download is refused
    assert results["peft_labels"] == results["auto_labels"] == LABELS
    name, message = results["damaged"]
    assert (
        name == "AdapterChecksumError"
        and "fails its checksum" in message
        and "models--diffprune-tests--tiny-sst2-damaged" in message
    )


def test_hub_cache_layout_resolves_like_huggingface_hub(pushed, tmp_path):
    # the layout written above is the one huggingface_hub itself reads
    files = pushed["hub"].commits[0]["files"]
    write_hub_cache(tmp_path, REPO_ID, files)
    for name, data in files.items():
        path = huggingface_hub.try_to_load_from_cache(REPO_ID, name, cache_dir=tmp_path)
        assert isinstance(path, str) and Path(path).read_bytes() == data
        assert Path(path).parent.name == COMMIT
    assert huggingface_hub.try_to_load_from_cache(REPO_ID, "pytorch_model.bin", cache_dir=tmp_path) is None
    info = huggingface_hub.scan_cache_dir(tmp_path)
    (repo,) = info.repos
    assert repo.repo_id == REPO_ID and {f.file_name for r in repo.revisions for f in r.files} == set(files)
