"""LoRA (model/lora.py): step 0 is the base model exactly, only adapters train, optimizer
state is adapter-sized, adapter gradients match jax.grad of the explicit merged-weight
formula, pulses of SFT, reward and DPO with adapters, bitwise resume, merged reads
(init_from, export-hf) against numpy, and one-line errors for bad `model.lora.*` keys.

The stage tests use tests/rl_chain.py's tiny pretrain → SFT → reward runs (built once per
session, tests/conftest.py `rl_chain`)."""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import linen as nn
from safetensors.numpy import load_file

from model import lora
from model import sharding as sh
from model.config import ModelConfig, get_preset
from model.transformer import Transformer
from rlhf import dpo
from tests.rl_chain import stage_args
from train import hf_cli, reward, sft
from train.metrics import read_metrics
from train.optim import make_optimizer, trainable_value_and_grad
from train.parent import load_params, read_parent
from train.state import abstract_sharded_params, create_train_state
from train.step import make_train_step

SCALE = 8.0 / 4  # alpha / rank in these tests
ADAPTERS = ("--config.model.lora.rank=4", "--config.model.lora.alpha=8")


def tiny_states(targets: tuple[str, ...] = tuple(lora.TARGET_AXES)):
    """(base model, LoRA model, base state, LoRA state) on a (2, 2, 2) fsdp_tp mesh."""
    cfg = get_preset("tiny")
    base, adapted = Transformer(cfg), lora.wrap(Transformer(cfg), lora.LoraConfig(4, 8.0, targets))
    mesh, rules = sh.make_mesh(2, 2, 2), sh.get_rules("fsdp_tp")
    tx, lr_fn = make_optimizer(lr=1e-2, total_steps=10, warmup_steps=0)
    plain, _ = create_train_state(base, tx, mesh, rules, seed=0)
    state, shardings = create_train_state(adapted, tx, mesh, rules, seed=0)
    return base, adapted, plain, state, (tx, lr_fn, mesh, rules, shardings)


def lm_batch(seed: int = 0, batch: int = 8, length: int = 16) -> dict:
    tokens = np.random.default_rng(seed).integers(1, 256, (batch, length + 1)).astype(np.int32)
    return {
        "inputs": tokens[:, :-1],
        "targets": tokens[:, 1:],
        "loss_mask": np.ones((batch, length), np.float32),
    }


