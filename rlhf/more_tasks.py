"""Four more preference tasks for the small char-level models, one of each kind.

Same design as the tasks in `rlhf.tasks` (read its module docstring): a tiny alphabet,
short prompts and answers that fit a 64-token char model, a teacher that is right with
probability `p_correct` (default ½) and otherwise makes one *systematic* mistake, prompts
drawn so that the mistake never equals the right answer (p_correct is then exact), and a
strict-shape oracle: a response of the wrong shape scores 0, a right one 1, and within the
shape credit is graded and always below ½.

    kind           short name     prompt              answer     teacher's mistake
    structural     brackets       close ([<           >])        closes in opening order: )]>
    prompt rule    rotate         rotate left abcde   bcdea      rotates the other way: eabcd
    arithmetic     subtraction    52-17               35         smaller-from-larger digit: 45
    length         repeat         repeat ab 3         ababab     one copy short: abab

The rotate task is the one whose rule lives in the prompt: the same letters need a
different answer for "left" and "right", so a reward model has to read the direction word.
"""

from __future__ import annotations

import re
from typing import ClassVar

import numpy as np

from rlhf.task_kit import check_p_correct, teacher_corpus

_LETTERS = "abcdefghijklmnopqrstuvwxyz"
_CLOSE = {"(": ")", "[": "]", "{": "}", "<": ">"}


class _TwoModeTask:
    """The shared teacher and corpus: `right(x)` with probability p_correct, else
    `mistake(x)`, where x is what `parse(prompt)` returns. Subclasses define `parse`,
    `right`, `mistake`, `prompts` and `score`."""

    def __init__(self, p_correct: float = 0.5, lines_per_doc: int = 8):
        check_p_correct(p_correct)
        self.p_correct, self.lines_per_doc = p_correct, lines_per_doc

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        parsed = self.parse(prompt)
        return self.right(parsed) if rng.random() < self.p_correct else self.mistake(parsed)

    def pretraining_corpus(self, rng: np.random.Generator, n_docs: int) -> list[str]:
        return teacher_corpus(self, rng, n_docs, self.lines_per_doc, " -> ")


def _check_lengths(min_len: int, max_len: int, least: int) -> None:
    if not least <= min_len <= max_len:
        raise ValueError(f"min_len={min_len}, max_len={max_len}: need {least} <= min <= max")


def _placed(given: str, answer: str) -> float:
    """½ · the fraction of positions where `given` matches `answer` (same length)."""
    return 0.5 * sum(x == y for x, y in zip(given, answer, strict=True)) / len(answer)


def _fullmatch(pattern: str, prompt: str, task: str, form: str) -> re.Match[str]:
    match = re.fullmatch(pattern, prompt.strip())
    if match is None:
        raise ValueError(f"{task}: prompt {prompt!r} is not '{form}'")
    return match


# ----------------------------------------------------------------------------- structural


class CloseBrackets(_TwoModeTask):
    """Prompt "close ([<" -> the closing brackets that balance it, innermost first: ">])".

    Prompts: "close " + `min_len`..`max_len` opening brackets from ( [ { <, drawn until the
    sequence is not a palindrome (for a palindrome the mistake is the right answer).
    Mistake: the right brackets in the opening order (")]>"), the classic nesting error.
    Oracle: the response (surrounding whitespace ignored) must be exactly the closing
    brackets of the prompt's openers, as a multiset, else 0 (padding, repeating, dropping
    or adding brackets earn nothing). 1 for the balancing order; otherwise ½ · the
    fraction of brackets in the right place (the mistake earns only its palindromic spots).
    """

    def __init__(self, min_len: int = 3, max_len: int = 5, **kwargs):
        _check_lengths(min_len, max_len, 2)
        super().__init__(**kwargs)
        self.min_len, self.max_len = min_len, max_len

    @staticmethod
    def parse(prompt: str) -> str:
        return _fullmatch(r"close ([(\[{<]+)", prompt, "CloseBrackets", "close <openers>")[1]

    @staticmethod
    def right(openers: str) -> str:
        return "".join(_CLOSE[c] for c in reversed(openers))

    @staticmethod
    def opening_order(openers: str) -> str:
        """The teacher's systematic mistake: closes in the order the brackets opened."""
        return "".join(_CLOSE[c] for c in openers)

    mistake = opening_order

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        kinds = np.array(list(_CLOSE))
        out: list[str] = []
        while len(out) < n:
            size = int(rng.integers(self.min_len, self.max_len + 1))
            openers = "".join(rng.choice(kinds, size=size))
            if openers != openers[::-1]:
                out.append(f"close {openers}")
        return out

    def score(self, prompt: str, response: str) -> float:
        answer, given = self.right(self.parse(prompt)), response.strip()
        if sorted(given) != sorted(answer):
            return 0.0
        return 1.0 if given == answer else _placed(given, answer)


