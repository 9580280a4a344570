"""The low-latency engine (engine.py) and its calls."""
