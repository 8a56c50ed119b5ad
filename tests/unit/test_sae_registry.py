"""writesae_lens.registry: SAE.from_pretrained(release, sae_id) for bundled, Hub and user releases.

Everything is offline: Hub loading is served from a local folder or a hand-built HF cache, and
any attempt to open a network connection fails the test.
"""

import json
import socket
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
import yaml
from huggingface_hub.errors import LocalEntryNotFoundError
from sae_lens import SAE, TopKSAE, TopKSAEConfig
from sae_lens.loading import pretrained_sae_loaders
from sae_lens.loading.pretrained_saes_directory import get_pretrained_saes_directory
from sae_lens.saes.sae import SAEMetadata

import writesae_lens
from writesae_lens import register_manifest, register_release, registered_releases, unregister_release
from writesae_lens.registry import BUNDLED_MANIFEST, HUB_LOADER_NAME, LOCAL_LOADER_NAME

IDS = ["blocks.0.mixer.hook_write.h0", "blocks.0.mixer.hook_write.h3"]


def make_sae(head, seed):
    torch.manual_seed(seed)
    metadata = SAEMetadata(hook_name="blocks.0.mixer.hook_write", hook_head_index=head, model_name="tiny-qwen35")
    sae = TopKSAE(TopKSAEConfig(d_in=32, d_sae=16, k=4, metadata=metadata))
    with torch.no_grad():
        for param in sae.parameters():
            param.normal_()
    return sae


@pytest.fixture(scope="module")
def release_dir(tmp_path_factory):
    """A release folder in SAELens's format: one sub-folder per SAE."""
    root = tmp_path_factory.mktemp("release")
    for seed, sae_id in enumerate(IDS):
        make_sae(int(sae_id[-1]), seed).save_model(root / sae_id)
    return root