def test_step0_is_the_base_model_and_only_adapters_train():
    base, adapted, plain, state, (tx, lr_fn, mesh, rules, _) = tiny_states()
    base_params = {k: v for k, v in state.params.items() if k != "lora"}
    for x, y in zip(jax.tree.leaves(plain.params), jax.tree.leaves(base_params), strict=True):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))  # same draws as no LoRA
    # A/B shard like their kernel: q [L, D, N, H] -> A [L, D, r] on fsdp, B [L, r, N, H]
    q = state.params["lora"]["layers"]["attn"]["q"]
    assert q["a"].sharding.spec == jax.sharding.PartitionSpec(None, "fsdp", None)
    assert q["b"].sharding.spec == jax.sharding.PartitionSpec(None, None, "tensor", None)
    tokens = lm_batch()["inputs"]
    with sh.sharding_context(mesh, rules):
        want = base.apply({"params": plain.params}, tokens).logits
        got = adapted.apply({"params": state.params}, tokens).logits
    np.testing.assert_array_equal(np.asarray(got), np.asarray(want))

    # Optimizer state: AdamW's two moments of the adapters and two step counts, nothing more.
    n_adapters = lora.count(state.params["lora"])
    n_base = lora.count(base_params)
    assert lora.count(state.opt_state) == 2 * n_adapters + 2
    assert lora.count(plain.opt_state) == 2 * n_base + 2
    # tiny: 2 layers x r=4 x (q,k,v: 64 + 64|32|32, o: 64 + 64, gate/up: 64 + 128, down: 128 + 64)
    assert n_adapters == 2 * 4 * ((64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + 192)

    step = jax.jit(make_train_step(adapted, tx, lr_fn))
    before = jax.device_get(state.params)
    with sh.sharding_context(mesh, rules):
        for i in range(3):
            state, metrics = step(state, lm_batch(i))
    after = jax.device_get(state.params)
    for key in before:
        if key != "lora":
            for x, y in zip(jax.tree.leaves(before[key]), jax.tree.leaves(after[key]), strict=True):
                np.testing.assert_array_equal(x, y)  # the base is frozen, bitwise
    for name, ab in after["lora"]["layers"]["attn"].items():
        assert np.abs(ab["b"]).max() > 0, name  # B left zero: the adapters trained
        assert not np.array_equal(ab["a"], before["lora"]["layers"]["attn"][name]["a"])
    assert np.isfinite(float(metrics["loss"]))


EXPLICIT = {  # W_eff = W + s * einsum(A, B): [L, *in, r] x [L, r, *out]
    "q": "ldr,lrnh->ldnh",
    "k": "ldr,lrnh->ldnh",
    "v": "ldr,lrnh->ldnh",
    "o": "lnhr,lrd->lnhd",
    "gate": "ldr,lrf->ldf",
    "up": "ldr,lrf->ldf",
    "down": "lfr,lrd->lfd",
}


def test_adapter_gradients_match_jax_grad_of_the_explicit_merged_weights():
    base, adapted, _, state, _ = tiny_states()
    params = jax.device_get(state.params)
    rng = np.random.default_rng(1)
    for ab in jax.tree.leaves(params["lora"], is_leaf=lambda x: isinstance(x, dict) and "b" in x):
        ab["b"] = rng.normal(0, 0.05, ab["b"].shape).astype(np.float32)  # B != 0: dA != 0
    batch = lm_batch(3, batch=2)

    def loss(p):
        logits = adapted.apply({"params": p}, batch["inputs"]).logits
        lp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(lp, batch["targets"][..., None], -1))

    def explicit(adapters):
        layers = jax.tree.map(lambda x: x, params["layers"])
        for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
            for name in names:
                ab = adapters["layers"][group][name]
                w = layers[group][name]
                layers[group][name] = w + SCALE * jnp.einsum(EXPLICIT[name], ab["a"], ab["b"])
        full = {k: v for k, v in params.items() if k not in ("lora", "layers")}
        logits = base.apply({"params": {**full, "layers": layers}}, batch["inputs"]).logits
        lp = jax.nn.log_softmax(logits)
        return -jnp.mean(jnp.take_along_axis(lp, batch["targets"][..., None], -1))

    value, grads = trainable_value_and_grad(loss)(params)
    assert set(grads) == {"lora"}  # no gradient of the frozen base is formed
    want_value, want = jax.value_and_grad(explicit)(params["lora"])
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for (path, g), w in zip(
        jax.tree_util.tree_leaves_with_path(grads["lora"]), jax.tree.leaves(want), strict=True
    ):
        # atol relative to the leaf's largest entry: the two forms sum in different orders,
        # so an entry near zero carries fp32 rounding of its larger neighbours (1.2e-7 seen
        # on one machine's XLA build, where a fixed 1e-7 failed).
        scale = np.abs(w).max()
        assert scale > 0
        np.testing.assert_allclose(
            g, w, rtol=2e-4, atol=1e-4 * scale, err_msg=jax.tree_util.keystr(path)
        )


def test_adapters_never_form_the_frozen_kernels_gradient():
    """Each adapted projection adds x A B (model/layers.py) instead of projecting with the
    merged W + s A B, whose backward forms a kernel-sized dW_eff (2 FLOPs per weight and
    token) only to contract it into dA and dB. Against that merged formulation, on the
    unscanned model (XLA counts a scan's body once): the same loss and gradients, and the
    compiled gradient at least half of 2 * tokens * (adapted weights) FLOPs cheaper."""
    cfg = dataclasses.replace(get_preset("tiny"), scan_layers=False)
    base = Transformer(cfg)
    adapted = lora.wrap(base, lora.LoraConfig(4, 8.0))
    tokens = np.random.default_rng(4).integers(1, 256, (8, 65)).astype(np.int32)
    params = nn.unbox(adapted.init(jax.random.key(0), tokens[:, :-1])["params"])
    params["lora"] = jax.tree.map(lambda x: x + 0.01, params["lora"])  # B != 0

    def loss(apply):
        def f(p):
            lp = jax.nn.log_softmax(apply(p).logits)
            return -jnp.mean(jnp.take_along_axis(lp, tokens[:, 1:, None], -1))

        return jax.jit(trainable_value_and_grad(f))

    now = loss(lambda p: adapted.apply({"params": p}, tokens[:, :-1]))
    merged = loss(lambda p: base.apply({"params": lora.merge(p, SCALE)}, tokens[:, :-1]))
    (value, grads), (want_value, want) = now(params), merged(params)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    for g, w in zip(jax.tree.leaves(grads), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, w, rtol=2e-4, atol=1e-7)

    def flops(fn) -> float:
        cost = fn.lower(params).compile().cost_analysis()
        return (cost[0] if isinstance(cost, list) else cost)["flops"]

    adapted_weights = cfg.num_layers * sum(
        math.prod(w.shape) for w in jax.tree.leaves(params["layers_0"]) if w.ndim >= 2
    )
    assert flops(merged) - flops(now) >= 0.5 * 2 * tokens[:, :-1].size * adapted_weights


