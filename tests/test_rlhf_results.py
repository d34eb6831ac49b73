"""benchmarks/rlhf_results.py's grid on hand-made summary.json files: intervals against
scipy's t quantile, target counts, missing runs, and the table written into a doc between
its markers (twice: the second write replaces the first)."""

import importlib.util
import json
import pathlib
import sys

import pytest
from scipy import stats

ROOT = pathlib.Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def rr():
    spec = importlib.util.spec_from_file_location(
        "rlhf_results", ROOT / "benchmarks/rlhf_results.py"
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def summary(sft: float, ppo: float, kl: float, rm: float) -> dict:
    return {
        "sft_oracle_sampled": sft,
        "sft_target_met": 1.0,
        "ppo_oracle_sampled": ppo,
        "ppo_kl_to_sft": kl,
        "ppo_gap_closed": (ppo - sft) / (1 - sft),
        "ppo_target_met": float((ppo - sft) / (1 - sft) >= 0.5),
        "reward_eval_pair_accuracy": rm,
        "reward_target_met": float(rm >= 0.85),
    }


def write_runs(workdir: pathlib.Path, task: str, summaries: list[dict]) -> None:
    for seed, s in enumerate(summaries):
        run = workdir / task / f"seed{seed}"
        run.mkdir(parents=True)
        (run / "summary.json").write_text(json.dumps(s))


def test_grid_rows_give_95_percent_t_intervals_and_target_counts(rr):
    summaries = [
        summary(0.6, 0.9, 1.0, 0.9),
        summary(0.6, 0.7, 2.0, 0.8) | {"ppo_shortfall": "weak_rm", "reward_shortfall": "reward"},
        summary(0.5, 0.8, 4.0, 0.86),
    ]
    rows = {r.split(" | ")[1]: r.split(" | ")[2:] for r in rr.grid_rows("upper", summaries)}
    assert list(rows) == ["sft", "ppo", "reward model (pairwise accuracy)"]
    ppo = [0.9, 0.7, 0.8]
    half = stats.t.ppf(0.975, 2) * stats.sem(ppo)  # 0.2484...
    assert rows["ppo"][0] == f"{0.8:.2f} ± {half:.2f}"
    assert rows["ppo"][3] == "2/3"  # gaps 0.75, 0.25, 0.6
    assert rows["reward model (pairwise accuracy)"][-2] == "2/3"
    assert rows["sft"][2] == "–"  # SFT closes no gap
    assert rows["ppo"][4] == "RM too weak 1 |" and rows["sft"][4] == "– |"
    assert rows["reward model (pairwise accuracy)"][-1] == "RM below 0.85 1 |"


def test_why_short_counts_each_reason_most_frequent_first(rr):
    runs = [{"grpo_shortfall": k} for k in ("gap", "kl", "gap", "variance")] + [{}]
    assert rr.why_short(runs, "grpo") == "gap closed < 50% 2, KL blow-up 1, no reward variance 1"
    assert rr.why_short(runs, "ppo") == "–"


def test_grid_from_run_directories_and_written_between_markers(rr, tmp_path, monkeypatch, capsys):
    write_runs(
        tmp_path / "runs", "upper", [summary(0.6, 0.9, 1.0, 0.9), summary(0.6, 0.7, 2.0, 0.8)]
    )
    write_runs(tmp_path / "runs", "letters", [summary(0.7, 0.72, 0.5, 0.6)])
    doc = tmp_path / "rlhf.md"
    doc.write_text("# Results\n\nhand-written text stays\n")
    argv = ["rlhf_results.py", "--tasks", "upper", "letters", "--seeds", "0", "1"]
    argv += ["--workdir", str(tmp_path / "runs"), "--table-only", "--write", str(doc)]
    monkeypatch.setattr(sys, "argv", argv)
    assert rr.main() == 0
    first = doc.read_text()
    assert first.startswith("# Results\n\nhand-written text stays\n")
    assert first.count(rr.GRID_BEGIN) == 1 and first.count(rr.GRID_END) == 1
    assert "Finished runs: upper 2/2, letters 1/2." in first
    assert "| letters | ppo | 0.72 (n=1) |" in first
    assert first.count("| why short (runs) |") == 1
    doc.write_text(first + "\nafter the grid\n")
    assert rr.main() == 0  # the second write replaces the block, keeps what is around it
    second = doc.read_text()
    assert second.count(rr.GRID_BEGIN) == 1 and second.endswith("\nafter the grid\n")
    assert second.replace("\nafter the grid\n", "") == first
    assert "The grid, seeds [0, 1]" in capsys.readouterr().out


def test_a_presets_grid_has_its_own_block_with_base_best_of_n_and_times(rr, tmp_path, monkeypatch):
    """`--preset smollm2` writes between its own markers (the demo's block stays), with
    the base model's and best-of-n's rows and each run's stage time from pipeline.json."""
    runs = [
        summary(0.1, 0.3, 1.0, 0.8) | {"base_oracle_sampled": 0.05, "base_kl_to_sft": 4.0},
        summary(0.2, 0.4, 1.5, 0.9) | {"base_oracle_sampled": 0.07, "base_kl_to_sft": 5.0},
    ]
    for s, best in zip(runs, (0.15, 0.25), strict=True):
        s |= {"best_of_n_oracle": best, "best_of_n_kl": 0.636}
    write_runs(tmp_path / "runs", "brief", runs)
    for seed, seconds in enumerate(([60, 120], [90, 90, 30])):
        state = {"stages": {f"s{i}": {"seconds": t} for i, t in enumerate(seconds)}}
        (tmp_path / "runs" / "brief" / f"seed{seed}" / "pipeline.json").write_text(
            json.dumps(state)
        )
    doc = tmp_path / "rlhf.md"
    demo_block = f"{rr.GRID_BEGIN}\n\nthe char grid\n\n{rr.GRID_END}"
    doc.write_text(f"# Results\n\n{demo_block}\n")
    argv = ["rlhf_results.py", "--tasks", "brief", "--seeds", "0", "1", "--preset", "smollm2"]
    argv += ["--workdir", str(tmp_path / "runs"), "--table-only", "--write", str(doc)]
    monkeypatch.setattr(sys, "argv", argv)
    assert rr.main() == 0
    text = doc.read_text()
    assert demo_block in text
    begin, end = rr.markers("smollm2")
    block = text.split(begin, 1)[1].split(end, 1)[0]
    rows = {r.split(" | ")[1]: r.split(" | ")[2:] for r in block.splitlines() if "| brief |" in r}
    assert list(rows)[:2] == ["base", "sft"]
    assert rr.best_of_n_kl([0.5, 0.7]) == rr.interval([0.5, 0.7])  # runs with different n
    half = stats.t.ppf(0.975, 1) * stats.sem([0.15, 0.25])
    assert (
        rows["best-of-n of SFT (RM picks)"][0] == f"{0.2:.2f} ± {half:.2f}"
    )  # 2 significant digits
    assert rows["best-of-n of SFT (RM picks)"][1] == "0.636 (analytic)"  # one n, one value
    assert "Stage time per run, minutes (pipeline.json): brief 3.0, 3.5." in block
