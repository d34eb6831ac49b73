"""Human rankings on disk: the candidates to rank, the ranked JSONL, skips, undo, resume.

Files in the labeling directory (the pipeline's RUN/rm_data):
- `candidates.jsonl`: {"prompt", "responses"} per line, the K sampled responses to rank.
  A candidate's id is a hash of its prompt and responses, so ids survive restarts and a
  submission made against an older candidates file is recognised as stale. Identical
  lines are one candidate.
- `ranked.jsonl`: the ranked format the reward model reads ({"prompt", "responses",
  "ranking"}, ranking[k] the dense rank of responses[k], 0 best, equal = tie) plus
  "labeler" and "time" (UTC, ISO 8601), which the reader ignores. Several labelers may
  rank the same prompt; each of their records is a training example.
- `skipped.jsonl`: {"prompt", "labeler", "time"}: prompts a labeler chose not to rank.

Durability (decision). An answer is one `os.write` of a whole line to a file opened
with O_APPEND, then fsync, before the server replies; a kill can at worst cut the line
being written, which the next start truncates away (`repair_tail`), so every answered
ranking survives. Undo rewrites the file without the line into a temporary file, fsyncs
it and renames it over the original, so no state between is ever visible. A ranking in
which every response ties carries no preference pair (the reader would reject it): it
is refused, and the labeler is pointed to skip.

Resume: a labeler continues at the first candidate (file order) they have neither
ranked nor skipped. One lock (threads of one server) guards the files; `flaxlm label`
takes an exclusive file lock so that two servers never share a directory.
"""

from __future__ import annotations

import dataclasses
import datetime
import hashlib
import json
import os
import pathlib
import re
import threading
from collections.abc import Sequence
from typing import Any

CANDIDATES, RANKED, SKIPPED = "candidates.jsonl", "ranked.jsonl", "skipped.jsonl"
LABELER_RE = re.compile(r"^[A-Za-z0-9_.@-]{1,40}$")


class LabelError(ValueError):
    """A bad or stale submission: one line for the labeler (the server answers 4xx)."""

    def __init__(self, message: str, status: int = 400):
        super().__init__(message)
        self.status = status


@dataclasses.dataclass(frozen=True)
class Candidate:
    id: str
    prompt: str
    responses: tuple[str, ...]


def candidate_id(prompt: str, responses: Sequence[str]) -> str:
    blob = json.dumps([prompt, list(responses)], ensure_ascii=False).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def read_candidates(path: str | os.PathLike) -> list[Candidate]:
    """The candidates file, deduplicated; ValueError naming the file and line if bad."""
    out: dict[str, Candidate] = {}
    with open(path, encoding="utf-8") as f:
        for number, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
                prompt, responses = obj["prompt"], obj["responses"]
            except (json.JSONDecodeError, TypeError, KeyError) as err:
                raise ValueError(f"{path}:{number}: not a candidate ({err})") from None
            if not isinstance(prompt, str) or not isinstance(responses, list):
                raise ValueError(f"{path}:{number}: need a string prompt and a list of responses")
            if len(responses) < 2 or not all(isinstance(r, str) for r in responses):
                raise ValueError(f"{path}:{number}: need at least 2 string responses")
            c = Candidate(candidate_id(prompt, responses), prompt, tuple(responses))
            out.setdefault(c.id, c)
    if not out:
        raise ValueError(f"{path}: no candidates to rank")
    return list(out.values())


def check_labeler(labeler: Any) -> str:
    if not isinstance(labeler, str) or not LABELER_RE.match(labeler):
        raise LabelError(
            f"bad labeler id {str(labeler)[:50]!r}: use 1-40 letters, digits or _ . @ -"
        )
    return labeler


def check_ranking(ranking: Any, k: int) -> list[int]:
    """Dense ranks [K] (0 best, every rank 0..max used, ties equal), not all tied."""
    if (
        not isinstance(ranking, list)
        or len(ranking) != k
        or not all(isinstance(r, int) and not isinstance(r, bool) for r in ranking)
    ):
        raise LabelError(f"bad ranking {str(ranking)[:80]}: need {k} integer ranks")
    if sorted(set(ranking)) != list(range(max(ranking) + 1)):
        raise LabelError(f"bad ranking {ranking}: ranks must be 0..m with none missing")
    if max(ranking) == 0:
        raise LabelError("all responses tied: that is no preference; skip this prompt instead")
    return list(ranking)


def now_iso() -> str:
    return datetime.datetime.now(datetime.UTC).isoformat(timespec="milliseconds")


def repair_tail(path: pathlib.Path) -> bool:
    """Cut a last line left without its newline by a kill mid-write; True if cut."""
    if not path.is_file() or path.stat().st_size == 0:
        return False
    data = path.read_bytes()
    if data.endswith(b"\n"):
        return False
    with open(path, "r+b") as f:
        f.truncate(data.rfind(b"\n") + 1)
        os.fsync(f.fileno())
    return True


def append_line(path: pathlib.Path, record: dict) -> None:
    """One whole line in one write, fsynced (and the directory, when the file is new)."""
    new = not path.exists()
    line = (json.dumps(record, ensure_ascii=False) + "\n").encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
        os.fsync(fd)
    finally:
        os.close(fd)
    if new:
        fsync_dir(path.parent)


