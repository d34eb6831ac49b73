"""Rollout health checks for the RL stages (PPO, GRPO): one clear line when a run cannot
learn, instead of a flat curve found hours later.

Small pure functions over per-iteration values the stages already compute (host floats
of their metrics, the first prompt batch), one in-jit metric (`update_norm`) and a
`HealthMonitor` that keeps the last `health.window` (W) iterations. Checks:

- chat template: no row of the first prompt batch ends with the tokenizer's generation
  prompt (`chat_suffix`) -> StageError, before the first rollout;
- zero update: `update_norm` (global L2 norm of the trained parameters' change over one
  iteration) exactly 0 for W iterations -> StageError (learning rate 0, LoRA adapters
  that receive no gradient, a loss without signal);
- GRPO without signal: `zero_std_groups` (the fraction of groups whose G rewards are
  equal) 1.0 for W iterations -> warning;
- clip fraction stuck at 0, or at its ceiling, for W iterations -> warning. The first
  update of an iteration always has ratio 1 (π = π_old), so the mean over U =
  epochs x minibatches updates is at most (U - 1) / U, the ceiling; with U = 1 it is
  always 0 and the check is off;
- response length collapse: the mean response length <= 1 token, or below
  `COLLAPSE_FRACTION` of the first iteration this process ran, for W iterations ->
  warning.

Errors raise the stage's StageError (the CLI prints one line and exits 3, no checkpoint
after the failing iteration); each kind of warning is printed once, as one line on
stderr, by process 0. Metrics are replicated, so every host stops at the same iteration.
"""

from __future__ import annotations

import collections
import dataclasses
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from tqdm.auto import tqdm

from configs import loader
from model import lora
from train.stage import StageError

COLLAPSE_FRACTION = 0.25  # of the first iteration's mean response length
WATCHED = ("clip_fraction", "update_norm", "zero_std_groups", "response_length")
_PROBES = ("x", "y")  # two user contents whose chat encodings differ only in the content


# ----------------------------------------------------------------------------- pure checks


def update_norm(old: Any, new: Any) -> jax.Array:
    """Global L2 norm of new - old over the trainable part (model/lora.py `trainable`) of
    two parameter trees; in-jit, fused per leaf. Frozen parameters never change, so
    leaving them out only saves work."""
    diff = jax.tree.map(jnp.subtract, lora.trainable(new), lora.trainable(old))
    return optax.tree.norm(diff)


def stuck(flags: Sequence[bool], window: int) -> bool:
    """True when the last `window` flags exist and are all set."""
    return len(flags) >= window and all(list(flags)[-window:])


def clip_state(clip_fraction: float, updates: int) -> str | None:
    """Where clip_fraction sits: "low" (no token clipped), "high" (at the ceiling
    (U - 1) / U) or None; always None for one update per iteration (U = 1), whose ratio
    is 1."""
    if updates <= 1:
        return None
    if clip_fraction <= 0.0:
        return "low"
    if clip_fraction >= (updates - 1) / updates - 1e-6:
        return "high"
    return None


def length_collapsed(length: float, first: float, fraction: float = COLLAPSE_FRACTION) -> bool:
    """Mean response length at most one token, or below `fraction` of the first one's."""
    return length <= 1.0 or length < fraction * first


def common_suffix(a: Sequence[int], b: Sequence[int]) -> tuple[int, ...]:
    n = 0
    while n < min(len(a), len(b)) and a[-1 - n] == b[-1 - n]:
        n += 1
    return tuple(int(t) for t in a[len(a) - n :])


def chat_suffix(tokenizer: Any) -> tuple[int, ...]:
    """The ids every chat prompt ends with after the last user content (end of turn, the
    generation prompt): the common suffix of two one-turn encodings with different
    contents. Empty when the template writes nothing there (the check is then off)."""
    rows = [
        tokenizer.encode_chat([{"role": "user", "content": c}], add_generation_prompt=True)[0]
        for c in _PROBES
    ]
    return common_suffix(list(rows[0]), list(rows[1]))


