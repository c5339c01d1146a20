"""A small synchronous client of the engine API (token ids in, token ids out), for tools and tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from clients.channel import Channels, client_timeout, sync_channel
from clients.requests import put_token_ids, set_sampling_field
from clients.tls import ClientTls
from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc


def _sampling_params(sampling: dict[str, object]) -> pb.SamplingParams:
    """The engine API's SamplingParams from keywords, each checked by name: handed to protobuf at once, a typo holding
    None passed unseen and a wrong value said only "must be real number, not str" or "Value out of range"."""
    fields = pb.SamplingParams.DESCRIPTOR.fields_by_name
    params = pb.SamplingParams()
    for name, value in sampling.items():
        if name not in fields:
            raise TypeError(f"unknown sampling parameter {name!r}; known: {tuple(fields)}")
        if value is not None:
            set_sampling_field(params, name, value)
    return params


class EngineClient:
    def __init__(self, target: str, timeout: float | None = None, tls: ClientTls | None = None,
                 **channel_kwargs: Any) -> None:
        """channel_kwargs: the channel settings TextClient takes (clients.channel.CHANNEL_SETTINGS), such as
        max_message_bytes, keepalive_time_s and extra_options."""
        self.timeout = client_timeout(timeout)
        self._channels = Channels(sync_channel, target, tls, pb_grpc.EngineStub, **channel_kwargs)

    @property
    def stub(self) -> pb_grpc.EngineStub:
        """The stub for a new call (on a new channel once the TLS files were rotated)."""
        return self._channels.stub()

    @property
    def _channel(self) -> grpc.Channel:
        return self._channels.current

    def generate(self, prompt_token_ids: list[int], request_id: str = "", *, trace_id: str = "",
                 **sampling: object) -> Iterator[pb.RequestUpdate]:
        """Stream one request's updates (GenerateStream); errors raise grpc.RpcError. trace_id: for the logs.
        sampling: the engine API's SamplingParams fields (None: unset); a name that is none of them is a TypeError,
        a value the field cannot take a ValueError naming it, as TextClient's."""
        for name, value in (("request_id", request_id), ("trace_id", trace_id)):
            if value is not None and not isinstance(value, str):  # protobuf: "bad argument type for built-in ..."
                raise ValueError(f"{name} must be a string (empty: the engine makes one up), got {value!r}")
        request = pb.NewRequest(request_id=request_id or "", sampling_params=_sampling_params(sampling),
                                trace_id=trace_id or "")
        put_token_ids(request.prompt_token_ids, prompt_token_ids, "prompt_token_ids")
        return self.stub.GenerateStream(request, timeout=self.timeout)

    def abort(self, request_id: str) -> bool:
        if not isinstance(request_id, str):  # protobuf: "bad argument type for built-in operation"
            raise ValueError(f"request_id must be a string (the id the request was sent with), got {request_id!r}")
        return self.stub.Abort(pb.AbortRequest(request_id=request_id), timeout=self.timeout).found

    def load(self) -> pb.Load:
        return self.stub.GetLoad(pb.GetLoadRequest(), timeout=self.timeout)

    def model_info(self) -> pb.ModelInfo:
        return self.stub.GetModelInfo(pb.GetModelInfoRequest(), timeout=self.timeout)

    def close(self) -> None:
        for channel in self._channels.close():
            channel.close()

    def __enter__(self) -> EngineClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
