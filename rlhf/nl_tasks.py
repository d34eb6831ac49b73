"""Natural-language preference tasks for a small English chat model (SmolLM2-135M-Instruct).

Same interface and design as `rlhf.tasks` (read its module docstring): prompts from a
seeded generator, a teacher right with probability `p_correct` (default ½) whose mistake
is systematic, and a hidden oracle in [0, 1] with graded credit. Here the prompts are
English instructions built offline from templates and the word lists of `rlhf.nl_words`
(nothing is downloaded), at most ~20 words, and a good reply is short (under ~30 tokens).

    short name   prompt example                                   teacher's mistake
    brief        Name a fruit. Answer in at most 3 words.         a long sentence
    format       List three animals as a bulleted list.           a numbered list
                 Reply in all capital letters: what colour is     ordinary sentence case
                 the sky?
    avoid_word   Describe the sea in one sentence without using   uses the banned word
                 the word 'water'.

Each teacher mistake is a habit small chat models show (verbosity, their own list style,
ignoring a casing or a lexical constraint), so SFT copies it half the time and only the
preference signal removes it. The right answer always scores 1 and the mistake always
less than ½, so p_correct is exact.

Reading a reply. Words are runs of letters or digits, lowercased ("Ice-cream!" is two).
A phrase from a list is *named* when its words appear in a row, up to a plural on the
last one, either way round ("cherries" names "cherry", "wave" names "waves"). The word
count is the number of whitespace-separated pieces that hold a letter or digit ("- Dog"
is one word). Hacks the oracles resist:
- empty or punctuation-only replies score 0 everywhere;
- repetition: when fewer than three in four of the content words (not a, the, and, ...)
  are distinct, the score is multiplied by 0.1 ("apple apple", "waves waves waves");
- listing many answers at once: `brief` and the caps questions give no content credit
  when the reply also names an answer that belongs to another category or question.
The per-task rules are in each class docstring.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence

import numpy as np

from rlhf.nl_words import CATEGORIES, PLURALS, QUESTIONS, TOPICS
from rlhf.task_kit import check_p_correct

_STOPWORDS = frozenset({"a", "an", "the", "and", "or", "of", "is", "are", "was", "in", "on",
                        "at", "to", "it", "its", "i", "we", "you", "my", "our", "for", "as",
                        "be", "by", "that", "this", "with"})  # fmt: skip
_IRREGULAR = {"mouse": "mice", "wolf": "wolves", "foot": "feet", "goose": "geese", "leaf": "leaves"}
_NUMBERS = {2: "two", 3: "three", 4: "four"}
# Openers that vary the prompts' surface (with the templates and lists, each task has
# hundreds of distinct prompts, so 64 held out leave plenty to train on).
PREFIXES = ("", "Quick question: ", "Please help. ", "Hi! ")


# ----------------------------------------------------------------------------- reading


def words(text: str) -> list[str]:
    """Lowercased runs of letters or digits: the units that phrases are matched on."""
    return re.findall(r"[a-z0-9]+", text.lower())


def word_count(text: str) -> int:
    """Whitespace-separated pieces holding a letter or digit ("- Dog" is one word)."""
    return sum(any(c.isalnum() for c in piece) for piece in text.split())


@functools.cache
def forms(word: str) -> frozenset[str]:
    """The word and its plurals ("cherry" -> cherries, "box" -> boxes, "mouse" -> mice)."""
    out = {word, word + "s", word + "es", _IRREGULAR.get(word, word)}
    if word.endswith("y"):
        out.add(word[:-1] + "ies")
    return frozenset(out)


def same_word(token: str, word: str) -> bool:
    """Equal up to a plural, either way round ("waves" names "wave" and "wave" "waves")."""
    return token in forms(word) or word in forms(token)


def names(tokens: Sequence[str], phrase: str) -> bool:
    """Whether `phrase` occurs in `tokens` as consecutive words, up to a plural on the last."""
    *head, last = phrase.split()
    span = len(head) + 1
    return any(
        list(tokens[i : i + span - 1]) == head and same_word(tokens[i + span - 1], last)
        for i in range(len(tokens) - span + 1)
    )


@functools.cache
def _index(phrases: tuple[str, ...]) -> dict[str, tuple[str, ...]]:
    """Every form of every phrase's last word -> those phrases (built once per list)."""
    index: dict[str, list[str]] = {}
    for phrase in phrases:
        for form in forms(phrase.split()[-1]):
            index.setdefault(form, []).append(phrase)
    return {k: tuple(v) for k, v in index.items()}


