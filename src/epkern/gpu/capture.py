"""Whether a stream is being captured into a CUDA graph (one place for every caller), and what a captured call
holds."""


def capturing(stream) -> bool:
    """Whether ``stream`` is being captured into a CUDA graph."""
    is_capturing = getattr(stream, "is_capturing", None)
    try:
        return bool(is_capturing()) if is_capturing is not None else False
    except Exception:  # noqa: BLE001 - an invalidated capture reports through CuPy later
        return False


class held_only_if_captured:  # noqa: N801 - used as a context manager, like contextlib's
    """An HT call: the memory it holds for a graph (``rt.graph_held``, appended to only while capturing) stays held
    only if the call got through; one refused part-way (a kernel's first use inside a capture, a bad argument found
    late) gives back what it took, which would otherwise stay allocated for the Buffer's life. (A class: a
    generator-based context manager cost ~3 µs per call.)"""

    __slots__ = ("held", "rt")

    def __init__(self, rt):
        self.rt = rt

    def __enter__(self):
        self.held = len(self.rt.graph_held)

    def __exit__(self, exc_type, *exc):
        if exc_type is not None:
            del self.rt.graph_held[self.held :]
        return False
