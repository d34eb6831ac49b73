"""Human labeling without a browser: ranking checks, the JSONL store (durable appends, torn
tails, resume, stale submissions, undo), agreement against Kendall's tau, and the HTTP
server's token, escaping-relevant headers, path handling and error answers."""

from __future__ import annotations

import http.client
import json
import pathlib
import threading

import numpy as np
import pytest
from scipy import stats

from rlhf import label_agreement as agr
from rlhf import label_server
from rlhf import label_store as ls
from rlhf.labeler import Labeler
from rlhf.tasks import load_task
from train.data.records import BadRecordError, jsonl_records

CANDIDATES = [
    {"prompt": "shout abc", "responses": ["ABC", "ABc", "abc"]},
    {"prompt": "shout xy", "responses": ["XY", "xy"]},
    {"prompt": "shout q", "responses": ["Q", "q", "QQ", ""]},
]


@pytest.fixture
def workdir(tmp_path: pathlib.Path) -> pathlib.Path:
    lines = [json.dumps(c) for c in CANDIDATES + CANDIDATES[:1]]  # a duplicate line
    (tmp_path / ls.CANDIDATES).write_text("\n".join(lines) + "\n")
    return tmp_path


@pytest.mark.parametrize(
    "ranking, message",
    [
        ([0, 1], "need 3 integer ranks"),
        ([0, 1, True], "need 3 integer ranks"),
        ([0, 1.0, 2], "need 3 integer ranks"),
        ("012", "need 3 integer ranks"),
        ([0, 2, 2], "none missing"),
        ([1, 1, 2], "none missing"),
        ([0, 0, 0], "all responses tied"),
    ],
)
def test_bad_rankings_are_refused_by_name(ranking, message):
    with pytest.raises(ls.LabelError, match=message):
        ls.check_ranking(ranking, 3)


def test_rank_skip_resume_and_the_reward_reader(workdir):
    store = ls.LabelStore(workdir)
    assert len(store.candidates) == 3  # the duplicate line is one candidate
    first, second, third = store.candidates
    assert store.next_item("ann") == first
    store.rank("ann", first.id, [1, 0, 1])
    store.skip("ann", second.id)
    store.rank("bob", first.id, [0, 1, 2])
    restarted = ls.LabelStore(workdir)  # a new server on the same files
    assert restarted.next_item("ann") == third
    assert restarted.next_item("bob") == second
    assert restarted.progress("ann") == {
        "ranked": 1, "skipped": 1, "total": 3, "remaining_for_anyone": 1
    }  # fmt: skip
    assert ls.summary(restarted)["remaining"] == 1
    # The reward model's reader takes the records, extra keys and all.
    parsed = [r for _, r in jsonl_records(str(workdir / ls.RANKED), "ranked")]
    assert not [r for r in parsed if isinstance(r, BadRecordError)]
    assert [r["ranks"] for r in parsed] == [[1, 0, 1], [0, 1, 2]]
    lines = [json.loads(x) for x in (workdir / ls.RANKED).read_text().splitlines()]
    assert [x["labeler"] for x in lines] == ["ann", "bob"] and all("time" in x for x in lines)


def test_stale_and_bad_submissions(workdir):
    store = ls.LabelStore(workdir)
    c = store.candidates[0]
    store.rank("ann", c.id, [0, 1, 2])
    with pytest.raises(ls.LabelError, match="already answered") as err:
        store.rank("ann", c.id, [0, 1, 2])
    assert err.value.status == 409
    with pytest.raises(ls.LabelError, match="unknown prompt id"):
        store.skip("ann", "0123456789abcdef")
    with pytest.raises(ls.LabelError, match="bad labeler id"):
        store.rank("../etc", c.id, [0, 1, 2])
    assert len((workdir / ls.RANKED).read_text().splitlines()) == 1


def test_a_torn_last_line_is_cut_and_undo_rewrites_atomically(workdir):
    store = ls.LabelStore(workdir)
    a, b, _ = store.candidates
    foreign = '{"prompt": "elsewhere", "responses": ["x", "y"], "ranking": [0, 1]}\n'
    (workdir / ls.RANKED).write_text(foreign)
    store.rank("ann", a.id, [0, 1, 2])
    store.rank("ann", b.id, [1, 0])
    with (workdir / ls.RANKED).open("a") as f:
        f.write('{"prompt": "shout q", "respo')  # a kill in the middle of a write
    store = ls.LabelStore(workdir)
    assert (workdir / ls.RANKED).read_text().count("\n") == 3
    assert store.undo("ann").id == b.id
    assert store.undo("ann").id == a.id
    assert store.undo("ann") is None
    assert (workdir / ls.RANKED).read_text() == foreign  # other lines byte for byte
    assert not (workdir / (ls.RANKED + ".tmp")).exists()


