"""The engine service's output path at an H200's decode pace: `python -m scripts.output_path_bench`.

    python -m scripts.output_path_bench --requests 256 --calls separate         # 256 GenerateStream calls
    python -m scripts.output_path_bench --requests 256 --calls stream           # one Generate stream carrying 256
    python -m scripts.output_path_bench --calls separate --logprobs 5 --gil-switch-interval-ms 5

It runs the real engine service (engine_service.server.serve, in this process) around a paced stand-in engine, and
a client in another process: --requests requests that never finish, multiplexed on one Generate stream (--calls
stream) or one GenerateStream call each (--calls separate). The stand-in mimics a decode step under overlap
scheduling, as on an H200 with ~256 requests running: each step() spends --pre-ms of GIL-holding Python (scheduling,
inputs, the launch), launches the next step on a virtual GPU (the engine loop hands the previous step's outputs to
the asyncio thread then), waits GIL-free (a sleep) until the current step's --step-ms of GPU time is over, makes
one one-token StepOutput per request (with --logprobs K alternatives), and spends --post-ms more. The virtual GPU
runs its queued steps back to back and idles only when the host launches late.

After all requests run and --warmup seconds pass, it measures --seconds in --rounds equal windows and reports the
median (min-max) over the windows of:
  steps/s             against the target, 1000 / --step-ms
  steps that waited   the share of steps whose GPU work was still running when the host came to wait for it (the
                      others found it done: the host was late, and the GPU idled)
  late after GPU p50, p99  how long after its GPU wait ended the engine thread ran again: waiting for the GIL,
                      mostly (the asyncio thread writing outputs holds it for up to the switch interval); the
                      sleep's own overshoot, about 0.1 ms, is its floor
  GPU idle            the share of the window in which the virtual GPU had nothing to run
  asyncio CPU/update  CPU time of the asyncio thread (the servicer and gRPC's Python side) per StepOutput
  asyncio, engine, other threads: the CPU share of a core each takes (other: gRPC's own threads, mostly)
  received            tokens, RequestUpdates and messages per second that the client read: a client that falls
                      behind gets a request's queued tokens in one update, so updates/s made (one token each)
                      can exceed updates/s received while every token arrives

--gil-switch-interval-ms is ServerConfig.gil_switch_interval_ms, which serve() applies once SERVING (Python's
default is 5). The client's process shares the machine's cores: on a small machine it competes with the server.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import mmap
import os
import shlex
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections import deque
from pathlib import Path

PROG = "python -m scripts.output_path_bench"
ROOT = Path(__file__).resolve().parent.parent
MAX_TOKENS = 900_000  # the client's requests outlast any run (75 minutes at 200 steps/s)
VOCAB_SIZE = 151_936  # Qwen3's


def spin(seconds: float) -> None:
    """Python work that holds the GIL for `seconds`."""
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        pass


class PacedEngine:
    """LLMEngine's step API (docs/ENGINE_API.md) over a virtual GPU; the module docstring says how it steps."""

    def __init__(self, step_ms: float, pre_ms: float, post_ms: float, max_num_seqs: int):
        from engine_service.outputs import StepOutput, TokenLogprobs

        self._step_output, self._token_logprobs = StepOutput, TokenLogprobs
        self.gpu_s, self.pre_s, self.post_s = step_ms / 1e3, pre_ms / 1e3, post_ms / 1e3
        self.max_num_seqs = max_num_seqs
        self.model_info = dict(model_name="paced-stand-in", vocab_size=VOCAB_SIZE, eos_token_ids=[VOCAB_SIZE - 1],
                               max_model_len=1_000_000, block_size=16)
        self.generation_defaults: dict[str, object] = {}
        self.waiting: deque[str] = deque()
        self.running: list[str] = []
        self.reqs: dict[str, list] = {}  # request id -> [tokens so far, SamplingParams, prompt length]
        self.aborted: list[str] = []
        self._queued: deque[float] = deque()  # when each launched step ends on the virtual GPU, oldest first
        self._gpu_free_at: float | None = None  # when the last launched step ends; None: no work, not idle
        # Read by the asyncio thread between steps (one writer; ints and floats are read whole).
        self.steps = 0
        self.outputs = 0  # StepOutputs with a token
        self.gpu_idle_s = 0.0
        self.late: list[float] = []  # per step that waited: seconds from its GPU end to this thread running again

    def add_request(self, request_id: str, prompt_token_ids: list[int], sampling_params) -> None:
        if request_id in self.reqs:
            raise ValueError(f"request_id {request_id!r} is already live")
        self.reqs[request_id] = [0, sampling_params, len(prompt_token_ids)]
        self.waiting.append(request_id)

    def abort_request(self, request_id: str) -> bool:
        if self.reqs.pop(request_id, None) is None:
            return False
        if request_id in self.waiting:
            self.waiting.remove(request_id)
        else:
            self.running.remove(request_id)
        self.aborted.append(request_id)
        return True

    def has_unfinished_requests(self) -> bool:
        return bool(self.reqs or self.aborted)

    def _launch(self, on_launch) -> None:
        now = time.perf_counter()
        free_at = self._gpu_free_at if self._gpu_free_at is not None else now
        if now > free_at:
            self.gpu_idle_s += now - free_at  # the host launched late: the GPU had nothing to run
        self._gpu_free_at = max(now, free_at) + self.gpu_s
        self._queued.append(self._gpu_free_at)
        if on_launch is not None:
            on_launch()

    def step(self, on_launch=None) -> list:
        spin(self.pre_s)  # schedule ahead, build the inputs, launch
        if not self._queued:
            self._launch(None)  # nothing in flight (the first step): this step's batch, then the next one
        self._launch(on_launch)
        end = self._queued.popleft()
        wait = end - time.perf_counter()
        if wait > 0:
            time.sleep(wait)  # the GPU wait, GIL released
            self.late.append(time.perf_counter() - end)
        aborted, self.aborted = self.aborted, []
        outputs = [self._step_output(rid, finish_reason="abort") for rid in aborted]
        while self.waiting and len(self.running) < self.max_num_seqs:
            self.running.append(self.waiting.popleft())
        finished = []
        for rid in self.running:
            req = self.reqs[rid]
            req[0] += 1
            params = req[1]
            token = 1000 + req[0] % 20_000
            reason = "length" if req[0] >= params.max_tokens else None
            out = self._step_output(rid, [token], reason, req[2], 0)
            if params.logprobs:
                k = params.logprobs
                out.logprobs = [self._token_logprobs(-0.25, [token + i for i in range(k)],
                                                     [-0.25 - i for i in range(k)])]
            outputs.append(out)
            if reason is not None:
                finished.append(rid)
        for rid in finished:
            self.running.remove(rid)
            del self.reqs[rid]
        spin(self.post_s)  # stop checks, bookkeeping
        self.outputs += len(outputs) - len(aborted)
        self.steps += 1
        if not self.reqs:
            self._queued.clear()  # no work left: the GPU is idle, and that is no one's fault
            self._gpu_free_at = None
        return outputs

    def stats(self) -> dict[str, int]:
        return dict(num_blocks=100_000, num_free_blocks=50_000, num_cached_blocks=0, num_running=len(self.running),
                    num_waiting=len(self.waiting), prefix_cache_queries=0, prefix_cache_hits=0, num_preemptions=0)

    def close(self) -> None:
        pass


