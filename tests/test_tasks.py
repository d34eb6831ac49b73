"""Preference tasks, the oracle, the simulated labeler and its JSONL through the data builders."""

from __future__ import annotations

import numpy as np
import pytest

from rlhf import labeler as lab
from rlhf import tasks
from train.data import builders

TASKS = [tasks.Addition(), tasks.SortLetters(), tasks.Uppercase(), tasks.NextLetter()]
IDS = ["addition", "sort", "uppercase", "next_letter"]


def as_text(value):
    return value.decode() if isinstance(value, bytes) else value


def read_all(prepared):
    source = prepared.source("train")
    return [source[i] for i in range(len(source))]


def correct_answer(task, prompt: str) -> str:
    if isinstance(task, tasks.Addition):
        a, b = task.parse(prompt)
        return str(a + b)
    if isinstance(task, tasks.Uppercase):
        return task.parse(prompt).upper()
    if isinstance(task, tasks.NextLetter):  # written out, not via task.shifted
        alphabet = "abcdefghijklmnopqrstuvwxyz"
        return "".join(alphabet[(alphabet.index(c) + 1) % 26] for c in task.parse(prompt))
    return "".join(sorted(task.parse(prompt)))


def teacher_mistake(task, prompt: str) -> str:
    if isinstance(task, tasks.Addition):
        return str(task.carry_free_sum(*task.parse(prompt)))
    if isinstance(task, tasks.Uppercase):
        return task.last_left_small(task.parse(prompt))
    if isinstance(task, tasks.NextLetter):
        return correct_answer(task, prompt)[:-1] + task.parse(prompt)[-1]
    return task.last_in_place(task.parse(prompt))


# ----------------------------------------------------------------------------- loading


def test_load_task_by_path():
    task = tasks.load_task("rlhf.tasks:SortLetters", min_len=3, max_len=3)
    assert isinstance(task, tasks.SortLetters) and task.max_len == 3
    assert isinstance(task, tasks.PreferenceTask)
    for name, path in tasks.TASKS.items():
        assert isinstance(tasks.load_task(path), tasks.PreferenceTask), name
    assert isinstance(tasks.load_task("addition", digits=3), tasks.Addition)
    with pytest.raises(ValueError, match="not a class"):
        tasks.load_task("rlhf.tasks:TASKS")
    with pytest.raises(ValueError, match="module:Class"):
        tasks.load_task("rlhf.tasks.Addition")
    with pytest.raises(ValueError, match="cannot import"):
        tasks.load_task("rlhf.no_such_module:Task")
    with pytest.raises(ValueError, match="no attribute"):
        tasks.load_task("rlhf.tasks:NoSuchTask")
    with pytest.raises(ValueError, match="lacks"):
        tasks.load_task("builtins:dict")


# ----------------------------------------------------------------------------- tasks


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_prompts_are_seeded_and_parse(task):
    a = task.prompts(np.random.default_rng(5), 50)
    assert a == task.prompts(np.random.default_rng(5), 50)
    assert len(a) == 50 and len(set(a)) > 25
    for p in a:
        assert correct_answer(task, p) != teacher_mistake(task, p)  # the mistake matters


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_oracle_ranks_correct_above_mistake_above_wrong(task):
    for prompt in task.prompts(np.random.default_rng(0), 200):
        right = task.score(prompt, correct_answer(task, prompt))
        mistake = task.score(prompt, teacher_mistake(task, prompt))
        assert right == 1.0
        assert 0.0 <= mistake < 0.5  # graded, but always below half of a right answer
        assert task.score(prompt, f" {correct_answer(task, prompt)}\n") == 1.0


def test_addition_oracle_by_hand():
    task = tasks.Addition()
    assert task.carry_free_sum(47, 38) == 75 and task.carry_free_sum(95, 17) == 2
    assert task.score("47+38", "85") == 1.0
    assert task.score("47+38", "75") == 0.25  # one of two digits in place
    assert task.score("47+38", "58") == 0.0
    assert task.score("95+17", "112") == 1.0 and task.score("95+17", "2") == 0.0


def test_sort_oracle_by_hand():
    task = tasks.SortLetters()
    assert task.score("sort dbca", "abcd") == 1.0
    assert task.score("sort dbca", "bcda") == pytest.approx(0.5 * 2 / 3)
    assert task.score("sort dbca", "dcba") == 0.0
    assert task.score("sort aab", "aab") == 1.0
    assert task.score("sort dbca", "abc") == 0.0  # a letter dropped