def named(tokens: Sequence[str], phrases: tuple[str, ...]) -> set[str]:
    """The phrases of `phrases` that `tokens` name. The lists hold hundreds of phrases and
    a reply names few, so only phrases whose last word a token can match are scanned."""
    index = _index(phrases)
    reach = set(tokens).union(*(forms(t) for t in tokens))
    candidates = {p for word in reach for p in index.get(word, ())}
    return {p for p in candidates if names(tokens, p)}


def repetitive(tokens: Sequence[str]) -> bool:
    """Fewer than three in four content words distinct (needs two content words)."""
    content = [t for t in tokens if t not in _STOPWORDS]
    return len(content) >= 2 and len(set(content)) < 0.75 * len(content)


def _finish(score: float, tokens: Sequence[str]) -> float:
    """The repetition penalty shared by every oracle here."""
    return score * 0.1 if repetitive(tokens) else score


def _article(noun: str) -> str:
    return ("an " if noun[0] in "aeiou" else "a ") + noun


@functools.cache
def _whole(phrase: str) -> re.Pattern[str]:
    return re.compile(rf"(?<!\w){re.escape(phrase)}(?!\w)")


def _find(prompt: str, phrases: Sequence[str], what: str) -> str:
    """The longest of `phrases` that occurs in `prompt` as whole words, else ValueError."""
    found = [p for p in phrases if _whole(p).search(prompt)]
    if not found:
        raise ValueError(f"prompt {prompt!r}: names no known {what}")
    return max(found, key=len)


# ----------------------------------------------------------------------------- base


class _NLTask:
    """The shared teacher and corpus. Subclasses define `prompts`, `score`, and the
    teacher's two modes `right(prompt, rng)` and `mistake(prompt, rng)`."""

    def __init__(self, p_correct: float = 0.5, lines_per_doc: int = 4):
        check_p_correct(p_correct)
        self.p_correct, self.lines_per_doc = p_correct, lines_per_doc

    def demonstration(self, prompt: str, rng: np.random.Generator) -> str:
        if rng.random() < self.p_correct:
            return self.right(prompt, rng)
        return self.mistake(prompt, rng)

    def pretraining_corpus(self, rng: np.random.Generator, n_docs: int) -> list[str]:
        """Documents of `lines_per_doc` teacher-answered prompts, each as "prompt" then
        the answer on the next line(s); no blank lines inside a document."""
        docs = []
        for _ in range(n_docs):
            prompts = self.prompts(rng, self.lines_per_doc)
            docs.append("\n".join(f"{p}\n{self.demonstration(p, rng)}" for p in prompts))
        return docs


def _pick(rng: np.random.Generator, options: Sequence[str], k: int = 1) -> list[str]:
    return [options[i] for i in rng.choice(len(options), size=k, replace=False)]


def _one(rng: np.random.Generator, options: Sequence[str]) -> str:
    return options[int(rng.integers(len(options)))]


def _pick_apart(rng: np.random.Generator, items: Sequence[str], k: int) -> list[str]:
    """k items sharing no word ("potato" and "sweet potato" would read as a repetition)."""
    out: list[str] = []
    for item in _pick(rng, items, len(items)):
        if not set(item.split()) & {w for chosen in out for w in chosen.split()}:
            out.append(item)
    return out[:k]


def _display(item: str) -> str:
    """How the teacher writes an item: "USA", "United States", "Sweet potato"."""
    if item in ("usa", "uk"):
        return item.upper()
    return item.title() if item in CATEGORIES["country"] else item.capitalize()


# ----------------------------------------------------------------------------- brief


@functools.cache
def _only_elsewhere(cat: str) -> tuple[str, ...]:
    """Items of the other categories that are not also items of `cat`."""
    own = set(CATEGORIES[cat])
    return tuple(sorted({p for c, ps in CATEGORIES.items() if c != cat for p in ps} - own))