# ---- the client (its own process) ---------------------------------------------------------------------------

CLIENT = "import json, sys; from scripts.output_path_bench import run_client; run_client(**json.loads(sys.argv[1]))"


def shared_counters(path: str | Path, n: int) -> memoryview:
    """n int64 counters in a file, mapped: each process that maps the file sees the others' writes."""
    with open(path, "r+b") as f:
        if f.seek(0, 2) < 8 * n:
            f.truncate(8 * n)
        return memoryview(mmap.mmap(f.fileno(), 8 * n)).cast("q")


def run_client(port: int, calls: str, requests: int, logprobs: int, counts_path: str) -> None:
    """Keep `requests` requests streaming until terminated, counting what it reads into the counters at
    counts_path: [messages, request updates, tokens]."""
    try:
        asyncio.run(_client(port, calls, requests, logprobs, shared_counters(counts_path, 3)))
    except KeyboardInterrupt:
        pass


async def _client(port: int, calls: str, requests: int, logprobs: int, counts) -> None:
    import grpc

    from protos.llmserve.engine.v1 import engine_pb2 as pb
    from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc

    def request(i: int) -> pb.NewRequest:
        params = pb.SamplingParams(max_tokens=MAX_TOKENS, ignore_eos=True, temperature=0.0)
        if logprobs:
            params.logprobs = logprobs
        return pb.NewRequest(request_id=f"r{i}", prompt_token_ids=[1, 2, 3, 4], sampling_params=params)

    def count(updates) -> None:
        counts[0] += 1
        for u in updates:
            counts[1] += 1
            counts[2] += len(u.new_token_ids)

    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                         options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
        stub = pb_grpc.EngineStub(channel)
        try:
            if calls == "stream":
                async def frames():
                    yield pb.ClientFrame(requests=[request(i) for i in range(requests)])
                    await asyncio.Event().wait()  # keep the stream open

                async for frame in stub.Generate(frames()):
                    count(frame.updates)
            else:
                async def one(i: int) -> None:
                    async for update in stub.GenerateStream(request(i)):
                        count((update,))

                await asyncio.gather(*(one(i) for i in range(requests)))
        except grpc.RpcError as exc:
            print(f"[client] the call ended: {exc.code().name}: {exc.details()}", file=sys.stderr)


