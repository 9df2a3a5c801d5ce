#!/usr/bin/env python3
"""A real SMTP server that accepts every message and records it.

Each accepted message becomes one JSON line in --record (arrival time,
envelope, subject, Message-ID, plain-text body), which tests, the benchmark
and `scripts/run.sh` read. With --http PORT it also serves the received
mail as a small web page, for people. With --refuse TEXT it refuses for
good (550) every recipient whose address contains TEXT, as a server
refuses an unknown user, and records each refusal as a line of its own
({"at", "refused": address}). With --pipelining it offers PIPELINING
(RFC 2920) in its EHLO reply, as Postfix does, and takes commands sent
together. With --tls-cert and --tls-key it speaks TLS from the first byte
(implicit TLS, `smtps://`).
"""
import argparse
import email
import html
import json
import os
import signal
import ssl
import threading
import time
from email import policy
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from aiosmtpd.controller import Controller


class Recorder:
    def __init__(self, path, refuse=None, pipelining=False):
        self.path = path
        self.refuse = refuse
        self.pipelining = pipelining
        self.lock = threading.Lock()

    async def handle_EHLO(self, server, session, envelope, hostname, responses):
        # aiosmtpd reads each command as it comes, so pipelined ones work;
        # it only leaves PIPELINING out of its reply.
        session.host_name = hostname
        if self.pipelining:
            responses.insert(-1, "250-PIPELINING")
        return responses

    async def handle_RCPT(self, server, session, envelope, address, rcpt_options):
        if self.refuse and self.refuse in address:
            self.write({"at": time.time(), "refused": address})
            return "550 5.1.1 No such user here"
        envelope.rcpt_tos.append(address)
        return "250 OK"

    def write(self, record):
        with self.lock, open(self.path, "a", encoding="utf-8") as out:
            out.write(json.dumps(record) + "\n")

    async def handle_DATA(self, server, session, envelope):
        message = email.message_from_bytes(envelope.content, policy=policy.default)
        body = message.get_body(preferencelist=("plain",))
        record = {
            "at": time.time(),
            "from": envelope.mail_from,
            "to": envelope.rcpt_tos,
            "subject": str(message["subject"] or ""),
            "message_id": str(message["message-id"] or ""),
            "text": body.get_content() if body is not None else "",
            "multipart": message.is_multipart(),
        }
        self.write(record)
        return "250 Message accepted"


def serve_web(port, path):
    class Page(BaseHTTPRequestHandler):
        def do_GET(self):
            try:
                with open(path, encoding="utf-8") as f:
                    records = [json.loads(line) for line in f if line.strip()]
                records = [r for r in records if "refused" not in r]
            except FileNotFoundError:
                records = []
            rows = "".join(
                "<tr><td>{}</td><td>{}</td><td>{}</td><td><pre>{}</pre></td></tr>".format(
                    time.strftime("%H:%M:%S", time.localtime(r["at"])),
                    html.escape(", ".join(r["to"])),
                    html.escape(r["subject"]),
                    html.escape(r["text"]),
                )
                for r in reversed(records)
            )
            page = (
                "<!doctype html><meta charset=utf-8><title>orderflow mail</title>"
                "<h1>Mail received ({})</h1><table border=1 cellpadding=4>"
                "<tr><th>at</th><th>to</th><th>subject</th><th>text</th></tr>{}</table>"
            ).format(len(records), rows)
            data = page.encode()
            self.send_response(200)
            self.send_header("Content-Type", "text/html; charset=utf-8")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)

        def log_message(self, *args):
            pass

    server = ThreadingHTTPServer(("127.0.0.1", port), Page)
    threading.Thread(target=server.serve_forever, daemon=True).start()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--port", type=int, default=1025)
    parser.add_argument("--record", required=True, help="JSON-lines file to append to")
    parser.add_argument("--http", type=int, help="serve the mail as a web page on this port")
    parser.add_argument("--refuse", help="refuse (550) recipients whose address contains this")
    parser.add_argument("--pipelining", action="store_true", help="offer PIPELINING (RFC 2920)")
    parser.add_argument("--tls-cert", help="PEM certificate chain: implicit TLS")
    parser.add_argument("--tls-key", help="PEM private key of --tls-cert")
    args = parser.parse_args()
    tls = None
    if args.tls_cert:
        tls = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
        tls.load_cert_chain(args.tls_cert, args.tls_key)
    controller = Controller(
        Recorder(args.record, args.refuse, args.pipelining),
        hostname="127.0.0.1",
        port=args.port,
        ssl_context=tls,
    )
    controller.start()
    if args.http:
        serve_web(args.http, args.record)
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    print(f"smtp sink on 127.0.0.1:{args.port}, recording to {args.record}", flush=True)
    stop.wait()
    # aiosmtpd's stop joins its loop thread, which once in a few stops of
    # run.sh never returned; the process ends either way.
    watchdog = threading.Timer(5, lambda: os._exit(0))
    watchdog.daemon = True
    watchdog.start()
    controller.stop()


if __name__ == "__main__":
    main()
