"""The English tasks of rlhf.nl_tasks: hand-computed oracle cases, hacks, the teacher."""

from __future__ import annotations

import re

import numpy as np
import pytest

from rlhf import nl_tasks as nl
from rlhf import nl_words as nw
from rlhf import tasks

TASKS = [nl.Brief(), nl.Format(), nl.AvoidWord()]
IDS = ["brief", "format", "avoid_word"]

FRUIT3 = "Name a fruit. Answer in at most 3 words."
COLOUR2 = "Name a colour. Answer in at most 2 words."
COUNTRY2 = "Give an example of a country. Use no more than 2 words."
SKY = "Reply in all capital letters: what colour is the sky?"
SPIDER = "Answer in all caps: how many legs does a spider have?"
ANIMALS3 = "List three animals as a bulleted list."
SEA = "Describe the sea in one sentence without using the word 'water'."
SALT = "Hi! Give me one sentence on the sea that does not contain the word 'salt'."
LIBRARY = "Say something about a library in one sentence, never using the word 'book'."
SUN = "Write one sentence about the sun, but do not use the word 'hot'."


# ----------------------------------------------------------------------------- by hand


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (FRUIT3, "Mango.", 1.0),
        (FRUIT3, "A ripe mango.", 1.0),
        (FRUIT3, "Cherries", 1.0),  # plural
        (FRUIT3, "Orange.", 1.0),  # also a colour: still a fruit
        (FRUIT3, "A mango is a sweet tropical fruit.", 0.5 * 3 / 7),  # too long
        (FRUIT3, "Carrot.", 0.1),  # within the limit, wrong category
        (FRUIT3, "I don't know", 0.1),
        (FRUIT3, "Apple, dog, France", 0.1),  # a list of guesses
        (FRUIT3, "apple apple", 0.1),  # repetition: 1 x 0.1
        (FRUIT3, "", 0.0),
        (FRUIT3, " ...!", 0.0),
        (FRUIT3, "Pineapple pizza is delicious and popular", 0.5 * 3 / 6),
        (COLOUR2, "Orange", 1.0),
        (COLOUR2, "Sky blue.", 1.0),
        (COLOUR2, "Dark green apple", 0.0),  # names a fruit too, and over the limit
        (COUNTRY2, "United States.", 1.0),
        (COUNTRY2, "the UK", 1.0),
        (COUNTRY2, "Turkey", 1.0),
        (COUNTRY2, "United Kingdom and France", 0.5 * 2 / 4),
    ],
)
def test_brief_by_hand(prompt, response, expected):
    assert nl.Brief().score(prompt, response) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (SKY, "BLUE", 1.0),
        (SKY, "THE SKY IS BLUE.", 1.0),
        (SKY, "The sky is blue.", 0.5 * (1 + 1 / 12) / 2),  # 1 capital in 12 letters
        (SKY, "blue", 0.25),
        (SKY, "BLUE OR GREEN", 0.25),  # names another question's answer
        (SKY, "NO", 0.25),
        (SKY, "BLUE BLUE BLUE", 0.1),  # repetition
        (SKY, "", 0.0),
        (SKY, "!!!", 0.0),
        (SPIDER, "EIGHT LEGS", 1.0),
        (SPIDER, "8", 0.25),  # no letters: no capitals shown
        (SPIDER, "IT HAS 8 LEGS.", 1.0),
    ],
)
def test_caps_by_hand(prompt, response, expected):
    assert nl.Format().score(prompt, response) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("response", "expected"),
    [
        ("- Dog\n- Cat\n- Horse", 1.0),
        ("* dog\n* cat\n\n* horse\n", 1.0),  # blank lines ignored
        ("• Dogs\n• Cats\n• Horses", 1.0),
        ("Here are three animals:\n- Dog\n- Cat\n- Horse", 0.5 * (3 / 4 + 1) / 2),
        ("1. Dog\n2. Cat\n3. Horse", 0.25),  # the teacher's mistake
        ("Dog, cat and horse.", 0.25),
        ("- Dog\n- Cat", 0.5 * (2 / 3 + 2 / 3) / 2),
        ("- Dog\n- Cat\n- Horse\n- Cow", 0.5 * (3 / 4 + 1) / 2),  # one too many
        ("- Dog\n- Apple\n- Horse", 0.5 * (1 + 2 / 3) / 2),
        ("- a\n- b\n- c", 0.25),  # bullets without content
        ("- Dog\n- Dog\n- Dog", 0.1 * 0.5 * (1 + 1 / 3) / 2),  # repetition
        ("-Dog\n-Cat\n-Horse", 0.25),  # no space after the dash: not a bullet
        ("", 0.0),
    ],
)
def test_bullets_by_hand(response, expected):
    assert nl.Format().score(ANIMALS3, response) == pytest.approx(expected)


