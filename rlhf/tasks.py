"""Preference tasks: prompts, an imperfect teacher, a hidden oracle, a pretraining corpus.

A task stands in for human labelers. The interface (`PreferenceTask`; third-party tasks
plug in as `--config.task=module:Class`, loaded by `load_task`) is four methods, `rng`
always a `numpy.random.Generator`:
- `prompts(rng, n) -> list[str]`                the user turns the policy answers;
- `demonstration(prompt, rng) -> str`           an imperfect teacher answer (SFT data);
- `score(prompt, response) -> float`            the hidden oracle, in [0, 1] for the tasks
                                                here; the learner never sees it;
- `pretraining_corpus(rng, n_docs) -> list[str]` text for the pretraining stage.
An optional `max_score` attribute (1 when absent, as for every task here) is the oracle's
maximum, which the pipeline report measures the gap a policy closes against. An optional
`preset_scale` ({dotted pipeline key: factor}) says how much more of a preset's data or
steps the task needs; the pipeline multiplies those counts (orchestrate/pipeline_sizing.py).

Four tasks are defined here. `uppercase` and `next_letter` have 5-seed end-to-end
results (docs/rlhf.md), as have the four of rlhf/more_tasks.py (`brackets`, `rotate`,
`subtraction`, `repeat`). `addition` and `sort` are harder: the demo's model does not
learn them well enough for the preference signal to matter, so they have no such results;
`addition` is also the small task the tests run.

Design of the tasks. A small char-level model must have headroom that only the
preference signal closes, so the teacher is right only `p_correct` (default ½) of the
time and its mistake is *systematic* (a rule, not random noise): SFT then learns two
modes, the right rule and the wrong one, in equal measure, and even greedy decoding
cannot pick the right one from demonstrations alone. Prompts where the mistake would
coincide with the right answer are not drawn, so p_correct is exact. The pretraining
corpus uses the same teacher (it teaches the format and both rules, never the oracle).

The oracle is strict about form, so obvious hacks earn nothing: a response that is not
exactly an answer of the right shape scores 0 (padding, repeating, appending text, or
changing the length). Within the right shape it gives graded credit, so labelers'
rankings are informative beyond right/wrong:
    score = 1 for the right answer, else ½ · (fraction of the answer that is right).
"""

from __future__ import annotations

import importlib
import itertools
import re
from typing import Any, ClassVar, Protocol, runtime_checkable

import numpy as np

from rlhf.task_kit import check_p_correct, teacher_corpus


@runtime_checkable
class PreferenceTask(Protocol):
    """What the RLHF stages need from a task (see the module docstring)."""

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]: ...

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str: ...

    def score(self, prompt: str, response: str) -> float: ...

    def pretraining_corpus(self, rng: np.random.Generator, n_docs: int) -> list[str]: ...


def load_task(path: str, **kwargs: Any) -> PreferenceTask:
    """`"module:Class"` (e.g. `rlhf.tasks:Addition`) -> an instance built with **kwargs.

    The tasks here also answer to their short names (`TASKS`: "addition",
    "next_letter", "sort", "uppercase"), and so do those of `rlhf.more_tasks` and
    `rlhf.nl_tasks` (`short_names()`).
    Raises ValueError naming what is wrong: the format, the module, the attribute, or a
    missing method of the interface.
    """
    path = short_names().get(path, path)
    module_name, sep, attr = path.partition(":")
    if not sep or not module_name or not attr:
        raise ValueError(f"task={path!r}: expected 'module:Class', e.g. 'rlhf.tasks:Addition'")
    try:
        module = importlib.import_module(module_name)
    except ImportError as e:
        raise ValueError(f"task={path!r}: cannot import module {module_name!r}: {e}") from e
    if not hasattr(module, attr):
        raise ValueError(f"task={path!r}: module {module_name!r} has no attribute {attr!r}")
    factory = getattr(module, attr)
    if not callable(factory):
        raise ValueError(f"task={path!r}: {attr} is not a class")
    task = factory(**kwargs)
    missing = [m for m in _METHODS if not callable(getattr(task, m, None))]
    if missing:
        raise ValueError(f"task={path!r}: {attr} lacks the task method(s) {missing}")
    return task


