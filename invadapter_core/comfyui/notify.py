"""Telling the user something that matters, where they look: the server log, a toast in the browser (the pack's web
extension listens for ``invadapter.notice``) and, for API clients, the same websocket event."""
from __future__ import annotations

import contextlib
import logging
import sys
import threading

log = logging.getLogger("InvAdapter")
EVENT = "invadapter.notice"
_collected = threading.local()


@contextlib.contextmanager
def collecting():
    """The notices raised inside the block, as a list (a node returns them as its UI text, which API users find in
    /history)."""
    notes: list[str] = []
    outer = getattr(_collected, "notes", None)
    _collected.notes = notes
    try:
        yield notes
    finally:
        _collected.notes = outer


def notify(message: str, level: str = "warning") -> None:
    """Log ``message`` and send it to the connected clients, naming the node that is running (if any)."""
    getattr(log, level)("Inv-Adapter: %s", message)
    notes = getattr(_collected, "notes", None)
    if notes is not None:
        notes.append(message)
    module = sys.modules.get("server")  # loaded only inside a running ComfyUI (not the trainer or in-process tests)
    server = getattr(getattr(module, "PromptServer", None), "instance", None)
    if server is None:
        return
    payload = {"message": message, "level": level, "node": getattr(server, "last_node_id", None),
               "prompt_id": getattr(server, "last_prompt_id", None)}
    try:
        server.send_sync(EVENT, payload, getattr(server, "client_id", None))
    except Exception:  # noqa: BLE001 - a notice must never break the run it describes
        log.debug("Inv-Adapter: could not send the notice to the client", exc_info=True)
