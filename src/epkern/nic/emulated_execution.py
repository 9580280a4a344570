"""What the emulated NIC's progress thread does with a rung doorbell: walk the send ring up to the producer
index, check each WQE (format, ring position, keys, access rights, bounds, alignment) and execute it through the
:class:`~epkern.nic.memory_access.MemoryAccess` of this NIC and of the peer's, writing CQEs. A bad WQE puts its
QP into the error state with an error CQE and a :class:`~epkern.nic.observation.NicFault`; nothing is written to
the target then."""

from __future__ import annotations

from . import wqe as W
from .emulated_objects import Access, MemoryRegion, QueuePair
from .observation import NicFault


class _Fault(Exception):
    def __init__(self, syndrome: int, message: str):
        super().__init__(message)
        self.syndrome = syndrome


class WqeExecution:
    """The execution half of :class:`~epkern.nic.emulated.EmulatedNic` (its base class): ``_process(qp)`` runs the
    WQEs a doorbell made executable, ``_fault(...)`` records an error. It uses the NIC's ``memory``, ``faults`` and
    local key table ``_mrs_l``, and the peer NIC's ``_mrs_r`` and ``memory``."""

    def _fault(self, qp: QueuePair, counter: int, syndrome: int, message: str, wqe_opcode: int = 0) -> None:
        self._settle(qp)  # the WQEs before the failed one have landed when its error CQE shows
        fault = NicFault(qp.qpn, counter & 0xFFFF, syndrome, message)
        qp.state = QueuePair.ERROR
        qp.error = fault
        qp.counters.errors += 1
        self.faults.append(fault)
        qp.cq._push(
            opcode=W.MLX5_CQE_REQ_ERR,
            qpn=qp.qpn,
            wqe_counter=counter & 0xFFFF,
            syndrome=syndrome,
            wqe_opcode=wqe_opcode,
        )

    _in_flight: set = frozenset()  # while _process runs: the memories holding copies not yet flushed

    def _process(self, qp: QueuePair) -> None:
        self._in_flight = set()  # only the NIC's thread executes WQEs
        try:
            self._process_batch(qp)
        finally:
            self._settle(qp)

    def _settle(self, qp: QueuePair) -> None:
        """Every copy issued has landed; then the consumer index says so."""
        while self._in_flight:
            self._in_flight.pop().flush()
        qp._done = qp._ci

    def _process_batch(self, qp: QueuePair) -> None:
        if qp.state == QueuePair.ERROR:
            return  # an errored QP executes nothing more (its doorbells are still counted)
        if qp.state != QueuePair.RTS or qp.remote is None:
            self._fault(qp, qp._ci, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "doorbell on a QP that is not connected")
            return
        _, db_qpn, _, _ = W.decode_doorbell(qp.db_reg)
        if db_qpn != qp.qpn:
            self._fault(
                qp, qp._ci, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"doorbell word names qpn {db_qpn}, not {qp.qpn}"
            )
            return
        delta = (W.decode_dbrec(qp.dbrec) - qp._ci) & 0xFFFF
        if delta > qp.wqe_cnt:
            self._fault(
                qp,
                qp._ci,
                W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR,
                f"producer index is {delta} WQEBBs ahead, more than the ring's {qp.wqe_cnt}",
            )
            return
        end = qp._ci + delta
        while qp._ci < end and not self._aborting:
            counter = qp._ci & 0xFFFF
            try:
                wqe = W.decode_wqe(qp.sq, qp._ci)
            except W.WqeFormatError as e:
                self._fault(qp, counter, W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"malformed WQE: {e}")
                return
            try:
                if wqe.pi16 != counter:
                    raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"ctrl pi16 {wqe.pi16} != slot index {counter}")
                if wqe.qpn != qp.qpn:
                    raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, f"ctrl qpn {wqe.qpn} != {qp.qpn}")
                if qp._ci + wqe.nbb > end:
                    raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "WQE extends past the doorbell's producer index")
                nbytes = self._execute(qp, wqe)
            except _Fault as f:
                self._fault(qp, counter, f.syndrome, f"{wqe.opcode_name}: {f}", wqe.opcode)
                return
            qp.counters.wqes += 1
            qp.counters.bytes += nbytes
            if wqe.signaled:
                self._settle(qp)  # a completion means the writes before it have landed
                # Counted before the CQE shows: a host that has seen the CQE reads counters that include it.
                qp.counters.cqes += 1
                if not qp.cq._push(opcode=W.MLX5_CQE_REQ, qpn=qp.qpn, wqe_counter=counter, byte_cnt=nbytes):
                    qp.counters.cqes -= 1
                    qp._ci += wqe.nbb
                    fault = NicFault(qp.qpn, counter, 0, "CQ overrun (host did not consume completions)")
                    qp.state, qp.error = QueuePair.ERROR, fault
                    qp.counters.errors += 1
                    self.faults.append(fault)
                    return
            qp._ci += wqe.nbb

    def _local(self, seg: W.DataSeg, need: Access) -> MemoryRegion:
        mr = self._mrs_l.get(seg.lkey)
        if mr is None:
            raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR, f"unknown lkey 0x{seg.lkey:x}")
        if need and not (mr.access & need):
            raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR, f"lkey 0x{seg.lkey:x} lacks {need!r}")
        if not mr.contains(seg.addr, seg.byte_count):
            raise _Fault(
                W.MLX5_CQE_SYNDROME_LOCAL_PROT_ERR,
                f"local range 0x{seg.addr:x}+{seg.byte_count} outside MR 0x{mr.addr:x}+{mr.length}",
            )
        return mr

    @staticmethod
    def _remote(qp: QueuePair, wqe: W.Wqe, n: int, need: Access) -> MemoryRegion:
        peer = qp.remote.nic
        mr = peer._mrs_r.get(wqe.rkey)
        if mr is None:
            raise _Fault(W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, f"unknown rkey 0x{wqe.rkey:x} on {peer.name}")
        if not (mr.access & need):
            raise _Fault(W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR, f"rkey 0x{wqe.rkey:x} lacks {need!r}")
        if not mr.contains(wqe.raddr, n):
            raise _Fault(
                W.MLX5_CQE_SYNDROME_REMOTE_ACCESS_ERR,
                f"remote range 0x{wqe.raddr:x}+{n} outside MR 0x{mr.addr:x}+{mr.length}",
            )
        return mr

    def _execute(self, qp: QueuePair, wqe: W.Wqe) -> int:
        if wqe.opcode == W.MLX5_OPCODE_NOP:
            return 0
        if wqe.opcode == W.MLX5_OPCODE_RDMA_WRITE:
            target = qp.remote.nic.memory
            if wqe.inline is not None:
                self._remote(qp, wqe, len(wqe.inline), Access.REMOTE_WRITE)
                if wqe.inline:
                    target.write(wqe.raddr, wqe.inline)
                return len(wqe.inline)
            for seg in wqe.data:
                self._local(seg, Access(0))
            n = sum(seg.byte_count for seg in wqe.data)
            self._remote(qp, wqe, n, Access.REMOTE_WRITE)
            copy = getattr(target, "copy_from", None)
            dst = wqe.raddr
            for seg in wqe.data:  # each segment straight into place where the memories allow, else via the host
                if copy is not None and copy(dst, self.memory, seg.addr, seg.byte_count):
                    self._in_flight.add(target)
                elif seg.byte_count:
                    target.write(dst, self.memory.read(seg.addr, seg.byte_count))
                dst += seg.byte_count
            return n
        if wqe.opcode == W.MLX5_OPCODE_ATOMIC_FA:
            (seg,) = wqe.data
            if seg.byte_count != 8:
                raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_LENGTH_ERR, f"result segment of {seg.byte_count} bytes, not 8")
            if wqe.raddr % 8:
                raise _Fault(W.MLX5_CQE_SYNDROME_REMOTE_INVAL_REQ_ERR, f"raddr 0x{wqe.raddr:x} is not 8-byte aligned")
            self._remote(qp, wqe, 8, Access.REMOTE_ATOMIC)
            self._local(seg, Access.LOCAL_WRITE)
            old = qp.remote.nic.memory.atomic_fetch_add64(wqe.raddr, wqe.swap_add)
            self.memory.write(seg.addr, old.to_bytes(8, "little"))
            return 8
        raise _Fault(W.MLX5_CQE_SYNDROME_LOCAL_QP_OP_ERR, "opcode not supported by the emulated NIC")
