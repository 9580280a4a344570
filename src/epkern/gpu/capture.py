"""Whether a stream is being captured into a CUDA graph (one place for every caller), and what a captured call
holds."""

import contextlib


def capturing(stream) -> bool:
    """Whether ``stream`` is being captured into a CUDA graph."""
    is_capturing = getattr(stream, "is_capturing", None)
    try:
        return bool(is_capturing()) if is_capturing is not None else False
    except Exception:  # noqa: BLE001 - an invalidated capture reports through CuPy later
        return False


@contextlib.contextmanager
def held_only_if_captured(rt):
    """An HT call: the memory it holds for a graph (``rt.graph_held``, appended to only while capturing) stays held
    only if the call got through; one refused part-way (a kernel's first use inside a capture, a bad argument found
    late) gives back what it took, which would otherwise stay allocated for the Buffer's life."""
    held = len(rt.graph_held)
    try:
        yield
    except BaseException:
        del rt.graph_held[held:]
        raise
