"""protos/: stubs in sync with the .proto files, messages, and a real gRPC round trip."""

from __future__ import annotations

import shutil
from collections.abc import Iterator
from concurrent import futures
from pathlib import Path

import grpc
import pytest

from protos import generate as gen
from protos import serving_pb2 as pb
from protos import serving_pb2_grpc as pb_grpc


def _copy_tree(tmp_path: Path) -> Path:
    """Copy the repo's protos/ (sources and stubs) into a fresh root under tmp_path."""
    shutil.copytree(gen.REPO_ROOT / "protos", tmp_path / "protos", ignore=shutil.ignore_patterns("__pycache__"))
    return tmp_path


def test_checked_in_stubs_have_not_drifted() -> None:
    assert gen.drift() == []


def test_every_proto_has_all_three_stubs(tmp_path: Path) -> None:
    names = {p.name for p in gen.generate(tmp_path)}
    for proto in gen.proto_files():
        assert {f"{proto.stem}{suffix}" for suffix in gen.GENERATED_SUFFIXES} <= names


def test_changed_proto_in_a_copy_is_detected_as_drift(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    assert gen.drift(root) == []
    proto = root / "protos" / "serving.proto"
    text = proto.read_text()
    proto.write_text(text.replace("bool ignore_eos = 8;", "bool ignore_eos = 8;\n  uint32 n = 99;"))
    problems = gen.drift(root)
    assert "protos/serving_pb2.py: differs" in problems
    assert "protos/serving_pb2.pyi: differs" in problems
    # Regenerating the copy brings it back in sync; the real tree is untouched.
    gen.generate(root, root)
    assert gen.drift(root) == []
    assert (gen.REPO_ROOT / "protos" / "serving.proto").read_text() == text


def test_missing_and_stale_stubs_are_detected(tmp_path: Path) -> None:
    root = _copy_tree(tmp_path)
    (root / "protos" / "serving_pb2_grpc.py").unlink()
    (root / "protos" / "gone_pb2.py").write_text("# stub of a deleted .proto\n")
    assert gen.drift(root) == ["protos/serving_pb2_grpc.py: missing", "protos/gone_pb2.py: stale"]


def test_check_command_exit_status(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert gen.main(["--check"]) == 0
    assert "up to date" in capsys.readouterr().out
    root = _copy_tree(tmp_path)
    (root / "protos" / "serving_pb2.py").write_text("# edited by hand\n")
    assert gen.main(["--check", "--root", str(root)]) == 1
    assert "protos/serving_pb2.py: differs" in capsys.readouterr().err
    # Without --check it rewrites the stubs and removes stale ones.
    (root / "protos" / "gone_pb2_grpc.py").write_text("")
    assert gen.main(["--root", str(root)]) == 0
    assert gen.drift(root) == []


def test_stub_modules_describe_the_service() -> None:
    service = pb.DESCRIPTOR.services_by_name["Serving"]
    assert service.full_name == "splitserve.v1.Serving"
    generate_rpc = service.methods_by_name["Generate"]
    assert generate_rpc.server_streaming and not generate_rpc.client_streaming
    assert not service.methods_by_name["ClusterStatus"].server_streaming
    assert pb.FinishReason.Name(0) == "FINISH_REASON_UNSPECIFIED"


def test_generate_request_round_trips_with_a_prompt() -> None:
    request = pb.GenerateRequest(
        request_id="r1",
        prompt="Hello",
        sampling=pb.SamplingParams(max_tokens=-3, temperature=0.0, seed=7, stop=["\n"], stop_token_ids=[2]),
    )
    back = pb.GenerateRequest.FromString(request.SerializeToString())
    assert back == request
    assert back.WhichOneof("input") == "prompt" and back.prompt == "Hello"
    # A negative max_tokens survives the wire so validation can refuse it by name.
    assert back.sampling.max_tokens == -3
    # Optional fields: an explicit 0 is distinguishable from unset.
    assert back.sampling.HasField("temperature") and back.sampling.temperature == 0.0
    assert not back.sampling.HasField("top_p")
    assert back.sampling.seed == 7


def test_generate_request_round_trips_with_chat_messages() -> None:
    chat = pb.ChatMessages(messages=[pb.ChatMessage(role="system", content="Be brief."), pb.ChatMessage(role="user", content="Hi")])
    request = pb.GenerateRequest(model="builtin:smollm2-135m-instruct", chat=chat)
    back = pb.GenerateRequest.FromString(request.SerializeToString())
    assert back == request
    assert back.WhichOneof("input") == "chat"
    assert [(m.role, m.content) for m in back.chat.messages] == [("system", "Be brief."), ("user", "Hi")]
    assert not back.HasField("sampling")
    # Setting one side of the oneof clears the other.
    back.prompt = "x"
    assert back.WhichOneof("input") == "prompt" and not back.HasField("chat")
    assert pb.GenerateRequest().WhichOneof("input") is None


class _FakeServing(pb_grpc.ServingServicer):
    """Streams the prompt's words back, one response each, then finishes."""

    def Generate(self, request: pb.GenerateRequest, context: grpc.ServicerContext) -> Iterator[pb.GenerateResponse]:
        words = request.prompt.split()
        for i, word in enumerate(words):
            last = i == len(words) - 1
            yield pb.GenerateResponse(
                request_id=request.request_id,
                token_ids=[i],
                text=word,
                finish_reason=pb.FINISH_REASON_STOP if last else pb.FINISH_REASON_UNSPECIFIED,
                usage=pb.Usage(prompt_tokens=len(words), completion_tokens=len(words)) if last else None,
                timings=pb.Timings(ttft_ms=1.0, e2e_ms=3.0, prefill_worker="p0", decode_worker="d0") if last else None,
            )

    def ClusterStatus(self, request: pb.ClusterStatusRequest, context: grpc.ServicerContext) -> pb.ClusterStatusResponse:
        worker = pb.WorkerStatus(worker_id="d0", alive=True, num_blocks=64, free_blocks=64)
        return pb.ClusterStatusResponse(model="fake", pools=[pb.PoolStatus(kind="decode", target_replicas=1, workers=[worker])])


@pytest.fixture
def stub() -> Iterator[pb_grpc.ServingStub]:
    """A real gRPC server on 127.0.0.1 (ephemeral port) running _FakeServing, and a client stub."""
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=2))
    pb_grpc.add_ServingServicer_to_server(_FakeServing(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    assert port > 0
    server.start()
    # No proxy for a loopback test, whatever the environment says.
    channel = grpc.insecure_channel(f"127.0.0.1:{port}", options=[("grpc.enable_http_proxy", 0)])
    try:
        yield pb_grpc.ServingStub(channel)
    finally:
        channel.close()
        server.stop(grace=None)


def test_real_server_streams_three_responses(stub: pb_grpc.ServingStub) -> None:
    responses = list(stub.Generate(pb.GenerateRequest(request_id="r1", prompt="one two three"), timeout=10))
    assert [r.text for r in responses] == ["one", "two", "three"]
    assert {r.request_id for r in responses} == {"r1"}
    assert [r.finish_reason for r in responses] == [pb.FINISH_REASON_UNSPECIFIED] * 2 + [pb.FINISH_REASON_STOP]
    assert not responses[0].HasField("usage")
    assert responses[-1].usage.completion_tokens == 3
    assert responses[-1].timings.decode_worker == "d0"


def test_real_server_answers_cluster_status(stub: pb_grpc.ServingStub) -> None:
    status = stub.ClusterStatus(pb.ClusterStatusRequest(), timeout=10)
    assert status.model == "fake"
    assert status.pools[0].workers[0].free_blocks == 64
