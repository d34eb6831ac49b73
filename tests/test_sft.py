"""`flaxlm sft` end to end, the response-only loss mask, and init_from: parameters onto
another mesh, refusal of another tokenizer or model shape, lineage."""

from __future__ import annotations

import itertools
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import linen as nn

from model import sharding as sh
from model import tokenizer as tk
from model.config import get_preset
from model.transformer import Transformer
from train import sft
from train.checkpoint import Checkpointer
from train.data import pipelines
from train.metrics import read_metrics
from train.optim import make_optimizer
from train.parent import InitFromError, lineage, load_params, read_parent
from train.state import create_train_state
from train.step import lm_loss_fn

ROOT = pathlib.Path(__file__).resolve().parents[1]
CONFIG = str(ROOT / "configs" / "sft.py")
SHAKESPEARE = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
WORDS = ["king", "queen", "lord", "sword", "crown", "night"]


def char_tokenizer(lines: range) -> tk.Tokenizer:
    with open(SHAKESPEARE, encoding="utf-8") as f:
        text = itertools.islice(f, lines.start, lines.stop)
        return tk.train_tokenizer(tk.training_sentences(text), 4096, "char")


def write_parent(workdir: pathlib.Path, tokenizer: tk.Tokenizer) -> tuple[pathlib.Path, dict]:
    """A pretraining-style checkpoint (random tiny model, this tokenizer) at step 3."""
    cfg = get_preset("tiny", vocab_size=-(-tokenizer.vocab_size // 128) * 128)
    mesh, rules = sh.make_mesh(-1, 1, 1), sh.get_rules("fsdp")
    tx, _ = make_optimizer(total_steps=10)
    state, _ = create_train_state(Transformer(cfg), tx, mesh, rules, seed=1)
    tokenizer.save(workdir / "tokenizer")
    meta = {
        "stage": "pretrain",
        "config": {"seq_len": 64},
        "model": cfg.to_dict(),
        "tokenizer": {"path": "tokenizer", "fingerprint": tokenizer.fingerprint},
        "lineage": lineage("pretrain"),
    }
    checkpointer = Checkpointer(workdir, async_save=False)
    checkpointer.save(3, state, {}, meta)
    checkpointer.close()
    return workdir, jax.device_get(state.params)


def conversations(n: int, seed: int) -> list[dict]:
    rng = np.random.default_rng(seed)
    rows = []
    for i in range(n):
        word = WORDS[rng.integers(len(WORDS))]
        if i % 3:
            rows.append({"prompt": f"say {word} twice", "response": f"{word} {word}"})
        else:  # multi-turn, with a system turn
            rows.append(
                {
                    "messages": [
                        {"role": "system", "content": "be brief"},
                        {"role": "user", "content": "hail"},
                        {"role": "assistant", "content": "hail"},
                        {"role": "user", "content": f"name {word}"},
                        {"role": "assistant", "content": word},
                    ]
                }
            )
    return rows


def write_jsonl(path: pathlib.Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def setup(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("sft")
    tokenizer = char_tokenizer(range(0, 2000))
    parent, params = write_parent(root / "parent", tokenizer)
    return {
        "root": root,
        "tokenizer": tokenizer,
        "parent": parent,
        "params": params,
        "train": write_jsonl(root / "train.jsonl", conversations(64, 0)),
        "heldout": write_jsonl(root / "heldout.jsonl", conversations(8, 1)),
    }


def args(setup: dict, workdir: pathlib.Path, *overrides: str) -> list[str]:
    return [
        "--config",
        f"{CONFIG}:tiny",
        "--workdir",
        str(workdir),
        f"--config.init_from={setup['parent']}",
        f"--config.data.path={setup['train']}",
        f"--config.eval.path={setup['heldout']}",
        f"--config.data.data_dir={setup['root'] / 'tfds'}",
        *overrides,
    ]


def test_sft_pulse(setup, tmp_path, capsys):
    workdir = tmp_path / "run"
    code = sft.main(
        args(
            setup,
            workdir,
            "--config.total_steps=2",
            "--config.log.every_steps=1",
            "--config.eval.every_steps=2",
            "--config.eval.num_samples=2",
            "--config.eval.sample_tokens=8",
        )
    )
    assert code == 0
    lines = read_metrics(workdir)
    train = [x for x in lines if "loss" in x]
    assert [x["step"] for x in train] == [1, 2]
    assert all(np.isfinite(x["loss"]) and x["num_tokens"] > 0 for x in train)
    assert [x["step"] for x in lines if "eval_loss" in x] == [2]
    samples = [json.loads(x) for x in (workdir / "samples.jsonl").read_text().splitlines()]
    assert len(samples) == 2 and all(s["step"] == 2 for s in samples)
    prompts = {f"say {w} twice" for w in WORDS} | {f"name {w}" for w in WORDS}
    assert all(s["prompt"] in prompts and isinstance(s["response"], str) for s in samples)
    assert "[sample step 2]" in capsys.readouterr().out
    own = read_parent(workdir)
    assert own.stage == "sft" and own.step == 2
    assert own.meta["lineage"]["parent"] == str(setup["parent"] / "checkpoints" / "3")
    assert own.meta["lineage"]["parent_lineage"]["stage"] == "pretrain"
    assert own.model == read_parent(setup["parent"]).model
    assert own.tokenizer_fingerprint == setup["tokenizer"].fingerprint
    assert (workdir / "tokenizer" / "tokenizer.model").is_file()
    config = json.loads((workdir / "config.json").read_text())
    assert config["model"]["d_model"] == 64 and config["init_from"] == str(setup["parent"])


def test_init_from_loads_the_parent_params_onto_another_mesh(setup):
    parent = read_parent(setup["parent"])
    by_directory = read_parent(setup["parent"] / "checkpoints" / "3")  # the other init_from form
    assert by_directory.checkpoint == parent.checkpoint and by_directory.meta == parent.meta
    cfg = get_preset("tiny", **{k: v for k, v in parent.model.items() if k != "dtype"})
    mesh = sh.make_mesh(4, 1, 2)
    tx, _ = make_optimizer(total_steps=10)
    state, _ = sft.init_state_from(parent, Transformer(cfg), tx, mesh, sh.get_rules("tp"), seed=7)
    q = state.params["layers"]["attn"]["q"]
    assert q.sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    for a, b in zip(jax.tree.leaves(state.params), jax.tree.leaves(setup["params"]), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_loss_ignores_prompt_targets(setup):
    """The SFT step's loss (train/step.py lm_loss_fn on the SFT batch): a prompt token's
    target can be anything; a response token's target matters."""
    tokenizer = setup["tokenizer"]
    records = []
    for row in conversations(6, 2):
        messages = row.get("messages") or [
            {"role": "user", "content": row["prompt"]},
            {"role": "assistant", "content": row["response"]},
        ]
        records.append(
            {"roles": [m["role"] for m in messages], "contents": [m["content"] for m in messages]}
        )
    options = pipelines.DataOptions(shuffle=False, num_threads=1, prefetch=2)
    batch = next(iter(pipelines.sft_dataset(records, tokenizer, 2, 96, options)))
    # The mask is the chat template's assistant mask, shifted onto the targets.
    first = records[0]
    ids, mask = tokenizer.encode_chat(
        [{"role": r, "content": c} for r, c in zip(first["roles"], first["contents"], strict=True)]
    )
    n = len(ids) - 1
    np.testing.assert_array_equal(batch["targets"][0, :n], ids[1:])
    np.testing.assert_array_equal(batch["loss_mask"][0, :n], mask[1:])
    model = Transformer(get_preset("tiny", vocab_size=384))
    params = nn.unbox(jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    grad_fn = jax.jit(lm_loss_fn(model))
    (loss, count), grads = grad_fn(params["params"], batch, jax.random.key(0))
    prompt = np.argwhere((batch["loss_mask"] == 0) & (batch["segment_ids"] > 0))
    response = np.argwhere(batch["loss_mask"] > 0)
    assert len(prompt) > 10 and len(response) > 10
    changed = dict(batch, targets=batch["targets"].copy())
    for b, t in prompt:
        changed["targets"][b, t] = (changed["targets"][b, t] + 17) % 300
    (loss2, count2), grads2 = grad_fn(params["params"], changed, jax.random.key(0))
    assert float(loss) == float(loss2) and float(count) == float(count2) == len(response)
    for a, b in zip(jax.tree.leaves(grads), jax.tree.leaves(grads2), strict=True):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    b, t = response[0]
    changed["targets"][b, t] = (changed["targets"][b, t] + 17) % 300
    (loss3, _), _ = grad_fn(params["params"], changed, jax.random.key(0))
    assert float(loss3) != float(loss)


@pytest.mark.parametrize(
    "override, message",
    [
        ("--config.model.d_model=128", "model.d_model=128 (checkpoint: 64)"),
        ("--config.model.num_layers=3", "model.num_layers=3 (checkpoint: 2)"),
        ("--config.init_from=/nonexistent/run", "no such workdir or checkpoint directory"),
        ("--config.init_from=", "init_from is empty"),
        ("--config.eval.num_samples=-1", "eval.num_samples=-1"),
        ("--config.seq_len=4096", "seq_len=4096 exceeds model.max_seq_len=128"),
    ],
)
def test_bad_input_is_one_line_and_writes_nothing(setup, tmp_path, capsys, override, message):
    workdir = tmp_path / "run"
    assert sft.main(args(setup, workdir, override)) == 2
    err = capsys.readouterr().err
    assert message in err and len(err.strip().splitlines()) == 1, err
    assert not workdir.exists()


def test_init_from_refuses_another_tokenizer(setup, tmp_path, capsys):
    other = char_tokenizer(range(20000, 20300))  # other lines: another alphabet order
    assert other.fingerprint != setup["tokenizer"].fingerprint
    other.save(tmp_path / "other")
    workdir = tmp_path / "run"
    code = sft.main(args(setup, workdir, f"--config.data.tokenizer={tmp_path / 'other'}"))
    assert code == 2
    err = capsys.readouterr().err
    assert f"fingerprint {other.fingerprint}" in err and "token ids would change meaning" in err
    assert not workdir.exists()


def test_load_params_refuses_another_shape(setup):
    parent = read_parent(setup["parent"])
    bigger = get_preset("tiny", vocab_size=parent.model["vocab_size"] + 128)
    target = jax.eval_shape(
        lambda: nn.unbox(Transformer(bigger).init(jax.random.key(0), jnp.zeros((1, 8), jnp.int32)))
    )["params"]
    sharding = sh.replicated(sh.make_mesh(-1, 1, 1))
    target = jax.tree.map(
        lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=sharding), target
    )
    with pytest.raises(InitFromError, match=r"params\['embedding'\] has shape \(\d+, 64\)"):
        load_params(parent, target)
