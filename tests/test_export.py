"""Exporting the global state as a peft adapter: layout from the config alone, adapter
directory and zip that ``PeftModel.from_pretrained`` loads to the same model as
``attach_lora`` + ``state_to_peft``."""

from __future__ import annotations

import io
import json
import os
import shutil
import socket
import zipfile

import pytest
import torch
from peft import LoraConfig, PeftModel
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, ViTConfig

from fedsrd_core.export import (
    ADAPTER_CONFIG_FILE,
    ADAPTER_WEIGHTS_FILE,
    adapter_layout_for,
    adapter_zip,
    write_peft_adapter,
)
from fedsrd_core.modeling import ModelLoadError, TinyModelSpec, build_tiny_model
from fedsrd_core.peft_lora import (
    PEFT_PREFIX,
    adapter_layout,
    attach_lora,
    lora_config,
    state_to_peft,
)
from fedsrd_core.state import GlobalState, LoraFactors, init_state

RANK = 4
SPEC = TinyModelSpec(
    hidden_size=32,
    intermediate_size=48,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
)
TOKENS = torch.tensor([[1, 72, 101, 108, 108, 111, 32, 119, 111, 114, 108, 100]])
QV = ["q_proj", "v_proj"]


@pytest.fixture(autouse=True)
def no_network(monkeypatch):
    """Any name lookup or connection fails the test: nothing here may download."""

    def refuse(*args, **kwargs):
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("export") / "tiny", SPEC)


def base_model(path):
    return AutoModelForCausalLM.from_pretrained(path, local_files_only=True).eval()


def logits(model):
    with torch.no_grad():
        return model(input_ids=TOKENS).logits


def trained_state(layout, rank=RANK, seed=1):
    """A fresh state with random non-zero ``B``, so the adapter changes the model's output."""
    state = init_state(layout, rank, seed=seed)
    gen = torch.Generator().manual_seed(seed + 100)
    for _, f in state.items():
        f.B.copy_(torch.randn(f.B.shape, generator=gen) * 0.5)
    return state


def reference_logits(path, state, target_modules, alpha=None):
    model = attach_lora(
        base_model(path), lora_config(rank=RANK, alpha=alpha, target_modules=target_modules)
    )
    state_to_peft(state, model)
    return logits(model.eval())


# --- layout ----------------------------------------------------------------------------------


@pytest.mark.parametrize("targets", ["all-linear", QV])
def test_layout_from_config_equals_the_loaded_models(tiny, targets):
    loaded = adapter_layout(
        attach_lora(base_model(tiny), lora_config(rank=RANK, target_modules=targets))
    )
    assert adapter_layout_for(str(tiny), rank=RANK, target_modules=targets) == loaded
    n = SPEC.num_hidden_layers * (7 if targets == "all-linear" else 2)
    assert len(loaded) == n
    assert loaded["model.layers.0.self_attn.q_proj"] == (32, 32)
    assert loaded["model.layers.1.self_attn.v_proj"] == (16, 32)  # 2 KV heads of 8


def test_layout_does_not_read_the_weights(tiny, tmp_path):
    config_only = tmp_path / "config-only"
    shutil.copytree(tiny, config_only)
    (config_only / "model.safetensors").unlink()
    with pytest.raises(OSError, match="no file named"):  # the weights really are gone
        AutoModelForCausalLM.from_pretrained(config_only, local_files_only=True)
    assert adapter_layout_for(str(config_only), rank=RANK) == adapter_layout_for(
        str(tiny), rank=RANK
    )


def test_layout_of_a_missing_model_names_it(tmp_path):
    missing = str(tmp_path / "no-such-model")
    with pytest.raises(ModelLoadError, match="no-such-model"):
        adapter_layout_for(missing, rank=RANK)


def test_layout_of_a_model_that_is_not_a_causal_lm(tmp_path):
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        adapter_layout_for(str(tmp_path / "vit"), rank=RANK)


def test_layout_with_targets_that_match_nothing(tiny):
    with pytest.raises(ValueError, match="nonexistent_proj") as info:
        adapter_layout_for(str(tiny), rank=RANK, target_modules=["nonexistent_proj"])
    assert str(tiny) in str(info.value)


# --- adapter directory ----------------------------------------------------------------------


