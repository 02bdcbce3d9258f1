"""A real OpenAI-compatible chat-completions server on loopback, for testing the judge with the
real `openai` client. Replies with top_logprobs chosen by a function of the prompt, and can fail
the first requests with given HTTP statuses (429, 500, ...)."""

import json
import math
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class FakeOpenAIServer:
    def __init__(self, top_logprobs_for):
        """top_logprobs_for(prompt) -> {token: probability}."""
        self.top_logprobs_for = top_logprobs_for
        self.failures = []  # HTTP statuses to answer with, one per request, before answering normally
        self.requests = []
        self.on_request = None  # called with the request count as each request arrives (e.g. to kill a client)
        self.lock = threading.Lock()
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):
                pass

            def do_POST(self):
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with server.lock:
                    server.requests.append(body)
                    status = server.failures.pop(0) if server.failures else 200
                    count = len(server.requests)
                if server.on_request is not None:
                    server.on_request(count)
                if status != 200:
                    payload = {"error": {"message": f"simulated {status}", "type": "server_error", "code": status}}
                    return self._reply(status, payload)
                if not body.get("logprobs") or body.get("top_logprobs") != 20 or body.get("max_tokens") != 1:
                    return self._reply(400, {"error": {"message": "the judge must ask for logprobs, top_logprobs=20, max_tokens=1"}})
                prompt = body["messages"][-1]["content"]
                top = [{"token": t, "logprob": math.log(p), "bytes": None} for t, p in server.top_logprobs_for(prompt).items()]
                choice = {"index": 0, "finish_reason": "length", "message": {"role": "assistant", "content": top[0]["token"]},
                          "logprobs": {"content": [{**top[0], "top_logprobs": top}]}}
                self._reply(200, {"id": "chatcmpl-test", "object": "chat.completion", "created": 0, "model": body["model"],
                                  "choices": [choice], "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}})

            def _reply(self, status, payload):
                data = json.dumps(payload).encode()
                self.send_response(status)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(data)))
                if status == 429:
                    self.send_header("Retry-After", "0")
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/v1"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)

    def __enter__(self):
        self.thread.start()
        return self

    def __exit__(self, *exc_info):
        self.httpd.shutdown()
        self.httpd.server_close()