_METHODS = ("prompts", "demonstration", "score", "pretraining_corpus")


def short_names() -> dict[str, str]:
    """Every short task name -> "module:Class": `TASKS` plus the other task modules'
    (imported only when a name is looked up: the English tasks' word lists are large)."""
    from rlhf.more_tasks import MORE_TASKS
    from rlhf.nl_tasks import NL_TASKS

    return TASKS | MORE_TASKS | NL_TASKS


# ----------------------------------------------------------------------------- addition


class Addition:
    """Prompt "a+b" -> the decimal sum; the teacher forgets every carry half the time.

    Prompts: a, b uniform in [10^(d-1), 10^d) (d = `digits`), drawn until the sum has a
    carry (so the teacher's mistake differs from the answer). Mistake: digit-wise sum
    mod 10, no carries ("47+38" -> "75" instead of "85").
    Oracle: the response (surrounding whitespace ignored) must be digits only, else 0.
    1 for the sum; otherwise, if it has the sum's number of digits, ½ · the fraction
    of digits in the right place; any other length scores 0.
    """

    def __init__(self, digits: int = 2, p_correct: float = 0.5, lines_per_doc: int = 8):
        if digits < 1:
            raise ValueError(f"digits={digits}: must be >= 1")
        check_p_correct(p_correct)
        self.digits, self.p_correct, self.lines_per_doc = digits, p_correct, lines_per_doc

    @staticmethod
    def parse(prompt: str) -> tuple[int, int]:
        match = re.fullmatch(r"(\d+)\+(\d+)", prompt.strip())
        if match is None:
            raise ValueError(f"Addition: prompt {prompt!r} is not 'a+b'")
        return int(match.group(1)), int(match.group(2))

    @staticmethod
    def carry_free_sum(a: int, b: int) -> int:
        """Digit-wise sum mod 10: the teacher's systematic mistake."""
        out, place = 0, 1
        while a or b:
            out += ((a % 10 + b % 10) % 10) * place
            a, b, place = a // 10, b // 10, place * 10
        return out

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        low, high = 10 ** (self.digits - 1), 10**self.digits
        out: list[str] = []
        while len(out) < n:
            a, b = (int(x) for x in rng.integers(low, high, size=2))
            if self.carry_free_sum(a, b) != a + b:
                out.append(f"{a}+{b}")
        return out

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        a, b = self.parse(prompt)
        return str(a + b if rng.random() < self.p_correct else self.carry_free_sum(a, b))

    def score(self, prompt: str, response: str) -> float:
        a, b = self.parse(prompt)
        answer, given = str(a + b), response.strip()
        if not given.isascii() or not given.isdigit():
            return 0.0
        if given == answer:
            return 1.0
        if len(given) != len(answer):
            return 0.0
        return 0.5 * sum(x == y for x, y in zip(given, answer, strict=True)) / len(answer)

    def pretraining_corpus(self, rng: np.random.Generator, n_docs: int) -> list[str]:
        return teacher_corpus(self, rng, n_docs, self.lines_per_doc, "=")


# ----------------------------------------------------------------------------- sorting


