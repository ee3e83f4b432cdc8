"""Kept for callers of the old location: llama.cpp RPC lives in edgellm.runtimes.rpc (ctypes, beside the
llama.cpp backend) and the worker's systemd unit in edgellm.deploy.units."""
from __future__ import annotations

from .deploy.units import worker_unit
from .runtimes.rpc import DEFAULT_PORT, parse_endpoints, rpc_devices, serve_worker

__all__ = ["DEFAULT_PORT", "parse_endpoints", "rpc_devices", "serve_worker", "worker_unit"]
