"""A verl tool backed by rollbox slots: each trajectory gets its own persistent Python
interpreter and workspace, so the model's cells build on each other like a Jupyter notebook.

verl calls ``create`` when a trajectory starts, ``execute`` for each of the model's tool
calls, and ``release`` when the trajectory ends. Register it with
``notebook_tool_config.yaml``. Written against verl's recent ``BaseTool``, whose ``create``
returns ``(instance_id, ToolResponse)`` (older releases return only the instance id).
"""

import asyncio
from typing import Any, Dict, Optional, Tuple
from uuid import uuid4

from rollbox_client import RollboxClient, RollboxError, Slot
from verl.tools.base_tool import BaseTool
from verl.tools.schemas import OpenAIFunctionToolSchema, ToolResponse


class RollboxNotebookTool(BaseTool):
    """One rollbox slot per trajectory; the tool's ``code`` argument runs as a cell in it."""

    def __init__(self, config: Dict[str, Any], tool_schema: OpenAIFunctionToolSchema):
        super().__init__(config, tool_schema)
        self.client = RollboxClient(config.get("url"), config.get("token"))
        self.cell_timeout: Optional[float] = config.get("cell_timeout")
        self._slots: Dict[str, Slot] = {}

    async def create(self, instance_id: Optional[str] = None, **kwargs: Any) -> Tuple[str, ToolResponse]:
        instance_id = instance_id or str(uuid4())
        # The client blocks on HTTP; keep it off verl's event loop.
        self._slots[instance_id] = await asyncio.to_thread(self.client.acquire, instance_id)
        return instance_id, ToolResponse()

    async def execute(self, instance_id: str, parameters: Dict[str, Any], **kwargs: Any) -> Tuple[ToolResponse, float, Dict[str, Any]]:
        code = parameters.get("code", "")
        if not isinstance(code, str):
            code = str(code)
        slot = self._slots[instance_id]
        try:
            result = await asyncio.to_thread(slot.python, code, self.cell_timeout)
        except RollboxError as error:
            # The request failed as a whole (server unreachable, saturated): tell the model
            # plainly instead of crashing the rollout.
            return ToolResponse(text=f"[the sandbox is unavailable: {error}]"), 0.0, {"sandbox_error": 1.0}
        metrics = {"success": float(result["success"]), "duration_ms": result["metadata"]["duration_us"] / 1000.0}
        return ToolResponse(text=result["output"]), 0.0, metrics

    async def release(self, instance_id: str, **kwargs: Any) -> None:
        slot = self._slots.pop(instance_id, None)
        if slot is None:
            return
        try:
            await asyncio.to_thread(slot.release)
        except RollboxError:
            pass  # already expired, or the server is gone: the server's idle expiry frees it