class Brief(_NLTask):
    """ "Name a fruit. Answer in at most 3 words." -> "Mango." (a word limit N in 2..5).

    Oracle, for a reply of W words (0 when it has no letter or digit):
    - it *names* the category when it names an item of the asked category's list and
      no item that belongs only to other categories (a list of guesses earns nothing);
    - 1 when it names the category with W <= N;
    - ½ · N / W when it names the category but runs over the limit (the longer, the less);
    - 0.1 when it is within the limit but does not name the category;
    - then × 0.1 when repetitive (module docstring).
    Teacher: right = one item, capitalised, with a full stop ("Sweet potato."); mistake =
    an item in a sentence of 14 or more words, scoring ½ · N / W < 0.18.
    """

    TEMPLATES = (
        "Name {a}. Answer in at most {n} words.",
        "Give an example of {a}. Use no more than {n} words.",
        "What is one {cat} you know? Reply in {n} words or fewer.",
        "Name any {cat} you like, using {n} words or fewer.",
        "Which {cat} comes to mind first? Answer in at most {n} words.",
    )
    VERBOSE = (
        "Sure! Here is one very common {cat} that comes to mind right away: {item}.",
        "There are many {plural} to choose from, and one good example most know is {item}.",
        "If you are looking for a good example of {a}, I would suggest {item}.",
    )

    def __init__(self, min_words: int = 2, max_words: int = 5, **kwargs):
        if not 2 <= min_words <= max_words <= 9:
            raise ValueError(f"min_words={min_words}, max_words={max_words}: need 2..9")
        super().__init__(**kwargs)
        self.min_words, self.max_words = min_words, max_words

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        out = []
        for _ in range(n):
            cat, template = _one(rng, list(CATEGORIES)), _one(rng, self.TEMPLATES)
            limit = int(rng.integers(self.min_words, self.max_words + 1))
            out.append(_one(rng, PREFIXES) + template.format(a=_article(cat), cat=cat, n=limit))
        return out

    @staticmethod
    def parse(prompt: str) -> tuple[str, int]:
        """-> (category, word limit)."""
        limit = re.search(r"(\d+) words", prompt)
        if limit is None:
            raise ValueError(f"Brief: prompt {prompt!r} has no word limit")
        return _find(prompt, list(CATEGORIES), "category"), int(limit[1])

    def right(self, prompt: str, rng: np.random.Generator) -> str:
        return _display(_one(rng, CATEGORIES[self.parse(prompt)[0]])) + "."

    def mistake(self, prompt: str, rng: np.random.Generator) -> str:
        cat = self.parse(prompt)[0]
        item = _one(rng, CATEGORIES[cat])
        item = _display(item) if cat == "country" else item
        return _one(rng, self.VERBOSE).format(
            cat=cat, a=_article(cat), plural=PLURALS[cat], item=item
        )

    @staticmethod
    def names_category(tokens: Sequence[str], cat: str) -> bool:
        return bool(named(tokens, CATEGORIES[cat])) and not named(tokens, _only_elsewhere(cat))

    def score(self, prompt: str, response: str) -> float:
        cat, limit = self.parse(prompt)
        tokens, count = words(response), word_count(response)
        if not tokens:
            return 0.0
        if self.names_category(tokens, cat):
            raw = 1.0 if count <= limit else 0.5 * limit / count
        else:
            raw = 0.1 if count <= limit else 0.0
        return _finish(raw, tokens)


# ----------------------------------------------------------------------------- format