def test_uppercase_oracle_by_hand():
    task = tasks.Uppercase()
    assert task.score("shout abcd", "ABCD") == 1.0
    assert task.score("shout abcd", " ABCD\n") == 1.0
    assert task.score("shout abcd", "ABCd") == pytest.approx(0.5 * 3 / 4)
    assert task.score("shout abcd", "abcd") == 0.0  # the prompt echoed: no credit
    assert task.score("shout abcd", "ABDC") == 0.0  # letters out of order
    assert task.score("shout abcd", "ABC") == 0.0  # a letter dropped
    assert tasks.load_task("uppercase").parse("shout xyz") == "xyz"


def test_next_letter_oracle_by_hand():
    task = tasks.NextLetter()
    assert task.score("next abcde", "bcdef") == 1.0
    assert task.score("next xyzab", " yzabc\n") == 1.0  # z wraps to a
    assert task.score("next abcde", "bcdee") == pytest.approx(0.5 * 4 / 5)  # the mistake
    assert task.last_copied("abcde") == "bcdee"
    assert task.score("next abcde", "abcde") == 0.0  # the prompt echoed: no credit
    assert task.score("next abcde", "BCDEF") == 0.0  # not lowercase
    assert task.score("next abcde", "bcde") == 0.0  # a letter dropped
    assert task.score("next abcde", "bcd3f") == 0.0  # not letters
    assert tasks.load_task("next_letter").parse("next xyz") == "xyz"


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_length_and_repetition_hacks_score_zero(task):
    for prompt in task.prompts(np.random.default_rng(1), 100):
        answer = correct_answer(task, prompt)
        for hack in (
            answer * 2,  # repetition
            answer + answer[-1] * 20,  # padding
            answer + " " + answer,
            answer + "!",
            answer[:-1],
            "",
        ):
            assert task.score(prompt, hack) == 0.0, (prompt, hack)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_one_character_repeated_earns_little(task):
    """Repeating one character at the answer's length: 0 for sorting (wrong letters), at
    most the credit of the digits it happens to hit for addition (full credit when the
    sum is a repdigit, like 111); the best such fixed policy ("111...", since many
    sums start with 1) earns under half of what the teacher, and so SFT, already earns."""
    prompts = task.prompts(np.random.default_rng(9), 300)
    means = [
        np.mean([task.score(p, c * len(correct_answer(task, p))) for p in prompts])
        for c in "0123456789abcdefg"
    ]
    rng = np.random.default_rng(10)
    teacher = np.mean([task.score(p, task.demonstration(p, rng)) for p in prompts])
    assert max(means) < 0.5 * teacher, (means, teacher)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_teacher_is_right_half_the_time(task):
    rng = np.random.default_rng(2)
    prompts = task.prompts(rng, 2000)
    right = np.mean([task.score(p, task.demonstration(p, rng)) == 1.0 for p in prompts])
    assert right == pytest.approx(0.5, abs=0.04)
    # Two modes only: the right answer and the systematic mistake.
    p = prompts[0]
    assert {task.demonstration(p, rng) for _ in range(50)} == {
        correct_answer(task, p),
        teacher_mistake(task, p),
    }
    perfect = type(task)(p_correct=1.0)
    assert all(perfect.score(q, perfect.demonstration(q, rng)) == 1.0 for q in prompts[:100])


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_pretraining_corpus(task):
    docs = task.pretraining_corpus(np.random.default_rng(3), 5)
    assert len(docs) == 5
    assert all(len(d.splitlines()) == task.lines_per_doc for d in docs)
    assert docs == task.pretraining_corpus(np.random.default_rng(3), 5)


# ----------------------------------------------------------------------------- labeler


def candidate_responses(task, prompt: str, rng: np.random.Generator, k: int) -> list[str]:
    """A spread of oracle scores: teacher answers and shuffled / perturbed answers."""
    out = []
    for i in range(k):
        answer = list(task.demonstration(prompt, rng))
        if i % 2:
            rng.shuffle(answer)
        out.append("".join(answer))
    return out