@pytest.mark.parametrize(
    ("prompt", "response", "expected"),
    [
        (SEA, "The sea is a vast blue expanse of salty waves.", 1.0),
        (SEA, "The sea is a huge body of salt water.", 1 / 3),
        (SEA, "Deep waters hide many fish.", 1 / 3),  # an ending of the banned word
        (SEA, "WATER everywhere, with waves and fish.", 1 / 3),  # any case
        (SEA, "Underwater creatures swim among waves and reefs.", 1.0),  # not a whole word
        (SEA, "ok", 1 / 6),  # clean only
        (SEA, "I like the sea.", 1 / 6),  # the topic word alone is not on topic
        (SEA, "I really like the sea a lot.", 1 / 3),
        (SEA, "waves waves waves waves waves", 0.1),  # repetition
        (SEA, "Waves " + " ".join(f"w{i}" for i in range(30)), 1 / 3),  # 31 words: too long
        (SEA, "", 0.0),
        (SALT, "The sea is salty and full of fish.", 1 / 3),  # "salty": an ending of 'salt'
        (SALT, "It covers most of the planet.", 1 / 3),  # clean and sized, off topic
        (SALT, "Cold water crashes on the shore.", 1.0),  # 'water' is only banned elsewhere
        (LIBRARY, "A library brings to mind books, shelves and quiet.", 1 / 3),
        (SUN, "The sun lights up the hotel pool at noon.", 1.0),
        (SUN, "The sun is hotter than anything on a summer day.", 1 / 3),
    ],
)
def test_avoid_word_by_hand(prompt, response, expected):
    assert nl.AvoidWord().score(prompt, response) == pytest.approx(expected)


def test_reading_helpers():
    assert nl.words("Ice-cream, 2 scoops!") == ["ice", "cream", "2", "scoops"]
    assert nl.word_count("- Dog\n- Sweet potato.") == 3
    assert nl.names(nl.words("I like sweet potatoes"), "sweet potato")
    assert not nl.names(nl.words("sweet and potato"), "sweet potato")
    assert nl.names(["mice"], "mouse") and nl.names(["cherries"], "cherry")
    assert nl.repetitive(nl.words("apple, apple and banana"))
    assert not nl.repetitive(nl.words("the sea and the sky and the sea breeze"))


def test_bad_prompts_raise():
    with pytest.raises(ValueError, match="word limit"):
        nl.Brief().score("Name a fruit.", "Apple")
    with pytest.raises(ValueError, match="category"):
        nl.Brief().score("Name a galaxy in 3 words.", "Mars")
    with pytest.raises(ValueError, match="question"):
        nl.Format().score("Reply in all capital letters: why?", "NO")
    with pytest.raises(ValueError, match="bans no known word"):
        nl.AvoidWord().score("Describe the sea without using the word 'fish'.", "Waves.")


# ----------------------------------------------------------------------------- word lists


