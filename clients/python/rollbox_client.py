"""A small client for rollbox's slot server (`rollbox serve`).

One file, standard library only, Python 3.9 or later: copy it next to your code. It gives
Python RL frameworks (verl, atropos, hermes-agent) stateful slots, tools and SandboxFusion's
``/run_code``::

    from rollbox_client import RollboxClient

    client = RollboxClient("http://127.0.0.1:8080")      # or $ROLLBOX_URL
    with client.slot("trajectory-7") as slot:
        slot.python("x = 40")
        print(slot.python("x + 2")["output"])              # 42
    print(client.run_code("print(input())", stdin="hi")["run_result"]["stdout"])

Results are the server's JSON as plain dicts: an execution result has ``success``, ``output``,
``error`` (``{"kind", "message"}`` when it failed), ``cell`` (stdout, stderr, result, error) and
``metadata``. A call that fails inside a slot is a failed result, never an exception; an
exception means the request as a whole failed, and carries the server's error body.
"""

import json
import os
import socket
import urllib.error
import urllib.request
from typing import Any, Dict, Iterable, List, Optional, Sequence, Tuple, Union

__all__ = [
    "RollboxClient",
    "Slot",
    "RollboxError",
    "ConnectionFailed",
    "ApiError",
    "BadRequest",
    "Unauthorized",
    "UnknownSlot",
    "NotFound",
    "PayloadTooLarge",
    "Unavailable",
    "ServerTimeout",
    "ServerFailed",
]

API_VERSION = "v1"
URL_ENV = "ROLLBOX_URL"
TOKEN_ENV = "ROLLBOX_SERVER_TOKEN"
DEFAULT_URL = "http://127.0.0.1:8080"
# Longer than the server's default request timeout (300 s), so the server's 504 arrives first.
DEFAULT_TIMEOUT = 330.0


class RollboxError(Exception):
    """Any failure of a request to the server."""


class ConnectionFailed(RollboxError):
    """The server could not be reached, or did not answer in time."""


