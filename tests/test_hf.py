"""Hugging Face interop (model/hf.py, model/hf_files.py, model/hf_tokenizer.py,
train/hf_cli.py) against `transformers` itself: logits of imported and exported models
(fp32, max abs diff <= 1e-4), greedy generation, exact round trips, the tokenizer, the
sharded-file path and refusals. HF models are built from small configs (no download)."""

from __future__ import annotations

import functools
import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import require
from flax import linen as nn

torch = require("torch")
transformers = require("transformers")
safetensors_torch = require("safetensors.torch")

from configs import sft as sft_config  # noqa: E402
from model import generate, hf, hf_files  # noqa: E402
from model import sharding as sh  # noqa: E402
from model import tokenizer as tk  # noqa: E402
from model.config import ModelConfig  # noqa: E402
from model.hf_tokenizer import write_hf_tokenizer  # noqa: E402
from model.transformer import Transformer  # noqa: E402
from orchestrate import cli  # noqa: E402
from train import hf_cli, sft  # noqa: E402
from train.checkpoint import Checkpointer  # noqa: E402
from train.parent import lineage, load_params, read_parent  # noqa: E402
from train.state import abstract_sharded_params  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
TOLERANCE = 1e-4
SAMPLE_TEXT = (
    "First Citizen:\nBefore we proceed any further, hear me speak.\n\n"
    "All:  Speak,\tspeak. 1234 émoji 😀 漢字 <|user|>hi<|end|>"
)
MAX_DIFFS: dict[str, float] = {}  # measured differences, printed at the end (-s)


def lines(n: int) -> list[str]:
    with open(SHAKESPEARE, encoding="utf-8") as f:
        return list(itertools.islice(f, n))


@pytest.fixture(scope="module")
def tokenizer() -> tk.Tokenizer:
    return tk.train_tokenizer(tk.training_sentences(lines(3000)), 320, "bpe", num_threads=1)


def hf_llama(kv_heads: int, tied: bool, vocab: int = 384, seed: int = 0):
    """A random LlamaForCausalLM; every weight (norm scales too) ~ N(0, 0.2^2)."""
    torch.manual_seed(seed)
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=kv_heads,
        head_dim=16,
        max_position_embeddings=128,
        rope_theta=500.0,
        rms_norm_eps=1e-5,
        tie_word_embeddings=tied,
        bos_token_id=tk.BOS_ID,
        eos_token_id=tk.EOS_ID,
        pad_token_id=tk.PAD_ID,
    )
    model = transformers.LlamaForCausalLM(config).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.normal_(0.0, 0.2)
    return model


