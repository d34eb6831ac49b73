"""`flaxlm sweep` and `flaxlm report`: plans, pairing, resume, failures, statistics."""

import json
import math
import os
import pathlib
import re
import signal
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from orchestrate import report, sweep

ROOT = pathlib.Path(__file__).resolve().parents[1]
stats = pytest.importorskip("scipy.stats")  # in the [test] extra: the independent reference


# ---------------------------------------------------------------- statistics vs scipy


@pytest.mark.parametrize("df", [1, 2, 3, 4, 5, 7, 10, 19, 30, 60, 200])
@pytest.mark.parametrize("p", [0.6, 0.9, 0.95, 0.975, 0.995, 0.9995, 0.025])
def test_t_quantile_matches_scipy(df, p):
    assert report.t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9)


@pytest.mark.parametrize("n", [2, 3, 5, 12])
def test_mean_ci_matches_scipy(n):
    values = np.random.default_rng(n).normal(3.0, 0.7, size=n)
    mean, half, count = report.mean_ci(list(values))
    low, high = stats.t.interval(0.95, n - 1, loc=values.mean(), scale=stats.sem(values))
    assert count == n
    assert mean == pytest.approx(values.mean(), rel=1e-12)
    assert half == pytest.approx((high - low) / 2, rel=1e-9)


def test_paired_diff_uses_the_seeds_both_arms_have():
    base = {0: 1.0, 1: 2.0, 2: 3.0}
    arm = {0: 1.5, 1: 2.1, 3: 9.0}  # seed 2 missing here, seed 3 missing in the baseline
    mean, half, n = report.paired_diff(arm, base)
    diffs = np.array([0.5, 0.1])
    assert n == 2 and mean == pytest.approx(diffs.mean())
    assert half == pytest.approx(stats.t.ppf(0.975, 1) * stats.sem(diffs))
    assert math.isnan(report.mean_ci([4.0])[1])  # one seed: no interval


# ---------------------------------------------------------------- plans and shards


def test_factors_expand_to_arms_times_seeds_seed_major():
    spec = {
        "command": "pretrain",
        "config": "configs/pretrain.py:tiny",
        "overrides": {"total_steps": 5},
        "factors": {
            "act": {"swiglu": {"model.activation": "swiglu"}, "gelu": {"model.activation": "gelu"}},
            "lr": {"hi": {"optim.lr": 3e-3}, "lo": {"optim.lr": 1e-3}},
        },
        "seeds": [0, 1, 2],
    }
    plan = sweep.make_plan(spec, ["log.every_steps=1"])
    assert list(plan.arms) == ["swiglu+hi", "swiglu+lo", "gelu+hi", "gelu+lo"]
    assert len(plan.runs) == 12 and plan.baseline == "swiglu+hi"
    assert [r.seed for r in plan.runs[:4]] == [0, 0, 0, 0]  # every arm of seed 0 first
    run = plan.runs[5]
    assert run.overrides == {
        "total_steps": 5,
        "log.every_steps": "1",
        "model.activation": "swiglu",
        "optim.lr": 1e-3,
        "seed": 1,
    }
    args = sweep.run_args(plan, run, pathlib.Path("/w"))
    assert args[:5] == [
        "pretrain",
        "--config",
        "configs/pretrain.py:tiny",
        "--workdir",
        "/w/runs/swiglu+lo/seed1",
    ]
    assert "--config.seed=1" in args and "--config.optim.lr=0.001" in args


def test_explicit_runs_and_bad_specs():
    spec = {"command": "pretrain", "config": "c.py", "arms": {"a": {}, "b": {}}, "seeds": [0, 1]}
    plan = sweep.make_plan({**spec, "runs": [["a", 0], ["b", 1]], "baseline": "b"})
    assert [r.name for r in plan.runs] == ["a/seed0", "b/seed1"] and plan.baseline == "b"
    bad = [
        ({**spec, "arms": {"a": {"seed": 3}}}, "sets \\['seed'\\]"),
        ({**spec, "baseline": "zzz"}, "baseline 'zzz'"),
        ({**spec, "lr": 1}, "unknown ablation key"),
        ({**spec, "factors": {}}, "exactly one of"),
        ({**spec, "seeds": [1, 1]}, "distinct seeds"),
        ({**spec, "runs": [["c", 0]]}, "unknown arm 'c'"),
    ]
    for bad_spec, message in bad:
        with pytest.raises(sweep.SweepError, match=message):
            sweep.make_plan(bad_spec)
    with pytest.raises(sweep.SweepError, match="arm 'a' sets"):
        sweep.make_plan({**spec, "arms": {"a": {"optim.lr": 1}}}, ["optim.lr=2"])
    with pytest.raises(sweep.SweepError, match="use --seeds"):
        sweep.make_plan(spec, ["seed=3"])
    assert sweep.unpaired_arms({"a": {"optim.lr": 1}, "b": {"data.packing": "x"}}) == ["b"]