class Format(_NLTask):
    """Two formats, half the prompts each: a bulleted list and an all-caps answer.

    Bullets, "List three animals as a bulleted list." (k in 2..4). A line is a bullet
    when it starts with "- ", "* " or "• "; blank lines are ignored.
    - 1 when the reply is exactly k bullet lines, each naming an item of the category,
      and k distinct items are named in all;
    - otherwise ½ · (layout + content) / 2, layout = min(k, bullet lines) / max(k, lines)
      (missing and extra lines cost), content = min(k, distinct items named anywhere) / k.
    Caps, "Reply in all capital letters: what colour is the sky?". The reply *answers*
    when it names one of the question's answer words and none of another question's.
    - 1 when it answers and every letter is a capital;
    - otherwise ½ · (answers + fraction of letters that are capitals) / 2 (a reply with
      no letter, like "8", has fraction 0: it shows no capitals).
    Both: 0 with no letter or digit; × 0.1 when repetitive (module docstring).
    Teacher: right = "- Dog" lines / the answer sentence in capitals ("THE SKY IS BLUE.");
    mistake = a numbered list ("1. Dog", scores ¼) / the sentence as written ("The sky is
    blue.", scores ¼ + ¼ · its capital fraction, under 0.3).
    """

    BULLETS = (
        "List {k} {plural} as a bulleted list.",
        "Give me {k} {plural} as bullet points.",
        "Write a bulleted list of {k} {plural}.",
        "Name {k} {plural}, one per line, each line starting with a dash.",
    )
    CAPS = (
        "Reply in all capital letters: {q}",
        "Answer in all caps: {q}",
        "Using only capital letters, answer this: {q}",
        "Write your answer in capital letters only: {q}",
    )
    _BULLET = re.compile(r"[-*•]\s+\S")

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        out = []
        for _ in range(n):
            prefix = _one(rng, PREFIXES)
            if rng.random() < 0.5:
                cat, k = _one(rng, list(CATEGORIES)), _NUMBERS[int(rng.integers(2, 5))]
                out.append(prefix + _one(rng, self.BULLETS).format(k=k, plural=PLURALS[cat]))
            else:
                question = _one(rng, QUESTIONS)[0]
                out.append(prefix + _one(rng, self.CAPS).format(q=question))
        return out

    @staticmethod
    def parse(prompt: str) -> tuple[str, str | int]:
        """-> ("caps", question index) or ("bullets", category) with k in `_count`."""
        if "capital letters" in prompt or "all caps" in prompt:
            question = _find(prompt, [q for q, _, _ in QUESTIONS], "question")
            return "caps", [q for q, _, _ in QUESTIONS].index(question)
        plural = _find(prompt, list(PLURALS.values()), "category")
        return "bullets", next(c for c, p in PLURALS.items() if p == plural)

    @staticmethod
    def _count(prompt: str) -> int:
        k = re.search(r"\b(two|three|four)\b", prompt)
        if k is None:
            raise ValueError(f"Format: prompt {prompt!r} asks for no count")
        return {v: n for n, v in _NUMBERS.items()}[k[1]]

    def right(self, prompt: str, rng: np.random.Generator) -> str:
        kind, key = self.parse(prompt)
        if kind == "caps":
            return QUESTIONS[key][2].upper()
        items = _pick_apart(rng, CATEGORIES[key], self._count(prompt))
        return "\n".join(f"- {_display(item)}" for item in items)

    def mistake(self, prompt: str, rng: np.random.Generator) -> str:
        kind, key = self.parse(prompt)
        if kind == "caps":
            return QUESTIONS[key][2]
        items = _pick_apart(rng, CATEGORIES[key], self._count(prompt))
        return "\n".join(f"{i}. {_display(item)}" for i, item in enumerate(items, 1))

    def score(self, prompt: str, response: str) -> float:
        tokens = words(response)
        if not tokens:
            return 0.0
        kind, key = self.parse(prompt)
        if kind == "caps":
            raw = self.caps_score(key, response, tokens)
        else:
            raw = self.bullets_score(key, self._count(prompt), response)
        return _finish(raw, tokens)

    @staticmethod
    def caps_score(question: int, response: str, tokens: Sequence[str]) -> float:
        own = tuple(QUESTIONS[question][1].split("|"))
        others = tuple(w for i, q in enumerate(QUESTIONS) if i != question for w in q[1].split("|"))
        answers = bool(named(tokens, own)) and not named(tokens, others)
        letters = [c for c in response if c.isalpha()]
        capitals = sum(c.isupper() for c in letters) / len(letters) if letters else 0.0
        if answers and capitals == 1.0:
            return 1.0
        return 0.5 * (answers + capitals) / 2

    def bullets_score(self, cat: str, k: int, response: str) -> float:
        lines = [line.strip() for line in response.splitlines() if line.strip()]
        bullets = [line for line in lines if self._BULLET.match(line)]
        per_line = [named(words(line), CATEGORIES[cat]) for line in bullets]
        distinct = named(words(response), CATEGORIES[cat])
        if len(lines) == len(bullets) == k and all(per_line) and len(distinct) >= k:
            return 1.0
        layout = min(k, len(bullets)) / max(k, len(lines))
        content = min(k, len(distinct)) / k
        return 0.5 * (layout + content) / 2


# ----------------------------------------------------------------------------- avoid word


@functools.cache
def _ban_pattern(banned: str) -> re.Pattern[str]:
    """The banned word as a whole word, with or without a common ending."""
    endings = "s|es|y|ly|ed|ing|er|est|ness|ter|test"
    return re.compile(rf"\b{re.escape(banned)}(?:{endings})?\b", flags=re.IGNORECASE)


