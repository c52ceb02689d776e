"""JSON-RPC message checks pygls leaves out: every request gets exactly one clear answer.

pygls structures a message inside `json.loads`; when that fails (a negative position, a
missing `context`, params given as an array) it logs a traceback and the request is never
answered. It also answers nothing after `shutdown`, lets any request through before
`initialize`, accepts a second `initialize`, and puts Python tracebacks (with the server's
file paths) into error responses. MaskfillProtocol reads each framed body itself:

- not JSON: ParseError; not a JSON-RPC object, or an id that is neither a string nor an
  integer: InvalidRequest (id null);
- before `initialize`: requests get ServerNotInitialized, notifications are dropped (`exit`
  aside); a second `initialize` and any request after `shutdown` get InvalidRequest;
- params that do not fit the method's type: InvalidParams, naming the method;
- error responses never carry a traceback (it goes to the log).
"""

from __future__ import annotations

import json
import logging
import time
from concurrent.futures import Future
from typing import Any

import cattrs
from lsprotocol import types
from pygls.exceptions import (
    JsonRpcException,
    JsonRpcInvalidParams,
    JsonRpcInvalidRequest,
    JsonRpcParseError,
    JsonRpcRequestCancelled,
    JsonRpcServerNotInitialized,
)
from pygls.protocol import LanguageServerProtocol, lsp_method
from pygls.protocol.json_rpc import (
    JsonRPCNotification,
    JsonRPCRequestMessage,
    JsonRPCResponseMessage,
)

from lsp_server import request_timing

log = logging.getLogger(__name__)

_MISSING = object()


def _why(exc: Exception) -> str:
    """One line naming the fields that did not fit ("... @ $.params.position")."""
    try:
        reasons = cattrs.transform_error(exc)
    except Exception:  # not a cattrs validation error
        reasons = [str(exc)]
    text = "; ".join(" ".join(reason.split()) for reason in reasons)
    return text if len(text) <= 300 else text[:299] + "…"


def peek(body: bytes) -> tuple[str | None, Any]:
    """(method, id) of a message body, without dispatching it; (None, None) if unreadable."""
    try:
        data = json.loads(body)
    except ValueError:
        return None, None
    if not isinstance(data, dict):
        return None, None
    method, msg_id = data.get("method"), data.get("id")
    return (method if isinstance(method, str) else None), (msg_id if _valid_id(msg_id) else None)


def error_frame(msg_id: Any, code: int, message: str) -> bytes:
    """A framed error response, for a connection that has no protocol object of its own."""
    body = json.dumps({"jsonrpc": "2.0", "id": msg_id, "error": {"code": code, "message": message}})
    return f"Content-Length: {len(body)}\r\n\r\n{body}".encode()


def _param(data: dict, key: str) -> Any:
    params = data.get("params")
    return params.get(key) if isinstance(params, dict) else None


def _valid_id(value: Any) -> bool:
    return isinstance(value, str) or (isinstance(value, int) and not isinstance(value, bool))