def test_bad_candidates_file_names_the_line(tmp_path):
    (tmp_path / ls.CANDIDATES).write_text('{"prompt": "p", "responses": ["a"]}\n')
    with pytest.raises(ValueError, match=r"candidates.jsonl:1: need at least 2"):
        ls.LabelStore(tmp_path)


def test_pair_agreement_matches_kendall_tau_without_ties():
    rng = np.random.default_rng(0)
    for _ in range(50):
        a, b = list(rng.permutation(6)), list(rng.permutation(6))
        agree, pairs = agr.pair_agreement(a, b)
        tau = stats.kendalltau(a, b).statistic
        assert pairs == 15 and agree / pairs == pytest.approx((1 + tau) / 2)


def test_pair_agreement_with_ties_by_hand():
    # (0,1): a tie against a preference, ½; (0,2): same preference, 1; (1,2): ½
    assert agr.pair_agreement([0, 0, 1], [0, 1, 1]) == (2.0, 3)
    # (0,1): ½; (0,2): opposite preferences, 0; (1,2): ½
    assert agr.pair_agreement([0, 0, 1], [1, 0, 0]) == (1.0, 3)
    assert agr.pair_agreement([0, 0], [0, 0]) == (0.0, 0)


def test_agreement_rows_against_oracle_and_simulated(workdir):
    task = load_task("uppercase")
    store = ls.LabelStore(workdir)
    for c in store.candidates:  # "oracle" ranks like the task's score; "rev" the reverse
        scores = [task.score(c.prompt, r) for r in c.responses]
        ranks = Labeler(random_rate=0.0).rank(scores, np.random.default_rng(0))
        if max(ranks) > 0:
            store.rank("oracle", c.id, ranks)
            store.rank("rev", c.id, [max(ranks) - r for r in ranks])
    rows = {r["between"]: r for r in agr.agreement_rows(store, task, Labeler(random_rate=0.0))}
    assert rows["oracle vs rev"]["agreement"] == 0.0
    assert rows["oracle vs oracle"]["agreement"] == 1.0
    assert rows["oracle vs simulated"]["agreement"] == 1.0
    assert rows["rev vs oracle"]["agreement"] == 0.0
    assert rows["simulated vs oracle"]["agreement"] == 1.0
    assert "oracle vs rev" in agr.format_rows(list(rows.values()))


# ----------------------------------------------------------------------------- server


@pytest.fixture
def server(workdir):
    srv = label_server.LabelServer(("127.0.0.1", 0), ls.LabelStore(workdir), "tok3n", "ann")
    thread = threading.Thread(target=srv.serve_forever, args=(0.05,), daemon=True)
    thread.start()
    yield srv
    srv.shutdown()
    srv.server_close()


def request(srv, method: str, path: str, body: bytes | None = None) -> tuple[int, dict, bytes]:
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=5)
    conn.request(method, path, body=body, headers={"Content-Type": "application/json"})
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out


def declared_only(srv, path: str, length: int) -> tuple[int, dict, bytes]:
    """A POST that declares a body of `length` bytes and sends none: the server refuses
    by the declared length before reading (sending a real oversized body races the
    server's close and may end in a broken pipe on the client side)."""
    conn = http.client.HTTPConnection(*srv.server_address[:2], timeout=5)
    conn.putrequest("POST", path)
    conn.putheader("Content-Type", "application/json")
    conn.putheader("Content-Length", str(length))
    conn.endheaders()
    response = conn.getresponse()
    out = response.status, dict(response.getheaders()), response.read()
    conn.close()
    return out


def test_every_request_needs_the_token(server):
    for path in ("/", "/label.js", "/wrong/", "/tok3/api/next?labeler=ann", "/tok3nx/"):
        status, _, body = request(server, "GET", path)
        assert status == 403 and b"wrong token" in body
    status, _, body = request(server, "POST", "/x/api/rank", b"{}")
    assert status == 403
    status, headers, body = request(server, "GET", "/tok3n/")
    assert status == 200 and b"label.js" in body
    assert "script-src 'self'" in headers["Content-Security-Policy"]
    assert headers["X-Content-Type-Options"] == "nosniff"