def test_word_lists_are_consistent():
    cats = nw.CATEGORIES
    for items in cats.values():
        assert len(items) == len(set(items)) >= 7
    assert set(cats["bird"]) | set(cats["insect"]) <= set(cats["animal"])
    shared = {"orange", "lime", "kiwi", "turkey", "cricket", "violet", "heart", "gold"}
    shared |= {"silver", "mercury"}
    seen: dict[str, str] = {}
    for cat, items in cats.items():
        if cat in ("bird", "insect"):
            continue  # sub-lists of "animal"
        for item in items:
            assert item not in seen or item in shared, (item, cat, seen.get(item))
            seen[item] = cat
    assert set(nw.PLURALS) == set(cats)
    answers = [w for _, keys, _ in nw.QUESTIONS for w in keys.split("|")]
    assert len(answers) == len(set(answers))
    for topic, bans, related in nw.TOPICS:
        for banned in bans.split():
            assert not nl.AvoidWord.uses(topic, banned), topic
            assert any(nl.AvoidWord.uses(w, banned) for w in related.split()), (topic, banned)
            assert sum(not nl.AvoidWord.uses(w, banned) for w in related.split()) >= 5


def test_prompt_spaces_are_large():
    """Held-out evaluation takes 64 distinct prompts; hundreds must remain for training."""
    for task in TASKS:
        distinct = set(task.prompts(np.random.default_rng(0), 5000))
        assert len(distinct) > 1000, (type(task).__name__, len(distinct))


# ----------------------------------------------------------------------------- every task


@pytest.mark.parametrize("name", ["brief", "format", "avoid_word"])
def test_load_task_resolves_short_names(name):
    task = tasks.load_task(name, p_correct=0.25)
    assert isinstance(task, tasks.PreferenceTask) and task.p_correct == 0.25
    assert type(task).__name__ == nl.NL_TASKS[name].split(":")[1]


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_prompts_are_seeded_short_and_parse(task):
    a = task.prompts(np.random.default_rng(5), 200)
    assert a == task.prompts(np.random.default_rng(5), 200)
    assert a != task.prompts(np.random.default_rng(6), 200)
    assert len(set(a)) > 50
    for p in a:
        assert len(p.split()) <= 20
        task.parse(p)


def mistake_score(task, prompt: str, mistake: str) -> float:
    """What each class docstring says the teacher's mistake scores."""
    if isinstance(task, nl.Brief):
        limit = int(re.search(r"(\d+) words", prompt)[1])
        return 0.5 * limit / len(mistake.split())
    if isinstance(task, nl.AvoidWord):
        return 1 / 3
    if "\n" in mistake or mistake.startswith("1. "):
        return 0.25
    letters = [c for c in mistake if c.isalpha()]
    return 0.25 + 0.25 * sum(c.isupper() for c in letters) / len(letters)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_teacher_right_at_p_correct(task):
    rng = np.random.default_rng(2)
    prompts = task.prompts(rng, 2000)
    right = np.mean([task.score(p, task.demonstration(p, rng)) == 1.0 for p in prompts])
    assert right == pytest.approx(task.p_correct, abs=0.03)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_every_demonstration_scores_as_documented(task):
    rng = np.random.default_rng(4)
    perfect, wrong = type(task)(p_correct=1.0), type(task)(p_correct=0.0)
    for p in task.prompts(rng, 400):
        answer, mistake = perfect.demonstration(p, rng), wrong.demonstration(p, rng)
        assert task.score(p, answer) == 1.0, (p, answer)
        assert len(answer.split()) <= 15 and len(mistake.split()) <= 20
        got = task.score(p, mistake)
        assert got == pytest.approx(mistake_score(task, p, mistake)), (p, mistake)
        assert 0.0 < got < 0.5


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_empty_and_repeated_text_earn_little(task):
    rng = np.random.default_rng(7)
    for p in task.prompts(rng, 100):
        answer = type(task)(p_correct=1.0).demonstration(p, rng)
        assert task.score(p, "") == task.score(p, "  \n ") == 0.0
        assert task.score(p, " ".join([answer] * 3)) <= 0.1, (p, answer)


@pytest.mark.parametrize("task", TASKS, ids=IDS)
def test_pretraining_corpus(task):
    docs = task.pretraining_corpus(np.random.default_rng(3), 5)
    assert docs == task.pretraining_corpus(np.random.default_rng(3), 5)
    assert len(docs) == 5
    for doc in docs:
        assert "\n\n" not in doc  # documents are separated by blank lines
        assert sum(line.endswith((".", "?")) for line in doc.splitlines()) >= task.lines_per_doc