def rows_ending_with(tokens: Any, suffix: Sequence[int]) -> Any:
    """[B] bool: which rows of left-padded prompts [B, P] end with `suffix`. numpy or jax
    (a global array stays global: the answer is the same on every host)."""
    if len(suffix) > tokens.shape[1]:
        return jnp.zeros(tokens.shape[:1], bool)
    tail = tokens[:, tokens.shape[1] - len(suffix) :]
    return jnp.all(tail == jnp.asarray(suffix, tokens.dtype), axis=1)


def _any_row_ends_with(tokens: Any, suffix: Sequence[int]) -> bool:
    fn = lambda t: jnp.any(rows_ending_with(t, suffix))  # noqa: E731
    sharding = getattr(tokens, "sharding", None)
    if isinstance(sharding, jax.sharding.NamedSharding):  # a global batch: every host answers
        replicated = jax.sharding.NamedSharding(sharding.mesh, jax.sharding.PartitionSpec())
        fn = jax.jit(fn, out_shardings=replicated)
    return bool(fn(tokens))


def check_chat_template(stage: str, tokens: Any, suffix: Sequence[int], tokenizer: Any) -> None:
    """StageError when no prompt row ends with the generation prompt `suffix`."""
    if not suffix or _any_row_ends_with(tokens, suffix):
        return
    pieces = "".join(tokenizer.id_to_piece(i) for i in suffix)
    raise StageError(
        f"{stage}: no prompt of the first batch ends with the chat template's generation "
        f"prompt {list(suffix)} ({pieces!r}): the prompts were not rendered with the chat "
        'template; write them as {"prompt": ...} or {"messages": [...]} records'
    )


# ----------------------------------------------------------------------------- the monitor


@dataclasses.dataclass(frozen=True)
class Settings:
    stage: str  # "ppo" | "grpo": names the config section in messages
    window: int  # W
    updates: int  # optimizer updates per iteration (epochs x minibatches)
    lr: float
    epochs: int
    clip_eps: float
    group_size: int = 0  # GRPO's G; 0: no group check

    @classmethod
    def from_config(cls, config: ml_collections.ConfigDict, stage: str) -> Settings:
        s = config[stage]
        return cls(
            stage=stage,
            window=int(config.health.window),
            updates=int(s.epochs * s.minibatches),
            lr=float(config.optim.lr),
            epochs=int(s.epochs),
            clip_eps=float(s.clip_eps),
            group_size=int(s.get("group_size", 0)),
        )


def _print_warning(line: str) -> None:
    if jax.process_index() == 0:
        tqdm.write(line, file=sys.stderr)  # above the loop's progress bar, not through it