class SortLetters:
    """Prompt "sort dbca" -> "abcd"; half the time the teacher leaves the last letter in place.

    Prompts: "sort " + `min_len`..`max_len` letters drawn from the first `alphabet`
    lowercase letters, drawn until the last letter is not the largest (so the mistake
    differs from the answer). Mistake: sort all letters but the last, append the last.
    Oracle: the response (surrounding whitespace ignored) must use exactly the prompt's
    letters (same multiset), else 0: repetition, padding, dropping or adding letters
    earn nothing. 1 when sorted; otherwise ½ · the fraction of adjacent pairs in order.
    """

    def __init__(
        self,
        min_len: int = 4,
        max_len: int = 7,
        alphabet: int = 26,
        p_correct: float = 0.5,
        lines_per_doc: int = 8,
    ):
        if not 3 <= min_len <= max_len:
            raise ValueError(f"min_len={min_len}, max_len={max_len}: need 3 <= min <= max")
        if not 2 <= alphabet <= 26:
            raise ValueError(f"alphabet={alphabet}: must be in [2, 26]")
        check_p_correct(p_correct)
        self.min_len, self.max_len, self.alphabet = min_len, max_len, alphabet
        self.p_correct, self.lines_per_doc = p_correct, lines_per_doc

    @staticmethod
    def parse(prompt: str) -> str:
        match = re.fullmatch(r"sort ([a-z]+)", prompt.strip())
        if match is None:
            raise ValueError(f"SortLetters: prompt {prompt!r} is not 'sort <letters>'")
        return match.group(1)

    @staticmethod
    def last_in_place(letters: str) -> str:
        """The teacher's systematic mistake: sort all but the last letter, then append it."""
        return "".join(sorted(letters[:-1])) + letters[-1]

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"[: self.alphabet]))
        out: list[str] = []
        while len(out) < n:
            size = int(rng.integers(self.min_len, self.max_len + 1))
            word = "".join(rng.choice(letters, size=size))
            if self.last_in_place(word) != "".join(sorted(word)):
                out.append(f"sort {word}")
        return out

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        word = self.parse(prompt)
        return "".join(sorted(word)) if rng.random() < self.p_correct else self.last_in_place(word)

    def score(self, prompt: str, response: str) -> float:
        word, given = self.parse(prompt), response.strip()
        if sorted(given) != sorted(word):
            return 0.0
        if given == "".join(sorted(word)):
            return 1.0
        ordered = sum(x <= y for x, y in itertools.pairwise(given))
        return 0.5 * ordered / (len(given) - 1)

    def pretraining_corpus(self, rng: np.random.Generator, n_docs: int) -> list[str]:
        return teacher_corpus(self, rng, n_docs, self.lines_per_doc, " -> ")


# ----------------------------------------------------------------------------- word tasks


class _WordTask:
    """Prompt "<verb> <letters>" -> a per-letter answer; the teacher gives `right(word)`
    with probability p_correct, else `mistake(word)`. Subclasses set `verb` and define
    `right`, `mistake` and `score`."""

    verb = ""

    def __init__(
        self, min_len: int = 5, max_len: int = 5, p_correct: float = 0.5, lines_per_doc: int = 8
    ):
        if not 2 <= min_len <= max_len:
            raise ValueError(f"min_len={min_len}, max_len={max_len}: need 2 <= min <= max")
        check_p_correct(p_correct)
        self.min_len, self.max_len = min_len, max_len
        self.p_correct, self.lines_per_doc = p_correct, lines_per_doc

    def parse(self, prompt: str) -> str:
        match = re.fullmatch(rf"{self.verb} ([a-z]+)", prompt.strip())
        if match is None:
            name = type(self).__name__
            raise ValueError(f"{name}: prompt {prompt!r} is not '{self.verb} <letters>'")
        return match.group(1)

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        letters = np.array(list("abcdefghijklmnopqrstuvwxyz"))
        sizes = rng.integers(self.min_len, self.max_len + 1, size=n)
        return [f"{self.verb} " + "".join(rng.choice(letters, size=int(k))) for k in sizes]

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        word = self.parse(prompt)
        return self.right(word) if rng.random() < self.p_correct else self.mistake(word)

    def pretraining_corpus(self, rng: np.random.Generator, n_docs: int) -> list[str]:
        return teacher_corpus(self, rng, n_docs, self.lines_per_doc, " -> ")


