"""The servers the server tests share (shared_servers.py)."""

from shared_servers import checkpoint_with_top_k, hippo_server, plain_server  # noqa: F401
