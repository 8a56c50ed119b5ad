"""Bad checkpoints and bad inputs fail with errors that name the problem and the fix."""

import json
import shutil

import pytest
import torch

from hooked_ssm import CheckpointError, HookedSSM


@pytest.fixture
def checkpoint_copy(qwen35, tmp_path):
    directory = tmp_path / "ckpt"
    shutil.copytree(qwen35[0], directory)
    return directory


def test_truncated_safetensors_is_reported(checkpoint_copy):
    weights = checkpoint_copy / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    with pytest.raises(CheckpointError, match="truncated or corrupt"):
        HookedSSM.from_pretrained(checkpoint_copy)


def test_unsupported_architecture_lists_the_supported_ones(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["architectures"] = ["LlamaForCausalLM"]
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="Unsupported architecture.*Qwen3_5ForCausalLM"):
        HookedSSM.from_pretrained(checkpoint_copy)


def test_missing_weights_and_config_are_reported(checkpoint_copy, tmp_path):
    (checkpoint_copy / "model.safetensors").unlink()
    with pytest.raises(CheckpointError, match="no \\*.safetensors"):
        HookedSSM.from_pretrained(checkpoint_copy)
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="no config.json"):
        HookedSSM.from_pretrained(tmp_path / "empty")


def test_checkpoint_that_does_not_match_its_config(checkpoint_copy):
    config = json.loads((checkpoint_copy / "config.json").read_text())
    config["num_hidden_layers"] += 1
    config["layer_types"].append("linear_attention")
    (checkpoint_copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing the tensor 'model.layers.5"):
        HookedSSM.from_pretrained(checkpoint_copy)


def test_not_a_model_name(tmp_path):
    with pytest.raises(CheckpointError, match="neither a local checkpoint directory"):
        HookedSSM.from_pretrained("no-such-model")


def test_token_ids_out_of_range(qwen35):
    model = HookedSSM.from_pretrained(qwen35[0])
    with pytest.raises(ValueError, match=r"Token ids must lie in \[0, 300\)"):
        model(torch.tensor([[1, 2, 300]]))
    with pytest.raises(TypeError, match="integer tensor"):
        model(torch.tensor([[1.0, 2.0]]))


def test_hub_ids_are_fetched_with_huggingface_hub(qwen35, monkeypatch):
    """A Hub id goes through snapshot_download (which honours HF_HUB_OFFLINE); no other network access."""
    import huggingface_hub

    requested = []

    def fake_snapshot_download(repo_id, allow_patterns=None, **kwargs):
        requested.append((repo_id, allow_patterns))
        return str(qwen35[0])

    monkeypatch.setattr(huggingface_hub, "snapshot_download", fake_snapshot_download)
    model = HookedSSM.from_pretrained("Qwen/Qwen3.5-0.8B")
    assert requested[0][0] == "Qwen/Qwen3.5-0.8B" and "*.safetensors" in requested[0][1]
    assert model.cfg.model_name == "Qwen/Qwen3.5-0.8B"