# ----------------------------------------------------------------------------- prompt rule


class Rotate(_TwoModeTask):
    """Prompt "rotate left abcde" -> "bcdea"; "rotate right abcde" -> "eabcd".

    The rule depends on a word in the prompt. Prompts: a direction drawn uniformly and
    `min_len`..`max_len` lowercase letters (5 by default, fixed for the reason
    `rlhf.tasks.Uppercase` gives), drawn until the two rotations differ.
    Mistake: rotating the other way ("rotate left abcde" -> "eabcd").
    Oracle: the response (surrounding whitespace ignored) must use exactly the word's
    letters (same multiset), else 0. 1 for the asked rotation; otherwise ½ · the fraction
    of letters in the right place.
    """

    # Seed 0 at the demo's sizes: SFT 0.115 against the teacher's 0.452; 4x the pretraining
    # and 2x the SFT steps overfit the 2000 demonstrations (0.198, eval loss rising); 10x
    # the demonstrations, 5x the documents, 2x pretraining, 4x SFT: 0.470.
    preset_scale: ClassVar[dict[str, float]] = {
        "data.n_sft": 10,
        "data.n_docs": 5,
        "pretrain.total_steps": 2,
        "sft.total_steps": 4,
    }

    def __init__(self, min_len: int = 5, max_len: int = 5, **kwargs):
        _check_lengths(min_len, max_len, 3)
        super().__init__(**kwargs)
        self.min_len, self.max_len = min_len, max_len

    @staticmethod
    def parse(prompt: str) -> tuple[str, str]:
        form = "rotate left|right <letters>"
        match = _fullmatch(r"rotate (left|right) ([a-z]+)", prompt, "Rotate", form)
        return match[1], match[2]

    @staticmethod
    def rotated(direction: str, word: str) -> str:
        return word[1:] + word[0] if direction == "left" else word[-1] + word[:-1]

    @staticmethod
    def right(parsed: tuple[str, str]) -> str:
        return Rotate.rotated(*parsed)

    @staticmethod
    def other_way(parsed: tuple[str, str]) -> str:
        """The teacher's systematic mistake: the rotation the prompt did not ask for."""
        direction, word = parsed
        return Rotate.rotated("right" if direction == "left" else "left", word)

    mistake = other_way

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        letters = np.array(list(_LETTERS))
        out: list[str] = []
        while len(out) < n:
            direction = ("left", "right")[int(rng.integers(2))]
            size = int(rng.integers(self.min_len, self.max_len + 1))
            word = "".join(rng.choice(letters, size=size))
            if self.rotated("left", word) != self.rotated("right", word):
                out.append(f"rotate {direction} {word}")
        return out

    def score(self, prompt: str, response: str) -> float:
        parsed, given = self.parse(prompt), response.strip()
        answer = self.right(parsed)
        if sorted(given) != sorted(answer):
            return 0.0
        return 1.0 if given == answer else _placed(given, answer)


# ----------------------------------------------------------------------------- arithmetic