def test_merge_reshapes_a_b_like_numpy():
    rng = np.random.default_rng(2)
    w = rng.normal(size=(3, 4, 2, 5)).astype(np.float32)  # o: [L, N, H, D]
    a = rng.normal(size=(3, 4, 2, 6)).astype(np.float32)
    b = rng.normal(size=(3, 6, 5)).astype(np.float32)
    params = {"layers": {"attn": {"o": w}}, "lora": {"layers": {"attn": {"o": {"a": a, "b": b}}}}}
    merged = lora.merge(params, 0.5)
    a64, b64 = a.astype(np.float64), b.astype(np.float64)
    want = w + 0.5 * np.stack([a64[i].reshape(8, 6) @ b64[i] for i in range(3)]).reshape(w.shape)
    np.testing.assert_allclose(np.asarray(merged["layers"]["attn"]["o"]), want, atol=1e-6)
    assert set(merged) == {"layers"}


def test_sampling_merges_once_and_matches_the_merged_base():
    """generate() on a LoRA state (adapters made non-zero) gives the tokens and log-probs
    of the base model run on numpy-merged weights; the decode loop's jaxpr holds no
    adapter product (the merge happens once, before it)."""
    from model.generate import CACHE_STEP, SamplingConfig, _generate, generate

    base, adapted, _, state, _ = tiny_states()
    params = jax.device_get(state.params)
    rng = np.random.default_rng(3)
    params["lora"] = jax.tree.map(
        lambda x: rng.normal(0, 0.05, x.shape).astype(x.dtype), params["lora"]
    )
    merged = lora.merge(params, SCALE)
    tokens = rng.integers(1, 256, (2, 6)).astype(np.int32)
    segments = np.ones_like(tokens)
    args = dict(max_new_tokens=5, sampling=SamplingConfig(temperature=0.0), eos_id=None)
    want = generate(base, merged, tokens, segments, jax.random.key(0), **args)
    got = generate(adapted, params, tokens, segments, jax.random.key(0), **args)
    np.testing.assert_array_equal(np.asarray(got.tokens), np.asarray(want.tokens))
    np.testing.assert_allclose(np.asarray(got.log_probs), np.asarray(want.log_probs), atol=1e-5)

    def dots(model, p) -> int:  # matrix products in the whole generate program
        run = functools.partial(
            _generate, model=model, pad_id=0, mesh=None, rules=None, cache_step=CACHE_STEP, **args
        )
        return str(jax.make_jaxpr(run)(p, tokens, segments, jax.random.key(0))).count("dot_general")

    # One A @ B per adapted kernel in all: merged before prefill and the decode loop.
    assert dots(adapted, params) - dots(base, merged) == len(
        lora.target_paths(params, lora.TARGET_AXES)
    )


def test_only_named_targets_get_adapters_and_heads_stay_trainable():
    cfg = get_preset("tiny")
    model = lora.wrap(
        Transformer(cfg, lm_head=False, scalar_head=True), lora.LoraConfig(2, 2.0, ("v", "down"))
    )
    params = jax.eval_shape(
        lambda: model.init({"params": jax.random.key(0)}, jnp.zeros((1, 4), jnp.int32))
    )
    adapters = params["params"]["lora"]["layers"]
    assert {k: set(v) for k, v in adapters.items()} == {"attn": {"v"}, "mlp": {"down"}}
    assert set(lora.trainable(params["params"])) == {"lora", "scalar_head", "scalar_bias"}
    assert lora.wrap(Transformer(cfg), lora.LoraConfig()) == Transformer(cfg)  # rank 0: no-op


# ----------------------------------------------------------------------------- stages


@pytest.fixture(scope="module")
def chain(rl_chain) -> dict:
    return rl_chain


def sft_args(chain: dict, workdir: pathlib.Path, *extra: str) -> list:
    return stage_args(
        "sft.py",
        workdir,
        chain["tfds"],
        f"--config.init_from={chain['root'] / 'pretrain'}",
        f"--config.data.path={chain['paths']['sft']}",
        "--config.eval.every_steps=0",
        "--config.checkpoint.every_steps=0",
        "--config.log.every_steps=1",
        "--config.total_steps=4",
        "--config.log.peak_flops_per_device=1e12",
        *ADAPTERS,
        *extra,
    )


