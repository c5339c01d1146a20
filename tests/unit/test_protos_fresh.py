"""The generated protocol code must match what the pinned grpcio-tools makes from the .proto files."""

from scripts import gen_protos


def test_generated_code_is_fresh():
    stale = gen_protos.stale_files()
    assert stale == [], f"run `python -m scripts.gen_protos`; stale: {stale}"


def test_generated_modules_import_by_package_name():
    from protos.llmserve.engine.v1 import engine_pb2, engine_pb2_grpc
    from protos.llmserve.text.v1 import text_pb2, text_pb2_grpc

    assert engine_pb2.DESCRIPTOR.package == "llmserve.engine.v1"
    assert text_pb2.DESCRIPTOR.package == "llmserve.text.v1"
    assert hasattr(engine_pb2_grpc, "EngineServicer") and hasattr(text_pb2_grpc, "TextGenerationStub")


def test_sampling_fields_are_optional():
    # Unset must be distinguishable from zero: temperature 0 means greedy.
    from protos.llmserve.engine.v1 import engine_pb2

    params = engine_pb2.SamplingParams()
    assert not params.HasField("temperature")
    params.temperature = 0.0
    assert params.HasField("temperature")
