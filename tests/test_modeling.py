"""Offline base models: byte tokenizer, tiny Llama model, loading and fingerprints.

Every test runs with the network cut (see ``network_attempts``): a code path that tried to download
would fail here instead of silently fetching.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import random
import shutil
import socket
import struct

import pytest
import torch
from huggingface_hub import constants as hf_constants
from peft import LoraConfig, get_peft_model
from peft.tuners.lora import LoraLayer
from transformers import AutoModelForCausalLM, AutoTokenizer, ViTConfig

from fedsrd_core.modeling import (
    BOS_ID,
    EOS_ID,
    METADATA_FILE,
    PAD_ID,
    UNK_ID,
    VOCAB_SIZE,
    ModelLoadError,
    TinyModelSpec,
    build_byte_tokenizer,
    build_tiny_model,
    fingerprint_directory,
    load_causal_lm,
    model_fingerprint,
    pretrain_tiny,
    tiny_model_dir,
)
from fedsrd_core.modeling import tiny as tiny_module

SAMPLES = [
    "",
    "hello world",
    "  leading and trailing whitespace \n\t\r\n",
    "héllo wörld, ça va? Ünïcödé",
    "日本語のテキスト、中文，한국어",
    "emoji 🙂👍🏽 and ZWJ 👩‍👩‍👧",
    "control \x00\x01\x7f bytes and \u200b zero-width",
    "literal special tokens: <s> </s> <pad> <unk>",
]


def arithmetic_texts(n: int = 300, seed: int = 0) -> list[str]:
    """A few hundred short, learnable texts generated locally."""
    rng = random.Random(seed)
    texts = []
    for _ in range(n):
        a, b = rng.randint(0, 9), rng.randint(0, 9)
        texts.append(f"Q: {a}+{b}=? A: {a + b}.")
    return texts


SMALL_PRETRAIN = {"steps": 30, "batch_size": 8, "seq_len": 32}


@pytest.fixture(autouse=True)
def network_attempts(monkeypatch):
    """Refuse and record every name lookup and connection, and fail the test if there was any
    (even one whose error the libraries swallowed). Patching the lookup matters: a download
    first resolves the host name."""
    attempts: list[object] = []

    def refuse(*args, **kwargs):
        attempts.append(args)
        raise OSError("network disabled in tests")

    monkeypatch.setattr(socket, "getaddrinfo", refuse)
    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket.socket, "connect_ex", refuse)
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setenv("TRANSFORMERS_OFFLINE", "1")
    yield attempts
    assert attempts == [], f"network access attempted: {attempts}"


def test_the_network_guard_works(network_attempts):
    with pytest.raises(OSError, match="network disabled"):
        socket.create_connection(("huggingface.co", 443), timeout=1)
    assert len(network_attempts) == 1
    network_attempts.clear()


@pytest.fixture(scope="session")
def tiny_dir(tmp_path_factory):
    """The tiny model, built and briefly pre-trained once for the whole session."""
    cache = tmp_path_factory.mktemp("tiny-cache")
    return tiny_model_dir(cache, TinyModelSpec(), arithmetic_texts(), **SMALL_PRETRAIN)


# --- tokenizer --------------------------------------------------------------------------------


def test_tokenizer_ids_are_the_utf8_bytes_and_round_trip():
    tok = build_byte_tokenizer()
    assert len(tok) == VOCAB_SIZE == 260
    assert (tok.pad_token_id, tok.bos_token_id, tok.eos_token_id, tok.unk_token_id) == (
        PAD_ID,
        BOS_ID,
        EOS_ID,
        UNK_ID,
    )
    for text in SAMPLES:
        ids = tok(text)["input_ids"]  # default call: no BOS/EOS inserted
        assert ids == list(text.encode("utf-8")), text
        assert tok.decode(ids) == text


def test_tokenizer_never_turns_text_into_special_tokens():
    tok = build_byte_tokenizer()
    ids = tok("a</s>b<s><pad>")["input_ids"]
    assert all(i < 256 for i in ids)
    # The explicit EOS the training code appends is a single special id, skipped on request.
    assert tok.decode([*tok("hi")["input_ids"], tok.eos_token_id]) == "hi</s>"
    assert tok.decode([*tok("hi")["input_ids"], tok.eos_token_id], skip_special_tokens=True) == (
        "hi"
    )


def test_tokenizer_saves_and_loads_offline_with_identical_ids(tmp_path):
    tok = build_byte_tokenizer(model_max_length=512)
    tok.save_pretrained(tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path, local_files_only=True)
    assert loaded.model_max_length == 512
    assert (loaded.pad_token, loaded.bos_token, loaded.eos_token, loaded.unk_token) == (
        "<pad>",
        "<s>",
        "</s>",
        "<unk>",
    )
    for text in SAMPLES:
        ids = tok(text)["input_ids"]
        assert loaded(text)["input_ids"] == ids
        assert loaded.decode(ids) == text
    batch = loaded(["ab", "abcd"], padding=True)
    assert batch["input_ids"][0] == [97, 98, PAD_ID, PAD_ID]  # right padding with <pad>
    assert batch["attention_mask"][0] == [1, 1, 0, 0]


# --- spec -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hidden_size": 0}, "hidden_size"),
        ({"num_hidden_layers": -1}, "num_hidden_layers"),
        ({"seed": -1}, "seed"),
        ({"intermediate_size": 1.5}, "intermediate_size"),
        ({"num_attention_heads": True}, "num_attention_heads"),
        ({"hidden_size": 66}, "num_attention_heads"),  # not divisible by 4 heads
        ({"num_key_value_heads": 3}, "num_key_value_heads"),
        ({"hidden_size": 12, "num_attention_heads": 4}, "even"),  # head_dim 3
    ],
)
def test_spec_validation_names_the_field(kwargs, field):
    with pytest.raises((ValueError, TypeError), match=field):
        TinyModelSpec(**kwargs)


# --- building and fingerprints ----------------------------------------------------------------


def test_build_is_deterministic_and_the_seed_matters(tmp_path):
    a = build_tiny_model(tmp_path / "a")
    b = build_tiny_model(tmp_path / "b", TinyModelSpec())
    c = build_tiny_model(tmp_path / "c", TinyModelSpec(seed=1))
    assert (tmp_path / "a" / "model.safetensors").read_bytes() == (
        tmp_path / "b" / "model.safetensors"
    ).read_bytes()
    fa, fb, fc = (fingerprint_directory(p) for p in (a, b, c))
    assert fa == fb
    assert fa != fc
    assert json.loads((a / METADATA_FILE).read_text())["fingerprint"] == fa
    assert sorted(os.listdir(tmp_path)) == ["a", "b", "c"]  # no staging leftovers


def test_initial_weights_are_pinned(tmp_path):
    # The initialisation is defined by SHAKE-256, not torch's RNG: these bytes must be the same
    # on every platform and torch version. A change here needs a TINY_FORMAT_VERSION bump.
    model = AutoModelForCausalLM.from_pretrained(build_tiny_model(tmp_path), local_files_only=True)
    q = model.state_dict()["model.layers.0.self_attn.q_proj.weight"]
    assert q.dtype == torch.float32
    digest = "cef350d0ecfde8f9a5d4d8c8a2279a023f7f9b8c05bc1d332a582cc39ca7c9c7"
    assert hashlib.sha256(q.numpy().tobytes()).hexdigest() == digest
    # The documented definition, recomputed in plain Python for the first row's first values.
    stream = hashlib.shake_256(
        b"fedsrd-tiny-init-v1\x000\x00model.layers.0.self_attn.q_proj.weight"
    )
    words = struct.unpack("<4I", stream.digest(16))
    half_width = 0.02 * math.sqrt(3.0)
    expected = [((w + 0.5) * (2.0 / 2.0**32) - 1.0) * half_width for w in words]
    as_f32 = [struct.unpack("<f", struct.pack("<f", x))[0] for x in expected]
    assert q[0, :4].tolist() == as_f32
    embed = model.get_input_embeddings().weight
    assert torch.all(embed[PAD_ID] == 0)
    assert 0.015 < float(embed.detach().std()) < 0.025  # ~ initializer_range 0.02
    assert torch.all(model.model.norm.weight == 1)


def test_parameter_count_and_architecture(tmp_path):
    model, _ = load_causal_lm(str(build_tiny_model(tmp_path)), device="cpu")
    assert type(model).__name__ == "LlamaForCausalLM"
    assert model.num_parameters() == 124_224
    assert model.config.vocab_size == VOCAB_SIZE
    assert (model.config.bos_token_id, model.config.eos_token_id) == (BOS_ID, EOS_ID)


def test_fingerprint_survives_save_and_load_and_sees_one_changed_bit(tmp_path):
    model = tiny_module.LlamaForCausalLM(TinyModelSpec(seed=3).to_config())
    before = model_fingerprint(model)
    model.save_pretrained(tmp_path, safe_serialization=True)
    assert model_fingerprint(model) == before  # saving fills in config fields: excluded
    loaded = AutoModelForCausalLM.from_pretrained(tmp_path, local_files_only=True)
    assert model_fingerprint(loaded) == before
    assert fingerprint_directory(tmp_path) == before

    w = loaded.model.layers[1].mlp.down_proj.weight
    with torch.no_grad():
        old = w[3, 5].clone()
        w[3, 5] = torch.nextafter(old, torch.tensor(1.0))  # one ulp
        assert model_fingerprint(loaded) != before
        w[3, 5] = old
    assert model_fingerprint(loaded) == before
    loaded.config.use_cache = False  # runtime switch, not identity
    assert model_fingerprint(loaded) == before
    loaded.config.rms_norm_eps = 1e-5  # changes what the model computes
    assert model_fingerprint(loaded) != before


def test_fingerprint_depends_on_dtype_and_is_stable_per_dtype(tiny_dir):
    fp32 = model_fingerprint(load_causal_lm(str(tiny_dir), device="cpu")[0])
    bf16_a = model_fingerprint(load_causal_lm(str(tiny_dir), dtype="bf16", device="cpu")[0])
    bf16_b = model_fingerprint(load_causal_lm(str(tiny_dir), dtype="bf16", device="cpu")[0])
    assert fp32 == fingerprint_directory(tiny_dir)
    assert bf16_a == bf16_b != fp32


# --- atomic writes ----------------------------------------------------------------------------


def test_a_failed_build_leaves_nothing_behind(tmp_path, monkeypatch):
    build_tiny_model(tmp_path / "m", TinyModelSpec(seed=1))
    old = fingerprint_directory(tmp_path / "m")

    def crash(*args, **kwargs):
        raise RuntimeError("simulated crash")

    monkeypatch.setattr(tiny_module, "_init_weights", crash)
    with pytest.raises(RuntimeError, match="simulated"):
        build_tiny_model(tmp_path / "m", TinyModelSpec(seed=2))
    with pytest.raises(RuntimeError, match="simulated"):
        build_tiny_model(tmp_path / "new")
    assert sorted(os.listdir(tmp_path)) == ["m"]  # no partial "new", no staging directories
    assert fingerprint_directory(tmp_path / "m") == old  # the old model is untouched

    monkeypatch.undo()
    build_tiny_model(tmp_path / "m", TinyModelSpec(seed=2))  # replaces an existing directory
    assert fingerprint_directory(tmp_path / "m") != old
    assert sorted(os.listdir(tmp_path)) == ["m"]


# --- pre-training and the cache ---------------------------------------------------------------


def test_pretraining_lowers_the_loss_deterministically(tmp_path):
    texts = arithmetic_texts()
    results, prints = [], []
    for name in ("a", "b"):
        path = build_tiny_model(tmp_path / name)
        results.append(pretrain_tiny(path, texts, seed=5, **SMALL_PRETRAIN))
        prints.append(fingerprint_directory(path))
    first = results[0]
    assert set(first) == {"initial_loss", "final_loss", "steps", "seconds"}
    assert first["steps"] == 30
    assert first["initial_loss"] > 5.0  # ~ ln(260) = 5.56 for an untrained model
    assert first["final_loss"] < 0.6 * first["initial_loss"]
    assert results[1]["final_loss"] == first["final_loss"]
    assert prints[0] == prints[1]
    assert prints[0] != fingerprint_directory(build_tiny_model(tmp_path / "fresh"))
    meta = json.loads((tmp_path / "a" / METADATA_FILE).read_text())
    assert meta["pretrain"]["final_loss"] == first["final_loss"]
    assert meta["fingerprint"] == prints[0]


def test_pretraining_rejects_bad_arguments(tmp_path):
    path = build_tiny_model(tmp_path / "m")
    with pytest.raises(TypeError, match="texts"):
        pretrain_tiny(path, "a single string")
    with pytest.raises(ValueError, match="texts"):
        pretrain_tiny(path, [])
    with pytest.raises(ValueError, match="steps"):
        pretrain_tiny(path, ["x"], steps=0)
    with pytest.raises(ValueError, match="seq_len"):
        pretrain_tiny(path, ["x"], seq_len=10_000)
    assert sorted(os.listdir(tmp_path)) == ["m"]  # failed runs leave no staging directories


def test_tiny_model_dir_builds_once_and_reuses(tiny_dir, monkeypatch):
    meta = json.loads((tiny_dir / METADATA_FILE).read_text())
    assert meta["pretrain"]["final_loss"] < meta["pretrain"]["initial_loss"]
    assert meta["fingerprint"] == fingerprint_directory(tiny_dir)

    def no_rebuild(*args, **kwargs):
        raise AssertionError("cached model was rebuilt")

    monkeypatch.setattr(tiny_module, "_write_tiny_model", no_rebuild)
    again = tiny_model_dir(tiny_dir.parent, TinyModelSpec(), arithmetic_texts(), **SMALL_PRETRAIN)
    assert again == tiny_dir
    with pytest.raises(AssertionError, match="rebuilt"):  # other texts -> other entry
        tiny_model_dir(tiny_dir.parent, TinyModelSpec(), arithmetic_texts(seed=1), steps=30)
    assert [p.name for p in tiny_dir.parent.iterdir()] == [tiny_dir.name]


# --- loading ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("dtype", "expected"), [("fp32", torch.float32), ("bf16", torch.bfloat16)])
def test_load_causal_lm_dtypes(tiny_dir, dtype, expected):
    model, tok = load_causal_lm(str(tiny_dir), dtype=dtype)
    assert model.dtype == expected
    assert all(p.dtype == expected for p in model.parameters())
    assert not model.training
    assert model.device.type == ("cuda" if torch.cuda.is_available() else "cpu")
    assert tok.pad_token_id == PAD_ID
    ids = torch.tensor([tok("Q: 1+2=? A:")["input_ids"]], device=model.device)
    with torch.no_grad():
        logits = model(input_ids=ids).logits
    assert logits.shape == (1, ids.shape[1], VOCAB_SIZE)
    assert torch.isfinite(logits.float()).all()


def test_load_causal_lm_sets_a_missing_pad_token_to_eos(tiny_dir, tmp_path):
    model = AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True)
    model.save_pretrained(tmp_path)
    tok = build_byte_tokenizer()
    tok.pad_token = None
    tok.save_pretrained(tmp_path)
    _, loaded = load_causal_lm(str(tmp_path), device="cpu")
    assert loaded.pad_token_id == EOS_ID


def test_missing_path_is_a_load_error_without_network(tmp_path, network_attempts):
    missing = tmp_path / "no-such-model"
    with pytest.raises(ModelLoadError, match="no-such-model") as info:
        load_causal_lm(str(missing))
    assert str(missing) in str(info.value)
    assert isinstance(info.value, ValueError)
    # A hub id that is not in the local cache: refused without a connection attempt.
    with pytest.raises(ModelLoadError, match="fedsrd-test/not-a-cached-model"):
        load_causal_lm("fedsrd-test/not-a-cached-model")
    assert network_attempts == []


def test_a_hub_id_in_the_local_cache_loads_offline(tiny_dir, tmp_path, monkeypatch):
    # The Hugging Face cache layout: refs/main names the snapshot holding the files.
    repo = tmp_path / "hub" / "models--fedsrd-test--tiny"
    commit = "0123456789abcdef0123456789abcdef01234567"
    shutil.copytree(tiny_dir, repo / "snapshots" / commit)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(commit)
    monkeypatch.setattr(hf_constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    model, _ = load_causal_lm("fedsrd-test/tiny", device="cpu")
    assert model_fingerprint(model) == fingerprint_directory(tiny_dir)
    assert fingerprint_directory("fedsrd-test/tiny") == model_fingerprint(model)


def test_non_causal_and_incomplete_models_are_load_errors(tmp_path, tiny_dir):
    ViTConfig().save_pretrained(tmp_path / "vit")
    with pytest.raises(ModelLoadError, match="not a causal language model"):
        load_causal_lm(str(tmp_path / "vit"))
    AutoModelForCausalLM.from_pretrained(tiny_dir, local_files_only=True).save_pretrained(
        tmp_path / "no-tokenizer"
    )
    with pytest.raises(ModelLoadError, match="tokenizer"):
        load_causal_lm(str(tmp_path / "no-tokenizer"), device="cpu")
    with pytest.raises(ModelLoadError, match="dtype"):
        load_causal_lm(str(tiny_dir), dtype="fp8")  # type: ignore[arg-type]
    with pytest.raises(ModelLoadError, match="device"):
        load_causal_lm(str(tiny_dir), device="not-a-device")


# --- LoRA -------------------------------------------------------------------------------------


# peft 0.21 calls an API that transformers 5 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_peft_lora_all_linear_targets_the_llama_projections(tiny_dir):
    model, _ = load_causal_lm(str(tiny_dir), device="cpu")
    base_print = model_fingerprint(model)
    peft_model = get_peft_model(model, LoraConfig(r=4, target_modules="all-linear"))
    prefix = "base_model.model."
    adapted = sorted(
        name.removeprefix(prefix)
        for name, module in peft_model.named_modules()
        if isinstance(module, LoraLayer)
    )
    expected = sorted(
        f"model.layers.{i}.{kind}"
        for i in range(TinyModelSpec().num_hidden_layers)
        for kind in (
            *(f"self_attn.{p}_proj" for p in "qkvo"),
            *(f"mlp.{p}_proj" for p in ("gate", "up", "down")),
        )
    )
    assert adapted == expected  # lm_head is left alone
    trainable = sum(p.numel() for p in peft_model.parameters() if p.requires_grad)
    assert 0 < trainable < 0.2 * model.num_parameters()
    # Fingerprint the base before adapting; unloading the (zero-initialised) adapters restores it.
    assert model_fingerprint(peft_model.unload()) == base_print


# --- mixture-of-experts models ------------------------------------------------------------------


def _moe_config(kind: str):
    """A few-thousand-parameter random Mixtral or Qwen2-MoE (4 routed experts, top 2), built
    here: no download. Qwen2-MoE also has a shared expert (dense MLP) and its gate."""
    from transformers import MixtralConfig, Qwen2MoeConfig

    common = {
        "vocab_size": VOCAB_SIZE,
        "hidden_size": 32,
        "num_hidden_layers": 2,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 512,
        "num_experts_per_tok": 2,
        "bos_token_id": BOS_ID,
        "eos_token_id": EOS_ID,
        "pad_token_id": PAD_ID,
    }
    if kind == "mixtral":
        return MixtralConfig(intermediate_size=48, num_local_experts=4, **common)
    return Qwen2MoeConfig(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=4,
        decoder_sparse_step=1,
        **common,
    )


@pytest.fixture(scope="module", params=["mixtral", "qwen2_moe"])
def moe_dir(request, tmp_path_factory):
    torch.manual_seed(0)
    path = tmp_path_factory.mktemp(f"moe-{request.param}")
    AutoModelForCausalLM.from_config(_moe_config(request.param)).save_pretrained(path)
    build_byte_tokenizer(model_max_length=512).save_pretrained(path)
    return path


def _expert_slots(layout, which):
    return sorted(k for k in layout if k.endswith("]") and f".experts.{which}[" in k)


# peft 0.21 calls an API that transformers 5 deprecates; not ours to fix.
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_moe_models_adapt_every_routed_expert_and_say_so(moe_dir, caplog):
    from fedsrd_core.export import adapter_layout_for
    from fedsrd_core.peft_lora import adapter_layout, attach_lora, lora_config

    model, _ = load_causal_lm(str(moe_dir), device="cpu")
    with caplog.at_level("INFO", logger="fedsrd_core.peft_lora"):
        layout = adapter_layout(attach_lora(model, lora_config(rank=4)))
    assert "one rank-4 adapter per routed expert (16 in all); routers are not adapted" in (
        caplog.text
    )
    assert adapter_layout_for(str(moe_dir), rank=4) == layout  # meta device, same names
    hidden = 32
    for i in range(2):
        for which in ("gate_up_proj", "down_proj"):
            slots = _expert_slots(layout, which)
            assert [s for s in slots if s.startswith(f"model.layers.{i}.")] == [
                f"model.layers.{i}.mlp.experts.{which}[{e}]" for e in range(4)
            ]
        ffn = 48 if "Mixtral" in type(model).__name__ else 24
        assert layout[f"model.layers.{i}.mlp.experts.gate_up_proj[0]"] == (2 * ffn, hidden)
        assert layout[f"model.layers.{i}.mlp.experts.down_proj[3]"] == (hidden, ffn)
        assert layout[f"model.layers.{i}.self_attn.q_proj"] == (hidden, hidden)
        assert f"model.layers.{i}.mlp.gate" not in layout  # the router keeps its choice
    if "Qwen2Moe" in type(model).__name__:  # the shared (dense) expert is a plain MLP
        assert layout["model.layers.0.mlp.shared_expert.up_proj"] == (40, hidden)
    # peft adapts fused experts without dropout: refused by name, not a worker's traceback.
    from fedsrd_core.peft_lora import LoraSettingError

    with pytest.raises(LoraSettingError, match=r"dropout 0\.1 cannot be applied") as info:
        adapter_layout_for(str(moe_dir), rank=4, dropout=0.1)
    assert info.value.setting == "dropout"
    attention_only = adapter_layout_for(str(moe_dir), rank=4, target_modules=["q_proj", "v_proj"])
    assert len(attention_only) == 4  # the documented way to leave the experts alone


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_a_local_round_trains_the_routed_experts_and_state_round_trips(moe_dir):
    from fedsrd_core.data import generate
    from fedsrd_core.peft_lora import (
        adapter_layout,
        attach_lora,
        lora_config,
        peft_to_state,
        state_to_peft,
    )
    from fedsrd_core.state import init_state
    from fedsrd_core.training import TrainConfig, local_round

    model, tok = load_causal_lm(str(moe_dir), device="cpu")
    peft_model = attach_lora(model, lora_config(rank=4))
    start = init_state(adapter_layout(peft_model), 4, seed=0)
    state_to_peft(start, peft_model)
    back = peft_to_state(peft_model)
    for name, f in start.items():  # each expert's slice lands where it is read back from
        assert torch.equal(back[name].A, f.A) and torch.equal(back[name].B, f.B), name
    data = generate("arithmetic", 8, seed=0)
    config = TrainConfig(steps=2, batch_size=4, seq_len=256, lr=1e-2)
    trained, stats = local_round(peft_model, tok, data, start, config, seed=0)
    assert all(math.isfinite(x) for x in stats.losses)
    moved = {n for n, f in trained.items() if not torch.equal(f.B, start[n].B)}
    for which in ("gate_up_proj", "down_proj"):
        assert set(_expert_slots(trained, which)) & moved, which  # routed experts learn
    assert "model.layers.0.self_attn.q_proj" in moved


@pytest.mark.slow
@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_fedsrd_simulate_runs_a_moe_model(moe_dir, tmp_path, capsys):
    # The issue's reproduction: this ended in "model factors A (32, 128) / B (64, 32) differ
    # from the state's (8, 128) / (64, 8)" (peft stacks the experts' factors).
    from fedsrd_core.cli import main

    out = tmp_path / "sim"
    code = main(
        [
            "simulate", "--model", str(moe_dir), "--rounds", "1", "--steps", "1",
            "--batch-size", "2", "--seq-len", "384", "--train-per-domain", "4",
            "--eval-per-domain", "2", "--rank", "2", "--out", str(out), "--quiet",
        ]
    )  # fmt: skip
    assert code == 0
    record = json.loads((out / "record.json").read_text())
    assert len(record["rounds"]) == 1 and record["rounds"][0]["digest"]
    assert "LoRA r=2" in capsys.readouterr().out


@pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")
def test_moe_export_loads_in_peft_both_ways(moe_dir, tmp_path):
    from peft import AutoPeftModelForCausalLM, PeftModel

    from fedsrd_core.export import adapter_layout_for, write_peft_adapter
    from fedsrd_core.peft_lora import attach_lora, lora_config, state_to_peft
    from fedsrd_core.state import init_state

    state = init_state(adapter_layout_for(str(moe_dir), rank=4), 4, seed=3)
    gen = torch.Generator().manual_seed(4)
    for _, f in state.items():
        f.B.copy_(torch.randn(f.B.shape, generator=gen) * 0.5)
    out = write_peft_adapter(state, tmp_path / "adapter", base_model=str(moe_dir), rank=4)
    raw = json.loads((out / "adapter_config.json").read_text())
    assert raw["target_parameters"] == [
        f"model.layers.{i}.mlp.experts.{w}" for i in range(2) for w in ("down_proj", "gate_up_proj")
    ]
    assert raw["rank_pattern"] == {} and raw["fan_in_fan_out"] is False

    ids = torch.tensor([[BOS_ID, *b"Q: 1+2=? A:"]])

    def logits(m):
        with torch.no_grad():
            return m.eval()(input_ids=ids).logits

    def base():
        return AutoModelForCausalLM.from_pretrained(moe_dir, local_files_only=True)

    reference = attach_lora(base(), lora_config(rank=4))
    state_to_peft(state, reference)
    want = logits(reference)
    assert not torch.allclose(want, logits(base()), atol=1e-4)  # the experts' adapters matter
    torch.testing.assert_close(logits(PeftModel.from_pretrained(base(), out)), want)
    auto = AutoPeftModelForCausalLM.from_pretrained(out, local_files_only=True)
    torch.testing.assert_close(logits(auto), want)
