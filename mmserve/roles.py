"""A service role built but not yet serving: its gRPC server and its hooks, so one process can run one role or all."""

from __future__ import annotations

import dataclasses
from collections.abc import Awaitable, Callable

from mmserve import rpc


@dataclasses.dataclass
class Role:
    """What a `build_<role>` function returns: `run_<role>_process` serves it alone, aggregated mode all four."""

    service: rpc.Service
    on_stop: Callable[[], Awaitable[None]] | None = None  # after the server stopped: engines, pools, clients
    on_start: Callable[[int], None] | None = None  # once the server is bound, with its port
    is_started: bool = False

    async def start(self) -> int:
        """Binds and starts the server; returns its port."""
        port = await self.service.start()
        self.is_started = True
        if self.on_start is not None:
            self.on_start(port)
        return port

    async def stop(self) -> None:
        """Stops the server if it started (in-flight RPCs get their grace period), then runs on_stop."""
        try:
            if self.is_started:
                self.is_started = False
                await self.service.stop()
        finally:
            if self.on_stop is not None:
                await self.on_stop()

    async def run_until_signalled(self) -> None:
        """Serves this role alone until SIGTERM or SIGINT; on_stop runs even when start-up fails."""
        try:
            await rpc.run_until_signalled(self.service, on_start=self.on_start)
        finally:
            if self.on_stop is not None:
                await self.on_stop()
