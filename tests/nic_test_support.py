"""What the NIC tests over fake verbs layers share: handles that log their kind when closed (once), and the
teardown of their proxy services and NICs."""

from __future__ import annotations

import types

from epkern.nic import ProxyError


class LoggedHandles:
    """Mixin of a fake verbs module: ``_handle(kind, close, **attrs)`` makes a handle whose ``close()`` appends
    ``kind`` to ``self.log`` and runs ``close`` the first time only."""

    log: list

    def _handle(self, kind, close=None, **attrs):
        h = types.SimpleNamespace(closed=False, **attrs)

        def _close():
            if not h.closed:
                h.closed = True
                self.log.append(kind)
                if close:
                    close()

        h.close = _close
        return h


def close_services_and_nics(services, nics) -> None:
    """A test's teardown: every proxy service closed (a recorded failure is the test's to assert, not raised
    here), then every NIC."""
    for s in services:
        try:
            s.close()
        except ProxyError:
            pass
    for nic in nics:
        nic.close()
