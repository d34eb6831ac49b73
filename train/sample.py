"""`flaxlm sample` and `flaxlm chat`: load a checkpoint with its tokenizer and generate.

    flaxlm sample --workdir runs/char --prompt "ROMEO:" --max-new-tokens 200
    flaxlm sample --workdir runs/sft --prompts-file prompts.txt --temperature 0.7 --top-p 0.9
    flaxlm chat --workdir runs/sft
    flaxlm chat --workdir runs/smollm --weight-dtype int8    # int8 weights, CPU kernel

A pretraining checkpoint continues raw text (bos + prompt); a chat-tuned one (SFT, RLHF)
answers through the chat template and stops at the end-of-turn marker. `--format` forces
either. `--step N` picks a checkpoint other than the newest.
"""

from __future__ import annotations

import argparse
import functools
import json
import pathlib
import sys
from collections.abc import Callable, Iterator, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from model import fused_decode, generate, quantize
from model import sharding as sh
from model.config import ModelConfig
from model.tokenizer import AnyTokenizer, load_tokenizer
from model.transformer import Transformer, init_cache
from train.data import pipelines
from train.parent import InitFromError, Parent, load_params, read_parent
from train.stage import RAW_LM_STAGES
from train.state import abstract_sharded_params


class Policy:
    """A loaded LM: model, sharded params, tokenizer, and the mesh they live on."""

    def __init__(
        self,
        workdir: str,
        step: int | None = None,
        weight_dtype: str = "float32",
        decode_impl: str = "xla",
    ) -> None:
        path = pathlib.Path(workdir)
        self.parent: Parent = read_parent(path / "checkpoints" / str(step) if step else path)
        if self.parent.stage == "reward":
            raise InitFromError(f"{self.parent.checkpoint} is a reward model: use `flaxlm score`")
        self.config = ModelConfig(**self.parent.model)
        self.model = Transformer(self.config)
        self.mesh = sh.make_mesh(data=1, fsdp=-1)  # parameters split over every device
        self.rules = sh.get_rules("fsdp")
        target = abstract_sharded_params(self.model, self.mesh, self.rules)
        self.params = load_params(self.parent, target)
        if weight_dtype == "int8":  # decoding only: model/quantize.py
            self.params = quantize.quantize_params(self.params)
        self.decode_impl = decode_impl
        if decode_impl == "cpu":  # model/fused_decode.py: one device, no mesh
            fused_decode.check_supported(self.config, self.params)
            self.params = jax.device_put(self.params, jax.devices()[0])
        if self.parent.tokenizer_dir is None:
            raise InitFromError(f"{self.parent.checkpoint} records no tokenizer")
        self.tokenizer: AnyTokenizer = load_tokenizer(self.parent.tokenizer_dir)

    @property
    def rows_multiple(self) -> int:
        """Batch rows must split evenly over the batch axes of the mesh."""
        return self.mesh.shape["data"] * self.mesh.shape["fsdp"]


def encode_prompt(tokenizer: AnyTokenizer, text: str, chat: bool) -> list[int]:
    if chat:
        ids, _ = tokenizer.encode_chat([{"role": "user", "content": text}], True)
        return [int(i) for i in ids]
    head = [] if tokenizer.bos_id is None else [tokenizer.bos_id]
    return [*head, *tokenizer.encode(text)]


def decode_completion(tokenizer: AnyTokenizer, tokens: np.ndarray, mask: np.ndarray) -> str:
    """Generated ids -> text, without the stop marker and any padded-vocabulary id."""
    ids = [int(t) for t, m in zip(tokens, mask, strict=True) if m]
    ids = [i for i in ids if i not in tokenizer.stop_ids and i < tokenizer.vocab_size]
    return tokenizer.decode(ids)