@pytest.fixture
def registry_guard():
    """Unregister whatever a test registered; check SAELens's directory is the same object after."""
    directory = get_pretrained_saes_directory()
    before = dict(registered_releases())
    yield directory
    for name in set(registered_releases()) - set(before):
        unregister_release(name)
    assert get_pretrained_saes_directory() is directory


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("a test tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def assert_same_weights(sae, reference):
    assert type(sae) is type(reference)
    for name, tensor in reference.state_dict().items():
        torch.testing.assert_close(sae.state_dict()[name], tensor, rtol=0, atol=0)


def test_bundled_manifest_is_registered_and_every_bundled_sae_loads(no_network):
    data = yaml.safe_load(BUNDLED_MANIFEST.read_text()) or {}
    assert isinstance(data, dict)  # an empty manifest ({}) is valid
    registered = registered_releases()
    directory = get_pretrained_saes_directory()
    for release in data:
        assert directory[release] is registered[release]
        for sae_id in registered[release].saes_map:
            assert isinstance(SAE.from_pretrained(release, sae_id), SAE)


def test_importing_keeps_sae_lens_releases(registry_guard):
    assert "gpt2-small-res-jb" in registry_guard  # one of SAELens's own
    assert {LOCAL_LOADER_NAME, HUB_LOADER_NAME} <= set(pretrained_sae_loaders.NAMED_PRETRAINED_SAE_LOADERS)
    assert "sae_lens" in pretrained_sae_loaders.NAMED_PRETRAINED_SAE_LOADERS
    with pytest.raises(ValueError, match="SAELens's own releases"):
        register_release("gpt2-small-res-jb", Path(__file__).parent)


def test_register_a_local_release_is_idempotent(release_dir, registry_guard, no_network, monkeypatch):
    size = len(registry_guard)
    lookup = writesae_lens.register_release("my-writesaes", release_dir)
    assert register_release("my-writesaes", str(release_dir)) is lookup  # same arguments: a no-op
    assert len(registry_guard) == size + 1 and registry_guard["my-writesaes"] is lookup
    assert sorted(lookup.saes_map) == IDS  # discovered from the folders' cfg.json
    assert lookup.model == "tiny-qwen35"  # from metadata.model_name
    monkeypatch.setattr(torch, "load", lambda *a, **k: pytest.fail("torch.load (a pickle) was called"))
    for seed, sae_id in enumerate(IDS):
        sae = SAE.from_pretrained("my-writesaes", sae_id)
        assert_same_weights(sae, make_sae(int(sae_id[-1]), seed))
        assert sae.cfg.metadata.hook_head_index == int(sae_id[-1])
    # Re-registering with other SAEs replaces the entry.
    replaced = register_release("my-writesaes", release_dir, saes={"head3": IDS[1]}, model="m")
    assert registry_guard["my-writesaes"] is replaced and list(replaced.saes_map) == ["head3"]
    assert_same_weights(SAE.from_pretrained("my-writesaes", "head3"), make_sae(3, 1))
    unregister_release("my-writesaes")
    assert "my-writesaes" not in registry_guard and len(registry_guard) == size


def test_a_one_line_manifest_entry(release_dir, registry_guard, tmp_path, no_network):
    manifest = tmp_path / "manifest.yaml"
    manifest.write_text(f"toy-writesaes: {{model: toy-gdn, path: {release_dir}}}\n")
    assert register_manifest(manifest) == ["toy-writesaes"]
    lookup = registered_releases()["toy-writesaes"]
    assert lookup.model == "toy-gdn" and sorted(lookup.saes_map) == IDS
    assert_same_weights(SAE.from_pretrained("toy-writesaes", IDS[0]), make_sae(0, 0))
    (tmp_path / "empty.yaml").write_text("# nothing yet\n{}\n")
    assert register_manifest(tmp_path / "empty.yaml") == []
    (tmp_path / "bad.yaml").write_text("broken: {model: x}\n")
    with pytest.raises(ValueError, match="exactly one of 'path'"):
        register_manifest(tmp_path / "bad.yaml")


def test_unknown_sae_id_lists_the_valid_ones(release_dir, registry_guard):
    register_release("my-writesaes", release_dir)
    with pytest.raises(ValueError, match=r"Valid IDs are.*blocks\.0\.mixer\.hook_write\.h0"):
        SAE.from_pretrained("my-writesaes", "blocks.0.mixer.hook_write.h9")


def broken_release(tmp_path, release_dir, name):
    root = tmp_path / name
    (root / "sae").mkdir(parents=True)
    for f in (release_dir / IDS[0]).iterdir():
        (root / "sae" / f.name).write_bytes(f.read_bytes())
    register_release(name, root)
    return root / "sae"


def test_missing_weights_file(release_dir, registry_guard, tmp_path):
    folder = broken_release(tmp_path, release_dir, "no-weights")
    (folder / "sae_weights.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"no-weights/sae/sae_weights\.safetensors is missing"):
        SAE.from_pretrained("no-weights", "sae")


def test_corrupt_weights_file(release_dir, registry_guard, tmp_path):
    folder = broken_release(tmp_path, release_dir, "corrupt")
    (folder / "sae_weights.safetensors").write_bytes(b"\x00\x01not a safetensors file")
    with pytest.raises(ValueError, match=r"corrupt/sae/sae_weights\.safetensors is not a readable safetensors"):
        SAE.from_pretrained("corrupt", "sae")


def test_corrupt_config(release_dir, registry_guard, tmp_path):
    folder = broken_release(tmp_path, release_dir, "bad-cfg")
    (folder / "cfg.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"bad-cfg/sae/cfg\.json is not valid JSON"):
        SAE.from_pretrained("bad-cfg", "sae")


def test_unknown_architecture(release_dir, registry_guard, tmp_path):
    folder = broken_release(tmp_path, release_dir, "unknown-arch")
    cfg = json.loads((folder / "cfg.json").read_text())
    (folder / "cfg.json").write_text(json.dumps({**cfg, "architecture": "no_such_sae"}))
    with pytest.raises(ValueError, match=r"'no_such_sae'.*not registered.*'topk'.*import writesae_lens"):
        SAE.from_pretrained("unknown-arch", "sae")


def test_register_release_rejects_bad_arguments(release_dir, registry_guard, tmp_path):
    with pytest.raises(ValueError, match="neither an existing directory nor a Hub repo id"):
        register_release("x", str(tmp_path / "missing"))
    with pytest.raises(ValueError, match="pass saes="):
        register_release("x", "org/repo")
    with pytest.raises(ValueError, match="duplicate SAE ids"):
        register_release("x", release_dir, saes=[IDS[0], IDS[0]])
    with pytest.raises(ValueError, match="no SAE folder"):
        register_release("x", tmp_path)
    assert "x" not in registered_releases()


# --------------------------------------------------------------------------------------------- Hub
def serve_from(local_root):
    """A stand-in for hf_hub_download serving ``local_root/<repo_id>/<filename>`` (never the network)."""

    def fake_hf_hub_download(repo_id, filename, force_download=False, **kwargs):
        path = Path(local_root) / repo_id / filename
        if not path.is_file():
            raise LocalEntryNotFoundError(f"{repo_id}/{filename} is not in the cache")
        return str(path)

    return fake_hf_hub_download


@pytest.fixture
def hub_root(release_dir, tmp_path):
    repo = tmp_path / "hub" / "someone" / "writesaes"
    repo.mkdir(parents=True)
    for sae_id in IDS:
        (repo / sae_id).symlink_to(release_dir / sae_id, target_is_directory=True)
    return tmp_path / "hub"


def test_hub_repo_without_registration(hub_root, no_network, monkeypatch):
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", serve_from(hub_root))
    sae = SAE.from_pretrained("someone/writesaes", IDS[1])  # SAELens's own "org/repo" path
    assert_same_weights(sae, make_sae(3, 1))


def test_registered_hub_release(hub_root, registry_guard, no_network, monkeypatch):
    monkeypatch.setattr(pretrained_sae_loaders, "hf_hub_download", serve_from(hub_root))
    register_release("hub-writesaes", "someone/writesaes", saes=IDS, model="Qwen/Qwen3.5-0.8B")
    assert_same_weights(SAE.from_pretrained("hub-writesaes", IDS[0]), make_sae(0, 0))
    register_release("hub-missing", "someone/writesaes", saes=["not-uploaded"])
    with pytest.raises(FileNotFoundError, match=r"not-uploaded/cfg\.json was not found.*HF_HUB_OFFLINE"):
        SAE.from_pretrained("hub-missing", "not-uploaded")


def test_hub_repo_from_a_real_hf_cache_offline(release_dir, registry_guard, tmp_path, no_network, monkeypatch):
    """The real hf_hub_download, HF_HUB_OFFLINE on, files only in a (hand-built) HF cache."""
    commit = "0123456789abcdef0123456789abcdef01234567"
    storage = tmp_path / "hf_cache" / "models--someone--writesaes"
    (storage / "refs").mkdir(parents=True)
    (storage / "refs" / "main").write_text(commit)
    for sae_id in IDS:
        target = storage / "snapshots" / commit / sae_id
        target.mkdir(parents=True)
        for f in (release_dir / sae_id).iterdir():
            (target / f.name).write_bytes(f.read_bytes())
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hf_cache"))
    assert_same_weights(SAE.from_pretrained("someone/writesaes", IDS[0]), make_sae(0, 0))
    register_release("cached-writesaes", "someone/writesaes", saes=IDS)
    assert_same_weights(SAE.from_pretrained("cached-writesaes", IDS[1]), make_sae(3, 1))