# ---- the measurement ----------------------------------------------------------------------------------------


def thread_cpu(ident: int) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(ident))


def snapshot(engine: PacedEngine, aio_ident: int, engine_ident: int, counts) -> dict[str, float]:
    return dict(t=time.perf_counter(), steps=engine.steps, outputs=engine.outputs, late=len(engine.late),
                gpu_idle=engine.gpu_idle_s, aio=thread_cpu(aio_ident), engine=thread_cpu(engine_ident),
                process=time.process_time(), messages=counts[0], updates=counts[1], tokens=counts[2])


def window(engine: PacedEngine, a: dict[str, float], b: dict[str, float]) -> dict[str, float]:
    """The figures of one window between two snapshots."""
    dt = b["t"] - a["t"]
    steps, outputs = b["steps"] - a["steps"], b["outputs"] - a["outputs"]
    aio, eng = b["aio"] - a["aio"], b["engine"] - a["engine"]
    late = sorted(engine.late[int(a["late"]):int(b["late"])])

    def pct(q: float) -> float:
        return late[min(len(late) - 1, int(q * len(late)))] * 1e3 if late else 0.0

    return dict(
        seconds=dt, steps=steps, steps_per_s=steps / dt, late_p50_ms=pct(0.5), late_p99_ms=pct(0.99),
        steps_waited=len(late), waited=len(late) / max(steps, 1), gpu_idle=(b["gpu_idle"] - a["gpu_idle"]) / dt,
        aio_us_per_update=aio / max(outputs, 1) * 1e6, aio_cores=aio / dt, engine_cores=eng / dt,
        engine_ms_per_step=eng / max(steps, 1) * 1e3, other_cores=(b["process"] - a["process"] - aio - eng) / dt,
        updates_per_s=outputs / dt, received_tokens_per_s=(b["tokens"] - a["tokens"]) / dt,
        received_updates_per_s=(b["updates"] - a["updates"]) / dt,
        received_messages_per_s=(b["messages"] - a["messages"]) / dt,
    )


async def wait_serving(port: int, server: asyncio.Task, timeout_s: float) -> None:
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline and not server.done():
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.05)
    raise RuntimeError("the engine service did not become SERVING" + (" (it exited)" if server.done() else ""))