def test_dense_ranks():
    assert lab.dense_ranks([0.5, 1.0, 0.5, 0.0]) == [1, 0, 1, 2]
    assert lab.dense_ranks([2.0, 2.0]) == [0, 0]


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_labeler_agreement_is_about_75_percent(task):
    rng = np.random.default_rng(4)
    labeler = lab.Labeler()
    agree, pairs = 0.0, 0
    for prompt in task.prompts(rng, 1500):
        responses = candidate_responses(task, prompt, rng, 4)
        scores = [task.score(prompt, r) for r in responses]
        a, n = lab.pairwise_agreement(scores, labeler.rank(scores, rng))
        agree, pairs = agree + a, pairs + n
    assert pairs > 3000
    assert agree / pairs == pytest.approx(labeler.expected_agreement, abs=0.02)
    assert agree / pairs == pytest.approx(0.75, abs=0.05)


def test_labeler_noise_settings():
    rng = np.random.default_rng(6)
    scores = [1.0, 0.25, 0.0, 0.25]
    assert lab.Labeler(random_rate=0.0).rank(scores, rng) == [0, 1, 2, 1]
    noisy = lab.Labeler(random_rate=0.0, score_noise=0.3)
    total = [lab.pairwise_agreement(scores, noisy.rank(scores, rng)) for _ in range(500)]
    rate = sum(a for a, _ in total) / sum(n for _, n in total)
    assert 0.6 < rate < 0.95  # Thurstone noise confuses close scores
    with pytest.raises(ValueError):
        lab.Labeler(random_rate=1.5)
    with pytest.raises(ValueError):
        lab.Labeler().rank([1.0], rng)


# ----------------------------------------------------------------------------- JSONL


def test_ranked_jsonl_round_trip(tmp_path):
    task, rng = tasks.SortLetters(), np.random.default_rng(7)
    records = []
    for prompt in task.prompts(rng, 30):
        record = lab.ranked_record(task, prompt, candidate_responses(task, prompt, rng, 4), rng)
        if record is not None:
            records.append(record)
    tied = lab.ranked_record(task, "sort ba", ["ab", "ab"], rng, lab.Labeler(random_rate=0.0))
    assert tied is None  # an all-tied group has no pair: not written
    path = tmp_path / "ranked.jsonl"
    assert lab.write_jsonl(path, records) == len(records) > 20
    prepared = builders.prepare("ranked", str(path), str(tmp_path / "tfds"), bad_records="fail")
    got = {as_text(r["contents"][0]): r for r in read_all(prepared)}
    assert len(got) == len({r["prompt"] for r in records})
    for record in records:
        stored = got[record["prompt"]]
        assert [as_text(x) for x in stored["roles"]] == ["user"]
        assert [as_text(x) for x in stored["responses"]] == record["responses"]
        assert [int(x) for x in stored["ranks"]] == record["ranking"]


def test_sft_jsonl_round_trip(tmp_path):
    task, rng = tasks.Addition(), np.random.default_rng(8)
    records = lab.sft_records(task, rng, 25)
    path = tmp_path / "sft.jsonl"
    lab.write_jsonl(path, records)
    prepared = builders.prepare("sft", str(path), str(tmp_path / "tfds"), bad_records="fail")
    stored = sorted(tuple(as_text(c) for c in r["contents"]) for r in read_all(prepared))
    assert stored == sorted((r["prompt"], r["response"]) for r in records)
    assert all(
        [as_text(x) for x in r["roles"]] == ["user", "assistant"] for r in read_all(prepared)
    )


def test_write_task_data(tmp_path):
    task = tasks.Addition()
    paths = lab.write_task_data(
        task, tmp_path / "data", np.random.default_rng(11), 6, 40, 30, n_eval=10
    )
    data_dir = str(tmp_path / "tfds")
    text = read_all(builders.prepare("text", paths["pretrain"], data_dir, "blank_line"))
    assert len(text) == 6
    assert all(len(as_text(r["text"]).splitlines()) == task.lines_per_doc for r in text)
    sft = read_all(builders.prepare("sft", paths["sft"], data_dir, bad_records="fail"))
    prompts = read_all(builders.prepare("prompts", paths["prompts"], data_dir, bad_records="fail"))
    held = read_all(builders.prepare("prompts", paths["eval_prompts"], data_dir))
    assert (len(sft), len(prompts), len(held)) == (40, 30, 10)
    held_out = {as_text(r["contents"][0]) for r in held}
    assert len(held_out) == 10
    train = {as_text(r["contents"][0]) for r in sft + prompts}
    assert not held_out & train