def complete(
    policy: Policy,
    prompts: Sequence[str],
    chat: bool,
    max_new_tokens: int,
    sampling: generate.SamplingConfig,
    seed: int,
) -> list[str]:
    """One completion per prompt, generated as one batch."""
    if sampling.decode_impl != policy.decode_impl:  # the Policy placed its params for one path
        raise ValueError(
            f"sampling.decode_impl={sampling.decode_impl!r} but the policy was loaded for "
            f"{policy.decode_impl!r} (Policy(..., decode_impl=...))"
        )
    ids = [encode_prompt(policy.tokenizer, p, chat) for p in prompts]
    room = policy.config.max_seq_len - max_new_tokens
    if room < 1:
        raise ValueError(
            f"--max-new-tokens {max_new_tokens} leaves no room for a prompt "
            f"(max_seq_len {policy.config.max_seq_len})"
        )
    ids = [p[-room:] for p in ids]  # keep the end of an over-long prompt
    rows = -(-len(ids) // policy.rows_multiple) * policy.rows_multiple
    padded = generate.left_pad(ids + [ids[-1]] * (rows - len(ids)))
    out = generate.generate(
        policy.model,
        policy.params,
        padded.tokens,
        padded.segment_ids,
        jax.random.key(seed),
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        eos_id=policy.tokenizer.end_of_turn_id if chat else policy.tokenizer.eos_id,
        mesh=None if policy.decode_impl == "cpu" else policy.mesh,
        rules=None if policy.decode_impl == "cpu" else policy.rules,
    )
    tokens, mask = np.asarray(out.tokens), np.asarray(out.mask)
    return [decode_completion(policy.tokenizer, tokens[i], mask[i]) for i in range(len(ids))]


def read_prompts(path: str) -> list[str]:
    """One prompt per line; JSONL lines with a "prompt" key are read as such."""
    prompts = []
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            line = line.rstrip("\n")
            if not line.strip():
                continue
            if line.lstrip().startswith("{"):
                try:
                    line = json.loads(line)["prompt"]
                except (json.JSONDecodeError, KeyError, TypeError):
                    raise ValueError(
                        f"{path}:{number}: not a JSON object with a 'prompt'"
                    ) from None
            prompts.append(line)
    if not prompts:
        raise ValueError(f"{path}: no prompts")
    return prompts


def common_args(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--workdir", required=True, help="run directory or checkpoint dir")
    parser.add_argument("--step", type=int, default=None, help="checkpoint step (default newest)")
    parser.add_argument(
        "--max-new-tokens",
        type=int,
        default=None,
        help="default: 128, or half the model's context when that is shorter",
    )
    parser.add_argument("--temperature", type=float, default=0.8)
    parser.add_argument("--top-k", type=int, default=0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--format", choices=("auto", "raw", "chat"), default="auto")
    parser.add_argument(
        "--weight-dtype",
        choices=("float32", "int8"),
        default="float32",
        help="int8: weights quantized per 32 inputs, the CPU int8 kernel (model/quantize.py)",
    )
    parser.add_argument(
        "--decode-impl",
        choices=generate.DECODE_IMPLS,
        default="xla",
        help="cpu: each decode step's blocks in one CPU kernel call (model/fused_decode.py; "
        "fp32 Llama-style models, one device)",
    )


def new_tokens(args: argparse.Namespace, policy: Policy) -> int:
    """--max-new-tokens, or its default for this model's context."""
    if args.max_new_tokens is not None:
        return args.max_new_tokens
    return min(128, policy.config.max_seq_len // 2)


def is_chat(policy: Policy, fmt: str) -> bool:
    if fmt != "auto":
        return fmt == "chat"
    # An imported instruct model is a raw LM by stage but ships its chat template.
    return policy.parent.stage not in RAW_LM_STAGES or bool(
        getattr(policy.tokenizer, "chat_template", None)
    )


def main_sample(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="flaxlm sample", description=__doc__.splitlines()[0])
    common_args(parser)
    parser.add_argument("--prompt", action="append", default=[], help="repeatable")
    parser.add_argument("--prompts-file", default=None)
    parser.add_argument("--num-samples", type=int, default=1)
    args = parser.parse_args(argv)
    try:
        prompts = list(args.prompt) + (read_prompts(args.prompts_file) if args.prompts_file else [])
        if not prompts:
            raise ValueError("give --prompt TEXT or --prompts-file FILE")
        if args.num_samples < 1 or (args.max_new_tokens or 1) < 1:
            raise ValueError("--num-samples and --max-new-tokens must be >= 1")
        policy = Policy(args.workdir, args.step, args.weight_dtype, args.decode_impl)
        args.max_new_tokens = new_tokens(args, policy)
        sampling = generate.SamplingConfig(
            args.temperature,
            args.top_k,
            args.top_p,
            policy.tokenizer.vocab_size,
            args.decode_impl,
        )
        chat = is_chat(policy, args.format)
        batch = [p for p in prompts for _ in range(args.num_samples)]
        outputs = complete(policy, batch, chat, args.max_new_tokens, sampling, args.seed)
    except (ValueError, FileNotFoundError) as err:
        print(f"flaxlm sample: error: {err}", file=sys.stderr)
        return 2
    for i, (prompt, text) in enumerate(zip(batch, outputs, strict=True)):
        header = f"=== prompt {i // args.num_samples + 1}, sample {i % args.num_samples + 1}"
        print(f"{header} ===\n{prompt}" + ("\n--- reply ---\n" if chat else "") + text)
    return 0


def stream_reply(
    policy: Policy,
    ids: list[int],
    max_new_tokens: int,
    sampling: generate.SamplingConfig,
    key: jax.Array,
    step_fn: Callable,
) -> Iterator[int]:
    """Yield reply tokens one at a time (prefill once, then one cached step per token).

    step_fn(cache, token [1], position [1], slot) -> (logits [1, V], cache): the decode
    step with its params bound (the model's own, or the fused one's)."""
    # Pad the prompt to a multiple of 32 so successive turns reuse one compilation.
    length = min(-(-len(ids) // 32) * 32, policy.config.max_seq_len - max_new_tokens)
    prompt = generate.left_pad([ids], length=length)
    cache = init_cache(policy.config, 1, length + max_new_tokens)
    logits, cache = policy_prefill(policy)(
        policy.params, prompt.tokens, prompt.segment_ids, prompt.positions, cache
    )
    for i in range(max_new_tokens):
        token, _ = sample_jit(sampling)(jax.random.fold_in(key, i), logits)
        token_id = int(token[0])
        if token_id in policy.tokenizer.stop_ids:
            return
        yield token_id
        logits, cache = step_fn(cache, token, jnp.array([len(ids) + i]), length + i)


_JITS: dict[Any, Callable] = {}


def policy_prefill(policy: Policy) -> Callable:
    key = ("prefill", id(policy))
    if key not in _JITS:
        _JITS[key] = jax.jit(
            lambda p, t, s, pos, c: generate.prefill(policy.model, p, t, s, pos, c)
        )
    return _JITS[key]


def sample_jit(sampling: generate.SamplingConfig) -> Callable:
    key = ("sample", sampling)
    if key not in _JITS:
        _JITS[key] = jax.jit(lambda k, logits: generate.sample_logits(k, logits, sampling))
    return _JITS[key]


def fit_history(policy: Policy, messages: list[dict], max_new_tokens: int) -> list[int]:
    """The chat rendered to ids that leave room for the reply: whole oldest exchanges
    dropped (system turns and the last user turn kept), never a turn cut. ValueError
    when the last user turn alone does not fit."""
    room = policy.config.max_seq_len - max_new_tokens
    what = "max_seq_len - max_new_tokens"
    return pipelines.generation_prompt(policy.tokenizer, messages, room, what).tolist()


def main_chat(argv: Sequence[str]) -> int:
    parser = argparse.ArgumentParser(prog="flaxlm chat", description="interactive chat")
    common_args(parser)
    parser.add_argument("--system", default="", help="an optional system message")
    args = parser.parse_args(argv)
    try:
        policy = Policy(args.workdir, args.step, args.weight_dtype, args.decode_impl)
        args.max_new_tokens = new_tokens(args, policy)
        sampling = generate.SamplingConfig(
            args.temperature,
            args.top_k,
            args.top_p,
            policy.tokenizer.vocab_size,
            args.decode_impl,
        )
        if args.max_new_tokens >= policy.config.max_seq_len:
            raise ValueError(f"--max-new-tokens must be < max_seq_len {policy.config.max_seq_len}")
    except (ValueError, FileNotFoundError) as err:
        print(f"flaxlm chat: error: {err}", file=sys.stderr)
        return 2
    decode, step_params = generate.decode_step, policy.params
    if policy.decode_impl == "cpu":
        decode = fused_decode.decode_step
        step_params = fused_decode.decode_params(policy.config, policy.params)
    step_jit = jax.jit(lambda p, c, t, pos, slot: decode(policy.model, p, c, t, pos, slot))
    step_fn = functools.partial(step_jit, step_params)
    messages: list[dict] = [{"role": "system", "content": args.system}] if args.system else []
    print("flaxlm chat: type a message; an empty line or Ctrl-D quits.", file=sys.stderr)
    key = jax.random.key(args.seed)
    for turn in range(10**9):
        try:
            text = input("you> ")
        except EOFError:
            break
        if not text.strip():
            break
        messages.append({"role": "user", "content": text})
        try:
            ids = fit_history(policy, messages, args.max_new_tokens)
        except ValueError as err:
            print(f"flaxlm chat: {err}", file=sys.stderr)
            messages.pop()
            continue
        print("bot> ", end="", flush=True)
        reply: list[int] = []
        shown = ""
        for token in stream_reply(
            policy, ids, args.max_new_tokens, sampling, jax.random.fold_in(key, turn), step_fn
        ):
            reply.append(token)
            text_so_far = policy.tokenizer.decode(
                [t for t in reply if t < policy.tokenizer.vocab_size]
            )
            print(text_so_far[len(shown) :], end="", flush=True)  # stream the new characters
            shown = text_so_far
        print()
        messages.append({"role": "assistant", "content": shown})
    return 0
