"""Request bytes to GenerateRequest, or a WireError naming the bad field."""

from __future__ import annotations

import grpc

from protos import serving_pb2
from router.client import build_request
from router.server import SERVICE_NAME
from router.request_decoding import WireError, first_invalid_utf8, make_request_deserializer

decode = make_request_deserializer(4096)


def corrupt(req: serving_pb2.GenerateRequest, marker: str) -> bytes:
    data = req.SerializeToString()
    assert data.count(marker.encode()) == 1
    return data.replace(marker.encode(), b"\xc3" + b"(" * (len(marker) - 1))


def test_valid_bytes_parse_to_the_request():
    req = build_request("hello", max_tokens=3, stop=["x"])
    assert decode(req.SerializeToString()) == req


def test_invalid_utf8_names_the_field_path():
    chat = build_request(messages=[{"role": "user", "content": "fine"}, {"role": "MARKER", "content": "ok"}])
    assert decode(corrupt(chat, "MARKER")) == WireError("chat.messages[1].role", "is not valid UTF-8 (bad byte at offset 0)")
    stop = build_request("p", stop=["a", "b", "MARKER"])
    assert decode(corrupt(stop, "MARKER")).field == "sampling.stop[2]"
    assert decode(corrupt(build_request("MARKER"), "MARKER")).field == "prompt"
    assert decode(corrupt(build_request("p", request_id="MARKER"), "MARKER")).field == "request_id"
    assert first_invalid_utf8(build_request("all good").SerializeToString()) is None


def test_garbage_and_oversized_requests():
    assert decode(b"\x0a\xff\xff\xff\xff\xff") == WireError("request", "is not a valid GenerateRequest message")
    big = decode(build_request("z" * 5000).SerializeToString())
    assert big.code == grpc.StatusCode.RESOURCE_EXHAUSTED and big.field == "request" and "4096" in big.reason


def test_router_registers_every_method_of_the_service():
    from router.server import serving_handlers

    class Stub:
        Generate = ClusterStatus = None

    handler = serving_handlers(Stub(), 1024)
    declared = {m.name for m in serving_pb2.DESCRIPTOR.services_by_name["Serving"].methods}
    served = {name for name in declared
              if handler.service(type("D", (), {"method": f"/{SERVICE_NAME}/{name}"})()) is not None}
    assert served == declared
