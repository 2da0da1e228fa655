"""Checkpoint I/O: round trips, casts, every error message, hub-cache resolution, and transformers compatibility."""

import json
import warnings
from pathlib import Path

import pytest
import torch
from huggingface_hub import constants as hub_constants
from safetensors import safe_open
from torch import nn

from idefics.loading import (
    CheckpointError,
    load_checkpoint,
    parse_size,
    resolve_pretrained_dir,
    save_checkpoint,
)


class Tiny(nn.Module):
    """A frozen embedding, a trainable projection, a head (optionally tied), an int and a float buffer."""

    def __init__(self, *, tied: bool = False):
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.proj = nn.Linear(8, 8)
        self.head = nn.Linear(8, 32, bias=False)
        self.register_buffer("steps", torch.arange(4))
        self.register_buffer("scale", torch.rand(8))
        self.embed.weight.requires_grad_(False)
        if tied:
            self.head.weight = self.embed.weight


def reference(*, tied: bool = False) -> Tiny:
    torch.manual_seed(0)
    return Tiny(tied=tied)


def on_meta(*, tied: bool = False) -> Tiny:
    with torch.device("meta"):
        return Tiny(tied=tied)


def assert_same(model: nn.Module, state: dict[str, torch.Tensor]) -> None:
    loaded = model.state_dict()
    assert loaded.keys() == state.keys()
    for key, tensor in state.items():
        assert loaded[key].dtype == tensor.dtype, key
        torch.testing.assert_close(loaded[key], tensor, rtol=0, atol=0)