def torch_logits(model, tokens: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        return model(torch.tensor(tokens)).logits.float().numpy()


@functools.cache
def forward(cfg: ModelConfig, lm_head: bool = True, scalar_head: bool = False):
    """Jitted (params, tokens, segment_ids) -> TransformerOutput, one per model."""
    model = Transformer(cfg, lm_head=lm_head, scalar_head=scalar_head)
    return jax.jit(
        lambda params, tokens, segment_ids=None: model.apply(
            {"params": params}, tokens, segment_ids=segment_ids
        )
    )


def flax_logits(cfg: ModelConfig, params, tokens: np.ndarray) -> np.ndarray:
    return np.asarray(forward(cfg)(params, jnp.asarray(tokens)).logits)


def record(name: str, diff: float) -> float:
    MAX_DIFFS[name] = diff
    print(f"[hf parity] {name}: max abs logit diff {diff:.3g}")
    return diff


def random_tokens(vocab: int, seed: int, shape=(3, 48)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, vocab, shape)


def abstract(model: Transformer, mesh, rules):
    return abstract_sharded_params(model, mesh, rules)


# ----------------------------------------------------------------------------- import


@pytest.mark.parametrize(
    "kv_heads,tied,mesh_shape,strategy,scan",
    [
        (4, True, (1, 8, 1), "fsdp", True),
        (2, False, (2, 2, 2), "fsdp_tp", True),
        (4, False, None, "dp", True),
        (2, True, (1, 1, 1), "dp", False),
    ],
    ids=["mha-tied", "gqa-untied", "mha-untied", "gqa-tied-unscanned"],
)
def test_imported_logits_match_torch(tmp_path, kv_heads, tied, mesh_shape, strategy, scan):
    """HF -> flaxlm params, sharded on several meshes (FSDP, FSDP x TP with replication
    over data, replicated, one device), scanned and per-layer."""
    model = hf_llama(kv_heads, tied, seed=kv_heads + tied)
    model.save_pretrained(tmp_path)
    hf_config = hf_files.read_config(tmp_path)
    cfg, reward = hf.config_from_hf(hf_config, dtype="float32", scan_layers=scan)
    assert not reward and (cfg.num_kv_heads, cfg.tie_embeddings) == (kv_heads, tied)
    assert cfg.rope_theta == 500.0 and cfg.norm_eps == 1e-5
    flax_model = Transformer(cfg)
    devices = 8 if mesh_shape is None else int(np.prod(mesh_shape))
    mesh = sh.make_mesh(*(mesh_shape or (8, 1, 1)), devices=jax.devices()[:devices])
    target = abstract(flax_model, mesh, sh.get_rules(strategy))
    reader = hf_files.SafetensorsDir(tmp_path)
    hf.check_names(reader.names(), cfg)
    params = hf.params_from_hf(reader.get, cfg, target)
    reader.close()
    layers = "layers" if scan else "layers_1"
    assert params[layers]["attn"]["q"].sharding == target[layers]["attn"]["q"].sharding
    tokens = random_tokens(cfg.vocab_size, seed=kv_heads)
    diff = np.abs(flax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max()
    assert record(f"import {'gqa' if kv_heads < 4 else 'mha'} tied={tied}", diff) <= TOLERANCE


def test_import_cli_writes_an_sft_ready_workdir(tmp_path, tokenizer):
    hf_dir = tmp_path / "hf"
    model = hf_llama(2, False, seed=5)
    model.save_pretrained(hf_dir)
    (hf_dir / tk.MODEL_FILE).write_bytes(tokenizer.model_proto)  # flaxlm's fixed ids
    workdir = tmp_path / "imported"
    assert cli.main(["import-hf", "--hf", str(hf_dir), "--workdir", str(workdir)]) == 0
    parent = read_parent(workdir)
    assert parent.stage == "import-hf" and parent.step == 0
    assert parent.meta["lineage"]["parent"] == str(hf_dir.resolve())
    assert parent.tokenizer_fingerprint == tokenizer.fingerprint
    # What `flaxlm sft --config.init_from=DIR` does before training:
    config = sft_config.get_config("tiny")
    config.init_from = str(workdir)
    config.model.dtype = "float32"
    _, child_tokenizer, cfg = sft.start_from_parent(config, "sft")
    assert child_tokenizer.fingerprint == tokenizer.fingerprint and cfg.num_kv_heads == 2
    mesh, rules = sh.make_mesh(2, 4, 1), sh.get_rules("fsdp")
    params = load_params(parent, abstract(Transformer(cfg), mesh, rules))
    tokens = random_tokens(cfg.vocab_size, seed=1)
    diff = np.abs(flax_logits(cfg, params, tokens) - torch_logits(model, tokens)).max()
    assert record("import-hf CLI checkpoint", diff) <= TOLERANCE
    assert cli.main(["import-hf", "--hf", str(hf_dir), "--workdir", str(workdir)]) == 2


# ----------------------------------------------------------------------------- export


def write_workdir(
    workdir: pathlib.Path,
    cfg: ModelConfig,
    tokenizer: tk.Tokenizer,
    seed: int,
    heads: dict | None = None,
) -> dict:
    """A pretraining-style checkpoint of a random flaxlm model; returns its host params.

    Norm scales are drawn around 1 (and a reward bias set) so every tensor matters.
    """
    heads = heads or {"lm_head": True, "scalar_head": False}
    model = Transformer(cfg, **heads)
    init = jax.jit(lambda key: model.init(key, jnp.zeros((1, 8), jnp.int32))["params"])
    params = nn.unbox(init(jax.random.key(seed)))
    rng = np.random.default_rng(seed)

    def perturb(path, x):
        name = jax.tree_util.keystr(path)
        if "norm" in name:
            return x * rng.uniform(0.5, 1.5, x.shape).astype(np.float32)
        return x + 0.3 if "scalar_bias" in name else x

    params = jax.tree_util.tree_map_with_path(perturb, jax.device_get(params))
    tokenizer.save(workdir / "tokenizer")
    meta = {
        "stage": "reward" if heads["scalar_head"] else "pretrain",
        "config": {},
        "model": cfg.to_dict(),
        "heads": heads,
        "tokenizer": {"path": "tokenizer", "fingerprint": tokenizer.fingerprint},
        "lineage": lineage("pretrain"),
    }
    checkpointer = Checkpointer(workdir, async_save=False)
    checkpointer.save(4, {"step": jnp.asarray(4), "params": params}, {}, meta)
    checkpointer.close()
    return params


def small_config(tokenizer: tk.Tokenizer, **changes) -> ModelConfig:
    fields = dict(
        vocab_size=-(-tokenizer.vocab_size // 128) * 128,  # padded, as pretraining does
        d_model=64,
        num_layers=2,
        num_heads=4,
        num_kv_heads=2,
        head_dim=16,
        mlp_dim=96,
        max_seq_len=128,
        rope_theta=2000.0,
        norm_eps=1e-5,
        tie_embeddings=False,
        dtype="float32",
    )
    return ModelConfig(**(fields | changes))


@pytest.fixture(scope="module")
def exported(tmp_path_factory, tokenizer) -> dict:
    root = tmp_path_factory.mktemp("export")
    cfg = small_config(tokenizer)
    params = write_workdir(root / "run", cfg, tokenizer, seed=3)
    code = cli.main(["export-hf", "--workdir", str(root / "run"), "--out", str(root / "hf")])
    assert code == 0
    return {"root": root, "cfg": cfg, "params": params, "hf": root / "hf"}


def test_exported_logits_and_greedy_generation_match(exported):
    cfg, params = exported["cfg"], exported["params"]
    files = sorted(p.name for p in exported["hf"].iterdir())
    assert "model.safetensors" in files and "model.safetensors.index.json" not in files
    model = transformers.AutoModelForCausalLM.from_pretrained(exported["hf"]).eval()
    assert type(model).__name__ == "LlamaForCausalLM" and model.dtype == torch.float32
    tokens = random_tokens(cfg.vocab_size, seed=2)
    diff = np.abs(torch_logits(model, tokens) - flax_logits(cfg, params, tokens)).max()
    assert record("export gqa untied", diff) <= TOLERANCE

    prompts = np.concatenate([np.full((2, 1), tk.BOS_ID), random_tokens(300, 9, (2, 7))], 1)
    model.generation_config.eos_token_id = None  # run the full 32 tokens, as ours does
    with torch.no_grad():
        theirs = model.generate(
            torch.tensor(prompts),
            attention_mask=torch.ones(prompts.shape, dtype=torch.long),
            max_new_tokens=32,
            do_sample=False,
        )[:, prompts.shape[1] :].numpy()
    ours = generate.generate(
        Transformer(cfg),
        params,
        prompts,
        np.ones_like(prompts),
        jax.random.key(0),
        max_new_tokens=32,
        sampling=generate.SamplingConfig(temperature=0.0),
    ).tokens
    np.testing.assert_array_equal(np.asarray(ours), theirs)
    generation = json.loads((exported["hf"] / "generation_config.json").read_text())
    assert generation["eos_token_id"] == [tk.EOS_ID, tk.END_ID]


def test_exported_tokenizer_encodes_like_flaxlm(exported, tokenizer):
    hf_tok = transformers.AutoTokenizer.from_pretrained(exported["hf"])
    assert "LlamaTokenizer" in type(hf_tok).__name__
    ids = (hf_tok.pad_token_id, hf_tok.unk_token_id, hf_tok.bos_token_id, hf_tok.eos_token_id)
    assert ids == (tk.PAD_ID, tk.UNK_ID, tk.BOS_ID, tk.EOS_ID)
    for text in [SAMPLE_TEXT, *lines(200)[100:140]]:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)
    assert hf_tok(SAMPLE_TEXT).input_ids == [tk.BOS_ID, *tokenizer.encode(SAMPLE_TEXT)]
    assert hf_tok.decode(tokenizer.encode(SAMPLE_TEXT)) == SAMPLE_TEXT
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": "Hail, my lord!\nSpeak."},
        {"role": "assistant", "content": "Hail."},
    ]
    chat = hf_tok.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
    chat = chat["input_ids"] if hasattr(chat, "keys") else chat
    assert list(chat) == tokenizer.encode_chat(messages, add_generation_prompt=True)[0].tolist()


@pytest.mark.parametrize("model_type,vocab", [("unigram", 320), ("char", 4096)])
def test_other_tokenizer_types_encode_like_flaxlm(tmp_path, model_type, vocab):
    tokenizer = tk.train_tokenizer(
        tk.training_sentences(lines(3000)), vocab, model_type, num_threads=1
    )
    write_hf_tokenizer(tokenizer, tmp_path, 128)
    hf_tok = transformers.AutoTokenizer.from_pretrained(tmp_path)
    for text in [SAMPLE_TEXT, *lines(200)[100:140]]:
        assert hf_tok.encode(text, add_special_tokens=False) == tokenizer.encode(text)


def test_round_trips_are_exact(exported, tmp_path):
    """flaxlm -> HF -> flaxlm gives the same params; HF -> flaxlm -> HF the same tensors,
    the second export through the sharded path (tiny shard limit)."""
    workdir = tmp_path / "imported"
    hf_cli.import_hf(exported["hf"], workdir)
    parent = read_parent(workdir)
    assert (
        parent.tokenizer_fingerprint == read_parent(exported["root"] / "run").tokenizer_fingerprint
    )
    assert parent.model == exported["cfg"].to_dict()
    mesh, rules = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1]), sh.get_rules("dp")
    params = load_params(parent, abstract(Transformer(exported["cfg"]), mesh, rules))
    for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(exported["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

    out = tmp_path / "sharded"
    argv = ["export-hf", "--workdir", str(workdir), "--out", str(out), "--step", "0"]
    assert cli.main([*argv, "--max-shard-bytes", "100000"]) == 0
    index = json.loads((out / hf_files.INDEX_FILE).read_text())
    files = sorted(set(index["weight_map"].values()))
    assert len(files) > 2 and files[0].endswith(f"-of-{len(files):05d}.safetensors")
    assert not (out / hf_files.SINGLE_FILE).exists()
    original = safetensors_torch.load_file(exported["hf"] / hf_files.SINGLE_FILE)
    again: dict = {}
    for file in files:
        again |= safetensors_torch.load_file(out / file)
    assert sorted(again) == sorted(original) == sorted(index["weight_map"])
    for name, tensor in original.items():
        assert torch.equal(tensor, again[name]), name
    model = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    tokens = random_tokens(exported["cfg"].vocab_size, seed=4)
    diff = np.abs(torch_logits(model, tokens) - flax_logits(exported["cfg"], params, tokens))
    assert record("sharded export", diff.max()) <= TOLERANCE


def test_hf_import_export_round_trip_tied_bf16(tmp_path):
    """A tied bf16 HF checkpoint: import (fp32 params) and export as bf16 reproduce it."""
    model = hf_llama(2, True, seed=11).to(torch.bfloat16)
    model.save_pretrained(tmp_path / "hf")
    hf_cli.import_hf(tmp_path / "hf", tmp_path / "run", mesh_shape=(1, 1, 1), strategy="dp")
    assert read_parent(tmp_path / "run").model["dtype"] == "bfloat16"
    assert read_parent(tmp_path / "run").tokenizer_dir is None
    hf_cli.export_hf(tmp_path / "run", tmp_path / "out", dtype="bfloat16")
    original = safetensors_torch.load_file(tmp_path / "hf" / hf_files.SINGLE_FILE)
    again = safetensors_torch.load_file(tmp_path / "out" / hf_files.SINGLE_FILE)
    original.pop("lm_head.weight", None)  # a tied model's copy, if the writer kept it
    assert sorted(again) == sorted(original)
    for name, tensor in original.items():
        assert tensor.dtype == torch.bfloat16 and torch.equal(tensor, again[name]), name


def test_reward_model_exports_as_sequence_classification(tmp_path, tokenizer):
    cfg = small_config(tokenizer, tie_embeddings=True)
    heads = {"lm_head": False, "scalar_head": True}
    params = write_workdir(tmp_path / "rm", cfg, tokenizer, seed=6, heads=heads)
    hf_cli.export_hf(tmp_path / "rm", tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["LlamaForSequenceClassification"]
    bias = config["flaxlm"]["scalar_bias"]
    assert bias == pytest.approx(float(params["scalar_bias"]))
    model = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf")
    assert model.config.num_labels == 1 and model.config.pad_token_id == tk.PAD_ID
    tokens = random_tokens(cfg.vocab_size, seed=8, shape=(2, 24))
    tokens[tokens == tk.PAD_ID] = tk.BOS_ID
    tokens[1, 16:] = tk.PAD_ID  # right padding: HF scores the last non-pad token
    with torch.no_grad():
        theirs = model(torch.tensor(tokens)).logits[:, 0].numpy() + bias
    out = forward(cfg, **heads)(params, jnp.asarray(tokens), jnp.asarray(tokens != tk.PAD_ID))
    ours = np.asarray(out.scalars)[[0, 1], [23, 15]]
    assert record("reward export", np.abs(theirs - ours).max()) <= TOLERANCE
    hf_cli.import_hf(tmp_path / "hf", tmp_path / "back")
    mesh, rules = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1]), sh.get_rules("dp")
    back = load_params(
        read_parent(tmp_path / "back"), abstract(Transformer(cfg, **heads), mesh, rules)
    )
    for a, b in zip(jax.tree.leaves(back), jax.tree.leaves(params), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


# ----------------------------------------------------------------------------- refusals


@pytest.mark.parametrize(
    "change,field",
    [
        ({"rope_scaling": {"rope_type": "llama3", "factor": 8.0}}, "rope_scaling"),
        ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope_type"),
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"sliding_window": 4096}, "sliding_window"),
        ({"model_type": "mixtral"}, "model_type"),
        ({"partial_rotary_factor": 0.5}, "partial_rotary_factor"),
    ],
)
def test_unsupported_hf_configs_are_refused(change, field):
    base = hf_llama(4, True).config.to_dict()
    with pytest.raises(hf.UnsupportedConfigError, match=field):
        hf.config_from_hf(base | change)


