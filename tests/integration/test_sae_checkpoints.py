"""A training run that crashes midway (in a training step, or in the middle of writing a checkpoint)
leaves its last complete checkpoint loadable with the weights it had, and no half-written folder that
looks like a checkpoint; an interrupted run (SIGINT/SIGTERM) saves a full checkpoint that resumes;
truncated weight files give clear errors.

The crashes are simulated with pytest's ``monkeypatch`` on SAELens's trainer and safetensors' writer,
for the duration of one test only."""

from pathlib import Path

import pytest
import sae_lens.saes.sae as sae_module
import torch
from sae_lens import SAE, TrainingSAE
from sae_lens.training.sae_trainer import SAETrainer
from safetensors import SafetensorError

import writesae_lens.saes  # noqa: F401  (registers the architectures)
from hooked_ssm import HookedSSM
from writesae_lens.registry import checked_disk_loader
# checkpointed_runner trains a writesae on the write factors: its SAE is a WriteFactorsTrainingSAE.
from writesae_lens.saes import WriteFactorsTrainingSAE as WriteTrainingSAE
from writesae_lens.training import build_runner

LAYER, HEAD, BATCH = 1, 2, 64
# 40 steps of 64 tokens, 3 checkpoints: SAELens saves once n_training_samples passes 640, 1280, 1920.
CHECKPOINTS = ["704", "1344", "1984"]
CHECKPOINT_FILES = {
    "cfg.json", "sae_weights.safetensors", "sparsity.safetensors", "trainer_state.pt", "activation_scaler.json",
    "activations_store_state.safetensors", "runner_cfg.json",
}


@pytest.fixture(scope="module")
def model(qwen35):
    return HookedSSM.from_pretrained(qwen35[0])


def checkpointed_runner(model, dataset, tmp_path, steps=40, **kwargs):
    return build_runner(
        model, dataset, LAYER, HEAD, "write", d_sae=32, k=4, training_tokens=BATCH * steps, context_size=32,
        train_batch_size_tokens=BATCH, checkpoint_path=str(tmp_path / "ckpt"), n_checkpoints=3, **kwargs,
    )


def record_saved_weights(monkeypatch, crash_on_call=None):
    """Spy on SAELens's trainer: record the SAE's weights at each checkpoint; optionally crash while
    writing checkpoint number ``crash_on_call`` (after its weights and sparsity, before its trainer state)."""
    saved = []
    real = SAETrainer.save_trainer_state

    def save_trainer_state(self, checkpoint_path):
        saved.append({name: value.detach().clone() for name, value in self.sae.state_dict().items()})
        if len(saved) == crash_on_call:
            raise OSError("simulated crash while writing a checkpoint")
        return real(self, checkpoint_path)

    monkeypatch.setattr(SAETrainer, "save_trainer_state", save_trainer_state)
    return saved


def entries(base: Path) -> set[str]:
    """Everything in the checkpoint folder, hidden staging folders included."""
    return {p.name for p in base.iterdir()}


def assert_loads_with(folder: Path, weights: dict[str, torch.Tensor]) -> None:
    assert {p.name for p in folder.iterdir()} == CHECKPOINT_FILES
    for cls in (SAE, TrainingSAE):
        loaded = cls.load_from_disk(folder)
        assert loaded.reads_write_factors  # a training checkpoint: the factor-input form
        state = loaded.state_dict()
        assert state.keys() == weights.keys()
        for name, value in weights.items():
            assert torch.equal(state[name], value), name
    assert SAE.load_from_disk(folder).to_write_site().cfg.metadata.hook_name == f"blocks.{LAYER}.mixer.hook_write"


def test_crash_while_writing_a_checkpoint_keeps_the_previous_one(model, dataset, tmp_path, monkeypatch):
    saved = record_saved_weights(monkeypatch, crash_on_call=2)
    runner = checkpointed_runner(model, dataset, tmp_path)
    with pytest.raises(OSError, match="simulated crash"):
        runner.run()
    base = Path(runner.cfg.checkpoint_path)
    assert entries(base) == {CHECKPOINTS[0]}  # no half-written "1344", no staging left behind
    assert_loads_with(base / CHECKPOINTS[0], saved[0])


