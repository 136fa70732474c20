"""The HTTP surfaces of ``voxloop serve``: the REST API (:mod:`~runtime.server.app`), the
Voice Agent WebSocket (:mod:`~runtime.server.realtime`), the HTTP/1.1 guard and access
logs. Sessions run in :mod:`runtime.sessions`; agents live in :mod:`runtime.agents`."""
