"""Standard-verbs posting on the CPU: ``post_send`` / ``poll_cq`` call through a context's ops table, so a context
made here whose ``ops.post_send`` / ``ops.poll_cq`` are cffi callbacks shows exactly what the bindings hand a
provider (the chained work requests, field by field) and how they read its answers. The real provider run is
tests/softroce_proxy_check.py (soft-RoCE in a QEMU guest)."""

from __future__ import annotations

import errno

import pytest

from epkern import _verbs_cffi as V
from epkern._verbs_cffi._cdef import CONSTANTS as C
from epkern.errors import ArgumentError


class FakeProvider:
    """An ``ibv_context`` whose ops table points at Python: records every posted chain, answers polls from a list."""

    def __init__(self, qp_num=0x11, max_inline_data=64):
        ffi = self.ffi = V.get_ffi()
        self.ctx = ffi.new("struct ibv_context *")
        self.qp_struct = ffi.new("struct ibv_qp *", {"context": self.ctx, "qp_num": qp_num})
        self.cq_struct = ffi.new("struct ibv_cq *", {"context": self.ctx, "cqe": 32})
        self.posted: list[list[dict]] = []
        self.refuse_at: tuple[int, int] | None = None  # (index, errno) of the request the provider refuses
        self.completions: list[dict] = []
        self.poll_rc: int | None = None
        self._post = ffi.callback("int(struct ibv_qp *, struct ibv_send_wr *, struct ibv_send_wr **)", self.post_send)
        self._poll = ffi.callback("int(struct ibv_cq *, int, struct ibv_wc *)", self.poll_cq)
        self.ctx.ops.post_send = self._post
        self.ctx.ops.poll_cq = self._poll
        self.qp = V.QueuePair(self.qp_struct, None, None, None, max_send_wr=64, max_inline_data=max_inline_data)
        self.cq = V.CompletionQueue(self.cq_struct, None, 32)

    def post_send(self, qp, wr, bad):
        assert qp == self.qp_struct
        chain = []
        while wr != self.ffi.NULL:
            if self.refuse_at is not None and len(chain) == self.refuse_at[0]:
                bad[0] = wr
                return self.refuse_at[1]
            sge = [(wr.sg_list[i].addr, wr.sg_list[i].length, wr.sg_list[i].lkey) for i in range(wr.num_sge)]
            chain.append(
                dict(
                    wr_id=wr.wr_id,
                    opcode=wr.opcode,
                    flags=wr.send_flags,
                    sge=sge,
                    rdma=(wr.wr.rdma.remote_addr, wr.wr.rdma.rkey),
                    atomic=(wr.wr.atomic.remote_addr, wr.wr.atomic.rkey, wr.wr.atomic.compare_add),
                )
            )
            wr = wr.next
        self.posted.append(chain)
        return 0

    def poll_cq(self, cq, n, wc):
        assert cq == self.cq_struct
        if self.poll_rc is not None:
            return self.poll_rc
        take, self.completions = self.completions[:n], self.completions[n:]
        for i, c in enumerate(take):
            for k, v in c.items():
                setattr(wc[i], k, v)
        return len(take)


def test_a_chain_goes_to_the_provider_in_one_call_field_for_field():
    p = FakeProvider()
    reqs = [
        V.rdma_write(7, 0x1000, 0xA1, 300, 0x9000, 0xB1),
        V.rdma_write(8, 0x1200, 0xA1, 12, 0x9400, 0xB1, inline=True),
        V.rdma_write(9, 0x1300, 0xA1, 0, 0x9500, 0xB1),  # zero bytes: no scatter/gather entry
        V.fetch_add(10, 0x2000, 0xA2, 0x9808, 0xB2, (1 << 64) - 3, signaled=True),
    ]
    V.post_send(p.qp, reqs)
    assert len(p.posted) == 1  # one ibv_post_send for the whole chain
    w = p.posted[0]
    assert [x["wr_id"] for x in w] == [7, 8, 9, 10]
    assert [x["opcode"] for x in w] == [C["IBV_WR_RDMA_WRITE"]] * 3 + [C["IBV_WR_ATOMIC_FETCH_AND_ADD"]]
    assert [x["flags"] for x in w] == [0, C["IBV_SEND_INLINE"], 0, C["IBV_SEND_SIGNALED"]]
    assert w[0]["sge"] == [(0x1000, 300, 0xA1)] and w[0]["rdma"] == (0x9000, 0xB1)
    assert w[1]["sge"] == [(0x1200, 12, 0xA1)] and w[2]["sge"] == [] and w[2]["rdma"] == (0x9500, 0xB1)
    assert w[3]["sge"] == [(0x2000, 8, 0xA2)] and w[3]["atomic"] == (0x9808, 0xB2, (1 << 64) - 3)


