#!/usr/bin/env python3
"""Demo origin for `envoy/run`: a few paths with different caching headers.

Python standard library only. Listens on 127.0.0.1 (loopback only) and logs each request,
so you can watch which requests the edge-filter cache answers itself (they never show
up here).

  /            200, no-store        answers the filter's upstream health check
  /hello       200, max-age=30      a cacheable page
  /time        200, max-age=5       the time it was generated: watch it stay fixed for 5 s
  /lang        200, max-age=60      Vary: Accept-Language (one entry per language)
  /private     200, no-store        never stored
  /big         200, max-age=60      2 MiB, over the default 1 MiB max_entry_bytes
  anything else 404, max-age=10     negative caching
"""

import argparse
import datetime
import http.server
import sys


def page(path, headers):
    """Returns (status, headers, body) for a request path."""
    if path == "/":
        return 200, {"Cache-Control": "no-store"}, b"ok\n"
    if path == "/hello":
        return 200, {"Cache-Control": "max-age=30"}, b"hello from the demo origin\n"
    if path == "/time":
        now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="milliseconds")
        return 200, {"Cache-Control": "max-age=5"}, f"generated at {now}\n".encode()
    if path == "/lang":
        lang = (headers.get("Accept-Language") or "en").split(",")[0].strip().lower()
        greeting = {"fr": "bonjour", "de": "hallo", "es": "hola"}.get(lang[:2], "hello")
        return (
            200,
            {"Cache-Control": "max-age=60", "Vary": "Accept-Language"},
            f"{greeting} ({lang})\n".encode(),
        )
    if path == "/private":
        return 200, {"Cache-Control": "no-store"}, b"not for caches\n"
    if path == "/big":
        return 200, {"Cache-Control": "max-age=60"}, b"x" * (2 * 1024 * 1024)
    return 404, {"Cache-Control": "max-age=10"}, b"not found\n"


class Handler(http.server.BaseHTTPRequestHandler):
    # HTTP/1.1 so Envoy can keep connections to the origin alive.
    protocol_version = "HTTP/1.1"
    server_version = "demo-origin/1"

    def respond(self, send_body):
        status, headers, body = page(self.path.split("?")[0], self.headers)
        self.send_response(status)
        self.send_header("Content-Type", "text/plain; charset=utf-8")
        self.send_header("Content-Length", str(len(body)))
        for name, value in headers.items():
            self.send_header(name, value)
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def do_GET(self):
        self.respond(send_body=True)

    def do_HEAD(self):
        self.respond(send_body=False)

    def do_POST(self):
        length = int(self.headers.get("Content-Length") or 0)
        self.rfile.read(length)
        self.respond(send_body=True)

    def log_message(self, fmt, *args):
        sys.stderr.write("origin: %s\n" % (fmt % args))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=8080)
    args = parser.parse_args()
    server = http.server.ThreadingHTTPServer(("127.0.0.1", args.port), Handler)
    server.daemon_threads = True
    sys.stderr.write(f"origin: listening on http://127.0.0.1:{args.port}\n")
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.server_close()


if __name__ == "__main__":
    main()
