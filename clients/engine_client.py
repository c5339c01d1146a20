"""A small synchronous client of the engine API (token ids in, token ids out), for tools and tests."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import grpc

from clients.channel import Channels, client_timeout, sync_channel
from clients.requests import put_token_ids
from clients.tls import ClientTls
from protos.llmserve.engine.v1 import engine_pb2 as pb
from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc


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
        """Stream one request's updates (GenerateStream); errors raise grpc.RpcError. trace_id: for the logs."""
        params = pb.SamplingParams(**{k: v for k, v in sampling.items() if v is not None})
        request = pb.NewRequest(request_id=request_id, sampling_params=params, trace_id=trace_id)
        put_token_ids(request.prompt_token_ids, prompt_token_ids, "prompt_token_ids")
        return self.stub.GenerateStream(request, timeout=self.timeout)

    def abort(self, request_id: str) -> bool:
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
