"""`labeler.kind=human` in the pipeline: the rm_data stage writes the candidates and stops
until people have ranked every prompt (saying how many remain), then continues and the
reward stage trains on the human ranked.jsonl. Starts from a copy of the shared tiny run."""

from __future__ import annotations

import json
import pathlib
import shutil

from orchestrate import pipeline, pipeline_stages
from rlhf import label_store as ls
from rlhf.labeler import dense_ranks
from train.metrics import read_metrics

ROOT = pathlib.Path(__file__).resolve().parents[1]
TINY = f"{ROOT / 'configs' / 'pipeline.py'}:tiny"
HUMAN = "--config.labeler.kind=human"


def run(workdir: pathlib.Path, *extra: str) -> int:
    return pipeline.main(["--config", TINY, "--workdir", str(workdir), HUMAN, *extra])


def rank_like_a_person(store: ls.LabelStore, labeler: str, candidates) -> None:
    """A fixed taste (alphabetical order of the answers): any ranking with a preference."""
    for c in candidates:
        ranks = dense_ranks([-ord(r[0]) if r else -1000 for r in c.responses])
        if max(ranks) == 0:
            store.skip(labeler, c.id)
        else:
            store.rank(labeler, c.id, ranks)


def test_human_rm_data_waits_for_rankings_then_feeds_the_reward_model(
    tiny_pipeline, tmp_path, capfd
):
    workdir = tmp_path / "run"
    workdir.mkdir()
    for name in ("data", "tokenizer", "tfds", "pretrain", "sft"):
        shutil.copytree(tiny_pipeline / name, workdir / name)
    state = json.loads((tiny_pipeline / "pipeline.json").read_text())
    state["stages"] = {
        k: v for k, v in state["stages"].items() if k in ("data", "tokenizer", "pretrain", "sft")
    }
    (workdir / "pipeline.json").write_text(json.dumps(state))
    assert run(workdir, "--stages", "rm_data") == 3
    rm = workdir / "rm_data"
    store = ls.LabelStore(rm)
    n = len(store.candidates)
    assert 16 <= n <= 32  # tiny: 32 prompts, groups whose K samples are identical left out
    assert all(len(c.responses) == 4 for c in store.candidates)
    assert not (rm / "ranked.jsonl").exists() and (rm / "ranked_eval.jsonl").exists()
    err = capfd.readouterr().err
    assert f"{n} of {n} prompts still unranked" in err and f"flaxlm label --workdir {rm}" in err

    rank_like_a_person(store, "ann", store.candidates[:5])
    assert run(workdir, "--stages", "rm_data") == 3  # no resampling: the same candidates
    assert ls.LabelStore(rm).candidates == store.candidates
    assert f"{n - 5} of {n} prompts still unranked" in capfd.readouterr().err

    rank_like_a_person(store, "bob", store.candidates)  # a second labeler, all of them
    assert run(workdir, "--stages", "rm_data,reward") == 0
    summary = json.loads((rm / "summary.json").read_text())["ranked"]
    assert summary["human"]["remaining"] == 0 and summary["human"]["labelers"] == ["ann", "bob"]
    assert {r["between"] for r in summary["human"]["agreement"]} >= {"ann vs bob", "bob vs oracle"}
    ranked = [json.loads(x) for x in (rm / "ranked.jsonl").read_text().splitlines()]
    assert summary["groups"] == len(ranked) and {r["labeler"] for r in ranked} == {"ann", "bob"}
    # The reward stage read the human file (its config points there) and trained.
    config = pipeline.parse_args(["--config", TINY, "--workdir", str(workdir), HUMAN])[1]
    reward_config = pipeline_stages.stage_config(config, "reward", workdir)
    assert reward_config.data.path == str(rm / "ranked.jsonl")
    assert read_metrics(workdir / "reward")[-1]["step"] > 0
    state = json.loads((workdir / "pipeline.json").read_text())["stages"]
    assert state["rm_data"]["done"] and state["reward"]["done"]