@pytest.mark.parametrize(
    "path",
    ["/tok3n/../setup.py", "/tok3n/label_page/index.html", "/tok3n/%2e%2e/label_store.py",
     "/tok3n//etc/passwd", "/tok3n/candidates.jsonl", "/tok3n/api/next/../../x"],
)  # fmt: skip
def test_no_path_reaches_the_file_system(server, path):
    status, _, body = request(server, "GET", path)
    assert status in (400, 404) and b"shout" not in body and b"import" not in body


def test_api_answers_bad_input_with_4xx_json(server):
    c = server.store.candidates[0]
    post = lambda name, body: request(server, "POST", f"/tok3n/api/{name}", body)  # noqa: E731
    cases = [
        (post("rank", b"not json"), 400, "not JSON"),
        (post("rank", b"[1]"), 400, "JSON object"),
        (post("rank", json.dumps({"labeler": "a b"}).encode()), 400, "bad labeler id"),
        (post("rank", json.dumps({"labeler": "ann", "id": c.id}).encode()), 400, "integer"),
        (post("skip", json.dumps({"labeler": "ann", "id": "nope"}).encode()), 409, "reload"),
        (post("undo", json.dumps({"labeler": "ann"}).encode()), 409, "nothing to undo"),
        (declared_only(server, "/tok3n/api/rank", label_server.MAX_BODY + 1), 413, "over"),
        (request(server, "GET", "/tok3n/api/next"), 400, "bad labeler id"),
        (request(server, "GET", "/tok3n/api/nope?labeler=ann"), 404, "no such page"),
    ]
    for (status, _, body), want, text in cases:
        assert status == want and text in json.loads(body)["error"], (status, body)
    good = json.dumps({"labeler": "ann", "id": c.id, "ranking": [2, 1, 0]}).encode()
    status, _, body = post("rank", good)
    assert status == 200 and json.loads(body)["item"]["prompt"] == "shout xy"
    status, _, body = post("rank", good)
    assert status == 409 and "already answered" in json.loads(body)["error"]
    status, _, body = post("undo", json.dumps({"labeler": "ann"}).encode())
    assert json.loads(body)["restored_ranking"] == [2, 1, 0]


def test_cli_errors_are_one_line(tmp_path, workdir, capsys):
    assert label_server.main(["--workdir", str(tmp_path / "none")]) == 2
    assert "no candidates.jsonl" in capsys.readouterr().err
    lock = label_server.lock_directory(str(workdir))
    try:
        assert label_server.main(["--workdir", str(workdir), "--port", "0"]) == 2
        assert "another `flaxlm label` server" in capsys.readouterr().err
    finally:
        lock.close()
    assert label_server.main(["--workdir", str(workdir), "--agreement"]) == 0
    assert "no rankings to compare yet" in capsys.readouterr().out


@pytest.mark.parametrize("sig", ["SIGINT", "SIGTERM"])
def test_server_stops_on_a_signal_its_parent_ignored(workdir, sig):
    """Started with SIGINT and SIGTERM ignored (a shell's background job; exec keeps
    SIG_IGN), `flaxlm label` still stops on either, exit 0, lock released. The signal
    goes out the moment the URL is printed (the server's handlers must be in place by
    then). A small launcher ignores the signals and execs the command, rather than a
    preexec_fn: that would run Python in a fork of this JAX-threaded process."""
    import os
    import signal
    import subprocess
    import sys

    root = pathlib.Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "orchestrate.cli", "label", "--workdir", str(workdir)]
    command += ["--port", "0"]
    launcher = (
        "import os, signal, sys\n"
        "for s in (signal.SIGINT, signal.SIGTERM):\n"
        "    signal.signal(s, signal.SIG_IGN)\n"
        "os.execv(sys.argv[1], sys.argv[1:])\n"
    )
    proc = subprocess.Popen(
        [sys.executable, "-c", launcher, *command],
        cwd=root,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )
    try:
        seen = b""
        while b"open http" not in seen:
            chunk = os.read(proc.stdout.fileno(), 4096)
            assert chunk, seen  # the server exited before printing its URL
            seen += chunk
        proc.send_signal(getattr(signal, sig))
        assert proc.wait(timeout=30) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        proc.stdout.close()
    label_server.lock_directory(str(workdir)).close()  # the lock was released