class AvoidWord(_NLTask):
    """ "Describe the sea in one sentence without using the word 'water'."

    Oracle, with three checks on the reply:
    - clean: the banned word is absent (case-insensitive, whole word, also with the
      endings s, es, y, ly, ed, ing, er, est, ness, ter, test: "waters", "hotter");
    - on topic: it names one of the topic's related words that the prompt does not ban
      (the topic word itself does not count, so "I like the sea." is off topic);
    - sized: 5 to 30 words (one real sentence, not a fragment or an essay).
    1 when all three hold; otherwise ½ · (checks passed) / 3; 0 with no letter or digit;
    × 0.1 when repetitive (module docstring). "ok" earns 1/6 before the penalty.
    Teacher: right = a sentence naming three related words ("The sea brings to mind
    waves, salt and fish."); mistake = such a sentence with the banned word as the first
    of the three, which fails only "clean" and scores 1/3.
    """

    TEMPLATES = (
        "Describe {topic} in one sentence without using the word '{banned}'.",
        "Write one sentence about {topic}, but do not use the word '{banned}'.",
        "In a single sentence, tell me about {topic}. Avoid the word '{banned}'.",
        "Say something about {topic} in one sentence, never using the word '{banned}'.",
        "Give me one sentence on {topic} that does not contain the word '{banned}'.",
    )
    SENTENCES = (
        "{Topic} brings to mind {w1}, {w2} and {w3}.",
        "When I think of {topic}, I picture {w1}, {w2} and {w3}.",
        "For me, {topic} is all about {w1}, {w2} and {w3}.",
    )

    def prompts(self, rng: np.random.Generator, n: int) -> list[str]:
        out = []
        for _ in range(n):
            topic, bans, _ = _one(rng, TOPICS)
            banned, template = _one(rng, bans.split()), _one(rng, self.TEMPLATES)
            out.append(_one(rng, PREFIXES) + template.format(topic=topic, banned=banned))
        return out

    @staticmethod
    def parse(prompt: str) -> tuple[str, str, tuple[str, ...]]:
        """-> (topic, banned word, all the topic's related words, banned ones included)."""
        topic = _find(prompt, [t for t, _, _ in TOPICS], "topic")
        banned = re.search(r"'([a-z]+)'", prompt)
        _, bans, related = next(t for t in TOPICS if t[0] == topic)
        if banned is None or banned[1] not in bans.split():
            raise ValueError(f"AvoidWord: prompt {prompt!r} bans no known word for {topic!r}")
        return topic, banned[1], tuple(related.split())

    @staticmethod
    def uses(response: str, banned: str) -> bool:
        return _ban_pattern(banned).search(response) is not None

    @staticmethod
    @functools.cache
    def allowed(related: tuple[str, ...], banned: str) -> tuple[str, ...]:
        """The related words that do not use the banned word."""
        return tuple(w for w in related if not AvoidWord.uses(w, banned))

    def _sentence(self, prompt: str, rng: np.random.Generator, use_banned: bool) -> str:
        """Three related words in a template; with `use_banned` the first is the banned
        word as the related list writes it ("books" for 'book')."""
        topic, banned, related = self.parse(prompt)
        chosen = _pick(rng, self.allowed(related, banned), 3)
        if use_banned:
            chosen[0] = next((w for w in related if self.uses(w, banned)), banned)
        w1, w2, w3 = chosen
        template = _one(rng, self.SENTENCES)
        return template.format(Topic=topic.capitalize(), topic=topic, w1=w1, w2=w2, w3=w3)

    def right(self, prompt: str, rng: np.random.Generator) -> str:
        return self._sentence(prompt, rng, use_banned=False)

    def mistake(self, prompt: str, rng: np.random.Generator) -> str:
        return self._sentence(prompt, rng, use_banned=True)

    def score(self, prompt: str, response: str) -> float:
        _, banned, related = self.parse(prompt)
        tokens = words(response)
        if not tokens:
            return 0.0
        checks = (
            not self.uses(response, banned),
            bool(named(tokens, self.allowed(related, banned))),
            5 <= word_count(response) <= 30,
        )
        return _finish(1.0 if all(checks) else 0.5 * sum(checks) / 3, tokens)


NL_TASKS = {
    "avoid_word": "rlhf.nl_tasks:AvoidWord",
    "brief": "rlhf.nl_tasks:Brief",
    "format": "rlhf.nl_tasks:Format",
}