def test_round_trip_single_file(tmp_path):
    state = reference().state_dict()
    save_checkpoint(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.safetensors"]
    with safe_open(tmp_path / "model.safetensors", framework="pt") as f:
        assert f.metadata() == {"format": "pt"}
    model = on_meta()
    assert load_checkpoint(model, tmp_path) == []
    assert_same(model, state)
    assert not model.embed.weight.requires_grad and model.proj.weight.requires_grad
    assert isinstance(model.proj.weight, nn.Parameter) and "scale" in model._buffers


def test_round_trip_sharded(tmp_path):
    state = reference().state_dict()
    save_checkpoint(state, tmp_path, max_shard_size=1100)  # embed and head are 1024 bytes each
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert shards == [f"model-0000{i}-of-00003.safetensors" for i in (1, 2, 3)]
    assert index["weight_map"].keys() == state.keys()
    assert index["metadata"]["total_size"] == sum(t.nbytes for t in state.values())
    model = on_meta()
    load_checkpoint(model, tmp_path)
    assert_same(model, state)


def test_loaded_weights_are_copy_on_write(tmp_path):
    state = reference().state_dict()
    save_checkpoint(state, tmp_path)
    model = on_meta()
    load_checkpoint(model, tmp_path)
    with torch.no_grad():
        model.proj.weight.add_(1.0)
    again = on_meta()
    load_checkpoint(again, tmp_path)
    assert_same(again, state)


@pytest.mark.parametrize("shard_size", ["5GB", 1100])
def test_bin_fallback_uses_weights_only_mmap(tmp_path, monkeypatch, shard_size):
    state = reference().state_dict()
    save_checkpoint(state, tmp_path, max_shard_size=shard_size, safe_serialization=False)
    assert not list(tmp_path.glob("*.safetensors"))
    calls = []
    real_load = torch.load

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real_load(*args, **kwargs)

    monkeypatch.setattr(torch, "load", spy)
    model = on_meta()
    load_checkpoint(model, tmp_path)
    assert_same(model, state)
    assert calls and all(c["weights_only"] and c["mmap"] and c["map_location"] == "cpu" for c in calls)


def test_cast_to_bf16_with_fp32_exemptions(tmp_path):
    state = reference().state_dict()
    save_checkpoint(state, tmp_path)
    model = on_meta()
    load_checkpoint(model, tmp_path, dtype=torch.bfloat16, keep_fp32=[r"^scale$", r"proj\.bias"])
    expected = {k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in state.items()}
    expected["scale"], expected["proj.bias"] = state["scale"], state["proj.bias"]
    assert_same(model, expected)
    assert model.steps.dtype == torch.int64
    assert not model.embed.weight.requires_grad and model.proj.weight.requires_grad


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_unaligned_tensors_load(tmp_path, dtype):
    """A hand-written file whose float tensor starts at an odd byte offset (safetensors itself never writes one)."""
    values = torch.arange(4, dtype=torch.float32)
    header = {
        "flag": {"dtype": "U8", "shape": [1], "data_offsets": [0, 1]},
        "scale": {"dtype": "F32", "shape": [4], "data_offsets": [1, 17]},
    }
    encoded = json.dumps(header).encode().ljust(128)
    data = len(encoded).to_bytes(8, "little") + encoded + b"\x07" + values.numpy().tobytes()
    (tmp_path / "model.safetensors").write_bytes(data)
    model = nn.Module()
    with torch.device("meta"):
        model.register_buffer("flag", torch.zeros(1, dtype=torch.uint8))
        model.register_buffer("scale", torch.zeros(4))
    load_checkpoint(model, tmp_path, dtype=dtype)
    assert model.flag.item() == 7
    torch.testing.assert_close(model.scale, values.to(dtype), rtol=0, atol=0)


def test_dtype_none_means_float32(tmp_path):
    state = {k: t.to(torch.bfloat16) if t.is_floating_point() else t for k, t in reference().state_dict().items()}
    save_checkpoint(state, tmp_path)
    model = on_meta()
    load_checkpoint(model, tmp_path)
    assert model.proj.weight.dtype == torch.float32 and model.steps.dtype == torch.int64


@pytest.mark.parametrize("drop", [None, "head.weight"])
def test_tied_weights_stay_tied(tmp_path, drop):
    state = reference(tied=True).state_dict()
    if drop:
        del state[drop]
    save_checkpoint(state, tmp_path)  # the shared tensor is cloned so that safetensors accepts it
    model = on_meta(tied=True)
    assert load_checkpoint(model, tmp_path) == []
    assert model.head.weight is model.embed.weight
    torch.testing.assert_close(model.head.weight, state["embed.weight"])


def test_missing_keys(tmp_path):
    state = reference().state_dict()
    del state["proj.bias"]
    save_checkpoint(state, tmp_path)
    with pytest.raises(CheckpointError, match=rf"1 model keys missing .* in {tmp_path}: proj\.bias"):
        load_checkpoint(on_meta(), tmp_path)


def test_unexpected_keys_name_their_file(tmp_path):
    state = reference().state_dict() | {"extra.weight": torch.ones(2)}
    save_checkpoint(state, tmp_path, max_shard_size=1100)
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    shard = index["weight_map"]["extra.weight"]
    with pytest.raises(CheckpointError, match=rf"1 unexpected checkpoint keys .*: extra\.weight \({shard}\)"):
        load_checkpoint(on_meta(), tmp_path)


def test_ignore_unexpected(tmp_path):
    state = reference().state_dict() | {"layers.0.rotary_emb.inv_freq": torch.ones(4)}
    save_checkpoint(state, tmp_path)
    model = on_meta()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert load_checkpoint(model, tmp_path, ignore_unexpected=[r"rotary_emb\.inv_freq$"]) == []
    assert not hasattr(model, "layers")


def test_shape_mismatch_names_key_file_and_shapes(tmp_path):
    state = reference().state_dict() | {"proj.weight": torch.zeros(8, 9)}
    save_checkpoint(state, tmp_path)
    pattern = rf"'proj\.weight' in {tmp_path / 'model.safetensors'}: checkpoint \(8, 9\), model \(8, 8\)"
    with pytest.raises(CheckpointError, match=pattern):
        load_checkpoint(on_meta(), tmp_path)


def test_not_strict_warns_and_returns_missing(tmp_path):
    state = reference().state_dict() | {"extra": torch.ones(1)}
    del state["head.weight"]
    save_checkpoint(state, tmp_path)
    model = on_meta()
    with pytest.warns(UserWarning) as record:
        missing = load_checkpoint(model, tmp_path, strict=False)
    assert missing == ["head.weight"]
    assert {str(w.message).split(" ")[1] for w in record} == {"model", "unexpected"}
    assert model.head.weight.is_meta and not model.proj.weight.is_meta


def test_index_with_missing_shard(tmp_path):
    save_checkpoint(reference().state_dict(), tmp_path, max_shard_size=1100)
    (tmp_path / "model-00002-of-00003.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"lists shard 'model-00002-of-00003\.safetensors'"):
        load_checkpoint(on_meta(), tmp_path)


@pytest.mark.parametrize("damage", ["truncate", "garbage"])
def test_corrupt_safetensors_names_the_file(tmp_path, damage):
    save_checkpoint(reference().state_dict(), tmp_path)
    path = tmp_path / "model.safetensors"
    data = path.read_bytes()
    path.write_bytes(data[:-100] if damage == "truncate" else b"\x10\0\0\0\0\0\0\0not json at all!" + data[24:])
    with pytest.raises(CheckpointError, match=rf"{path} is not a valid safetensors file"):
        load_checkpoint(on_meta(), tmp_path)


def test_no_weights_lists_the_folder(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=rf"no weights in {tmp_path} .* it contains: config\.json"):
        load_checkpoint(on_meta(), tmp_path)


def test_stale_shards_are_removed(tmp_path):
    state = reference().state_dict()
    (tmp_path / "config.json").write_text("{}")
    save_checkpoint(state, tmp_path, max_shard_size=1100)
    save_checkpoint(state, tmp_path, max_shard_size=2000)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "config.json",
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
        "model.safetensors.index.json",
    ]
    save_checkpoint(state, tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["config.json", "model.safetensors"]
    model = on_meta()
    load_checkpoint(model, tmp_path)
    assert_same(model, state)


@pytest.mark.parametrize(
    ("size", "expected"),
    [(123, 123), ("5GB", 5 * 10**9), ("500MB", 500 * 10**6), ("10KiB", 10240), ("1.5GiB", 3 * 2**29), ("7", 7)],
)
def test_parse_size(size, expected):
    assert parse_size(size) == expected


@pytest.mark.parametrize("size", ["5 parsecs", "", 0, "-1MB"])
def test_parse_size_rejects(size):
    with pytest.raises(ValueError):
        parse_size(size)


@pytest.fixture
def offline(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(hub_constants, "HF_HUB_OFFLINE", True)


def test_resolve_from_hub_cache_offline(tmp_path, offline):
    commit = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "models--org--name"
    snapshot = repo / "snapshots" / commit
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    assert resolve_pretrained_dir("org/name", cache_dir=tmp_path) == snapshot
    assert resolve_pretrained_dir("org/name", cache_dir=tmp_path, revision=commit) == snapshot
    assert resolve_pretrained_dir(snapshot) == snapshot


def test_resolve_not_found_anywhere_is_one_line(tmp_path, offline):
    with pytest.raises(FileNotFoundError) as info:
        resolve_pretrained_dir("org/absent", cache_dir=tmp_path)
    message = str(info.value)
    assert message.startswith("'org/absent' is neither a local folder nor a model in the hub cache")
    assert "\n" not in message and info.value.__suppress_context__


@pytest.mark.parametrize("name", ["./nowhere", "file"])
def test_resolve_local_looking_path_that_is_not_a_folder(tmp_path, monkeypatch, name):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "file").write_text("")
    with pytest.raises(FileNotFoundError, match=rf"checkpoint folder '{name}' (does not exist|is not a directory)"):
        resolve_pretrained_dir(name)


def test_transformers_loads_what_we_save(tmp_path):
    transformers = pytest.importorskip("transformers")
    config = transformers.LlamaConfig(
        hidden_size=16,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=2,
        vocab_size=64,
    )
    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(config)
    config.save_pretrained(tmp_path)
    save_checkpoint(model.state_dict(), tmp_path, max_shard_size=10_000)
    assert len(list(Path(tmp_path).glob("model-*.safetensors"))) > 1
    loaded, info = transformers.LlamaForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info["mismatched_keys"]
    for (name, ours), (_, theirs) in zip(model.state_dict().items(), loaded.state_dict().items(), strict=True):
        torch.testing.assert_close(theirs, ours, rtol=0, atol=0, msg=name)
