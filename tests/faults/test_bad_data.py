"""Bad data: empty files, a 10 MB single line, invalid UTF-8, JSONL with missing keys or
wrong types, rankings that are not permutations, K=1, prompts longer than the context.

Expectation: `data.bad_records=fail` stops with one line naming file and line (exit 2,
before any training, no traceback); `skip` trains on the good records and counts the bad
ones by reason in bad_records.json; nothing ever fails deep inside JAX."""

from __future__ import annotations

import json
import pathlib

import pytest

from tests.faults import harness
from tests.rl_chain import stage_args

GOOD_SFT = {"prompt": "1+2=", "response": "3"}
GOOD_RANKED = {"prompt": "1+2=", "responses": ["3", "4", "12"], "ranking": [0, 1, 2]}

# name -> (data kind, the bad line as bytes, the reason expected in the message)
BAD_LINES: dict[str, tuple[str, bytes, str]] = {
    "invalid UTF-8": ("sft", b'{"prompt": "1+2=", "response": "\xff\xfe"}', "invalid UTF-8"),
    "not JSON": ("sft", b'{"prompt": "1+2=", "response": ', "invalid JSON"),
    "missing key": ("sft", b'{"prompt": "1+2="}', "missing key"),
    "wrong type": ("sft", b'{"prompt": "1+2=", "response": 3}', "bad type"),
    "ranking not a permutation": (
        "ranked",
        b'{"prompt": "1+2=", "responses": ["3", "4", "5"], "ranking": [0, 2, 2]}',
        "bad ranking",
    ),
    "ranking of wrong length": (
        "ranked",
        b'{"prompt": "1+2=", "responses": ["3", "4", "5"], "ranking": [0, 1]}',
        "bad ranking",
    ),
    "K=1": ("ranked", b'{"prompt": "1+2=", "responses": ["3"], "ranking": [0]}', "K < 2"),
}


def write(path: pathlib.Path, good: dict, bad: bytes | None, n_good: int = 40) -> pathlib.Path:
    """n_good good lines with the bad one at line 7."""
    lines = [json.dumps(good).encode()] * n_good
    if bad is not None:
        lines.insert(6, bad)
    path.write_bytes(b"\n".join(lines) + b"\n")
    return path


def stage_for(kind: str) -> tuple[str, str]:
    return {"sft": ("sft", "sft.py"), "ranked": ("reward", "reward.py")}[kind]


def init_for(kind: str, chain: dict) -> str:
    return str(chain["pretrain"] if kind == "sft" else chain["sft"])


@pytest.mark.parametrize("name", list(BAD_LINES))
def test_fail_policy_stops_preparation_at_the_line(name, tmp_path):
    """The policy where it applies (data preparation), for every kind of bad line."""
    from train.data import builders

    kind, bad, reason = BAD_LINES[name]
    data = write(tmp_path / f"{kind}.jsonl", GOOD_SFT if kind == "sft" else GOOD_RANKED, bad)
    expect = "stops at the bad line: the error names file:line and the reason"
    with harness.case("data", f"{kind} data", name, "prepare, bad_records=fail", expect) as info:
        with pytest.raises(ValueError) as caught:
            builders.prepare(kind, str(data), str(tmp_path / "tfds"), bad_records="fail")
        info["detail"] = str(caught.value)[-160:]
        assert f"{data}:7" in str(caught.value) and reason in str(caught.value)


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD_LINES))
def test_fail_policy_names_file_and_line(name, chain, tmp_path, capsys):
    from train import reward, sft

    kind, bad, reason = BAD_LINES[name]
    command, config = stage_for(kind)
    good = GOOD_SFT if kind == "sft" else GOOD_RANKED
    data = write(tmp_path / f"{kind}.jsonl", good, bad)
    workdir = tmp_path / "run"
    argv = stage_args(
        config,
        workdir,
        tmp_path / "tfds",
        f"--config.init_from={init_for(kind, chain)}",
        f"--config.data.path={data}",
        "--config.data.bad_records=fail",
        "--config.eval.every_steps=0",
        *(
            [f"--config.calibration.prompts_path={chain['paths']['eval_prompts']}"]
            if kind == "ranked"
            else []
        ),
    )
    expect = "exit 2, one line naming file:line and the reason, workdir not created"
    with harness.case("data", command, name, "bad_records=fail", expect) as info:
        capsys.readouterr()  # drop what fixtures printed (e.g. building the chain)
        code = (sft.main if kind == "sft" else reward.main)(argv)
        err = capsys.readouterr().err.strip()
        info["detail"] = f"exit {code}: {err.splitlines()[-1][-160:] if err else ''}"
        assert code == 2
        assert f"{data}:7" in err and reason in err, err[-500:]
        assert "Traceback" not in err
        assert not workdir.exists()


@pytest.mark.parametrize("kind", ["sft", "ranked"])
def test_skip_policy_counts_every_reason(kind, tmp_path):
    """Every bad line of one kind in one file: prepared with the good ones, counted."""
    from train.data import builders

    good = GOOD_SFT if kind == "sft" else GOOD_RANKED
    bad = [line for k, line, _ in BAD_LINES.values() if k == kind]
    path = tmp_path / "mixed.jsonl"
    lines = [json.dumps(good).encode()] * 20 + bad
    path.write_bytes(b"\n".join(lines) + b"\n")
    command = stage_for(kind)[0]
    expect = "the good records prepared; each bad one counted by reason in bad_records.json"
    with harness.case(
        "data", command, f"{len(bad)} kinds of bad lines in one file", "bad_records=skip", expect
    ) as info:
        prepared = builders.prepare(kind, str(path), str(tmp_path / "tfds"), bad_records="skip")
        assert len(prepared.source("train")) == 20
        counts = prepared.bad_records.get("counts", prepared.bad_records)
        info["detail"] = f"20 prepared; bad_records: {json.dumps(counts)[:200]}"
        assert sum(v for v in counts.values() if isinstance(v, int)) == len(bad), counts