class Subtraction(_TwoModeTask):
    """Prompt "a-b" -> the decimal difference; the teacher has the smaller-from-larger bug.

    Prompts: a > b, both with `digits` digits, drawn until a - b also has `digits` digits
    and needs a borrow (then the mistake differs from the answer and has its length).
    Mistake: in every column, the smaller digit subtracted from the larger, no borrows
    ("52-17" -> "45" instead of "35"), the best-known systematic subtraction error.
    Oracle: the response (surrounding whitespace ignored) must be digits only with the
    difference's number of digits, else 0. 1 for the difference; otherwise ½ · the
    fraction of digits in the right place.
    """

    def __init__(self, digits: int = 2, **kwargs):
        if digits < 2:
            raise ValueError(f"digits={digits}: must be >= 2 (one digit has no borrow)")
        super().__init__(**kwargs)
        self.digits = digits

    @staticmethod
    def parse(prompt: str) -> tuple[int, int]:
        match = _fullmatch(r"(\d+)-(\d+)", prompt, "Subtraction", "a-b")
        return int(match[1]), int(match[2])

    @staticmethod
    def right(parsed: tuple[int, int]) -> str:
        return str(parsed[0] - parsed[1])

    @staticmethod
    def smaller_from_larger(parsed: tuple[int, int]) -> str:
        """The teacher's systematic mistake: |digit_a - digit_b| in each column."""
        a, b = parsed
        out, place = 0, 1
        while a or b:
            out += abs(a % 10 - b % 10) * place
            a, b, place = a // 10, b // 10, place * 10
        return str(out)

    mistake = smaller_from_larger

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        low, high = 10 ** (self.digits - 1), 10**self.digits
        out: list[str] = []
        while len(out) < n:
            a, b = (int(x) for x in rng.integers(low, high, size=2))
            if a - b >= low and self.mistake((a, b)) != self.right((a, b)):
                out.append(f"{a}-{b}")
        return out

    def score(self, prompt: str, response: str) -> float:
        answer, given = self.right(self.parse(prompt)), response.strip()
        if not (given.isascii() and given.isdigit()) or len(given) != len(answer):
            return 0.0
        return 1.0 if given == answer else _placed(given, answer)


# ----------------------------------------------------------------------------- length


class Repeat(_TwoModeTask):
    """Prompt "repeat ab 3" -> "ababab": the unit written exactly n times, nothing else.

    A length constraint: the answer is easy to write and the whole task is stopping at
    the right count. Prompts: "repeat " + `min_unit`..`max_unit` lowercase letters + a
    count n in [`min_count`, `max_count`]. Mistake: one copy short (n - 1 copies, the
    off-by-one), which always differs from the answer.
    Oracle: the response (surrounding whitespace ignored) must be k >= 1 whole copies of
    the unit, else 0 (other letters, a partial copy, separators). 1 for k = n; otherwise
    ½ · max(0, 1 - |k - n| / n): the mistake earns ½ · (n - 1) / n, doubling earns 0.
    """

    def __init__(
        self,
        min_unit: int = 2,
        max_unit: int = 3,
        min_count: int = 2,
        max_count: int = 4,
        **kwargs,
    ):
        if not 1 <= min_unit <= max_unit:
            raise ValueError(f"min_unit={min_unit}, max_unit={max_unit}: need 1 <= min <= max")
        if not 2 <= min_count <= max_count <= 9:
            raise ValueError(f"min_count={min_count}, max_count={max_count}: need 2..9")
        super().__init__(**kwargs)
        self.min_unit, self.max_unit = min_unit, max_unit
        self.min_count, self.max_count = min_count, max_count

    @staticmethod
    def parse(prompt: str) -> tuple[str, int]:
        match = _fullmatch(r"repeat ([a-z]+) ([1-9])", prompt, "Repeat", "repeat <letters> <n>")
        return match[1], int(match[2])

    @staticmethod
    def right(parsed: tuple[str, int]) -> str:
        unit, count = parsed
        return unit * count

    @staticmethod
    def one_short(parsed: tuple[str, int]) -> str:
        """The teacher's systematic mistake: n - 1 copies."""
        unit, count = parsed
        return unit * (count - 1)

    mistake = one_short

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        letters = np.array(list(_LETTERS))
        out = []
        for _ in range(n):
            size = int(rng.integers(self.min_unit, self.max_unit + 1))
            count = int(rng.integers(self.min_count, self.max_count + 1))
            out.append(f"repeat {''.join(rng.choice(letters, size=size))} {count}")
        return out

    def score(self, prompt: str, response: str) -> float:
        (unit, count), given = self.parse(prompt), response.strip()
        copies = len(given) // len(unit)
        if copies < 1 or given != unit * copies:
            return 0.0
        if copies == count:
            return 1.0
        return 0.5 * max(0.0, 1.0 - abs(copies - count) / count)


MORE_TASKS = {
    "brackets": "rlhf.more_tasks:CloseBrackets",
    "repeat": "rlhf.more_tasks:Repeat",
    "rotate": "rlhf.more_tasks:Rotate",
    "subtraction": "rlhf.more_tasks:Subtraction",
}
