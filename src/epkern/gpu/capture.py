"""Whether a stream is being captured into a CUDA graph (one place for every caller)."""


def capturing(stream) -> bool:
    """Whether ``stream`` is being captured into a CUDA graph."""
    is_capturing = getattr(stream, "is_capturing", None)
    try:
        return bool(is_capturing()) if is_capturing is not None else False
    except Exception:  # noqa: BLE001 - an invalidated capture reports through CuPy later
        return False