def test_shards_partition_the_runs():
    runs = [sweep.Run("a", s, {}) for s in range(7)]
    shards = [sweep.shard_runs(runs, i, 3) for i in range(3)]
    assert sorted(r.seed for s in shards for r in s) == list(range(7))
    assert sweep.parse_shard("2/3") == (2, 3)
    for text in ("3/3", "x", "1/0"):
        with pytest.raises(sweep.SweepError):
            sweep.parse_shard(text)


def test_dry_run_shards_and_seed_override(tmp_path, capsys):
    spec = {"command": "pretrain", "config": "configs/pretrain.py:tiny", "arms": {"a": {}, "b": {}}}
    file = write_ablation(tmp_path / "ab.py", {**spec, "seeds": [0, 1]})
    argv = ["--config", str(file), "--workdir", str(tmp_path / "sw"), "--dry-run"]
    assert sweep.main([*argv, "--shard", "1/2"]) == 0
    assert [line.split(":")[0] for line in capsys.readouterr().out.splitlines()] == [
        "b/seed0",
        "b/seed1",
    ]
    assert sweep.main([*argv, "--seeds", "5,6,7", "--config.total_steps=3"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 6 and "--config.total_steps=3 --config.seed=7" in lines[-1]
    assert not (tmp_path / "sw").exists()  # a dry run writes nothing
    assert sweep.main([*argv, "--shard", "2/2"]) == 2
    assert "need 0 <= I < N" in capsys.readouterr().err


# ---------------------------------------------------------------- execute with a fake runner


def fake_runner(calls, fail_arm=None):
    """Writes a synthetic metrics.jsonl whose numbers depend on arm and seed."""

    def run(args, directory):
        calls.append(directory)
        arm, seed = directory.parent.name, int(directory.name.removeprefix("seed"))
        if arm == fail_arm:
            return 3
        directory.mkdir(parents=True, exist_ok=True)
        offset = {"base": 0.0, "better": -0.2, "other": 0.1}[arm] + 0.05 * seed
        lines = []
        for step in (1, 2, 3, 4):
            loss = 3.0 - 0.3 * step + offset + 0.01 * ((seed * 7 + step) % 3)
            lines.append(
                {"step": step, "loss": loss, "tokens_per_sec": 0.0 if step == 1 else 1000 + seed}
            )
            if step % 2 == 0:
                lines.append({"step": step, "eval_loss": loss + 0.1 - 0.02 * (step == 2)})
        (directory / "metrics.jsonl").write_text("".join(json.dumps(x) + "\n" for x in lines))
        return 0

    return run


def synthetic_sweep(tmp_path, fail_arm=None, calls=None):
    spec = {
        "command": "pretrain",
        "config": "configs/pretrain.py:tiny",
        "arms": {"base": {}, "better": {"optim.lr": 1e-3}, "other": {"optim.lr": 1e-2}},
        "seeds": [0, 1, 2],
        "metrics": ["final_eval_loss", "best_eval_loss", "tokens_per_sec", "wall_s"],
    }
    plan = sweep.make_plan(spec)
    sweep.write_json_atomic(tmp_path / sweep.PLAN_FILE, sweep.plan_record(plan))
    calls = [] if calls is None else calls
    failed = sweep.execute(
        plan, tmp_path, plan.runs, fake_runner(calls, fail_arm), echo=lambda s: None
    )
    return plan, failed, calls


def test_failures_are_recorded_and_resume_skips_finished_runs(tmp_path):
    plan, failed, calls = synthetic_sweep(tmp_path, fail_arm="other")
    assert failed == ["other/seed0", "other/seed1", "other/seed2"] and len(calls) == 9
    record = json.loads((tmp_path / "runs/other/seed0" / sweep.RUN_FILE).read_text())
    assert record["status"] == "failed" and record["returncode"] == 3
    calls.clear()
    failed = sweep.execute(plan, tmp_path, plan.runs, fake_runner(calls), echo=lambda s: None)
    assert not failed
    assert sorted(d.name for d in calls) == ["seed0", "seed1", "seed2"]  # only the failed arm
    assert {d.parent.name for d in calls} == {"other"}
    record = json.loads((tmp_path / "runs/other/seed0" / sweep.RUN_FILE).read_text())
    assert record["status"] == "finished" and record["attempts"] == 2
    changed = sweep.make_plan({**plan.spec, "overrides": {"total_steps": 9}})
    calls.clear()
    with pytest.raises(sweep.SweepError, match="finished with other settings"):
        sweep.execute(changed, tmp_path, changed.runs, fake_runner(calls), echo=lambda s: None)
    assert not calls  # refused before anything ran


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_stops_the_sweep_after_the_current_run_and_resume_continues(tmp_path, signum):
    """The signal reaches the run (it checkpoints, exits 128 + signal) and the sweep: the
    run is recorded as interrupted, not failed, and nothing else starts; a rerun resumes it."""
    plan, _, _ = synthetic_sweep(tmp_path / "straight")
    calls, inner = [], fake_runner([])

    def preempted_second_run(args, directory):
        calls.append(directory)
        if len(calls) == 2:
            os.kill(os.getpid(), signum)  # as a preemption sends to the whole process group
            return 128 + signum
        return inner(args, directory)

    workdir, handler = tmp_path / "run", signal.getsignal(signum)
    with pytest.raises(sweep.SweepInterrupted) as stop:
        sweep.execute(plan, workdir, plan.runs, preempted_second_run, echo=lambda s: None)
    assert stop.value.code == 128 + signum and stop.value.run == plan.runs[1].name
    assert len(calls) == 2
    record = json.loads((calls[1] / sweep.RUN_FILE).read_text())
    assert record["status"] == "interrupted" and record["returncode"] == 128 + signum
    assert signal.getsignal(signum) == handler  # restored after the sweep
    calls.clear()
    failed = sweep.execute(plan, workdir, plan.runs, fake_runner(calls), echo=lambda s: None)
    assert not failed and len(calls) == len(plan.runs) - 1  # the first run is not repeated
    record = json.loads((calls[0] / sweep.RUN_FILE).read_text())
    assert record["status"] == "finished" and record["attempts"] == 2


def parse_table(text: str, which: int) -> dict[str, list[str]]:
    """Rows (by arm) of the report's first (0: per arm) or second (1: differences) table."""
    lines = text.splitlines()
    start = [i for i, line in enumerate(lines) if line.startswith("| arm |")][which]
    rows = {}
    for line in lines[start + 2 :]:
        if not line.startswith("|"):
            break
        cells = [c.strip() for c in line.strip("|").split("|")]
        rows[cells[0].removesuffix(" (baseline)")] = cells[1:]
    return rows


def parse_cell(text: str) -> tuple[float, float, float]:
    """`mean ± half` -> (mean, half, tolerance of the printed rounding)."""
    match = re.fullmatch(r"\+?(-?[\d,]+(?:\.(\d+))?) ± ([\d,]+(?:\.\d+)?)(?: \*)?", text)
    assert match, text
    decimals = len(match.group(2) or "")
    mean, half = (float(match.group(i).replace(",", "")) for i in (1, 3))
    return mean, half, 0.5 * 10.0**-decimals * 1.0001


def check_report_against_metrics(sweep_dir: pathlib.Path, metrics: list[str], baseline: str):
    """Recompute every table cell from the runs' metrics.jsonl with numpy/scipy."""
    text = (sweep_dir / "report.md").read_text()
    plan = json.loads((sweep_dir / sweep.PLAN_FILE).read_text())
    table = parse_table(text, 0)
    diffs = parse_table(text, 1)
    defs = [report.resolve_metric(m) for m in metrics]
    per_arm = {}
    for arm in plan["arms"]:
        per_arm[arm] = {}
        for col, metric in enumerate(defs):
            values = []
            for seed in plan["seeds"]:
                directory = sweep_dir / "runs" / arm / f"seed{seed}"
                if metric.file == sweep.RUN_FILE:
                    values.append(json.loads((directory / sweep.RUN_FILE).read_text())["wall_s"])
                    continue
                rows = [
                    json.loads(x) for x in (directory / "metrics.jsonl").read_text().splitlines()
                ]
                seen = [r[metric.key] for r in rows if metric.key in r]
                seen = [v for v in seen if v > 0] if metric.positive_only else seen
                values.append(
                    {"last": seen[-1], "min": min(seen), "median": float(np.median(seen))}[
                        metric.reduce
                    ]
                )
            values = np.array(values)
            per_arm[arm][metric.name] = values
            half = stats.t.ppf(0.975, len(values) - 1) * stats.sem(values)
            mean_cell, half_cell, tol = parse_cell(table[arm][1 + col])
            assert mean_cell == pytest.approx(values.mean(), abs=tol), (arm, metric)
            assert half_cell == pytest.approx(half, abs=tol), (arm, metric)
    for arm in plan["arms"]:
        if arm == baseline:
            continue
        for col, metric in enumerate(defs):
            d = per_arm[arm][metric.name] - per_arm[baseline][metric.name]
            mean_cell, half_cell, tol = parse_cell(diffs[arm][col])
            assert mean_cell == pytest.approx(d.mean(), abs=tol), (arm, metric)
            half = stats.t.ppf(0.975, len(d) - 1) * stats.sem(d)
            assert half_cell == pytest.approx(half, abs=tol), (arm, metric)


def test_report_tables_and_plots_from_synthetic_runs(tmp_path):
    synthetic_sweep(tmp_path)
    assert report.main([str(tmp_path)]) == 0
    metrics = ["final_eval_loss", "best_eval_loss", "tokens_per_sec", "wall_s"]
    check_report_against_metrics(tmp_path, metrics, "base")
    summary = json.loads((tmp_path / "report.json").read_text())
    better = summary["metrics"]["final_eval_loss"]["better"]
    assert better["diff"] == pytest.approx(-0.2) and better["diff_n"] == 3
    assert better["diff_ci"] == pytest.approx(0.0, abs=1e-9)  # same offset on every seed
    assert "-0.2 ± 0 *" in (tmp_path / "report.md").read_text()
    pytest.importorskip("matplotlib")
    for name in ("curves", "metrics"):
        png = (tmp_path / "plots" / f"{name}.png").read_bytes()
        assert png.startswith(b"\x89PNG") and len(png) > 10_000
        assert f"](plots/{name}.png)" in (tmp_path / "report.md").read_text()


def test_report_errors_are_one_line(tmp_path, capsys):
    assert report.main([str(tmp_path)]) == 2
    assert "not a sweep directory" in capsys.readouterr().err
    synthetic_sweep(tmp_path)
    assert report.main([str(tmp_path), "--metrics", "nope"]) == 2
    assert "unknown metric 'nope'" in capsys.readouterr().err


# ---------------------------------------------------------------- real runs (subprocesses)


def write_ablation(path: pathlib.Path, spec: dict) -> pathlib.Path:
    path.write_text(f"def get_ablation(arg=None):\n    return {spec!r}\n")
    return path


def flaxlm(*args: str, cwd: pathlib.Path = ROOT) -> subprocess.CompletedProcess:
    env = dict(os.environ, XLA_FLAGS="", PYTHONPATH=str(ROOT))  # one CPU device per run
    return subprocess.run(
        [sys.executable, "-m", "orchestrate.cli", *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )


def test_a_crashing_run_is_reported_and_the_exit_code_names_it(tmp_path):
    # `report` stands in for a stage that crashes at once: it refuses --config/--workdir.
    # The sweep is generic over the command, and this costs a second, not a JAX start-up.
    file = write_ablation(
        tmp_path / "bad.py",
        {"command": "report", "config": "x.py", "arms": {"ok": {}, "broken": {}}, "seeds": [0]},
    )
    result = flaxlm(
        "sweep", "--config", str(file), "--workdir", str(tmp_path / "sw"), "--no-report"
    )
    assert result.returncode == 1
    assert "2 run(s) failed: ok/seed0, broken/seed0" in result.stderr
    assert "usage: flaxlm report" in result.stdout  # the run's own error, from its log
    record = json.loads((tmp_path / "sw/runs/broken/seed0" / sweep.RUN_FILE).read_text())
    assert record["status"] == "failed" and record["returncode"] == 2


def first_batch(run_dir: pathlib.Path) -> dict:
    """What the run's data pipeline yields first, rebuilt from its resolved config.json."""
    from model.tokenizer import load_tokenizer
    from train import pretrain
    from train.data import pipelines

    config = ml_collections.ConfigDict(json.loads((run_dir / "config.json").read_text()))
    source = pretrain.open_text(config, "data")
    options = pipelines.DataOptions(seed=config.seed, shard_index=0, shard_count=1)
    dataset = pipelines.pretrain_dataset(
        source,
        load_tokenizer(run_dir / "tokenizer"),
        config.batch_size,
        config.seq_len,
        options,
        config.data.packing,
    )
    return next(iter(dataset))


def test_two_arms_two_seeds_tiny_sweep_is_paired_resumable_and_reported(tmp_path):
    file = write_ablation(
        tmp_path / "lr.py",
        {
            "description": "tiny lr",
            "command": "pretrain",
            "config": "configs/pretrain.py:tiny",
            "overrides": {
                "total_steps": 2,
                "log.every_steps": 1,
                "eval.every_steps": 2,
                "checkpoint.every_steps": 2,
                "checkpoint.async_save": False,
            },
            "arms": {"lr3e-3": {"optim.lr": 3e-3}, "lr1e-3": {"optim.lr": 1e-3}},
            "seeds": [0, 1],
            "metrics": ["final_eval_loss", "final_loss", "tokens_per_sec"],
        },
    )
    workdir = tmp_path / "sw"
    result = flaxlm("sweep", "--config", str(file), "--workdir", str(workdir), "--no-report")
    assert result.returncode == 0, result.stdout + result.stderr
    runs = sorted(workdir.glob("runs/*/seed*"))
    assert [f"{d.parent.name}/{d.name}" for d in runs] == [
        "lr1e-3/seed0",
        "lr1e-3/seed1",
        "lr3e-3/seed0",
        "lr3e-3/seed1",
    ]
    configs = {(d.parent.name, d.name): json.loads((d / "config.json").read_text()) for d in runs}
    assert (
        configs["lr1e-3", "seed1"]["optim"]["lr"] == 1e-3
        and configs["lr1e-3", "seed1"]["seed"] == 1
    )

    # Paired: same seed -> the same first batch and (same init) the same step-1 loss.
    batches = {(d.parent.name, d.name): first_batch(d) for d in runs}
    first_loss = {
        (d.parent.name, d.name): report.read_records(d / "metrics.jsonl")[0] for d in runs
    }
    for seed in ("seed0", "seed1"):
        a, b = batches["lr3e-3", seed], batches["lr1e-3", seed]
        assert all(np.array_equal(a[k], b[k]) for k in a)
        assert first_loss["lr3e-3", seed]["step"] == 1
        assert first_loss["lr3e-3", seed]["loss"] == pytest.approx(
            first_loss["lr1e-3", seed]["loss"], abs=1e-6
        )
    assert not np.array_equal(
        batches["lr3e-3", "seed0"]["inputs"], batches["lr3e-3", "seed1"]["inputs"]
    )

    # The report against numpy/scipy (the synthetic test covers the plots).
    assert report.main([str(workdir), "--no-plots"]) == 0
    check_report_against_metrics(
        workdir, ["final_eval_loss", "final_loss", "tokens_per_sec"], "lr3e-3"
    )

    # Resume: every run is finished, so nothing runs again.
    again = flaxlm("sweep", "--config", str(file), "--workdir", str(workdir), "--no-report")
    assert again.returncode == 0
    assert again.stdout.count("finished earlier, skipped") == 4 and "running" not in again.stdout


@pytest.mark.parametrize(
    "path",
    sorted(p for p in (ROOT / "configs/ablations").glob("*.py") if "get_ablation" in p.read_text()),
    ids=lambda p: p.stem,
)
def test_shipped_ablations_resolve_against_their_base_config(path):
    """Every run's overrides name real keys with valid values (what a run checks first)."""
    from configs import loader

    plan = sweep.make_plan(sweep.load_ablation(str(path)))
    base_file = ROOT / plan.config.partition(":")[0]
    if not base_file.is_file():
        pytest.skip(f"{base_file.name} is not in this tree yet")
    assert len(plan.runs) == len(plan.arms) * len(plan.seeds) >= 4
    for run in plan.runs:
        overrides = [f"{k}={sweep.format_value(v)}" for k, v in run.overrides.items()]
        config = loader.load(str(base_file) + ":" + plan.config.partition(":")[2], overrides)
        if plan.command == "pretrain":
            loader.model_config(config)  # model fields are validated here
    for metric in plan.spec.get("metrics", []):
        report.resolve_metric(metric)
    assert not sweep.unpaired_arms(plan.arms)
