"""The fault suite's harness: faulted runs as subprocesses, seeded fault points, the
comparison of a recovered run with an uninterrupted one, and the record of every case.

Every case appends one JSON line (command, fault, point, outcome, detail) to the session's
results file; `write_report` turns that file into docs/reliability.md (only when
FLAXLM_WRITE_RELIABILITY=1, see conftest.py).
"""

from __future__ import annotations

import collections
import contextlib
import dataclasses
import datetime
import json
import os
import pathlib
import random
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator, Sequence
from typing import Any

ROOT = pathlib.Path(__file__).resolve().parents[2]
CONFIGS = ROOT / "configs"
RESULTS: dict[str, pathlib.Path] = {}  # "path" -> the session's results file (conftest)
SUITE = {"now": "ci"}  # "slow" while a test marked slow runs (conftest)
PASSED = "as expected"

# Metric keys that measure the machine, not the computation: left out of comparisons.
TIMING_PARTS = ("per_sec", "mfu", "time", "seconds", "elapsed")


def child_env(cache_dir: pathlib.Path | None = None, **extra: str) -> dict[str, str]:
    """The environment of every faulted run: the 8 fake CPU devices of tests/conftest.py
    (so in- and out-of-process runs reduce in the same order and agree bitwise) and a
    persistent compilation cache shared by the session (reruns skip XLA compiles; a
    cached executable computes exactly what a fresh compile does)."""
    env = dict(os.environ, PYTHONPATH=str(ROOT), JAX_PLATFORMS="cpu")
    env["XLA_FLAGS"] = "--xla_force_host_platform_device_count=8"
    env.pop("FLAXLM_WRITE_RELIABILITY", None)
    if cache_dir is not None:
        env["JAX_COMPILATION_CACHE_DIR"] = str(cache_dir)
        env["JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS"] = "0"
        env["JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES"] = "0"
    env.update(extra)
    return env


def cache_dir() -> pathlib.Path | None:
    return RESULTS.get("cache")


def cli_argv(command: str, *args: str) -> list[str]:
    return [sys.executable, "-m", "orchestrate.cli", command, *args]