def fsync_dir(directory: pathlib.Path) -> None:
    fd = os.open(directory, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def rewrite_without(path: pathlib.Path, line_index: int) -> None:
    """Atomically drop line `line_index` (0-based, counting every line) from `path`."""
    lines = path.read_bytes().splitlines(keepends=True)
    del lines[line_index]
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "wb") as f:
        f.writelines(lines)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync_dir(path.parent)


@dataclasses.dataclass
class Answer:
    """One labeler's answer to one candidate: a ranking, or a skip (ranking None)."""

    id: str
    labeler: str
    time: str
    ranking: list[int] | None


class LabelStore:
    """The candidates and every labeler's answers, kept in memory and on disk."""

    def __init__(self, directory: str | os.PathLike):
        self.dir = pathlib.Path(directory)
        self.candidates = read_candidates(self.dir / CANDIDATES)
        self.by_id = {c.id: c for c in self.candidates}
        self.lock = threading.RLock()  # reads too: never see a line half-appended
        for name in (RANKED, SKIPPED):
            repair_tail(self.dir / name)

    # -- reading ---------------------------------------------------------------------

    def _lines(self, name: str) -> list[tuple[int, dict]]:
        """(line index, object) for the readable JSON lines of a file (others ignored)."""
        path, out = self.dir / name, []
        if not path.is_file():
            return out
        for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(keepends=True)):
            try:
                obj = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(obj, dict):
                out.append((i, obj))
        return out

    def answers(self, labeler: str | None = None) -> list[tuple[Answer, str, int]]:
        """(answer, file, line index) for known candidates, oldest first, optionally for one
        labeler. Ranked records are matched to candidates by content; a record of another
        origin (no matching candidate) is left alone and not counted."""
        out = []
        with self.lock:
            lines = {name: self._lines(name) for name in (RANKED, SKIPPED)}
        for name in (RANKED, SKIPPED):
            for index, obj in lines[name]:
                who = obj.get("labeler", "")
                if labeler is not None and who != labeler:
                    continue
                if name == RANKED:
                    cid = candidate_id(obj.get("prompt"), obj.get("responses") or [])
                    ranking = obj.get("ranking")
                else:
                    cid, ranking = obj.get("id"), None
                if cid in self.by_id:
                    out.append((Answer(cid, who, str(obj.get("time", "")), ranking), name, index))
        out.sort(key=lambda a: a[0].time)  # stable: file order within equal times
        return out

    def next_item(self, labeler: str) -> Candidate | None:
        done = {a.id for a, _, _ in self.answers(labeler)}
        return next((c for c in self.candidates if c.id not in done), None)

    def progress(self, labeler: str) -> dict[str, int]:
        mine = self.answers(labeler)
        everyone = {a.id for a, _, _ in self.answers()}
        return {
            "ranked": sum(a.ranking is not None for a, _, _ in mine),
            "skipped": sum(a.ranking is None for a, _, _ in mine),
            "total": len(self.candidates),
            "remaining_for_anyone": len(self.candidates) - len(everyone),
        }

    # -- writing ---------------------------------------------------------------------

    def _check_open(self, labeler: str, cid: Any) -> Candidate:
        check_labeler(labeler)
        if not isinstance(cid, str) or cid not in self.by_id:
            raise LabelError(
                "unknown prompt id: the candidates changed since this page loaded; reload", 409
            )
        if any(a.id == cid for a, _, _ in self.answers(labeler)):
            raise LabelError(
                f"{labeler} already answered this prompt (another tab?); reload for the next",
                409,
            )
        return self.by_id[cid]

    def rank(self, labeler: str, cid: Any, ranking: Any) -> dict:
        """Validate and store a ranking; returns the record written."""
        with self.lock:
            c = self._check_open(labeler, cid)
            ranks = check_ranking(ranking, len(c.responses))
            record = {"prompt": c.prompt, "responses": list(c.responses), "ranking": ranks}
            record |= {"labeler": labeler, "time": now_iso()}
            append_line(self.dir / RANKED, record)
            return record

    def skip(self, labeler: str, cid: Any) -> dict:
        with self.lock:
            c = self._check_open(labeler, cid)
            record = {"id": c.id, "prompt": c.prompt, "labeler": labeler, "time": now_iso()}
            append_line(self.dir / SKIPPED, record)
            return record

    def undo(self, labeler: str) -> Answer | None:
        """Remove the labeler's latest answer (None if there is none); it is returned so
        the page can show that prompt again with the ranking it had."""
        with self.lock:
            check_labeler(labeler)
            mine = self.answers(labeler)
            if not mine:
                return None
            answer, name, index = mine[-1]
            rewrite_without(self.dir / name, index)
            return answer


def summary(store: LabelStore) -> dict[str, Any]:
    """Counts for the pipeline: candidates, ranked by anyone, skipped only, unanswered."""
    ranked = {a.id for a, _, _ in store.answers() if a.ranking is not None}
    answered = {a.id for a, _, _ in store.answers()}
    labelers = sorted({a.labeler for a, _, _ in store.answers()})
    return {
        "candidates": len(store.candidates),
        "ranked": len(ranked),
        "skipped_only": len(answered - ranked),
        "remaining": len(store.candidates) - len(answered),
        "rankings": sum(a.ranking is not None for a, _, _ in store.answers()),
        "labelers": labelers,
    }