def restore_tree(checkpoint: pathlib.Path) -> dict:
    """A checkpoint's raw state arrays (numpy), adapters included."""
    return ocp.PyTreeCheckpointer().restore(checkpoint / "state")


@pytest.fixture(scope="module")
def sft_runs(chain, tmp_path_factory) -> dict:
    """A LoRA SFT run straight to 4 steps and one stopped at 2 and resumed to 4."""
    root = tmp_path_factory.mktemp("lora_sft")
    assert sft.main(sft_args(chain, root / "straight")) == 0
    assert sft.main(sft_args(chain, root / "split", "--config.stop_at_step=2")) == 0
    assert read_parent(root / "split").step == 2
    assert sft.main(sft_args(chain, root / "split")) == 0
    return {"straight": root / "straight", "split": root / "split"}


def test_sft_pulse_resumes_bitwise_and_keeps_the_parent_base(chain, sft_runs):
    def lines(workdir):
        keep = ("loss", "grad_norm", "lr", "num_tokens")
        return [{k: x[k] for k in keep} | {"step": x["step"]} for x in read_metrics(workdir)]

    straight, split = lines(sft_runs["straight"]), lines(sft_runs["split"])
    assert [x["step"] for x in split] == [1, 2, 3, 4] and straight == split
    own = read_parent(sft_runs["split"])
    assert own.meta["lora"] == {"rank": 4, "alpha": 8.0, "targets": lora.DEFAULT_TARGETS}
    a, b = restore_tree(own.checkpoint), restore_tree(read_parent(sft_runs["straight"]).checkpoint)
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b), strict=True):
        np.testing.assert_array_equal(x, y)  # state, optimizer and adapters bitwise
    parent = restore_tree(read_parent(chain["root"] / "pretrain").checkpoint)["params"]
    params = a["params"]
    for key in parent:  # the frozen base is still the pretrained one
        for x, y in zip(jax.tree.leaves(parent[key]), jax.tree.leaves(params[key]), strict=True):
            np.testing.assert_array_equal(x, y)
    assert np.abs(params["lora"]["layers"]["mlp"]["up"]["b"]).max() > 0
    n_opt = sum(x.size for x in jax.tree.leaves(a["opt_state"]))
    assert n_opt <= 2 * lora.count(params["lora"]) + 4  # moments of the adapters only


def numpy_merged(params: dict, name: tuple[str, str], scale: float) -> np.ndarray:
    """W + scale * A @ B of one scanned kernel in plain numpy, per layer."""
    group, kernel = name
    w = np.asarray(params["layers"][group][kernel], np.float64)
    ab = params["lora"]["layers"][group][kernel]
    a, b = np.asarray(ab["a"], np.float64), np.asarray(ab["b"], np.float64)
    n_in = lora.TARGET_AXES[kernel][0]
    rows, cols = math.prod(w.shape[1 : 1 + n_in]), math.prod(w.shape[1 + n_in :])
    delta = [a[i].reshape(rows, -1) @ b[i].reshape(-1, cols) for i in range(w.shape[0])]
    return w + scale * np.stack(delta).reshape(w.shape)


def test_reads_of_a_lora_checkpoint_are_merged(sft_runs, tmp_path):
    parent = read_parent(sft_runs["split"])
    raw = restore_tree(parent.checkpoint)["params"]
    cfg = ModelConfig(**parent.model)
    mesh, rules = sh.make_mesh(2, 2, 2), sh.get_rules("fsdp_tp")
    merged = load_params(parent, abstract_sharded_params(Transformer(cfg), mesh, rules))
    assert "lora" not in merged
    for group, names in (("attn", "qkvo"), ("mlp", ("gate", "up", "down"))):
        for kernel in names:
            want = numpy_merged(raw, (group, kernel), SCALE)
            got = np.asarray(merged["layers"][group][kernel])
            np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6, err_msg=kernel)
    np.testing.assert_array_equal(np.asarray(merged["embedding"]), raw["embedding"])

    out = tmp_path / "hf"
    assert hf_cli.export_main(["--workdir", str(sft_runs["split"]), "--out", str(out)]) == 0
    tensors = {}
    for file in out.glob("*.safetensors"):
        tensors |= load_file(file)
    up = numpy_merged(raw, ("mlp", "up"), SCALE)
    down = numpy_merged(raw, ("mlp", "down"), SCALE)
    o = numpy_merged(raw, ("attn", "o"), SCALE)
    for i in range(cfg.num_layers):
        prefix = f"model.layers.{i}"
        np.testing.assert_allclose(
            tensors[f"{prefix}.mlp.up_proj.weight"], up[i].T, rtol=1e-5, atol=1e-6
        )
        np.testing.assert_allclose(
            tensors[f"{prefix}.mlp.down_proj.weight"], down[i].T, rtol=1e-5, atol=1e-6
        )
        o_hf = o[i].reshape(-1, o.shape[-1]).T  # [D, N*H]
        np.testing.assert_allclose(
            tensors[f"{prefix}.self_attn.o_proj.weight"], o_hf, rtol=1e-5, atol=1e-6
        )


