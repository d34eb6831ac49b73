"""What happens to a chat example longer than the context: the one policy of every stage.

An example is kept whole or it does not fit; nothing is ever cut out of it. Cutting
tokens would silently change what is learned: it can drop a role marker, the `<|end|>`
the model learns to stop at, or the last token of a ranked response, where the reward
model reads its score.

- Training records (SFT, reward, DPO) and RL prompt records (PPO, GRPO): the stage
  measures every record once when it starts (`pipelines.fitting_records`, linear in the
  records). Over-long ones follow `data.bad_records`, the key that already governs bad
  lines: "skip" leaves them out, counts them and prints one warning line; "fail" stops
  the run before anything is written, with one line naming the record (`file:line` when
  the records come from local files) and its length against the limit. When no record
  fits, the run stops either way.
- A record that reaches a tokenize function without that check (`tokenize_sft`,
  `tokenize_ranked`, `tokenize_prompt` called directly) raises `RecordTooLongError`.
- Interactive generation prompts (sampling, chat): `drop_oldest_turns` removes whole
  exchanges, oldest first, never the leading system turns nor the last user turn and what
  follows it; when even those do not fit it raises a ValueError naming the limit.

Lengths are positions in a row: an SFT conversation of L tokens takes L - 1 (inputs are
its first L - 1 tokens, targets its last L - 1), a ranked response row and a prompt take
all of theirs.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from train.data.records import BadRecordError, BadRecordLog

REASON = "too long"  # the count's key in BadRecordLog (reason up to the first colon)
Locate = Callable[[Sequence[int]], Mapping[int, str]]


class RecordTooLongError(BadRecordError):
    """A record longer than the row it must fit in, whole."""


def too_long(length: int, limit: int, what: str = "seq_len", where: str = "") -> RecordTooLongError:
    return RecordTooLongError(f"{REASON}: {length} tokens, longer than {what}={limit}", where)


def require_fit(length: int, limit: int, what: str = "seq_len") -> None:
    """Raise RecordTooLongError unless `length` <= `limit`."""
    if length > limit:
        raise too_long(length, limit, what)


@dataclasses.dataclass(frozen=True)
class Verdict:
    """What `check_lengths` decided: the records kept (indices in order), how many were
    left out, and the warning line to print (None when nothing was left out)."""

    kept: list[int]
    skipped: int
    warning: str | None


def check_lengths(
    lengths: Sequence[int],
    limit: int,
    policy: str = "skip",
    label: str = "data",
    locate: Locate | None = None,
    what: str = "seq_len",
) -> Verdict:
    """Apply the bad-record `policy` ("skip" or "fail") to records of `lengths` against
    `limit`. `label` names the source in messages; `locate(indices)` gives `file:line` of
    records where known (else they are named by index). Raises RecordTooLongError (policy
    "fail", naming the first over-long record) or ValueError (no record fits)."""
    log = BadRecordLog(policy)  # checks the policy name
    over = [i for i, n in enumerate(lengths) if n > limit]
    if not over:
        return Verdict(list(range(len(lengths))), 0, None)
    if len(over) == len(lengths):
        raise ValueError(
            f"{label}: all {len(lengths)} records are longer than {what}={limit} (shortest "
            f"{min(lengths)} tokens); raise {what} or shorten the records"
        )
    longest = max(over, key=lambda i: lengths[i])
    first = over[0] if policy == "fail" else longest
    places = dict(locate([first])) if locate is not None else {}
    where = places.get(first) or f"{label}: record {first}"
    if policy == "fail":
        more = f"{len(over) - 1} more records are too long; " if len(over) > 1 else ""
        error = too_long(lengths[first], limit, what, where)
        log.handle(
            RecordTooLongError(f"{error.reason} ({more}bad_records=skip leaves them out)", where)
        )
    warning = (
        f"{label}: skipped {len(over)} of {len(lengths)} records longer than {what}={limit} "
        f"(longest {lengths[longest]} tokens, {where}; bad_records=fail to stop instead)"
    )
    dropped = set(over)
    return Verdict([i for i in range(len(lengths)) if i not in dropped], len(over), warning)


class KeptRecords:
    """The records of `source` at `indices`, as a random-access sequence (picklable, so
    grain's worker processes can read it)."""

    def __init__(self, source: Sequence[Any], indices: Sequence[int]):
        self.source, self.indices = source, list(indices)

    def __len__(self) -> int:
        return len(self.indices)

    def __getitem__(self, i: int) -> Any:
        return self.source[self.indices[i]]


def _cuts(roles: Sequence[str]) -> tuple[int, list[int]]:
    """(head, cuts): head = the number of leading system turns; cuts = the user turns
    after the head, in order. Dropping [head, cut) removes whole turns: first any turns
    before the first user turn (a greeting), then whole exchanges (a user turn and its
    replies up to the next user turn). The last cut is the last user turn, so it and what
    follows are always kept."""
    head = 0
    while head < len(roles) and roles[head] == "system":
        head += 1
    return head, [i for i in range(head + 1, len(roles)) if roles[i] == "user"]


def drop_oldest_turns(
    messages: Sequence[Mapping[str, str]],
    length_of: Callable[[Sequence[Mapping[str, str]]], int],
    limit: int,
    what: str = "limit",
) -> list[Mapping[str, str]]:
    """`messages` with whole turns removed, oldest first, until `length_of` them is at
    most `limit`. The leading system turns and the last user turn (with any turns after
    it) are never removed; exchanges go whole (a user turn and the replies up to the next
    user turn), so the kept turns start with a user turn after the system turns. Raises
    ValueError, naming `what`=`limit`, when the kept turns alone do not fit. A
    conversation that fits comes back unchanged."""
    messages = list(messages)
    length = length_of(messages)
    if length <= limit:
        return messages
    head, cuts = _cuts([m.get("role", "") for m in messages])
    for cut in cuts:  # drop everything in [head, cut)
        kept = messages[:head] + messages[cut:]
        length = length_of(kept)
        if length <= limit:
            return kept
    raise ValueError(
        f"the prompt's last user turn (with the system turn, if any) is {length} tokens, "
        f"more than {what}={limit}; shorten it"
    )
