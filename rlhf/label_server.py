"""`flaxlm label --workdir RUN/rm_data`: a local web page on which people rank responses.

    flaxlm label --workdir runs/demo/rm_data [--port 8765] [--host 127.0.0.1] [--labeler NAME]
    flaxlm label --workdir runs/demo/rm_data --agreement [--task uppercase]

The page (rlhf/label_page/, plain HTML/JS/CSS, no build step) shows one prompt at a time
with its K responses; the answers go to DIR/ranked.jsonl through rlhf/label_store.py.

Safety (decisions). The server binds 127.0.0.1 unless told otherwise. Every request must
start with /TOKEN/, a random token printed with the URL at start, compared in constant
time; anything else gets 403. The static files are read once at start from a fixed
table, so no part of a request path ever reaches the file system. The page builds every
piece of model output with `textContent` (never as HTML) and the Content-Security-Policy
allows only the page's own script and style, so a response containing `<script>` is
shown as text. Bad or stale submissions get a 4xx JSON `{"error": "..."}` that the page
shows; bodies over 1 MiB are refused.

Standard library only: ThreadingHTTPServer, one lock in the store serialises writes.
"""

from __future__ import annotations

import argparse
import fcntl
import hmac
import http.server
import importlib.resources
import json
import os
import pathlib
import secrets
import signal
import sys
import urllib.parse
from collections.abc import Sequence
from typing import Any

from rlhf import label_agreement
from rlhf.label_store import CANDIDATES, LABELER_RE, LabelError, LabelStore, check_labeler

MAX_BODY = 1 << 20
STATIC = {  # URL name -> (file in rlhf/label_page, content type)
    "": ("index.html", "text/html; charset=utf-8"),
    "label.js": ("label.js", "text/javascript; charset=utf-8"),
    "label.css": ("label.css", "text/css; charset=utf-8"),
}
HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; connect-src 'self'; "
        "img-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "no-referrer",
    "Cache-Control": "no-store",
}


def load_static() -> dict[str, tuple[bytes, str]]:
    root = importlib.resources.files("rlhf") / "label_page"
    return {name: ((root / f).read_bytes(), ctype) for name, (f, ctype) in STATIC.items()}


def item_json(store: LabelStore, labeler: str) -> dict[str, Any]:
    """What the page needs next: the labeler's next prompt (or none) and progress."""
    c = store.next_item(labeler)
    item = None if c is None else {"id": c.id, "prompt": c.prompt, "responses": list(c.responses)}
    return {"item": item, "progress": store.progress(labeler)}


def history_json(store: LabelStore, labeler: str) -> list[dict[str, Any]]:
    out = []
    for answer, _, _ in reversed(store.answers(labeler)):
        c = store.by_id[answer.id]
        row = {"id": c.id, "prompt": c.prompt, "responses": list(c.responses)}
        out.append(row | {"ranking": answer.ranking, "time": answer.time})
    return out