async def until(condition, what: str, timeout_s: float, *alive) -> None:
    """Poll until condition() holds; fail when a process or task in `alive` ends first, or on the timeout."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for thing in alive:
            if thing.done() if isinstance(thing, asyncio.Task) else thing.poll() is not None:
                raise RuntimeError(f"{what}: {thing} ended first")
        if time.monotonic() > deadline:
            raise RuntimeError(f"{what}: not within {timeout_s:.0f}s")
        await asyncio.sleep(0.02)


async def bench(args: argparse.Namespace) -> dict[str, object]:
    from engine_service.server import serve
    from engine_service.server_config import ServerConfig

    engine = PacedEngine(args.step_ms, args.pre_ms, args.post_ms, max_num_seqs=args.requests)
    config = ServerConfig(model="paced-stand-in", host="127.0.0.1", port=0, metrics_port=0, canary_interval_s=0,
                          max_num_seqs=args.requests, grace_s=2.0,
                          gil_switch_interval_ms=args.gil_switch_interval_ms)
    aio = asyncio.get_running_loop()
    stop, bound = asyncio.Event(), aio.create_future()
    server = asyncio.create_task(serve(config, engine_factory=lambda _config: engine, stop=stop, bound_port=bound,
                                       handle_signals=False))
    counts_file = tempfile.NamedTemporaryFile(prefix="output-path-bench-")
    counts = shared_counters(counts_file.name, 3)
    client = None
    try:
        await asyncio.wait({bound, server}, return_when=asyncio.FIRST_COMPLETED)
        if not bound.done():
            raise RuntimeError(f"the engine service ended before listening (exit {server.result()})")
        port = bound.result()
        await wait_serving(port, server, 60)
        client_args = dict(port=port, calls=args.calls, requests=args.requests, logprobs=args.logprobs,
                           counts_path=counts_file.name)
        client = subprocess.Popen([sys.executable, "-c", CLIENT, json.dumps(client_args)], cwd=ROOT)
        await until(lambda: len(engine.running) == args.requests, "all requests running", 60, client, server)
        await asyncio.sleep(args.warmup)
        engine_ident = next(t.ident for t in threading.enumerate() if t.name == "engine-loop")
        aio_ident = threading.get_ident()
        snaps = [snapshot(engine, aio_ident, engine_ident, counts)]
        for _ in range(args.rounds):
            await asyncio.sleep(args.seconds / args.rounds)
            snaps.append(snapshot(engine, aio_ident, engine_ident, counts))
        switch_interval_ms = sys.getswitchinterval() * 1e3
        running = len(engine.running)
    finally:
        if client is not None:
            client.terminate()  # its calls end with the connection: the service aborts their requests
            try:
                await asyncio.to_thread(client.wait, 10)
            except subprocess.TimeoutExpired:
                client.kill()
                client.wait()
        counts_file.close()
        stop.set()
        try:
            await asyncio.wait_for(server, 30)
        except TimeoutError:
            print("[bench] the engine service did not stop within 30 s", file=sys.stderr)
    rounds = [window(engine, a, b) for a, b in zip(snaps, snaps[1:], strict=False)]
    return {
        "config": dict(requests=args.requests, calls=args.calls, logprobs=args.logprobs, step_ms=args.step_ms,
                       pre_ms=args.pre_ms, post_ms=args.post_ms, gil_switch_interval_ms=switch_interval_ms,
                       seconds=args.seconds, rounds=args.rounds, warmup_s=args.warmup),
        "target_steps_per_s": 1e3 / args.step_ms,
        "running": running,
        "median": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
        "rounds": rounds,
        # Over the whole run: the client read no more tokens than the engine made.
        "totals": dict(steps=engine.steps, engine_tokens=engine.outputs, client_messages=counts[0],
                       client_updates=counts[1], client_tokens=counts[2]),
        "load_average": os.getloadavg()[0],
    }


ROWS = (  # (label, key, format, scale)
    ("steps/s", "steps_per_s", "{:.1f}", 1),
    ("steps that waited (%)", "waited", "{:.1f}", 100),
    ("late after GPU p50 (ms)", "late_p50_ms", "{:.3f}", 1),
    ("late after GPU p99 (ms)", "late_p99_ms", "{:.3f}", 1),
    ("GPU idle (%)", "gpu_idle", "{:.1f}", 100),
    ("asyncio CPU/update (us)", "aio_us_per_update", "{:.2f}", 1),
    ("asyncio thread (cores)", "aio_cores", "{:.3f}", 1),
    ("engine thread (cores)", "engine_cores", "{:.3f}", 1),
    ("other threads (cores)", "other_cores", "{:.3f}", 1),
    ("updates/s made", "updates_per_s", "{:.0f}", 1),
    ("tokens/s received", "received_tokens_per_s", "{:.0f}", 1),
    ("updates/s received", "received_updates_per_s", "{:.0f}", 1),
    ("messages/s received", "received_messages_per_s", "{:.0f}", 1),
)


def print_table(report: dict) -> None:
    c = report["config"]
    calls = "on one Generate stream" if c["calls"] == "stream" else "in as many GenerateStream calls"
    print(f"{report['command']}\n{c['requests']} requests {calls}, logprobs {c['logprobs']}, step "
          f"{c['step_ms']:g} ms (target {report['target_steps_per_s']:.0f} steps/s), host {c['pre_ms']:g} + "
          f"{c['post_ms']:g} ms, switch interval {c['gil_switch_interval_ms']:g} ms; {c['rounds']} windows of "
          f"{c['seconds'] / c['rounds']:.1f} s after a {c['warmup_s']:g} s warm-up; load average "
          f"{report['load_average']:.2f}")
    print_rounds(report, ROWS)


def print_rounds(report: dict, rows) -> None:
    """The table of a report's windows: each row's median, min and max (rows: label, key, format, scale)."""
    print(f"{'':26}{'median':>10}{'min':>10}{'max':>10}")
    for label, key, fmt, scale in rows:
        values = [r[key] * scale for r in report["rounds"]]
        cells = (fmt.format(v) for v in (report["median"][key] * scale, min(values), max(values)))
        print(f"{label:26}" + "".join(f"{cell:>10}" for cell in cells))


def main(argv: list[str] | None = None) -> dict[str, object]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--requests", type=int, default=256)
    p.add_argument("--calls", choices=("stream", "separate"), default="separate",
                   help="stream: one Generate call carries them all; separate: one GenerateStream call each")
    p.add_argument("--logprobs", type=int, default=0, help="top-K alternatives with every token (0: none)")
    p.add_argument("--step-ms", type=float, default=5.0, help="GPU time of a step (an H200's at ~256 running)")
    p.add_argument("--pre-ms", type=float, default=0.5, help="GIL-held host work of a step before its launch")
    p.add_argument("--post-ms", type=float, default=0.5, help="GIL-held host work of a step after its GPU wait")
    p.add_argument("--gil-switch-interval-ms", type=float, default=0.5,
                   help="ServerConfig.gil_switch_interval_ms (the service's default 0.5; Python's is 5)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured time, after the warm-up")
    p.add_argument("--rounds", type=int, default=3, help="windows the measured time is cut into")
    p.add_argument("--warmup", type=float, default=1.0, help="seconds once all requests run, before measuring")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if args.requests < 1 or args.rounds < 1 or args.seconds <= 0 or args.step_ms <= 0 or args.logprobs < 0:
        p.error("--requests, --rounds, --seconds and --step-ms must be positive, --logprobs not negative")
    logging.basicConfig(level=logging.WARNING, format="%(levelname)s %(name)s: %(message)s")
    switch_interval = sys.getswitchinterval()  # serve() sets it process-wide; main() puts it back
    try:
        report = {"command": shlex.join([*PROG.split(), *argv]), **asyncio.run(bench(args))}
    finally:
        sys.setswitchinterval(switch_interval)
    print_table(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


def run_cli(main_, stopped: str) -> None:
    """A bench's command line: a process that did not start or stopped early exits 1 with the message that says
    which; Ctrl-C exits 130, saying what was stopped."""
    try:
        main_()
    except RuntimeError as exc:
        print(f"[bench] {exc}", file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print(f"\n[bench] interrupted; {stopped} were stopped", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    run_cli(main, "the client process and the service")
