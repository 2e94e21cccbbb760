"""Telling the user something that matters, where they look: the server log, a toast in the browser (the pack's web
extension listens for ``invadapter.notice``) and, for API clients, the same websocket event."""
from __future__ import annotations

import logging
import sys

log = logging.getLogger("InvAdapter")
EVENT = "invadapter.notice"


def notify(message: str, level: str = "warning") -> None:
    """Log ``message`` and send it to the connected clients, naming the node that is running (if any)."""
    getattr(log, level)("Inv-Adapter: %s", message)
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