@pytest.mark.parametrize(("targets", "alpha"), [("all-linear", None), (QV, 16)])
def test_written_adapter_loads_in_peft_to_the_same_model(tiny, tmp_path, targets, alpha):
    state = trained_state(adapter_layout_for(str(tiny), rank=RANK, target_modules=targets))
    out = write_peft_adapter(
        state,
        tmp_path / "adapter",
        base_model=str(tiny),
        rank=RANK,
        alpha=alpha,
        target_modules=targets,
    )
    assert out == tmp_path / "adapter"
    assert sorted(os.listdir(tmp_path)) == ["adapter"]  # no staging leftovers
    assert sorted(os.listdir(out)) == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]

    config = LoraConfig.from_pretrained(out)
    assert config.base_model_name_or_path == str(tiny)
    assert (config.r, config.lora_alpha) == (RANK, alpha or 2 * RANK)
    raw = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert raw["target_modules"] == (sorted(QV) if targets == QV else "all-linear")

    tensors = load_file(out / ADAPTER_WEIGHTS_FILE)
    assert len(tensors) == 2 * len(state)
    for name, f in state.items():
        A = tensors[f"{PEFT_PREFIX}{name}.lora_A.weight"]
        B = tensors[f"{PEFT_PREFIX}{name}.lora_B.weight"]
        assert A.dtype == B.dtype == torch.float32
        assert torch.equal(A, f.A) and torch.equal(B, f.B)

    base_logits = logits(base_model(tiny))
    loaded = PeftModel.from_pretrained(base_model(tiny), out).eval()
    got = logits(loaded)
    torch.testing.assert_close(got, reference_logits(tiny, state, targets, alpha))
    assert not torch.allclose(got, base_logits, atol=1e-3)  # the adapter matters


# --- zip ---------------------------------------------------------------------------------------


def test_adapter_zip_is_reproducible_and_loads(tiny, tmp_path):
    state = trained_state(adapter_layout_for(str(tiny), rank=RANK), seed=2)
    data = adapter_zip(state, base_model=str(tiny), rank=RANK)
    assert data == adapter_zip(state.clone(), base_model=str(tiny), rank=RANK)
    with zipfile.ZipFile(io.BytesIO(data)) as archive:
        infos = archive.infolist()
        assert [i.filename for i in infos] == [ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE]
        assert all(i.compress_type == zipfile.ZIP_DEFLATED for i in infos)
        assert all(i.date_time == (1980, 1, 1, 0, 0, 0) for i in infos)
        archive.extractall(tmp_path / "unzipped")
    written = write_peft_adapter(state, tmp_path / "written", base_model=str(tiny), rank=RANK)
    for name in (ADAPTER_CONFIG_FILE, ADAPTER_WEIGHTS_FILE):
        assert (tmp_path / "unzipped" / name).read_bytes() == (written / name).read_bytes()

    loaded = PeftModel.from_pretrained(base_model(tiny), tmp_path / "unzipped").eval()
    torch.testing.assert_close(logits(loaded), reference_logits(tiny, state, "all-linear"))


# --- validation --------------------------------------------------------------------------------


def test_rank_mismatch_is_refused(tmp_path):
    layout = {"model.layers.0.self_attn.q_proj": (8, 8), "model.layers.0.mlp.up_proj": (12, 8)}
    state = init_state(layout, RANK)
    with pytest.raises(ValueError, match="rank 4"):
        write_peft_adapter(state, tmp_path / "a", base_model="m", rank=8)
    mixed = GlobalState(
        {
            "model.layers.0.self_attn.q_proj": state["model.layers.0.self_attn.q_proj"],
            "model.layers.0.mlp.up_proj": LoraFactors(torch.zeros(2, 8), torch.zeros(12, 2)),
        }
    )
    with pytest.raises(ValueError, match=r"mlp\.up_proj.*rank 2"):
        adapter_zip(mixed, base_model="m", rank=RANK)
    assert not (tmp_path / "a").exists()
    assert os.listdir(tmp_path) == []


def test_modules_outside_target_modules_are_refused(tmp_path):
    state = init_state({"model.layers.0.mlp.up_proj": (12, 8)}, RANK)
    with pytest.raises(ValueError, match="target_modules"):
        write_peft_adapter(state, tmp_path / "a", base_model="m", rank=RANK, target_modules=QV)


