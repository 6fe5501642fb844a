#!/usr/bin/python3
"""Stand-in for envd inside isolation-test sandboxes: runs commands on request.

Placed at /opt/pmoves/bin/envd in a test layer above the base template, so the backend starts
it exactly as it starts envd (same argv, env, namespaces, limits). POST /run with JSON
{"argv": [...], "uid": 0, "timeout": 30} answers {"rc", "stdout", "stderr"}.
"""

import http.server
import json
import os
import subprocess
import sys


class Handler(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        self._reply(200, {"pid": os.getpid(), "secret": bool(os.environ.get("ENVD_INIT_SECRET"))})

    def do_POST(self):
        request = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
        uid = request.get("uid", 0)
        try:
            proc = subprocess.run(
                request["argv"],
                capture_output=True,
                timeout=request.get("timeout", 30),
                user=uid,
                group=uid,
                extra_groups=[],
                cwd="/",
            )
            result = {
                "rc": proc.returncode,
                "stdout": proc.stdout.decode(errors="replace"),
                "stderr": proc.stderr.decode(errors="replace"),
            }
        except subprocess.TimeoutExpired:
            result = {"rc": None, "stdout": "", "stderr": "timeout"}
        self._reply(200, result)

    def _reply(self, status, body):
        data = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)

    def log_message(self, *args):
        pass


class Server(http.server.ThreadingHTTPServer):
    def server_bind(self):
        # HTTPServer.server_bind() does a reverse DNS lookup (getfqdn) that hangs without a resolver.
        import socketserver

        socketserver.TCPServer.server_bind(self)


if __name__ == "__main__":
    host = sys.argv[sys.argv.index("--host") + 1]
    port = int(sys.argv[sys.argv.index("--port") + 1])
    Server((host, port), Handler).serve_forever()
