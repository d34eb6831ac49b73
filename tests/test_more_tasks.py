"""The char-level tasks of rlhf.more_tasks: hand-computed oracle cases, hacks, the teacher."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf import more_tasks as mt
from rlhf import tasks

TASKS = [mt.CloseBrackets(), mt.Rotate(), mt.Subtraction(), mt.Repeat()]
IDS = ["brackets", "rotate", "subtraction", "repeat"]


def correct_answer(task, prompt: str) -> str:
    """Written out independently of the task code."""
    if isinstance(task, mt.CloseBrackets):
        stack = []
        for c in prompt.split()[1]:
            stack.append({"(": ")", "[": "]", "{": "}", "<": ">"}[c])
        return "".join(reversed(stack))
    if isinstance(task, mt.Rotate):
        _, direction, word = prompt.split()
        shift = 1 if direction == "left" else len(word) - 1
        return "".join(word[(i + shift) % len(word)] for i in range(len(word)))
    if isinstance(task, mt.Subtraction):
        a, b = prompt.split("-")
        return str(int(a) - int(b))
    _, unit, count = prompt.split()
    return unit * int(count)


# ----------------------------------------------------------------------------- by hand


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("close ([<", ">])", 1.0),
        ("close ([<", " >])\n", 1.0),
        ("close ([<", ")]>", 0.5 / 3),  # the mistake: only the middle bracket in place
        ("close ([<", "])>", 0.0),  # right brackets, none in place
        ("close ([<", ">]", 0.0),  # one dropped
        ("close ([<", ">])>", 0.0),  # one added
        ("close ([<", ")))", 0.0),  # wrong kinds
        ("close {<", "}>", 0.0),  # even length: the mistake has no spot right
        ("close ((([", "])))", 1.0),
        ("close ((([", ")))]", 0.25),  # 2 of 4 in place
    ],
)
def test_brackets_by_hand(prompt, response, expected):
    assert mt.CloseBrackets().score(prompt, response) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("rotate left abcde", "bcdea", 1.0),
        ("rotate left abcde", "eabcd", 0.0),  # the other way
        ("rotate right abcde", "eabcd", 1.0),
        ("rotate right abcde", "bcdea", 0.0),
        ("rotate right abcde", "abcde", 0.0),  # the prompt echoed
        ("rotate right abcde", "eabdc", 0.3),  # 3 of 5 in place
        ("rotate right abcde", "eabc", 0.0),  # a letter dropped
        ("rotate right abcde", "EABCD", 0.0),
        ("rotate left abcab", "bcaba", 1.0),
        ("rotate left abcab", "babca", 0.2),  # the mistake keeps 2 of 5 in place
    ],
)
def test_rotate_by_hand(prompt, response, expected):
    assert mt.Rotate().score(prompt, response) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("52-17", "35", 1.0),
        ("52-17", " 35\n", 1.0),
        ("52-17", "45", 0.25),  # the mistake: the units digit right
        ("52-17", "035", 0.0),
        ("52-17", "3 5", 0.0),
        ("52-17", "-35", 0.0),
        ("52-17", "3", 0.0),
        ("91-28", "63", 1.0),
        ("91-28", "77", 0.0),  # the mistake, no digit in place
        ("503-267", "236", 1.0),
        ("503-267", "364", 0.0),
        ("503-267", "266", 0.5 * 2 / 3),
    ],
)
def test_subtraction_by_hand(prompt, response, expected):
    assert mt.Subtraction().score(prompt, response) == pytest.approx(expected)


def test_subtraction_mistake_by_hand():
    bug = mt.Subtraction.smaller_from_larger
    assert bug((52, 17)) == "45" and bug((91, 28)) == "77" and bug((503, 267)) == "364"


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        ("repeat ab 3", "ababab", 1.0),
        ("repeat ab 3", "abab", 1 / 3),  # the mistake: one copy short
        ("repeat ab 3", "ab", 1 / 6),
        ("repeat ab 3", "abababab", 1 / 3),  # one copy long
        ("repeat ab 3", "ab" * 6, 0.0),  # doubled
        ("repeat ab 3", "ababa", 0.0),  # a partial copy
        ("repeat ab 3", "ab ab ab", 0.0),  # separators
        ("repeat ab 3", "ABABAB", 0.0),
        ("repeat ab 3", "aaaaaa", 0.0),
        ("repeat ab 3", "", 0.0),
        ("repeat aa 2", "aaaa", 1.0),
        ("repeat aa 2", "aaa", 0.0),
        ("repeat xyz 4", "xyzxyzxyz", 0.375),
    ],
)
def test_repeat_by_hand(prompt, response, expected):
    assert mt.Repeat().score(prompt, response) == pytest.approx(expected)


def test_bad_prompts_and_settings_raise():
    with pytest.raises(ValueError, match="close"):
        mt.CloseBrackets().score("close abc", ")")
    with pytest.raises(ValueError, match="rotate"):
        mt.Rotate().score("rotate up abc", "abc")
    with pytest.raises(ValueError, match="a-b"):
        mt.Subtraction().score("5+3", "8")
    with pytest.raises(ValueError, match="repeat"):
        mt.Repeat().score("repeat ab", "ab")
    with pytest.raises(ValueError):
        mt.Subtraction(digits=1)
    with pytest.raises(ValueError):
        mt.Repeat(p_correct=1.5)


# ----------------------------------------------------------------------------- every task


@pytest.mark.parametrize("name", ["brackets", "rotate", "subtraction", "repeat"])
def test_load_task_resolves_short_names(name):
    task = tasks.load_task(name, p_correct=0.25)
    assert isinstance(task, tasks.PreferenceTask) and task.p_correct == 0.25
    assert type(task).__name__ == mt.MORE_TASKS[name].split(":")[1]


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_prompts_are_seeded_short_and_the_mistake_matters(task):
    a = task.prompts(np.random.default_rng(5), 200)
    assert a == task.prompts(np.random.default_rng(5), 200)
    assert a != task.prompts(np.random.default_rng(6), 200)
    assert len(set(a)) > 100
    for p in a:
        assert len(p) + len(correct_answer(task, p)) < 40  # fits a 64-token char model
        assert correct_answer(task, p) != task.mistake(task.parse(p))


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_teacher_right_at_p_correct_and_mistake_below_half(task):
    rng = np.random.default_rng(2)
    prompts = task.prompts(rng, 2000)
    right = np.mean([task.score(p, task.demonstration(p, rng)) == 1.0 for p in prompts])
    assert right == pytest.approx(task.p_correct, abs=0.03)
    perfect, wrong = type(task)(p_correct=1.0), type(task)(p_correct=0.0)
    for p in prompts[:300]:
        assert perfect.demonstration(p, rng) == correct_answer(task, p)
        assert perfect.score(p, correct_answer(task, p)) == 1.0
        assert 0.0 <= wrong.score(p, wrong.demonstration(p, rng)) < 0.5
    assert {task.demonstration(prompts[0], rng) for _ in range(50)} == {
        correct_answer(task, prompts[0]),
        task.mistake(task.parse(prompts[0])),
    }


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_length_and_repetition_hacks_score_zero(task):
    for prompt in task.prompts(np.random.default_rng(1), 100):
        answer = correct_answer(task, prompt)
        for hack in (
            answer * 2,
            answer + answer[-1] * 20,
            answer + " " + answer,
            answer + "!",
            answer[:-1],
            "",
        ):
            assert task.score(prompt, hack) == 0.0, (prompt, hack)
        if not isinstance(task, mt.Subtraction):  # a repdigit may share digits with it
            assert task.score(prompt, answer[0] * len(answer)) == 0.0 or len(set(answer)) == 1


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_pretraining_corpus(task):
    docs = task.pretraining_corpus(np.random.default_rng(3), 4)
    assert docs == task.pretraining_corpus(np.random.default_rng(3), 4)
    assert len(docs) == 4
    for doc in docs:
        lines = doc.splitlines()
        assert len(lines) == task.lines_per_doc
        for line in lines:
            prompt, answer = line.split(" -> ")
            assert answer in (correct_answer(task, prompt), task.mistake(task.parse(prompt)))