def start(
    command: str, args: Sequence[str], log: pathlib.Path, env: dict | None = None
) -> subprocess.Popen:
    """A run in its own process group (signals go to the whole job, as a scheduler's
    preemption does), its stdout+stderr appended to `log`."""
    log.parent.mkdir(parents=True, exist_ok=True)
    out = open(log, "ab")  # noqa: SIM115  (closed by finish())
    out.write(f"\n$ flaxlm {command} {' '.join(args)}\n".encode())
    out.flush()
    proc = subprocess.Popen(
        cli_argv(command, *args),
        cwd=ROOT,
        env=env or child_env(cache_dir()),
        stdout=out,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    proc._fault_log = out  # type: ignore[attr-defined]
    return proc


def finish(proc: subprocess.Popen, timeout: float = 900) -> int:
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        code = proc.wait()
    proc._fault_log.close()  # type: ignore[attr-defined]
    return code


def run(
    command: str,
    args: Sequence[str],
    log: pathlib.Path,
    env: dict | None = None,
    timeout: float = 900,
) -> int:
    return finish(start(command, args, log, env), timeout)


def run_capture(
    command: str, args: Sequence[str], env: dict | None = None, timeout: float = 600, **kw: Any
) -> subprocess.CompletedProcess:
    return subprocess.run(
        cli_argv(command, *args),
        cwd=ROOT,
        env=env or child_env(cache_dir()),
        capture_output=True,
        text=True,
        timeout=timeout,
        **kw,
    )


def rss_bytes(pid: int) -> int:
    """Resident memory of a process and its children (Linux /proc), 0 once gone."""
    total = 0
    for status in pathlib.Path("/proc").glob("[0-9]*/status"):
        try:
            text = status.read_text()
        except OSError:
            continue
        fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
        if int(status.parent.name) == pid or fields.get("PPid", "").strip() == str(pid):
            total += int(fields.get("VmRSS", "0 kB").split()[0]) * 1024
    return total


def run_guarded(
    command: str, args: Sequence[str], log: pathlib.Path, max_rss: float, timeout: float
) -> tuple[int | None, str]:
    """Run, but kill the run (a shared CI machine) past `max_rss` bytes or `timeout` s.
    Returns (exit code or None when killed, why it was killed)."""
    proc = start(command, args, log)
    deadline, peak = time.monotonic() + timeout, 0
    while proc.poll() is None:
        peak = max(peak, rss_bytes(proc.pid))
        why = ""
        if peak > max_rss:
            why = f"killed at {peak / 2**30:.1f} GiB resident (limit {max_rss / 2**30:.1f})"
        elif time.monotonic() > deadline:
            why = f"killed after {timeout:.0f} s (peak {peak / 2**30:.1f} GiB)"
        if why:
            os.killpg(proc.pid, signal.SIGKILL)
            finish(proc)
            return None, why
        time.sleep(0.5)
    return finish(proc), f"peak {peak / 2**30:.1f} GiB"


def tail(path: pathlib.Path, n: int = 3000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


# ----------------------------------------------------------------------------- fault points

SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGKILL)


@dataclasses.dataclass(frozen=True)
class Point:
    """Where a signal lands: once `metrics` (a metrics.jsonl) shows a step >= after_step
    written by this attempt (0: at once), plus `delay` seconds; so a point can fall in
    startup, compile, a step, an eval or an async save."""

    signum: int
    after_step: int
    delay: float

    def describe(self) -> str:
        where = "startup" if self.after_step == 0 else f"step>={self.after_step}"
        return f"{signal.Signals(self.signum).name} at {where}+{self.delay:.2f}s"


def points(seed: int, n: int, total_steps: int) -> list[Point]:
    """n seeded points in increasing step order (each lands in a later attempt than the
    previous one). The three signals take turns, shuffled, so two points already differ in
    kind. A startup point waits 0-8 s (imports, data preparation, compile); a step point
    0-0.3 s (inside a step, an eval or an async save)."""
    rng = random.Random(seed)
    kinds = list(SIGNALS)
    rng.shuffle(kinds)
    steps = sorted(rng.randrange(0, total_steps) for _ in range(n))
    return [
        Point(kinds[i % 3], step, round(rng.uniform(0.0, 8.0 if step == 0 else 0.3), 2))
        for i, step in enumerate(steps)
    ]


def logged_step(metrics: pathlib.Path, since: float) -> int:
    """The largest step in `metrics` if it was written after `since`, else -1."""
    try:
        if metrics.stat().st_mtime < since:
            return -1
        text = metrics.read_text()
    except OSError:
        return -1
    best = -1
    for line in text.splitlines():
        with contextlib.suppress(ValueError, AttributeError):
            best = max(best, int(json.loads(line).get("step", -1)))
    return best


# ----------------------------------------------------------------------------- comparisons


def metric_table(metrics: pathlib.Path) -> dict[int, dict[str, Any]]:
    """step -> every logged value of that step except timings (a later line wins, as a
    resumed run rewrites the steps after its checkpoint)."""
    out: dict[int, dict[str, Any]] = {}
    if not metrics.exists():
        return out
    for line in metrics.read_text().splitlines():
        row = json.loads(line)
        keep = {
            k: v
            for k, v in row.items()
            if k != "step" and not any(part in k for part in TIMING_PARTS)
        }
        out.setdefault(int(row["step"]), {}).update(keep)
    return out


def diff_tables(expected: dict, got: dict, where: str) -> list[str]:
    """Readable differences between two metric tables (empty: bitwise equal)."""
    problems = []
    if sorted(expected) != sorted(got):
        missing = sorted(set(expected) - set(got))
        extra = sorted(set(got) - set(expected))
        problems.append(f"{where}: steps missing {missing[:5]}, extra {extra[:5]}")
    for step in sorted(set(expected) & set(got)):
        for key in sorted(set(expected[step]) | set(got[step])):
            a, b = expected[step].get(key), got[step].get(key)
            if a != b and not (isinstance(a, float) and a != a and isinstance(b, float) and b != b):
                problems.append(f"{where} step {step} {key}: {a!r} != {b!r}")
    return problems


def without_timings(value: Any) -> Any:
    if isinstance(value, dict):
        return {
            k: without_timings(v)
            for k, v in value.items()
            if not any(part in k for part in TIMING_PARTS)
        }
    return value


# ----------------------------------------------------------------------------- records


def record(
    category: str,
    command: str,
    fault: str,
    point: str,
    outcome: str,
    detail: str = "",
    expected: str = "",
    suite: str | None = None,
) -> None:
    """Append one tried fault to the session's results file."""
    path = RESULTS.get("path")
    if path is None:
        return
    row = {
        "category": category,
        "command": command,
        "fault": fault,
        "point": point,
        "outcome": outcome,
        "detail": detail[:400],
        "expected": expected,
        "suite": suite or SUITE["now"],
        "time": round(time.time(), 1),
    }
    with open(path, "a", encoding="utf-8") as f:
        f.write(json.dumps(row) + "\n")


@contextlib.contextmanager
def case(
    category: str,
    command: str,
    fault: str,
    point: str,
    expected: str,
    suite: str | None = None,
) -> Iterator[dict[str, str]]:
    """Record a case: PASSED when the block finishes, else the failure's first line
    (and the failure propagates: a fault that breaks an expectation fails the test)."""
    info = {"detail": ""}
    try:
        yield info
    except BaseException as err:
        first = (str(err).strip().splitlines() or [type(err).__name__])[0]
        record(
            category,
            command,
            fault,
            point,
            f"FAILED: {first[:200]}",
            info["detail"],
            expected,
            suite,
        )
        raise
    record(category, command, fault, point, PASSED, info["detail"], expected, suite)


def read_results(path: pathlib.Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


ORDER = ("signals", "checkpoint", "disk", "data", "config", "numerics", "security", "coverage")
TITLES = {
    "signals": "Signals (SIGTERM / SIGINT / kill -9 at seeded points, then the same command)",
    "checkpoint": "Checkpoint damage",
    "disk": "Disk full during a save",
    "data": "Bad data",
    "config": "Bad configs and arguments",
    "numerics": "Numerical faults",
    "security": "Security (workdir data never runs code)",
    "coverage": "Not covered",
}


def write_report(
    results: list[dict], target: pathlib.Path, command: str, notes: str, seconds: float
) -> None:
    """`seconds`: the session's wall time; pooled sessions report their records' span."""
    stamps = [r["time"] for r in results if "time" in r]
    if stamps:
        seconds = max(seconds, max(stamps) - min(stamps))
    """docs/reliability.md: per (category, command, fault) how often it was tried and
    what happened, then every failure in full."""
    # Session paths (pytest's tmp dirs) say nothing to a reader: shorten them.
    tmp = re.compile(r"/tmp/pytest-of-[^/\s]+/pytest-[^/\s]+/")
    results = [
        {**r, "detail": tmp.sub("<tmp>/", r["detail"]), "outcome": tmp.sub("<tmp>/", r["outcome"])}
        for r in results
    ]
    groups: dict[tuple, list[dict]] = collections.OrderedDict()
    for row in sorted(
        results,
        key=lambda r: ORDER.index(r["category"]) if r["category"] in ORDER else 99,
    ):
        groups.setdefault((row["category"], row["command"], row["fault"]), []).append(row)
    suites = collections.Counter(r["suite"] for r in results)
    failed = [r for r in results if r["outcome"] != PASSED and r["category"] != "coverage"]
    lines = [
        "# Reliability: faults tried and what happened",
        "",
        "Written by the fault-injection suite in `tests/faults/`, not by hand. Produced by",
        "",
        "    " + command.strip().replace("\n", "\n    "),
        "",
        f"on {datetime.date.today().isoformat()}, {len(results)} fault cases in "
        f"{seconds / 60:.1f} minutes ({suites.get('ci', 0)} from the CI part, "
        f"{suites.get('slow', 0)} from the `slow` part), {len(failed)} not as expected.",
        "",
        notes.strip(),
        "",
    ]
    current = None
    for (category, command_name, fault), rows in groups.items():
        if category != current:
            current = category
            lines += [
                "",
                f"## {TITLES.get(category, category)}",
                "",
                "| command | fault | times | as expected | expected outcome | observed |",
                "|---|---|---|---|---|---|",
            ]
        ok = sum(r["outcome"] == PASSED for r in rows)
        if category == "coverage":  # a gap, not a fault that was tried
            lines.append(f"| {command_name} | {fault} | 0 | - | - | {rows[0]['detail']} |")
            continue
        observed = "; ".join(dict.fromkeys(r["detail"] for r in rows if r["detail"]))[:300]
        bad = [r["outcome"] for r in rows if r["outcome"] != PASSED]
        if bad:
            observed = f"**{bad[0]}** " + observed
        cell = (observed or "-").replace("|", "\\|").replace("\n", " ")
        expected = rows[0]["expected"].replace("|", "\\|")
        lines.append(
            f"| {command_name} | {fault} | {len(rows)} | {ok}/{len(rows)} | {expected} | {cell} |"
        )
    if failed:
        lines += ["", "## Observed failures", ""]
        for r in failed:
            lines.append(
                f"- {r['command']} / {r['fault']} ({r['point']}): {r['outcome']}"
                + (f" — {r['detail']}" if r["detail"] else "")
            )
    target.write_text("\n".join(lines).rstrip() + "\n")