def test_crash_in_the_middle_of_the_weights_file(model, dataset, tmp_path, monkeypatch):
    saved = record_saved_weights(monkeypatch)
    calls = []
    real_save_file = sae_module.save_file

    def save_file(tensors, filename, *args, **kwargs):
        calls.append(filename)
        real_save_file(tensors, filename, *args, **kwargs)
        if len(calls) == 2:  # the second checkpoint's weights: leave half a file and die
            data = Path(filename).read_bytes()
            Path(filename).write_bytes(data[: len(data) // 2])
            raise OSError("simulated crash while writing sae_weights.safetensors")

    monkeypatch.setattr(sae_module, "save_file", save_file)
    runner = checkpointed_runner(model, dataset, tmp_path)
    with pytest.raises(OSError, match="simulated crash"):
        runner.run()
    base = Path(runner.cfg.checkpoint_path)
    assert entries(base) == {CHECKPOINTS[0]}
    assert_loads_with(base / CHECKPOINTS[0], saved[0])


def test_exception_in_a_later_training_step(model, dataset, tmp_path, monkeypatch):
    saved = record_saved_weights(monkeypatch)
    real = WriteTrainingSAE.training_forward_pass
    steps = []

    def training_forward_pass(self, step_input):
        steps.append(step_input.n_training_steps)
        if len(steps) == 30:  # after the checkpoints at steps 11 and 21
            raise RuntimeError("simulated failure in a training step")
        return real(self, step_input)

    monkeypatch.setattr(WriteTrainingSAE, "training_forward_pass", training_forward_pass)
    runner = checkpointed_runner(model, dataset, tmp_path)
    with pytest.raises(RuntimeError, match="simulated failure"):
        runner.run()
    base = Path(runner.cfg.checkpoint_path)
    assert entries(base) == set(CHECKPOINTS[:2])
    assert_loads_with(base / CHECKPOINTS[1], saved[1])


def test_interrupted_run_saves_a_full_checkpoint_that_resumes(model, dataset, tmp_path, monkeypatch):
    saved = record_saved_weights(monkeypatch)
    real = WriteTrainingSAE.training_forward_pass
    steps = []

    def training_forward_pass(self, step_input):
        steps.append(step_input.n_training_steps)
        if len(steps) == 15:  # SAELens's SIGINT handler raises from wherever training is
            raise KeyboardInterrupt
        return real(self, step_input)

    monkeypatch.setattr(WriteTrainingSAE, "training_forward_pass", training_forward_pass)
    runner = checkpointed_runner(model, dataset, tmp_path)
    with pytest.raises(KeyboardInterrupt):
        runner.run()
    base = Path(runner.cfg.checkpoint_path)
    # SAELens alone would save only the activation store's state under "960"; here it is complete.
    assert entries(base) == {CHECKPOINTS[0], "960"}
    assert_loads_with(base / "960", saved[-1])
    scale = runner.sae.cfg.write_scale

    monkeypatch.setattr(WriteTrainingSAE, "training_forward_pass", real)
    resumed = checkpointed_runner(model, dataset, tmp_path / "resumed", resume_from_checkpoint=str(base / "960"))
    sae = resumed.run()
    assert resumed.sae.cfg.write_scale == scale  # the checkpoint's, not a fresh estimate
    assert not sae.reads_write_factors and torch.isfinite(sae.W_dec).all()


def test_truncated_weights_give_clear_errors(model, dataset, tmp_path):
    runner = checkpointed_runner(model, dataset, tmp_path, steps=12)
    runner.run()
    folder = min(Path(runner.cfg.checkpoint_path).iterdir(), key=lambda p: int(p.name))
    weights = folder / "sae_weights.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])

    # SAELens's own loader reports it (safetensors' message, which does not name the file) ...
    with pytest.raises(SafetensorError, match="incomplete metadata|file not fully covered"):
        SAE.load_from_disk(folder)
    # ... writesae_lens's loader names the file and the fix ...
    with pytest.raises(ValueError, match=r"sae_weights\.safetensors is not a readable safetensors file.*re-save"):
        SAE.load_from_disk(folder, converter=checked_disk_loader)
    # ... and so does resuming from it.
    resumed = checkpointed_runner(model, dataset, tmp_path / "resumed", steps=12, resume_from_checkpoint=str(folder))
    with pytest.raises(ValueError, match=r"checkpoint weights .*sae_weights\.safetensors are not a readable.*earlier checkpoint"):
        resumed.run()