class ApiError(RollboxError):
    """The server answered with an error body: ``status``, ``code``, ``message``, ``body``."""

    def __init__(self, status: int, code: str, message: str, body: Any = None):
        super().__init__(f"{status} {code}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.body = body


class BadRequest(ApiError):
    """400: the body is not valid JSON of the route's shape."""


class Unauthorized(ApiError):
    """401: the bearer token is missing or wrong."""


class UnknownSlot(ApiError):
    """404: the slot is not live on the server (never acquired, released, or expired)."""


class NotFound(ApiError):
    """404: no such route (is the URL the server's root?)."""


class PayloadTooLarge(ApiError):
    """413: the body is over the server's size limit."""


class Unavailable(ApiError):
    """503: every slot is in use, or the server is busy or shutting down; retry later."""


class ServerTimeout(ApiError):
    """504: the request ran past the server's per-request timeout."""


class ServerFailed(ApiError):
    """500: the server failed; the details are in its log."""


class ForkRefused(ApiError):
    """409: the slot cannot be forked as it is (it holds files open); the message says why."""


class Unsupported(ApiError):
    """501: the server's backend cannot do this (a fork on the process backend)."""


_ERRORS_BY_CODE = {
    "bad_request": BadRequest,
    "unauthorized": Unauthorized,
    "unknown_slot": UnknownSlot,
    "not_found": NotFound,
    "payload_too_large": PayloadTooLarge,
    "unavailable": Unavailable,
    "timeout": ServerTimeout,
    "internal": ServerFailed,
    "fork_refused": ForkRefused,
    "unsupported": Unsupported,
}


class Slot:
    """A live slot on the server: a persistent Python interpreter and a workspace.

    Use it as a context manager to release it (with its workspace) on the way out.
    """

    def __init__(self, client: "RollboxClient", info: Dict[str, Any]):
        self.client = client
        self.info = info
        self.id: int = info["id"]
        self.trajectory_id: str = info.get("trajectory_id", "")
        self.released = False

    def execute(self, name: str, arguments: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Runs one tool call in this slot and returns its result."""
        return self.client.execute(self, name, arguments, timeout)

    def python(self, code: str, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Runs ``code`` as a notebook cell in this slot's interpreter."""
        return self.execute("python", {"code": code}, timeout)

    def fork(self, trajectory_id: str) -> "Slot":
        """A new slot in this slot's state (variables, modules, files), independent from then on."""
        return self.client.fork(self, trajectory_id)

    def release(self, reset_workspace: bool = True) -> None:
        """Ends the slot; with ``reset_workspace`` its workspace is deleted too."""
        if not self.released:
            self.client.release(self, reset_workspace)
            self.released = True

    def __enter__(self) -> "Slot":
        return self

    def __exit__(self, *exc: Any) -> None:
        try:
            self.release()
        except UnknownSlot:
            pass  # already gone (expired): nothing left to release

    def __repr__(self) -> str:
        return f"Slot(id={self.id}, trajectory_id={self.trajectory_id!r})"


SlotRef = Union[Slot, int]


def _slot_id(slot: SlotRef) -> int:
    return slot.id if isinstance(slot, Slot) else int(slot)


def _call(name: str, arguments: Optional[Dict[str, Any]], timeout: Optional[float]) -> Dict[str, Any]:
    call: Dict[str, Any] = {"name": name, "arguments": arguments or {}}
    if timeout is not None:
        call["timeout"] = timeout
    return call


class RollboxClient:
    """A client for one ``rollbox serve``.

    ``url`` defaults to ``$ROLLBOX_URL`` (else ``http://127.0.0.1:8080``) and ``token`` to
    ``$ROLLBOX_SERVER_TOKEN``; ``timeout`` is the seconds one HTTP request may take. The client
    keeps no connection open and is safe to share between threads.
    """

    def __init__(self, url: Optional[str] = None, token: Optional[str] = None, timeout: float = DEFAULT_TIMEOUT):
        self.url = (url or os.environ.get(URL_ENV) or DEFAULT_URL).rstrip("/")
        self.token = token if token is not None else os.environ.get(TOKEN_ENV)
        self.timeout = timeout

    # -- the slot API -------------------------------------------------------------------

    def health(self) -> Dict[str, Any]:
        """``status``, ``api_version``, ``backend``, ``tools``, ``live_slots``, ``max_slots``."""
        return self._request("GET", f"/{API_VERSION}/health")

    def tools(self) -> List[Dict[str, Any]]:
        """The server's tools as OpenAI function-calling schemas."""
        return self._request("GET", f"/{API_VERSION}/tools")

    def acquire(self, trajectory_id: str) -> Slot:
        """Starts a slot: a fresh interpreter and an empty workspace."""
        answer = self._request("POST", f"/{API_VERSION}/slots", {"trajectory_id": trajectory_id})
        return Slot(self, answer["slot"])

    def fork(self, slot: SlotRef, trajectory_id: str) -> Slot:
        """A new slot on the same server in ``slot``'s state: its interpreter's variables and
        modules and a copy of its workspace and ``/tmp``. The two are independent from then
        on. Raises :class:`ForkRefused` when the slot holds files open, and
        :class:`Unsupported` on a backend that cannot fork (``process``)."""
        answer = self._request("POST", f"/{API_VERSION}/slots/{_slot_id(slot)}/fork", {"trajectory_id": trajectory_id})
        return Slot(self, answer["slot"])

    def slots(self) -> List[Dict[str, Any]]:
        """The live slots, oldest first, each with ``slot``, ``idle_secs`` and ``busy``."""
        return self._request("GET", f"/{API_VERSION}/slots")["slots"]

    def execute_batch(self, calls: Iterable[Tuple[SlotRef, Dict[str, Any]]]) -> List[Dict[str, Any]]:
        """Runs ``(slot, call)`` pairs, where a call is ``{"name", "arguments"[, "timeout"]}``.

        Calls of different slots run in parallel, calls of one slot in order; the answer has
        one result per call, in the same order.
        """
        body = {"calls": [{"slot_id": _slot_id(slot), "call": call} for slot, call in calls]}
        return self._request("POST", f"/{API_VERSION}/execute", body)["results"]

    def execute(self, slot: SlotRef, name: str, arguments: Optional[Dict[str, Any]] = None, timeout: Optional[float] = None) -> Dict[str, Any]:
        """Runs one tool call in ``slot``; ``timeout`` (seconds) can only shorten the server's limit."""
        return self.execute_batch([(slot, _call(name, arguments, timeout))])[0]

    def release(self, slot: SlotRef, reset_workspace: bool = True) -> None:
        """Ends ``slot``. Raises :class:`UnknownSlot` if the server does not hold it."""
        self._request("POST", f"/{API_VERSION}/slots/{_slot_id(slot)}/release", {"reset_workspace": reset_workspace})

    def slot(self, trajectory_id: str) -> Slot:
        """A new slot to use in a ``with`` block, released (workspace included) at its end."""
        return self.acquire(trajectory_id)

    # -- SandboxFusion ------------------------------------------------------------------

    def run_code(
        self,
        code: str,
        language: str = "python",
        stdin: Optional[str] = None,
        run_timeout: float = 10.0,
        files: Optional[Dict[str, str]] = None,
        fetch_files: Sequence[str] = (),
    ) -> Dict[str, Any]:
        """Runs a program in a fresh slot, in SandboxFusion's ``/run_code`` shapes.

        ``files`` maps relative paths to base64 content. The answer's ``status`` is
        ``Success``, ``Failed`` or ``SandboxError``; ``run_result`` has ``status``
        (``Finished``, ``TimeLimitExceeded``, ``Error``), ``execution_time``, ``return_code``,
        ``stdout`` and ``stderr``.
        """
        body = {"code": code, "language": language, "stdin": stdin, "run_timeout": run_timeout, "files": files or {}, "fetch_files": list(fetch_files)}
        return self._request("POST", "/run_code", body)

    # -- transport ----------------------------------------------------------------------

    def _request(self, method: str, path: str, body: Any = None) -> Any:
        data = None if body is None else json.dumps(body).encode("utf-8")
        request = urllib.request.Request(self.url + path, data=data, method=method)
        request.add_header("Accept", "application/json")
        if data is not None:
            request.add_header("Content-Type", "application/json")
        if self.token:
            request.add_header("Authorization", f"Bearer {self.token}")
        try:
            with urllib.request.urlopen(request, timeout=self.timeout) as response:
                return json.loads(response.read().decode("utf-8"))
        except urllib.error.HTTPError as error:
            raise _api_error(error) from None
        except (urllib.error.URLError, socket.timeout, ConnectionError) as error:
            reason = getattr(error, "reason", error)
            raise ConnectionFailed(f"failed to reach the rollbox server at {self.url}: {reason}; is `rollbox serve` running there?") from error


def _api_error(error: urllib.error.HTTPError) -> ApiError:
    raw = error.read()
    try:
        body = json.loads(raw.decode("utf-8"))
        code, message = body["error"]["code"], body["error"]["message"]
    except (ValueError, KeyError, TypeError):
        text = raw.decode("utf-8", "replace").strip()
        return ApiError(error.code, f"http_{error.code}", text or str(error.reason), raw)
    return _ERRORS_BY_CODE.get(code, ApiError)(error.code, code, message, body)
