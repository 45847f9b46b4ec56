"""Is the Hugging Face hub reachable? Asked once, before the first download is tried.

On a machine without internet, huggingface_hub retries every request with growing waits: a
pretrained timm model not in the cache failed after about 55 s, a transformers model after 25 s.
When the hub's host does not resolve (and no proxy is configured, which might resolve it for us),
downloads go straight to the local cache instead, so a cached model loads and a missing one fails
with its one-line error at once.
"""
from __future__ import annotations

import functools
import socket
import urllib.request
from contextlib import contextmanager
from typing import Iterator
from urllib.parse import urlparse


@functools.lru_cache(maxsize=None)
def hub_unreachable() -> bool:
    """True when HF_HUB_OFFLINE is set or the hub's host name does not resolve."""
    from huggingface_hub import constants

    if constants.HF_HUB_OFFLINE:
        return True
    url = urlparse(constants.ENDPOINT)
    if url.scheme in urllib.request.getproxies():  # the proxy resolves names, not this machine
        return False
    try:
        socket.getaddrinfo(url.hostname, url.port or 443)
    except OSError:
        return True
    return False


@contextmanager
def cache_only_when_unreachable() -> Iterator[None]:
    """huggingface_hub in offline mode (local cache only) inside the block when the hub is unreachable."""
    from huggingface_hub import constants

    saved = constants.HF_HUB_OFFLINE
    constants.HF_HUB_OFFLINE = saved or hub_unreachable()
    try:
        yield
    finally:
        constants.HF_HUB_OFFLINE = saved