def test_a_refused_request_is_named():
    p = FakeProvider()
    p.refuse_at = (1, errno.ENOMEM)
    reqs = [V.rdma_write(i, 0x1000, 1, 8, 0x2000, 2) for i in range(3)]
    want = r"ibv_post_send failed: ENOMEM .*qpn 17: request 1 of 3 \(RDMA_WRITE, wr_id 1\) and those after it"
    with pytest.raises(V.VerbsError, match=want):
        V.post_send(p.qp, reqs)


def test_completions_become_records_and_failures_name_the_status():
    p = FakeProvider()
    p.completions = [
        dict(wr_id=41, status=C["IBV_WC_SUCCESS"], opcode=C["IBV_WC_RDMA_WRITE"], qp_num=0x11, byte_len=300),
        dict(wr_id=42, status=C["IBV_WC_REM_ACCESS_ERR"], qp_num=0x11, vendor_err=0x88),
        dict(wr_id=43, status=C["IBV_WC_WR_FLUSH_ERR"], qp_num=0x11),
    ]
    first = V.poll_cq(p.cq, 2)
    assert [c.wr_id for c in first] == [41, 42] and first[0].ok and not first[1].ok
    assert first[0].check() is first[0] and first[0].opcode_name == "IBV_WC_RDMA_WRITE"
    assert first[0].byte_len == 300 and first[1].status_name == "IBV_WC_REM_ACCESS_ERR"
    with pytest.raises(V.WorkCompletionError) as e:  # the text from libibverbs, or without it from the table
        first[1].check()
    assert str(e.value) == (
        "work request 42 on qpn 17 completed with IBV_WC_REM_ACCESS_ERR (remote access error), vendor_err 0x88"
    )
    assert isinstance(e.value, V.VerbsError) and e.value.errno == errno.EIO and e.value.completion is first[1]
    (last,) = V.poll_cq(p.cq)
    assert last.status_name == "IBV_WC_WR_FLUSH_ERR" and V.poll_cq(p.cq) == []
    p.poll_rc = -2
    with pytest.raises(V.VerbsError, match="ibv_poll_cq failed.*returned -2"):
        V.poll_cq(p.cq)


def test_status_texts_are_libibverbs_own():
    """The table behind status_text (used without libibverbs) says what ibv_wc_status_str says, status by status."""
    from epkern._verbs_cffi import _posting

    try:
        lib, ffi = V.verbs_lib(), V.get_ffi()
    except V.RdmaUnavailableError:
        pytest.skip("libibverbs is not loadable: ibv_wc_status_str cannot be asked")
    for status, text in enumerate(_posting._STATUS_TEXT):
        assert ffi.string(lib.ibv_wc_status_str(status)).decode() == text, status


@pytest.mark.parametrize(
    "make,match",
    [
        (lambda: V.rdma_write(1, 0x1000, 1, -1, 0x2000, 2), "length"),
        (lambda: V.rdma_write(1, 0x1000, 1, 1 << 31, 0x2000, 2), "length"),
        (lambda: V.rdma_write(1, (1 << 64) - 4, 1, 8, 0x2000, 2), "length"),
        (lambda: V.rdma_write(-1, 0x1000, 1, 8, 0x2000, 2), "wr_id"),
        (lambda: V.rdma_write(1, 0x1000, 1 << 32, 8, 0x2000, 2), "lkey"),
        (lambda: V.rdma_write(1, 0x1000, 1, 8, 0x2000, "2"), "rkey"),
        (lambda: V.rdma_write(1, 4096.0, 1, 8, 0x2000, 2), "local_addr"),
        (lambda: V.fetch_add(1, 0x1004, 1, 0x2000, 2, 1), "result_addr"),
        (lambda: V.fetch_add(1, 0x1000, 1, 0x2001, 2, 1), "remote_addr"),
        (lambda: V.fetch_add(1, 0x1000, 1, 0x2000, 2, -1), "add"),
    ],
)
def test_request_arguments_are_validated(make, match):
    with pytest.raises(ArgumentError, match=match):
        make()


def test_post_and_poll_arguments_are_validated():
    p = FakeProvider(max_inline_data=16)
    with pytest.raises(ArgumentError, match=r"requests\[1\]: inline write of 17 bytes.*at most 16"):
        V.post_send(p.qp, [V.rdma_write(1, 0, 1, 8, 0, 2), V.rdma_write(2, 0, 1, 17, 0, 2, inline=True)])
    with pytest.raises(ArgumentError, match="requests: expected a non-empty"):
        V.post_send(p.qp, [])
    with pytest.raises(ArgumentError, match=r"requests\[0\]: expected a SendRequest"):
        V.post_send(p.qp, [("write",)])
    with pytest.raises(ArgumentError, match="qp: expected a QueuePair"):
        V.post_send(p.cq, [V.rdma_write(1, 0, 1, 8, 0, 2)])
    with pytest.raises(ArgumentError, match="max_entries"):
        V.poll_cq(p.cq, 0)
    with pytest.raises(ArgumentError, match="cq: expected a CompletionQueue"):
        V.poll_cq(p.qp)
    assert p.posted == []
