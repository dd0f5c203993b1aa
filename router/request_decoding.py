"""Decoding ``GenerateRequest`` bytes so that bad input gets a clear error.

gRPC's default deserializer turns any undecodable request into a bare
INTERNAL error. Here, a request that is too large or that is not valid
protobuf, or whose text fields are not valid UTF-8, becomes a
:class:`WireError` naming the field (e.g. ``chat.messages[1].content``); the
servicer answers it with RESOURCE_EXHAUSTED or INVALID_ARGUMENT.

To find *which* string field holds invalid UTF-8, the bytes are parsed a
second time with a twin of the message in which every ``string`` field is
``bytes`` (built from the real descriptor at import, so it cannot drift).
Protobuf parsing never executes anything from the payload; nothing a client
sends is unpickled.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import grpc
from google.protobuf import descriptor_pb2, descriptor_pool, message_factory
from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import DecodeError

from protos import serving_pb2

_TWIN_PACKAGE = "splitserve.bytes_twin"


@dataclass(frozen=True)
class WireError:
    """A request that could not be decoded; the servicer aborts with ``code``."""

    field: str
    reason: str
    code: grpc.StatusCode = grpc.StatusCode.INVALID_ARGUMENT

    def message(self) -> str:
        return f"{self.field}: {self.reason}"


def _bytes_twin_class() -> type:
    fdp = descriptor_pb2.FileDescriptorProto()
    serving_pb2.DESCRIPTOR.CopyToProto(fdp)
    real = f".{fdp.package}."
    fdp.name, fdp.package = "splitserve_bytes_twin.proto", _TWIN_PACKAGE
    del fdp.service[:]

    def rewrite(msg: descriptor_pb2.DescriptorProto) -> None:
        for f in msg.field:
            if f.type == FieldDescriptor.TYPE_STRING:
                f.type = FieldDescriptor.TYPE_BYTES
            if f.type_name.startswith(real):
                f.type_name = f".{_TWIN_PACKAGE}." + f.type_name[len(real):]
        for nested in msg.nested_type:
            rewrite(nested)

    for msg in fdp.message_type:
        rewrite(msg)
    pool = descriptor_pool.DescriptorPool()
    pool.Add(fdp)
    return message_factory.GetMessageClass(pool.FindMessageTypeByName(f"{_TWIN_PACKAGE}.GenerateRequest"))


_TWIN = _bytes_twin_class()


def _string_paths(real: Any, twin: Any, prefix: str = ""):
    """Yield (path, raw bytes) of every field that is a string in the real message."""
    for fd in real.DESCRIPTOR.fields:
        name = prefix + fd.name
        value = getattr(twin, fd.name)
        if fd.type == FieldDescriptor.TYPE_STRING:
            if fd.is_repeated:
                for i, v in enumerate(value):
                    yield f"{name}[{i}]", v
            elif not fd.has_presence or twin.HasField(fd.name):
                yield name, value
        elif fd.type == FieldDescriptor.TYPE_MESSAGE:
            sub_real = fd.message_type._concrete_class()
            if fd.is_repeated:
                for i, v in enumerate(value):
                    yield from _string_paths(sub_real, v, f"{name}[{i}].")
            elif twin.HasField(fd.name):
                yield from _string_paths(sub_real, value, f"{name}.")


def first_invalid_utf8(data: bytes) -> tuple[str, int] | None:
    """(path, byte offset) of the first text field of a ``GenerateRequest`` that is not valid UTF-8."""
    twin = _TWIN.FromString(data)
    for path, raw in _string_paths(serving_pb2.GenerateRequest(), twin):
        try:
            raw.decode("utf-8")
        except UnicodeDecodeError as e:
            return path, e.start
    return None


def make_request_deserializer(max_request_bytes: int):
    """A gRPC request deserializer returning a ``GenerateRequest`` or a :class:`WireError`."""

    def deserialize(data: bytes) -> serving_pb2.GenerateRequest | WireError:
        if len(data) > max_request_bytes:
            return WireError("request", f"{len(data)} bytes exceeds the limit of {max_request_bytes} "
                             "(router.max_request_bytes)", grpc.StatusCode.RESOURCE_EXHAUSTED)
        try:
            return serving_pb2.GenerateRequest.FromString(data)
        except DecodeError:
            pass
        try:
            found = first_invalid_utf8(data)
        except DecodeError:
            return WireError("request", "is not a valid GenerateRequest message")
        if found is None:
            return WireError("request", "is not a valid GenerateRequest message")
        path, offset = found
        return WireError(path, f"is not valid UTF-8 (bad byte at offset {offset})")

    return deserialize