def test_an_existing_directory_is_not_overwritten(tmp_path):
    state = init_state({"model.layers.0.self_attn.q_proj": (8, 8)}, RANK)
    target = tmp_path / "adapter"
    target.mkdir()
    (target / "keep.txt").write_text("mine")
    with pytest.raises(FileExistsError, match="adapter"):
        write_peft_adapter(state, target, base_model="m", rank=RANK)
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileExistsError):
        write_peft_adapter(state, empty, base_model="m", rank=RANK)
    assert sorted(os.listdir(tmp_path)) == ["adapter", "empty"]  # no staging leftovers
    assert os.listdir(target) == ["keep.txt"] and os.listdir(empty) == []


# --- GPT-2 (Conv1D layers) and peft's one-call loader -------------------------------------------


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    """A small random GPT-2, built here: its linear layers are transformers' ``Conv1D``,
    which store the weight transposed (peft's ``fan_in_fan_out``)."""
    from transformers import GPT2Config

    from fedsrd_core.modeling import build_byte_tokenizer

    torch.manual_seed(0)
    path = tmp_path_factory.mktemp("gpt2")
    config = GPT2Config(vocab_size=260, n_positions=64, n_embd=32, n_layer=2, n_head=4)
    AutoModelForCausalLM.from_config(config).save_pretrained(path)
    build_byte_tokenizer(model_max_length=64).save_pretrained(path)
    return path


def test_gpt2_export_says_fan_in_fan_out_and_loads_both_ways(gpt2, tmp_path, recwarn):
    import warnings

    from peft import AutoPeftModelForCausalLM

    state = trained_state(adapter_layout_for(str(gpt2), rank=RANK))
    assert "transformer.h.0.attn.c_attn" in state
    out = write_peft_adapter(state, tmp_path / "adapter", base_model=str(gpt2), rank=RANK)
    raw = json.loads((out / ADAPTER_CONFIG_FILE).read_text())
    assert raw["fan_in_fan_out"] is True  # it said false, and peft corrected it with a warning
    assert raw["base_model_name_or_path"] == str(gpt2.resolve())
    want = reference_logits(gpt2, state, "all-linear")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        plain = PeftModel.from_pretrained(base_model(gpt2), out).eval()
        auto = AutoPeftModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    assert not [w for w in caught if "fan_in_fan_out" in str(w.message)]
    torch.testing.assert_close(logits(plain), want)
    torch.testing.assert_close(logits(auto), want)
    assert not torch.allclose(want, logits(base_model(gpt2)), atol=1e-3)


def test_a_relative_base_model_directory_is_written_absolute(tiny, tmp_path, monkeypatch):
    from peft import AutoPeftModelForCausalLM

    state = trained_state(adapter_layout_for(str(tiny), rank=RANK))
    monkeypatch.chdir(tiny.parent)
    out = write_peft_adapter(state, tmp_path / "adapter", base_model=tiny.name, rank=RANK)
    monkeypatch.chdir(tmp_path)  # elsewhere: the relative name would no longer resolve
    assert LoraConfig.from_pretrained(out).base_model_name_or_path == str(tiny.resolve())
    auto = AutoPeftModelForCausalLM.from_pretrained(out, local_files_only=True).eval()
    torch.testing.assert_close(logits(auto), reference_logits(tiny, state, "all-linear"))


def test_export_names_a_base_model_it_cannot_read(tmp_path):
    state = init_state({"model.layers.0.self_attn.q_proj": (8, 8)}, RANK)
    with pytest.raises(ModelLoadError, match="tiny"):  # "tiny" is a name, not a model
        write_peft_adapter(state, tmp_path / "a", base_model="tiny", rank=RANK)
    assert os.listdir(tmp_path) == []


def test_a_state_that_does_not_fit_the_base_model_is_refused(tiny, tmp_path):
    state = init_state({"model.layers.0.self_attn.q_proj": (8, 8)}, RANK)
    with pytest.raises(ValueError, match="does not fit the adapter"):
        write_peft_adapter(state, tmp_path / "a", base_model=str(tiny), rank=RANK)
