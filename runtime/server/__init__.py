"""The agent service: stored agents, encrypted secrets, tokens (REST and realtime adapters)."""