class Handler(http.server.BaseHTTPRequestHandler):
    """Routes under /TOKEN/: GET '', label.js, label.css, api/next, api/history;
    POST api/rank, api/skip, api/undo (JSON bodies with "labeler")."""

    server: LabelServer
    protocol_version = "HTTP/1.1"

    def log_message(self, format: str, *args: Any) -> None:
        if self.server.verbose:
            super().log_message(format, *args)

    def send(self, status: int, body: bytes, ctype: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        for key, value in HEADERS.items():
            self.send_header(key, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(body)

    def send_json(self, status: int, value: Any) -> None:
        self.send(status, json.dumps(value, ensure_ascii=False).encode(), "application/json")

    def route(self) -> tuple[str, dict[str, str]] | None:
        """The path after /TOKEN/ and the query, or None (403 sent) without the token."""
        url = urllib.parse.urlsplit(self.path)
        parts = url.path.split("/", 2)
        token = parts[1] if len(parts) > 1 else ""
        if not hmac.compare_digest(token.encode(), self.server.token.encode()):
            self.send_json(403, {"error": "missing or wrong token: use the URL flaxlm printed"})
            return None
        if len(parts) == 2:  # /TOKEN without the slash: relative URLs need it
            self.send_response(301)
            self.send_header("Location", f"/{token}/")
            self.send_header("Content-Length", "0")
            self.end_headers()
            return None
        query = dict(urllib.parse.parse_qsl(url.query))
        return parts[2], query

    def do_GET(self) -> None:
        routed = self.route()
        if routed is None:
            return
        name, query = routed
        try:
            if name in self.server.static:
                body, ctype = self.server.static[name]
                return self.send(200, body, ctype)
            if name == "api/config":
                return self.send_json(200, {"default_labeler": self.server.default_labeler})
            labeler = check_labeler(query.get("labeler"))
            if name == "api/next":
                return self.send_json(200, item_json(self.server.store, labeler))
            if name == "api/history":
                return self.send_json(200, {"history": history_json(self.server.store, labeler)})
            self.send_json(404, {"error": f"no such page {name[:60]!r}"})
        except LabelError as err:
            self.send_json(err.status, {"error": str(err)})

    do_HEAD = do_GET  # noqa: N815

    def read_body(self) -> dict[str, Any]:
        try:
            length = int(self.headers.get("Content-Length") or 0)
        except ValueError:
            raise LabelError("bad Content-Length") from None
        if length > MAX_BODY:
            self.close_connection = True
            raise LabelError(f"request body over {MAX_BODY} bytes", 413)
        try:
            body = json.loads(self.rfile.read(length) or b"null")
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise LabelError("the request body is not JSON") from None
        if not isinstance(body, dict):
            raise LabelError("the request body must be a JSON object")
        return body

    def do_POST(self) -> None:
        routed = self.route()
        if routed is None:
            return
        name, store = routed[0], self.server.store
        try:
            body = self.read_body()
            labeler = check_labeler(body.get("labeler"))
            if name == "api/rank":
                store.rank(labeler, body.get("id"), body.get("ranking"))
            elif name == "api/skip":
                store.skip(labeler, body.get("id"))
            elif name == "api/undo":
                answer = store.undo(labeler)
                if answer is None:
                    raise LabelError("nothing to undo", 409)
                # The undone prompt comes back (not the next in file order), as it was.
                c = store.by_id[answer.id]
                item = {"id": c.id, "prompt": c.prompt, "responses": list(c.responses)}
                reply = {"item": item, "progress": store.progress(labeler)}
                return self.send_json(200, reply | {"restored_ranking": answer.ranking})
            else:
                return self.send_json(404, {"error": f"no such action {name[:60]!r}"})
            self.send_json(200, item_json(store, labeler))
        except LabelError as err:
            self.send_json(err.status, {"error": str(err)})


class LabelServer(http.server.ThreadingHTTPServer):
    # Ctrl-C must not wait for a browser's open keep-alive connections: handler threads are
    # daemons and server_close() does not join them (every answer is already fsynced).
    daemon_threads = True
    block_on_close = False

    def __init__(
        self, address: tuple[str, int], store: LabelStore, token: str, default_labeler: str
    ):
        super().__init__(address, Handler)
        self.store, self.token, self.default_labeler = store, token, default_labeler
        self.static = load_static()
        self.verbose = False


def lock_directory(directory: str) -> Any:
    """An exclusive lock on DIR/.label.lock for the server's life (released on any exit)."""
    f = open(os.path.join(directory, ".label.lock"), "w")  # noqa: SIM115 (held open)
    try:
        fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        f.close()
        raise ValueError(f"another `flaxlm label` server is using {directory}") from None
    return f


def load_task_for(directory: str, task: str | None) -> tuple[Any, Any]:
    """The task (for the oracle) and the simulated labeler: --task wins over DIR/label.json."""
    from rlhf.labeler import Labeler
    from rlhf.tasks import load_task

    meta_path = os.path.join(directory, "label.json")
    meta = json.loads(pathlib.Path(meta_path).read_text()) if os.path.isfile(meta_path) else {}
    name = task or meta.get("task")
    simulated = Labeler(**meta.get("labeler", {}))
    return (load_task(name) if name else None), simulated


def parse_args(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        prog="flaxlm label", description="rank sampled responses on a local web page"
    )
    parser.add_argument("--workdir", required=True, help=f"directory with {CANDIDATES}")
    parser.add_argument("--host", default="127.0.0.1", help="address to bind (default local)")
    parser.add_argument("--port", type=int, default=8765, help="0 picks a free port")
    parser.add_argument("--labeler", default=None, help="name the page starts with ($USER)")
    parser.add_argument("--agreement", action="store_true", help="print agreement and exit")
    parser.add_argument("--task", default=None, help="task for the oracle (default label.json)")
    parser.add_argument("--verbose", action="store_true", help="log every request")
    return parser.parse_args(argv)


def main(argv: Sequence[str]) -> int:
    args = parse_args(argv)
    try:
        if not os.path.isfile(os.path.join(args.workdir, CANDIDATES)):
            raise ValueError(f"--workdir {args.workdir}: no {CANDIDATES} in it")
        store = LabelStore(args.workdir)
        if args.agreement:
            task, simulated = load_task_for(args.workdir, args.task)
            rows = label_agreement.agreement_rows(store, task, simulated)
            print(label_agreement.format_rows(rows))
            if task is None:
                print("(no task known: pass --task NAME for the oracle and simulated rows)")
            return 0
        user = os.environ.get("USER", "")
        default = check_labeler(args.labeler or (user if LABELER_RE.match(user) else "labeler"))
        lock = lock_directory(args.workdir)
        token = secrets.token_urlsafe(18)
        server = LabelServer((args.host, args.port), store, token, default)
    except (ValueError, OSError) as err:  # LabelError is a ValueError
        print(f"flaxlm label: error: {err}", file=sys.stderr)
        return 2
    server.verbose = args.verbose
    host, port = server.server_address[:2]
    shown = f"[{host}]" if ":" in str(host) else host
    # Ctrl-C and SIGTERM stop the server even when it was started with them ignored (as a
    # shell's background job, or by a parent that ignores SIGINT: exec keeps SIG_IGN).
    # Before the URL is printed: whoever reads it may signal at once.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, signal.default_int_handler)
    try:
        if args.host not in ("127.0.0.1", "localhost", "::1"):
            print(f"flaxlm label: warning: listening on {args.host}, not only this machine")
        print(f"flaxlm label: {len(store.candidates)} prompts in {args.workdir}", flush=True)
        print(f"open http://{shown}:{port}/{token}/", flush=True)
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()
        lock.close()
    return 0
