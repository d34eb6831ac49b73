"""A pretrained model's HF tokenizer directory (model/pretrained_tokenizer.py): special ids
from the files, the chat template rendered as transformers renders it, and the assistant
mask on ChatML (SmolLM2, Qwen2) and Gemma layouts, checked against hand-written replies."""

import json
import pickle

import numpy as np
import pytest
from conftest import require
from tokenizers import Tokenizer, models, pre_tokenizers, trainers

from model.pretrained_tokenizer import PretrainedTokenizer, TokenizerFileError
from model.tokenizer import load_tokenizer

# SmolLM2-Instruct's layout: a default system turn, then ChatML turns.
SMOLLM_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful AI assistant<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Qwen2's layout: the same markers, a different default system turn, trimmed content.
QWEN2_TEMPLATE = (
    "{% for message in messages %}"
    "{% if loop.first and messages[0]['role'] != 'system' %}"
    "{{ '<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n' }}{% endif %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] | trim + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Gemma's layout: bos, "model" for the assistant, <end_of_turn>.
GEMMA_TEMPLATE = (
    "{{ bos_token }}{% for message in messages %}"
    "{% set role = 'model' if message['role'] == 'assistant' else message['role'] %}"
    "{{ '<start_of_turn>' + role + '\n' + message['content'] + '<end_of_turn>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<start_of_turn>model\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<bos>", "<start_of_turn>"]
SPECIALS += ["<end_of_turn>"]
CHAT = [
    {"role": "user", "content": "What is 2+2?"},
    {"role": "assistant", "content": "It is 4."},
    {"role": "user", "content": "And 3+3?"},
    {"role": "assistant", "content": "Six, I think."},
]


def write_dir(path, template, bos="<|endoftext|>", eos="<|im_end|>", pad=None):
    """A small byte-level BPE tokenizer (trained here) with the template's markers."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    trainer = trainers.BpeTrainer(
        vocab_size=400,
        special_tokens=SPECIALS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    corpus = [m["content"] for m in CHAT] * 20 + ["system user assistant model helpful"] * 20
    tok.train_from_iterator(corpus, trainer)
    from tokenizers import decoders

    tok.decoder = decoders.ByteLevel()
    path.mkdir(parents=True, exist_ok=True)
    tok.save(str(path / "tokenizer.json"))
    config = {"bos_token": bos, "eos_token": eos, "pad_token": pad, "unk_token": None}
    if template is not None:
        config["chat_template"] = template
    (path / "tokenizer_config.json").write_text(json.dumps(config))
    return path


def reply_runs(tok: PretrainedTokenizer, ids: np.ndarray, mask: np.ndarray) -> list[str]:
    """The text of each run of masked tokens, special tokens kept."""
    runs, current = [], []
    for token, m in zip(ids.tolist(), mask.tolist(), strict=True):
        if m:
            current.append(token)
        elif current:
            runs.append(current)
            current = []
    if current:
        runs.append(current)
    return [tok._tok.decode(run, skip_special_tokens=False) for run in runs]


@pytest.mark.parametrize(
    "template, end", [(SMOLLM_TEMPLATE, "<|im_end|>"), (QWEN2_TEMPLATE, "<|im_end|>")]
)
def test_chatml_mask_covers_each_reply_and_its_end_of_turn(tmp_path, template, end):
    tok = load_tokenizer(write_dir(tmp_path / "tok", template))
    assert isinstance(tok, PretrainedTokenizer)
    assert tok.end_of_turn_id == tok._tok.token_to_id(end)
    ids, mask = tok.encode_chat(CHAT)
    assert reply_runs(tok, ids, mask) == [f"It is 4.{end}", f"Six, I think.{end}"]
    # With a generation prompt nothing new is learned, and the prompt ends the ids.
    ids, mask = tok.encode_chat(CHAT[:1], add_generation_prompt=True)
    assert mask.sum() == 0
    assert tok._tok.decode(ids.tolist(), skip_special_tokens=False).endswith(
        "<|im_start|>assistant\n"
    )


def test_gemma_layout_end_of_turn_and_bos(tmp_path):
    tok = load_tokenizer(
        write_dir(tmp_path / "tok", GEMMA_TEMPLATE, bos="<bos>", eos="<|endoftext|>")
    )
    assert tok.end_of_turn_id == tok._tok.token_to_id("<end_of_turn>")
    assert tok.eos_id == tok._tok.token_to_id("<|endoftext|>")
    assert set(tok.stop_ids) == {tok.eos_id, tok.end_of_turn_id}
    ids, mask = tok.encode_chat(CHAT)
    assert ids[0] == tok._tok.token_to_id("<bos>")
    assert reply_runs(tok, ids, mask) == ["It is 4.<end_of_turn>", "Six, I think.<end_of_turn>"]
    assert tok.encode_document("abc")[0] == tok.bos_id and tok.encode_document("abc")[-1] == (
        tok.eos_id
    )


@pytest.mark.parametrize("template", [SMOLLM_TEMPLATE, QWEN2_TEMPLATE, GEMMA_TEMPLATE])
def test_rendering_matches_transformers(tmp_path, template):
    """transformers' apply_chat_template on the same files is the reference."""
    transformers = require("transformers")
    directory = write_dir(tmp_path / "tok", template, bos="<bos>")
    ours = load_tokenizer(directory)
    theirs = transformers.AutoTokenizer.from_pretrained(directory)
    for messages, generation in ((CHAT, False), (CHAT[:3], True)):
        expected = theirs.apply_chat_template(
            messages, add_generation_prompt=generation, tokenize=False
        )
        assert ours.render(messages, generation) == expected
        want = theirs(expected, add_special_tokens=False)["input_ids"]
        assert ours.encode_chat(messages, generation)[0].tolist() == want


def test_pickle_save_and_fingerprint(tmp_path):
    tok = load_tokenizer(write_dir(tmp_path / "tok", SMOLLM_TEMPLATE))
    again = pickle.loads(pickle.dumps(tok))
    assert again.encode("It is 4.") == tok.encode("It is 4.")
    assert tok.decode(tok.encode("Six, I think.")) == "Six, I think."
    tok.save(tmp_path / "copy")
    assert load_tokenizer(tmp_path / "copy").fingerprint == tok.fingerprint


def test_missing_template_and_bad_special_token_are_one_line(tmp_path):
    tok = load_tokenizer(write_dir(tmp_path / "plain", None))
    assert tok.end_of_turn_id == tok.eos_id  # no template: replies stop at eos
    with pytest.raises(TokenizerFileError, match="no chat template"):
        tok.encode_chat(CHAT)
    with pytest.raises(TokenizerFileError, match="eos_token='<nope>' is not in the vocabulary"):
        load_tokenizer(write_dir(tmp_path / "bad", SMOLLM_TEMPLATE, eos="<nope>"))


def test_import_hf_keeps_the_checkpoints_own_tokenizer(tmp_path):
    """import-hf copies tokenizer.json + tokenizer_config.json; chat then uses them."""
    transformers = require("transformers")
    from train import hf_cli, sample

    hf_dir = write_dir(tmp_path / "hf", SMOLLM_TEMPLATE)
    vocab = load_tokenizer(hf_dir).vocab_size
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=64,
        tie_word_embeddings=True,
    )
    transformers.LlamaForCausalLM(config).save_pretrained(hf_dir)
    hf_cli.import_hf(hf_dir, tmp_path / "run")
    copied = load_tokenizer(tmp_path / "run" / "tokenizer")
    assert copied.fingerprint == load_tokenizer(hf_dir).fingerprint
    policy = sample.Policy(tmp_path / "run")
    assert policy.tokenizer.fingerprint == copied.fingerprint
    assert sample.is_chat(policy, "auto")
    ids = sample.encode_prompt(policy.tokenizer, "What is 2+2?", chat=True)
    want, _ = copied.encode_chat([{"role": "user", "content": "What is 2+2?"}], True)
    assert ids == want.tolist()
    # Export writes the same files back, and the tokenizer's ids into the configs.
    hf_cli.export_hf(tmp_path / "run", tmp_path / "out")
    assert load_tokenizer(tmp_path / "out").fingerprint == copied.fingerprint
    generation = json.loads((tmp_path / "out" / "generation_config.json").read_text())
    end = copied._tok.token_to_id("<|im_end|>")
    assert generation["eos_token_id"] == [end] and generation["pad_token_id"] == end
    exported = transformers.AutoTokenizer.from_pretrained(tmp_path / "out")
    text = exported.apply_chat_template(CHAT, tokenize=False)
    assert exported(text, add_special_tokens=False)["input_ids"] == (
        copied.encode_chat(CHAT)[0].tolist()
    )


@pytest.mark.parametrize("template", [SMOLLM_TEMPLATE, QWEN2_TEMPLATE, GEMMA_TEMPLATE])
def test_last_user_text_reads_the_prompt_back(tmp_path, template):
    """What a task's oracle sees: the last user turn's content, found through the template
    (left padding and earlier turns around it)."""
    tok = load_tokenizer(write_dir(tmp_path / "tok", template, bos="<bos>"))
    for conversation, want in ((CHAT[:1], "What is 2+2?"), (CHAT[:3], "And 3+3?")):
        ids, _ = tok.encode_chat(conversation, add_generation_prompt=True)
        padded = [tok.pad_id] * 5 + ids.tolist()
        assert tok.last_user_text(padded) == want
    # A row that is not a prompt awaiting a reply is refused, not misread.
    ids, _ = tok.encode_chat(CHAT[:2])
    with pytest.raises(ValueError, match="does not end with a user turn"):
        tok.last_user_text(ids)