def test_unsupported_flaxlm_models_are_refused(tmp_path, tokenizer, capsys):
    with pytest.raises(hf.UnsupportedConfigError, match=r"model\.activation='gelu'"):
        hf.config_to_hf(small_config(tokenizer, activation="gelu"))
    model = hf_llama(4, True)
    model.save_pretrained(tmp_path / "hf")
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    config["rope_scaling"] = {"rope_type": "linear", "factor": 2.0}
    (tmp_path / "hf" / "config.json").write_text(json.dumps(config))
    argv = ["import-hf", "--hf", str(tmp_path / "hf"), "--workdir", str(tmp_path / "run")]
    assert cli.main(argv) == 2
    assert "rope_scaling" in capsys.readouterr().err and not (tmp_path / "run").exists()
    extra = dict(safetensors_torch.load_file(tmp_path / "hf" / hf_files.SINGLE_FILE))
    extra["model.layers.0.self_attn.q_proj.bias"] = torch.zeros(64)
    with pytest.raises(hf.UnsupportedConfigError, match=r"q_proj\.bias"):
        hf.check_names(list(extra), hf.config_from_hf(model.config.to_dict())[0])


def test_plan_shards():
    sizes = [("a", 4), ("b", 4), ("c", 10), ("d", 1), ("e", 1)]
    assert hf_files.plan_shards(sizes, 8) == [["a", "b"], ["c"], ["d", "e"]]
    assert hf_files.plan_shards(sizes, 100) == [["a", "b", "c", "d", "e"]]
    assert hf_files.shard_file_names(2) == [
        "model-00001-of-00002.safetensors",
        "model-00002-of-00002.safetensors",
    ]