class HealthMonitor:
    """Feed it each iteration's host metrics (`observe`); it warns once per kind and
    raises StageError when the run cannot learn. `write` prints a warning line."""

    def __init__(self, settings: Settings, write: Callable[[str], None] = _print_warning):
        self.s, self.write = settings, write
        self.recent: collections.deque[dict[str, bool]] = collections.deque(maxlen=settings.window)
        self.first_length: float | None = None
        self.warned: set[str] = set()

    def _stuck(self, key: str) -> bool:
        return stuck([flags[key] for flags in self.recent], self.s.window)

    def flags(self, m: Mapping[str, float]) -> dict[str, bool]:
        """This iteration's conditions, from its metrics (absent ones never trigger)."""
        clip = clip_state(m["clip_fraction"], self.s.updates) if "clip_fraction" in m else None
        length = m.get("response_length")
        if length is not None and self.first_length is None:
            self.first_length = length
        return {
            "zero_update": m.get("update_norm", 1.0) == 0.0,
            "no_signal": self.s.group_size > 0 and m.get("zero_std_groups", 0.0) >= 1.0,
            "clip_low": clip == "low",
            "clip_high": clip == "high",
            "collapse": length is not None and length_collapsed(length, self.first_length),
        }

    def observe(self, metrics: Mapping[str, float]) -> list[str]:
        """One iteration: returns the warnings printed now; raises on a zero update."""
        self.recent.append(self.flags(metrics))
        zero = self._stuck("zero_update")  # then clip_fraction 0 says nothing more
        new = [
            (kind, self.message(kind, metrics))
            for kind in ("no_signal", "clip_low", "clip_high", "collapse")
            if kind not in self.warned and self._stuck(kind) and not (zero and kind == "clip_low")
        ]
        for kind, line in new:
            self.warned.add(kind)
            self.write(line)
        if zero:
            raise StageError(self.message("zero_update", metrics))
        return [line for _, line in new]

    def message(self, kind: str, m: Mapping[str, float]) -> str:
        s, w = self.s, self.s.window
        lr = f"optim.lr (now {s.lr:g})"
        epochs = f"{s.stage}.epochs (now {s.epochs})"
        if kind == "no_signal":
            return (
                f"{s.stage}: every group's {s.group_size} rewards were equal for {w} "
                "iterations: no advantage to learn from; raise sampling.temperature or "
                f"{s.stage}.group_size, or check the reward"
            )
        if kind == "clip_low":
            return (
                f"{s.stage}: clip_fraction was 0 for {w} iterations: the policy hardly moves "
                f"within an iteration; raise {lr} or {epochs}"
            )
        if kind == "clip_high":
            return (
                f"{s.stage}: clip_fraction was {m['clip_fraction']:.3f} for {w} iterations, "
                f"its ceiling with {s.updates} updates per iteration (every token clipped "
                f"after the first update); lower {lr} or {epochs}, or raise "
                f"{s.stage}.clip_eps (now {s.clip_eps:g})"
            )
        if kind == "collapse":
            return (
                f"{s.stage}: mean response length fell to {m['response_length']:.1f} tokens "
                f"(first iteration: {self.first_length:.1f}) for {w} iterations: the policy "
                f"stopped answering; lower {lr}, raise kl.beta, or check the reward"
            )
        cause = ""
        if self._stuck("no_signal"):
            cause = "; every group's rewards were equal too, so the loss had no gradient"
        return (
            f"{s.stage}: update_norm was 0 for {w} iterations: the trained parameters never "
            f"changed; check {lr} and that they get gradients (model.lora.targets with "
            f"LoRA){cause}"
        )


# ----------------------------------------------------------------------------- the stages


def check_config(config: ml_collections.ConfigDict) -> None:
    """`health.window` must be a positive integer (ConfigError naming the key)."""
    if "health" in config:
        loader.check_positive(config, "health.window")
        if not isinstance(config.health.window, int):
            raise loader.ConfigError(f"health.window={config.health.window!r}: must be an int")


def monitored(
    train_step: Callable, config: ml_collections.ConfigDict, stage: str, tokenizer: Any
) -> Callable:
    """`train_step` with the checks around it (unchanged when `health.enabled` is False):
    the chat template on the first batch, then `observe` after every iteration."""
    health = config.get("health")
    if health is None or not health.enabled:
        return train_step
    monitor = HealthMonitor(Settings.from_config(config, stage))
    suffix = chat_suffix(tokenizer)
    checked = []

    def step(state: Any, batch: dict[str, jax.Array]) -> tuple[Any, dict]:
        if not checked:
            check_chat_template(stage, batch["tokens"], suffix, tokenizer)
            checked.append(True)
        state, metrics = train_step(state, batch)
        watched = {k: metrics[k] for k in WATCHED if k in metrics}
        monitor.observe({k: float(np.asarray(v)) for k, v in jax.device_get(watched).items()})
        return state, metrics

    step.monitor = monitor  # for tests and tools
    return step