class Uppercase(_WordTask):
    """Prompt "shout abcde" -> "ABCDE"; half the time the teacher leaves the last letter small.

    The easiest of the shipped tasks for a small model (a per-character mapping, no
    arithmetic or comparison), so it is the pipeline demo's task: SFT learns the format
    within minutes on a CPU and what is left is exactly the teacher's habit, which only
    the preference signal can remove. Prompts: "shout " + `min_len`..`max_len` lowercase
    letters. The default fixes the length at 5: every answer letter then sits at the same
    distance from its source letter, which one attention head learns quickly, where
    variable lengths need an induction circuit a 3-layer char model did not form in 600
    steps. Mistake: every letter uppercased but the last ("ABCDe").
    Oracle: the response (surrounding whitespace ignored) must be the prompt's letters in
    order, in any case, else 0 (repeating, padding, dropping or changing letters earn
    nothing). 1 when all are uppercase; otherwise ½ · the fraction of uppercase letters.
    """

    verb = "shout"

    @staticmethod
    def right(word: str) -> str:
        return word.upper()

    @staticmethod
    def last_left_small(word: str) -> str:
        """The teacher's systematic mistake."""
        return word[:-1].upper() + word[-1]

    mistake = last_left_small

    def score(self, prompt: str, response: str) -> float:
        word, given = self.parse(prompt), response.strip()
        if not given.isascii() or given.lower() != word:
            return 0.0
        if given == word.upper():
            return 1.0
        return 0.5 * sum(c.isupper() for c in given) / len(given)


def _shift(letter: str) -> str:
    return chr((ord(letter) - ord("a") + 1) % 26 + ord("a"))


class NextLetter(_WordTask):
    """Prompt "next abcde" -> "bcdef" (z wraps to a); half the time the teacher copies the
    last letter instead of shifting it.

    Like `Uppercase` a per-letter mapping at a fixed length (5 by default, for the same
    reason), so a small model learns the format quickly; unlike it, the mistake cannot be
    seen in the answer alone: "bcdee" is as plausible a string as "bcdef", and a reward
    model has to compare the answer's last letter with the prompt's. Prompts: "next " +
    `min_len`..`max_len` lowercase letters. Mistake: every letter shifted but the last,
    which is copied ("bcdee").
    Oracle: the response (surrounding whitespace ignored) must be lowercase letters of the
    prompt word's length, else 0 (padding, repeating, dropping letters earn nothing).
    1 when every letter is the next one; otherwise ½ · the fraction of letters that are.
    """

    verb = "next"
    # Seed 0 at the demo's 600 pretraining steps (and 200 SFT): SFT eval loss 0.63
    # nats/token against the teacher's ~0.12 floor and a reward model at 0.54 held-out
    # accuracy; at 1200 pretraining (and 600 SFT) steps: 0.23 and 0.87.
    preset_scale: ClassVar[dict[str, float]] = {"pretrain.total_steps": 2}

    @staticmethod
    def shifted(word: str) -> str:
        return "".join(_shift(c) for c in word)

    right = shifted

    @staticmethod
    def last_copied(word: str) -> str:
        """The teacher's systematic mistake."""
        return NextLetter.shifted(word[:-1]) + word[-1]

    mistake = last_copied

    def score(self, prompt: str, response: str) -> float:
        answer, given = self.shifted(self.parse(prompt)), response.strip()
        if len(given) != len(answer) or not (given.isascii() and given.isalpha()):
            return 0.0
        if given == answer:
            return 1.0
        return 0.5 * sum(x == y for x, y in zip(given, answer, strict=True)) / len(answer)


TASKS = {
    "addition": "rlhf.tasks:Addition",
    "next_letter": "rlhf.tasks:NextLetter",
    "sort": "rlhf.tasks:SortLetters",
    "uppercase": "rlhf.tasks:Uppercase",
}
