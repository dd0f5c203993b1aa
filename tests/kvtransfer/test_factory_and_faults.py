"""The factory's names and the fault dataclass."""

from __future__ import annotations

import pytest

import kvtransfer
from kvtransfer import TransferFaults, make_transport
from kvtransfer.faults import FaultInjector
from kvtransfer.grpc_transport import GrpcTransport
from kvtransfer.inproc import InProcHub, InProcTransport
from kvtransfer.ray_transport import RayTransport
from kvtransfer.shm_transport import ShmTransport
from kvtransfer.torch_dist import TorchDistTransport

pytestmark = pytest.mark.timeout(60)


@pytest.mark.parametrize("backend,cls,kwargs", [
    ("gloo", TorchDistTransport, {}),
    ("grpc", GrpcTransport, {}),
    ("ray", RayTransport, {}),
    ("inproc", InProcTransport, {"hub": InProcHub()}),
    ("shm", ShmTransport, {}),
])
def test_make_transport(backend, cls, kwargs) -> None:
    tr = make_transport(backend, "w", **kwargs)
    try:
        assert isinstance(tr, cls) and isinstance(tr, kvtransfer.KVTransport)
        assert tr.endpoint().worker_id == "w" and tr.endpoint().backend == backend
    finally:
        tr.close()


def test_make_transport_refuses_bad_input() -> None:
    with pytest.raises(ValueError, match="unknown kvtransfer backend"):
        make_transport("carrier-pigeon", "w")
    with pytest.raises(ValueError, match="hub"):
        make_transport("inproc", "w")
    assert set(kvtransfer.BACKENDS) == {"gloo", "nccl", "grpc", "ray", "inproc", "shm"}


def test_fault_injector_counts_sends() -> None:
    inj = FaultInjector(TransferFaults(fail_first_n=2, drop_first_n=1))
    fates = [inj.begin_send() for _ in range(4)]
    assert [why is not None for why, _ in fates] == [True, True, False, False]
    assert [drop for _, drop in fates] == [False, False, True, False]
    assert all(drop for _, drop in (FaultInjector(TransferFaults(drop=True)).begin_send() for _ in range(3)))
    assert FaultInjector(None).begin_send() == (None, False)
    with pytest.raises(ValueError):
        TransferFaults(delay_s=-1)
