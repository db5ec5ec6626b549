"""A minifastv server in a subprocess on a free loopback port, and raw HTTP to it, for the serving tests."""

from __future__ import annotations

import base64
import http.client
import json
import socket
import subprocess
import sys
import time

from minifastv.data import SAMPLES

SAMPLE = json.loads((SAMPLES / "questions.json").read_text())


def data_url(path) -> str:
    return "data:image/png;base64," + base64.b64encode(path.read_bytes()).decode()


def image_message(path, question: str) -> dict:
    return {"role": "user", "content": [{"type": "image_url", "image_url": {"url": data_url(path)}},
                                        {"type": "text", "text": question}]}


class Server:
    """`python -m minifastv serve` on the shipped tiny model (float32, one thread) with the given options."""

    def __init__(self, *options: str):
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self.proc = subprocess.Popen([sys.executable, "-m", "minifastv", "serve", "--dtype", "float32", "--threads",
                                      "1", "--port", str(self.port), *options],
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 90
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited ({self.proc.returncode}): {self.proc.stderr.read()}")
            try:
                if self.request("GET", "/health")[0] == 200:
                    return
            except OSError:
                time.sleep(0.2)
        self.stop()
        raise RuntimeError("the server did not answer /health within 90 s")

    def request(self, method: str, path: str, body=None, headers=None, timeout: float = 60):
        """(status, headers, parsed JSON or raw text) of one request; `body` as bytes is sent as it is."""
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            data = body if isinstance(body, (bytes, type(None))) else json.dumps(body).encode()
            conn.request(method, path, body=data, headers={"Content-Type": "application/json", **(headers or {})})
            reply = conn.getresponse()
            raw = reply.read().decode()
            try:
                parsed = json.loads(raw)
            except json.JSONDecodeError:
                parsed = raw
            return reply.status, reply.headers, parsed  # headers: case-insensitive
        finally:
            conn.close()

    def health(self) -> dict:
        return self.request("GET", "/health")[2]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            pipe.close()
        return self.proc.returncode