@pytest.mark.parametrize("kind", ["text", pytest.param("sft", marks=pytest.mark.slow)])
def test_empty_file_is_one_line(kind, request, tmp_path, capsys):
    from train import pretrain, sft

    data = tmp_path / ("empty.txt" if kind == "text" else "empty.jsonl")
    data.write_bytes(b"")
    workdir = tmp_path / "run"
    if kind == "text":
        command, main = "pretrain", pretrain.main
        links = (
            "--config.data.name=",
            "--config.eval.name=",
        )
        config = "pretrain.py"
    else:
        command, main = "sft", sft.main
        chain = request.getfixturevalue("chain")
        links = (f"--config.init_from={chain['pretrain']}", "--config.eval.every_steps=0")
        config = "sft.py"
    argv = stage_args(config, workdir, tmp_path / "tfds", *links, f"--config.data.path={data}")
    expect = "exit 2, one line naming the file, workdir not created"
    with harness.case("data", command, "empty file", "data.path", expect) as info:
        capsys.readouterr()
        code = main(argv)
        err = capsys.readouterr().err.strip()
        info["detail"] = f"exit {code}: {err.splitlines()[-1][-160:] if err else '(silent)'}"
        assert code == 2, err[-800:]
        assert str(data) in err or "empty" in err.lower() or "no records" in err.lower(), err
        # One error line (TFDS's progress bars above it are not errors).
        errors = [line for line in err.splitlines() if "error" in line.lower()]
        assert "Traceback" not in err and len(errors) == 1, err[-800:]
        assert not workdir.exists()


@pytest.mark.slow
@pytest.mark.parametrize(
    "which",
    ["pretrain", "sft"],
)
def test_huge_lines_and_overlong_prompts_train(which, chain, tmp_path):
    """A 10 MB single-line document (pretrain), and SFT records with a 10 MB response and a
    prompt longer than seq_len: trained through (the document packed across rows, the
    over-long chat records skipped and counted, never cut), never a crash inside JAX."""
    huge = "1+2=3 " * (10 * 2**20 // 6)
    text = tmp_path / "huge.txt"
    text.write_text(huge + "\n")
    sft_file = tmp_path / "sft.jsonl"
    rows = [GOOD_SFT] * 30
    rows.insert(3, {"prompt": "1+2=", "response": huge})
    rows.insert(9, {"prompt": "9+9=" * 200, "response": "18"})
    sft_file.write_text("".join(json.dumps(r) + "\n" for r in rows))
    runs = {
        ("pretrain", "10 MB single line"): stage_args(
            "pretrain.py",
            tmp_path / "pre",
            tmp_path / "tfds",
            "--config.data.name=",
            "--config.eval.name=",
            "--config.eval.every_steps=0",
            f"--config.data.tokenizer={chain['pretrain'] / 'tokenizer'}",
            f"--config.data.path={text}",
            "--config.total_steps=2",
        ),
        ("sft", "10 MB response + prompt longer than seq_len"): stage_args(
            "sft.py",
            tmp_path / "sft",
            tmp_path / "tfds",
            f"--config.init_from={chain['pretrain']}",
            f"--config.data.path={sft_file}",
            "--config.eval.every_steps=0",
            "--config.total_steps=2",
        ),
    }
    expect = (
        "trains (a long document packed across rows; over-long chat records skipped and "
        "counted, never cut) within 3 GiB and 5 min; no crash inside JAX"
    )
    for (command, fault), args in runs.items():
        if command != which:
            continue
        with harness.case("data", command, fault, "bad_records=skip", expect) as info:
            log = tmp_path / f"{command}.log"
            code, memory = harness.run_guarded(command, args, log, 3 * 2**30, 300)
            err = harness.tail(log, 4000)
            info["detail"] = f"exit {code}, {memory}: " + (
                err.strip().splitlines()[-1][-120:] if err.strip() else ""
            )
            assert code == 0, f"exit {code}, {memory}"
            assert "Traceback" not in err
            if command == "sft":
                assert "skipped 2 of 32 records longer than" in err, err[-1500:]


@pytest.mark.slow
def test_ppo_prompt_longer_than_seq_len(chain, tmp_path):
    prompts = tmp_path / "prompts.jsonl"
    rows = [{"prompt": "1+2="}] * 40
    rows.insert(5, {"prompt": "9+9=" * 100})
    prompts.write_text("".join(json.dumps(r) + "\n" for r in rows))
    args = stage_args(
        "ppo.py",
        tmp_path / "ppo",
        tmp_path / "tfds",
        f"--config.init_from={chain['sft']}",
        f"--config.reward_from={chain['reward']}",
        f"--config.data.path={prompts}",
        "--config.total_steps=2",
    )
    expect = "trains (the over-long prompt skipped and counted, never cut); no crash inside JAX"
    with harness.case(
        "data", "ppo", "prompt longer than seq_len", "bad_records=skip", expect, suite="slow"
    ) as info:
        result = harness.run_capture("ppo", args)
        info["detail"] = f"exit {result.returncode}"
        assert result.returncode == 0, result.stderr[-1500:]
        assert "Traceback" not in result.stderr
        assert "skipped 1 of 41 records longer than" in result.stderr, result.stderr[-1500:]
