"""Tests of rollbox_client against a real `rollbox serve`.

The server's URL comes from $ROLLBOX_URL and its token from $ROLLBOX_SERVER_TOKEN. rollbox's
test suite starts a server on a free loopback port and runs this file; by hand::

    ROLLBOX_SERVER_TOKEN=$(openssl rand -hex 16) rollbox serve --listen 127.0.0.1:8080 &
    ROLLBOX_URL=http://127.0.0.1:8080 ROLLBOX_SERVER_TOKEN=... python3 test_rollbox_client.py
"""

import base64
import os
import socket
import sys
import unittest

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

import rollbox_client  # noqa: E402
from rollbox_client import RollboxClient  # noqa: E402


def _client(**kwargs):
    return RollboxClient(os.environ[rollbox_client.URL_ENV], **kwargs)


class SlotApiTest(unittest.TestCase):
    def setUp(self):
        self.client = _client()

    def test_health_and_tools(self):
        health = self.client.health()
        self.assertEqual(health["status"], "ok")
        self.assertEqual(health["api_version"], "v1")
        self.assertIn("python", health["tools"])
        names = [tool["function"]["name"] for tool in self.client.tools()]
        self.assertIn("python", names)

    def test_a_slot_keeps_state_and_is_released_by_its_with_block(self):
        with self.client.slot("client-state") as slot:
            self.assertTrue(slot.python("total = 40")["success"])
            result = slot.python("total += 2\ntotal")
            self.assertTrue(result["success"], result)
            self.assertEqual(result["cell"]["result"]["text/plain"], "42")
            written = slot.execute("write_file", {"path": "notes.txt", "content": "hello"})
            self.assertTrue(written["success"], written)
            self.assertEqual(slot.python("open('notes.txt').read()")["output"], "'hello'")
            self.assertIn(slot.id, [s["slot"]["id"] for s in self.client.slots()])
        self.assertNotIn(slot.id, [s["slot"]["id"] for s in self.client.slots()])

    def test_a_fork_starts_in_its_parents_state_and_then_goes_its_own_way(self):
        with self.client.slot("client-fork-parent") as parent:
            self.assertTrue(parent.python("total = 40\nopen('f.txt', 'w').write('p')")["success"])
            with parent.fork("client-fork-child") as child:
                self.assertNotEqual(child.id, parent.id)
                seen = child.python("total, open('f.txt').read()")
                self.assertEqual(seen["cell"]["result"]["text/plain"], "(40, 'p')", seen)
                self.assertTrue(child.python("total = 1\nopen('f.txt', 'w').write('c')")["success"])
                kept = parent.python("total, open('f.txt').read()")
                self.assertEqual(kept["cell"]["result"]["text/plain"], "(40, 'p')", kept)
            self.assertTrue(parent.python("handle = open('g.txt', 'w')")["success"])
            with self.assertRaises(rollbox_client.ForkRefused) as refused:
                parent.fork("client-fork-refused")
            self.assertIn("close them", refused.exception.message)
        with self.assertRaises(rollbox_client.UnknownSlot):
            self.client.fork(10**9, "client-fork-unknown")

    def test_a_batch_keeps_order_and_failures_stay_in_place(self):
        with self.client.slot("client-a") as a, self.client.slot("client-b") as b:
            results = self.client.execute_batch(
                [
                    (a, {"name": "python", "arguments": {"code": "n = 1"}}),
                    (b, {"name": "python", "arguments": {"code": "1 / 0"}}),
                    (a.id, {"name": "python", "arguments": {"code": "n + 1"}}),
                    (987654, {"name": "python", "arguments": {"code": "1"}}),
                ]
            )
        self.assertEqual(len(results), 4)
        self.assertTrue(results[0]["success"])
        self.assertEqual(results[1]["error"]["kind"], "cell_error")
        self.assertEqual(results[1]["cell"]["error"]["name"], "ZeroDivisionError")
        self.assertEqual(results[2]["output"], "2")
        self.assertEqual(results[3]["error"]["kind"], "unknown_slot")

    def test_a_per_call_timeout_stops_a_cell(self):
        with self.client.slot("client-timeout") as slot:
            result = slot.python("while True:\n    pass", timeout=0.3)
        self.assertFalse(result["success"])
        self.assertEqual(result["metadata"]["limit_hit"], "time")

    def test_request_failures_raise_with_the_servers_error_body(self):
        with self.assertRaises(rollbox_client.UnknownSlot) as caught:
            self.client.release(123456789)
        self.assertEqual(caught.exception.status, 404)
        self.assertEqual(caught.exception.code, "unknown_slot")
        self.assertIn("not live", caught.exception.message)
        with self.assertRaises(rollbox_client.BadRequest) as caught:
            self.client._request("POST", "/v1/execute", {"calls": "not a list"})
        self.assertIn("invalid type", caught.exception.message)


class AuthAndTransportTest(unittest.TestCase):
    def test_a_wrong_token_is_unauthorized(self):
        with self.assertRaises(rollbox_client.Unauthorized) as caught:
            _client(token="wrong-token-0123456789abcdef").health()
        self.assertEqual(caught.exception.status, 401)

    def test_a_missing_token_is_unauthorized(self):
        with self.assertRaises(rollbox_client.Unauthorized):
            _client(token="").health()

    def test_an_unreachable_server_is_a_connection_failure(self):
        with socket.socket() as probe:
            probe.bind(("127.0.0.1", 0))
            port = probe.getsockname()[1]
        with self.assertRaises(rollbox_client.ConnectionFailed) as caught:
            RollboxClient(f"http://127.0.0.1:{port}", timeout=10).health()
        self.assertIn("rollbox serve", str(caught.exception))


class RunCodeTest(unittest.TestCase):
    def setUp(self):
        self.client = _client()

    def test_success_with_stdin(self):
        answer = self.client.run_code("a, b = map(int, input().split())\nprint(a + b)", stdin="2 3\n")
        self.assertEqual(answer["status"], "Success", answer)
        self.assertEqual(answer["run_result"]["stdout"], "5\n")
        self.assertEqual(answer["run_result"]["return_code"], 0)

    def test_an_exception_fails_with_its_traceback(self):
        answer = self.client.run_code("raise RuntimeError('boom')")
        self.assertEqual(answer["status"], "Failed", answer)
        self.assertEqual(answer["run_result"]["return_code"], 1)
        self.assertIn("RuntimeError: boom", answer["run_result"]["stderr"])

    def test_a_time_limit(self):
        answer = self.client.run_code("while True:\n    pass", run_timeout=0.3)
        self.assertEqual(answer["status"], "Failed", answer)
        self.assertEqual(answer["run_result"]["status"], "TimeLimitExceeded")

    def test_files_round_trip(self):
        content = base64.b64encode(b"abc").decode()
        answer = self.client.run_code("open('b.txt', 'w').write(open('a.txt').read().upper())", files={"a.txt": content}, fetch_files=["b.txt"])
        self.assertEqual(answer["status"], "Success", answer)
        self.assertEqual(base64.b64decode(answer["files"]["b.txt"]), b"ABC")

    def test_an_unsupported_language_is_a_sandbox_error(self):
        answer = self.client.run_code("fn main() {}", language="rust")
        self.assertEqual(answer["status"], "SandboxError")
        self.assertIn("python", answer["message"])


if __name__ == "__main__":
    if not os.environ.get(rollbox_client.URL_ENV):
        sys.exit(f"set {rollbox_client.URL_ENV} (and {rollbox_client.TOKEN_ENV}) to a running `rollbox serve`")
    unittest.main(verbosity=2)