class MaskfillProtocol(LanguageServerProtocol):
    """pygls' LSP protocol, fed whole message bodies by lsp_server.transport."""

    def __init__(self, server, converter):
        super().__init__(server, converter)
        self.initialize_received = False  # set once a well-formed `initialize` is dispatched
        self.exit_received = False
        self.timings = request_timing.RequestTimings()  # completion requests, for the status

    # -- reading ------------------------------------------------------------------------------

    def receive(self, body: bytes) -> None:
        """Check one message body and dispatch it, or answer why it cannot be."""
        received = (time.perf_counter(), time.thread_time())
        try:
            data = json.loads(body)
        except ValueError as exc:  # also invalid UTF-8
            log.warning("dropped a message that is not JSON (%s)", exc)
            self._answer_error(None, JsonRpcParseError("Parse error: the message is not JSON"))
            return
        if not isinstance(data, dict) or data.get("jsonrpc") != "2.0":
            log.warning("dropped a message that is not a JSON-RPC 2.0 object")
            self._answer_error(None, JsonRpcInvalidRequest("Invalid Request: not JSON-RPC 2.0"))
            return
        msg_id = data.get("id", _MISSING)
        if msg_id is not _MISSING and not _valid_id(msg_id):
            log.warning("dropped a message whose id is %s", type(msg_id).__name__)
            self._answer_error(
                None, JsonRpcInvalidRequest("Invalid Request: id must be a string or an integer")
            )
            return
        method = data.get("method", _MISSING)
        if method is _MISSING:  # the client's answer to one of our requests
            self._dispatch(data, None)
            return
        request_id = None if msg_id is _MISSING else msg_id
        if not isinstance(method, str):
            self._refuse(request_id, JsonRpcInvalidRequest("Invalid Request: method not a string"))
            return
        refusal = self._lifecycle_refusal(method)
        if refusal is not None:
            self._refuse(request_id, refusal)
            return
        if method == types.CANCEL_REQUEST and not _valid_id(_param(data, "id")):
            log.info("dropped $/cancelRequest for an impossible id")  # pygls would crash on it
            return
        self._dispatch(data, request_id, received)

    def _lifecycle_refusal(self, method: str) -> JsonRpcException | None:
        if method == types.EXIT:
            return None
        if not self.initialize_received:
            if method == types.INITIALIZE:
                return None
            return JsonRpcServerNotInitialized(f"maskfill: {method} before initialize")
        if method == types.INITIALIZE:
            return JsonRpcInvalidRequest("maskfill: the server is already initialized")
        if self._shutdown:
            return JsonRpcInvalidRequest(f"maskfill: {method} after shutdown")
        return None

    def _refuse(self, request_id: Any, error: JsonRpcException) -> None:
        if request_id is None:  # a notification cannot be answered
            log.debug("dropped notification: %s", error.message)
        else:
            self._answer_error(request_id, error)

    def _dispatch(
        self, data: dict, request_id: Any, received: tuple[float, float] | None = None
    ) -> None:
        method = data.get("method")
        try:
            message = self._structure(data)
        except Exception as exc:
            reason = _why(exc)
            if request_id is not None:
                log.warning("invalid params for %s: %s", method, reason)
                self._answer_error(
                    request_id, JsonRpcInvalidParams(f"Invalid params for {method}: {reason}")
                )
            else:
                log.warning("dropped %s with invalid params: %s", method or "a response", reason)
            return
        if method == types.INITIALIZE:
            self.initialize_received = True
        if received is None or request_id is None or method not in request_timing.TIMED_METHODS:
            self.handle_message(message)
            return
        # The handler's task is created inside handle_message: it keeps this timing.
        token = request_timing.current.set(self.timings.begin(request_id, method, *received))
        try:
            self.handle_message(message)
        finally:
            request_timing.current.reset(token)

    def _structure(self, data: dict) -> Any:
        """pygls' structure_message without its traceback logging."""
        if "method" not in data:
            if "error" in data:
                return self._converter.structure(data, types.ResponseErrorMessage)
            result_type = self._result_types.pop(data.get("id"), None) or JsonRPCResponseMessage
            return self._converter.structure(data, result_type)
        if "id" in data:
            request_type = self.get_message_type(data["method"]) or JsonRPCRequestMessage
            return self._converter.structure(data, request_type)
        notification_type = self.get_message_type(data["method"]) or JsonRPCNotification
        return self._converter.structure(data, notification_type)

    # -- writing ------------------------------------------------------------------------------

    def _answer_error(self, msg_id: Any, error: JsonRpcException) -> None:
        # A plain dict: lsprotocol's converter would leave out `"id": null`, which JSON-RPC
        # requires when the id could not be read.
        self._send_data({"jsonrpc": self.VERSION, "id": msg_id,
                         "error": {"code": error.code, "message": error.message}})

    def _send_handler_result(self, future: Future[Any], *, msg_id: Any) -> None:
        """pygls' version, except for the log: a client's bad request (a JsonRpcException:
        unknown command, invalid arguments) is one line; only a failure of ours, which
        answers InternalError, has its traceback logged."""
        self._request_futures.pop(msg_id, None)
        try:
            self._answer_handler_result(future, msg_id)
        finally:
            self.timings.end(msg_id)  # the response is written

    def _answer_handler_result(self, future: Future[Any], msg_id: Any) -> None:
        if future.cancelled():
            error = JsonRpcRequestCancelled(f'Request with id "{msg_id}" is canceled')
            self._send_response(msg_id, error=error.to_response_error())
            return
        exc = future.exception()
        if exc is None:
            self._send_response(msg_id, result=future.result())
        elif isinstance(exc, JsonRpcException):
            log.warning("request %s refused: %s", msg_id, exc.message)
            self._send_response(msg_id, error=types.ResponseError(exc.code, exc.message))
        else:
            log.error("request %s failed", msg_id, exc_info=exc)
            message = f"maskfill: internal error ({type(exc).__name__}); see the server log"
            self._send_response(msg_id, error=types.ResponseError(-32603, message))

    def _send_response(self, msg_id, result=None, error=None):
        """Send a response; an error's data (pygls puts a traceback there) stays in the log."""
        if error is not None and error.data is not None:
            log.debug("error data kept out of the response to %s: %s", msg_id, error.data)
            error = types.ResponseError(code=error.code, message=error.message)
        super()._send_response(msg_id, result, error)

    # -- lifecycle ------------------------------------------------------------------------------

    @lsp_method(types.EXIT)
    def lsp_exit(self, *args: Any) -> None:
        """Stop serving; __main__ frees the model and ends the process (no SystemExit raised
        inside a handler, which made asyncio cancel tasks that then wrote to a closed pipe)."""
        self.exit_received = True
        self._server.stop_serving("exit")