def test_reward_and_dpo_pulses_start_from_a_lora_policy(chain, sft_runs, tmp_path):
    """Reward (with calibration: the LoRA reward model's own merged weights score the
    merged LoRA policy's samples) and DPO, both with fresh adapters on the merged SFT."""
    rm_dir = tmp_path / "reward"
    rm = stage_args(
        "reward.py",
        rm_dir,
        chain["tfds"],
        f"--config.init_from={sft_runs['split']}",
        f"--config.data.path={chain['paths']['dpo_ranked']}",
        f"--config.calibration.prompts_path={chain['paths']['eval_prompts']}",
        "--config.calibration.num_samples=8",
        "--config.optim.warmup_steps=0",
        "--config.eval.every_steps=0",
        "--config.total_steps=2",
        "--config.log.every_steps=1",
        "--config.log.peak_flops_per_device=1e12",
        *ADAPTERS,
    )
    assert reward.main(rm) == 0
    tree = restore_tree(read_parent(rm_dir).checkpoint)
    assert set(tree["params"]) >= {"lora", "scalar_head", "scalar_bias"}
    assert "lm_head" not in tree["params"]
    lines = [x for x in read_metrics(rm_dir) if "loss" in x]
    assert [x["step"] for x in lines] == [1, 2] and all(math.isfinite(x["loss"]) for x in lines)
    assert json.loads((rm_dir / reward.CALIBRATION_FILE).read_text())["step"] == 2

    dpo_dir = tmp_path / "dpo"
    args = stage_args(
        "dpo.py",
        dpo_dir,
        chain["tfds"],
        f"--config.init_from={sft_runs['split']}",
        f"--config.data.path={chain['paths']['dpo_ranked']}",
        "--config.total_steps=2",
        "--config.log.every_steps=1",
        "--config.dpo.ref_batch_size=64",
        "--config.log.peak_flops_per_device=1e12",
        *ADAPTERS,
    )
    assert dpo.main(args) == 0
    lines = [x for x in read_metrics(dpo_dir) if "loss" in x]
    assert [x["step"] for x in lines] == [1, 2]
    # π = π_ref at step 0 (B = 0 on the merged SFT): the first loss is exactly log 2.
    assert lines[0]["loss"] == pytest.approx(math.log(2), abs=1e-6)
    assert lines[1]["loss"] != lines[0]["loss"]
    assert read_parent(dpo_dir).meta["lora"]["rank"] == 4


@pytest.mark.parametrize(
    ("override", "named"),
    [
        ("model.lora.rank=-1", "model.lora.rank"),
        ("model.lora.alpha=0", "model.lora.alpha"),
        ("model.lora.targets=q,wq", "model.lora.targets"),
        ("model.lora.bogus=1", "model.lora.bogus"),
    ],
)
def test_bad_lora_keys_fail_in_one_line(chain, tmp_path, capsys, override, named):
    workdir = tmp_path / "bad"
    assert sft.main(sft_args(chain, workdir, f"--config.{override}")) == 2
    err = capsys.readouterr().err.strip()
    assert named in err and len(err.splitlines()) == 1 and "Traceback" not in err
    assert not workdir.exists()


def test_resuming_with_other_adapters_is_refused(chain, sft_runs, capsys):
    before = sorted(p.name for p in (sft_runs["split"] / "checkpoints").iterdir())
    assert sft.main(sft_args(chain, sft_runs["split"], "--config.model.lora.rank=2")) == 2
    assert "model.lora.rank=2" in capsys.readouterr().err
    assert sorted(p.name for p in (sft_runs["split"] / "checkpoints").iterdir()) == before
