"""How fast the tokenizer service relays tokens, and its CPU a token: `python -m scripts.text_relay_bench`.

    python -m scripts.text_relay_bench --requests 256 --mode generate   # 256 Generate calls
    python -m scripts.text_relay_bench --requests 256 --mode multi      # one GenerateMulti call carrying 256
    python -m scripts.text_relay_bench --mode multi --logprobs 5 --stop # top-5 logprobs, two stop strings
    python -m scripts.text_relay_bench --requests 256 --stream-interval 4  # a message every 4 tokens

The real tokenizer service (python -m tokenizer_service.server, its own process) runs on the demo model (built
into .demo_model when absent, as scripts.demo does) or --model DIR, over a stand-in engine in another process
that computes nothing: every --step-ms it sends, on each Generate stream open to it, one token for each live
request (with --logprobs K alternatives), from an English text tokenized by the model's tokenizer, cycled. This
process is the client: --requests requests always live, of --max-tokens tokens each, each replaced when it
finishes, on as many Generate calls (--mode generate) or on one GenerateMulti call (--mode multi); the first ones
are of 1/N, 2/N ... of --max-tokens, so that requests finish spread out rather than in waves. After --warmup
seconds it measures --seconds in --rounds equal windows and reports the median (min-max) over the windows of:
  tokens/s        token ids relayed to the client, against the tokens/s the engine sent
  messages/s      responses the client read (one carries every token queued for its request)
  CPU/token       the tokenizer service's CPU time (user + system, all its threads, /proc/PID/stat) per token
                  relayed, and its share of a core
  engine steps/s  the stand-in's steps, against 1000 / --step-ms: fewer when the service's reading backs it up
The client and the stand-in share the machine's cores with the service: their shares of a core are reported.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import shlex
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

from scripts.output_path_bench import print_rounds, run_cli, shared_counters

PROG = "python -m scripts.text_relay_bench"
ROOT = Path(__file__).resolve().parent.parent
TICKS = os.sysconf("SC_CLK_TCK")
# What the stand-in engine says, cycled: prose, digits, punctuation, accents and CJK (multi-byte characters cut
# across tokens are what the detokenizer holds back).
TEXT = ("The quick brown fox jumps over the lazy dog. In 1905, Einstein published four papers; each one changed "
        "physics. Café, naïve and résumé are loanwords, some with accents. 東京は日本の首都です。 ") * 4
STOP_STRINGS = ("never appears XYZ", "</answer>")  # --stop: checked on every token, never matched
PROMPT = [11, 12, 13, 14]


# ---- the stand-in engine (its own process) ------------------------------------------------------------------

ENGINE = "import json, sys; from scripts.text_relay_bench import run_engine; run_engine(**json.loads(sys.argv[1]))"


def run_engine(model: str, step_s: float, counts_path: str) -> None:
    """Serve until terminated, counting into the counters at counts_path: [port (once listening), steps, tokens
    sent]."""
    try:
        asyncio.run(_engine(Path(model), step_s, shared_counters(counts_path, 3)))
    except KeyboardInterrupt:
        pass


def model_tokens(model: Path):
    """The model's vocabulary size, EOS ids (as the tokenizer service counts them) and the script's tokens."""
    from tokenizers import Tokenizer

    from tokenizer_service.validation import read_eos_token_ids

    tokenizer = Tokenizer.from_file(str(model / "tokenizer.json"))
    config = json.loads((model / "config.json").read_text())
    vocab = config.get("vocab_size") or config.get("text_config", {}).get("vocab_size") or tokenizer.get_vocab_size()
    eos_token = json.loads((model / "tokenizer_config.json").read_text()).get("eos_token")
    if isinstance(eos_token, dict):
        eos_token = eos_token.get("content")
    eos_id = tokenizer.token_to_id(eos_token) if eos_token else None
    eos = read_eos_token_ids(str(model), SimpleNamespace(eos_token_id=eos_id), vocab)
    script = [t for t in tokenizer.encode(TEXT, add_special_tokens=False).ids if t not in eos]
    return vocab, sorted(eos), script


async def _engine(model: Path, step_s: float, shared) -> None:
    import grpc

    from protos.llmserve.engine.v1 import engine_pb2 as pb
    from protos.llmserve.engine.v1 import engine_pb2_grpc as pb_grpc

    vocab, eos, script = model_tokens(model)

    class StandInEngine(pb_grpc.EngineServicer):
        async def GetModelInfo(self, request, context):
            return pb.ModelInfo(model_name=model.name, vocab_size=vocab, eos_token_ids=eos, max_model_len=10_000_000,
                                block_size=16, features=["logprobs"])

        async def Generate(self, request_iterator, context):
            live: dict[str, list[int]] = {}  # request id -> [tokens sent, max_tokens, prompt length, logprobs]
            aborted: list[str] = []
            reading = True

            async def read() -> None:
                nonlocal reading
                async for frame in request_iterator:
                    for rid in frame.abort_request_ids:
                        if live.pop(rid, None) is not None:
                            aborted.append(rid)
                    for r in frame.requests:
                        sp = r.sampling_params
                        live[r.request_id] = [0, sp.max_tokens if sp.HasField("max_tokens") else 16,
                                              len(r.prompt_token_ids), sp.logprobs if sp.HasField("logprobs") else 0]
                reading = False

            reader = asyncio.create_task(read())
            next_step = time.monotonic()
            try:
                while reading or live or aborted:
                    next_step += step_s
                    delay = next_step - time.monotonic()
                    if delay > 0:
                        await asyncio.sleep(delay)
                    else:
                        next_step = time.monotonic()  # late (the writes backed up): no catching up
                    if not live and not aborted:
                        continue
                    updates = [pb.RequestUpdate(request_id=rid, finish_reason=pb.FINISH_REASON_ABORT)
                               for rid in aborted]
                    aborted.clear()
                    for rid, state in list(live.items()):
                        sent, max_tokens, prompt_len, k = state
                        token = script[sent % len(script)]
                        state[0] = sent = sent + 1
                        update = pb.RequestUpdate(request_id=rid, new_token_ids=[token], num_prompt_tokens=prompt_len)
                        if k:
                            update.logprobs.append(pb.TokenLogprobs(logprob=-0.5, top_token_ids=script[:k],
                                                                    top_logprobs=[-1.0] * k))
                        if sent >= max_tokens:
                            update.finish_reason = pb.FINISH_REASON_LENGTH
                            del live[rid]
                        updates.append(update)
                    yield pb.ServerFrame(updates=updates)
                    shared[1] += 1
                    shared[2] += sum(len(u.new_token_ids) for u in updates)
            finally:
                reader.cancel()

    server = grpc.aio.server(options=[("grpc.max_receive_message_length", 64 << 20),
                                      ("grpc.max_send_message_length", 64 << 20)])
    pb_grpc.add_EngineServicer_to_server(StandInEngine(), server)
    port = server.add_insecure_port("127.0.0.1:0")
    await server.start()
    shared[0] = port
    try:
        await server.wait_for_termination()
    finally:  # Ctrl-C reaches this process too
        await server.stop(0)


# ---- the client and the measurement (this process) ----------------------------------------------------------


def process_cpu(pid: int) -> float:
    """CPU seconds (user + system) of a process so far, all its threads, from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / TICKS


class Counts:
    """What the client read: messages, token ids, finished requests."""

    def __init__(self) -> None:
        self.messages = self.tokens = self.finished = 0

    def add(self, response) -> None:
        self.messages += 1
        self.tokens += len(response.token_ids)
        if response.finish_reason:
            self.finished += 1


async def drive(stub, args: argparse.Namespace, counts: Counts) -> None:
    """Keep args.requests requests live until cancelled."""
    from protos.llmserve.text.v1 import text_pb2 as pb

    ids = iter(range(1 << 62))

    def request(first: int | None = None) -> pb.GenerateRequest:
        """A request of args.max_tokens tokens; the first ones (first = 0, 1, ...) of a share of them, so that
        requests finish spread out, not in waves."""
        n = args.max_tokens if first is None else max(1, args.max_tokens * (first + 1) // args.requests)
        params = pb.SamplingParams(max_tokens=n, ignore_eos=True)
        if args.logprobs:
            params.logprobs = args.logprobs
        req = pb.GenerateRequest(request_id=f"q{next(ids)}", prompt_token_ids=pb.TokenIds(ids=PROMPT),
                                 sampling_params=params)
        if args.stop:
            req.stop.extend(STOP_STRINGS)
        return req

    if args.mode == "generate":
        async def one(i: int) -> None:
            req = request(first=i)
            while True:
                async for response in stub.Generate(req):
                    counts.add(response)
                req = request()

        await asyncio.gather(*(one(i) for i in range(args.requests)))
    else:
        more: asyncio.Queue = asyncio.Queue()

        async def requests():
            for i in range(args.requests):
                yield pb.MultiRequest(generate=request(first=i))
            while True:
                yield pb.MultiRequest(generate=await more.get())

        async for response in stub.GenerateMulti(requests()):
            counts.add(response)
            if response.finish_reason:
                more.put_nowait(request())


async def wait_serving(port: int, proc: subprocess.Popen, log: Path, timeout_s: float) -> None:
    """Poll the tokenizer service's health until SERVING (it is once it has connected to the engine)."""
    import grpc
    from grpc_health.v1 import health_pb2, health_pb2_grpc

    deadline = time.monotonic() + timeout_s
    async with grpc.aio.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while proc.poll() is None and time.monotonic() < deadline:
            try:
                reply = await stub.Check(health_pb2.HealthCheckRequest(), timeout=1)
                if reply.status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            await asyncio.sleep(0.1)
    why = f"exited with {proc.returncode}" if proc.poll() is not None else f"was not SERVING within {timeout_s:.0f}s"
    raise RuntimeError(f"the tokenizer service {why}; the end of its log:\n{log.read_text()[-3000:]}")


def wait_listening(engine: subprocess.Popen, shared, timeout_s: float) -> int:
    deadline = time.monotonic() + timeout_s
    while not shared[0]:
        if engine.poll() is not None:
            raise RuntimeError(f"the stand-in engine exited with {engine.returncode} before listening")
        if time.monotonic() > deadline:
            raise RuntimeError(f"the stand-in engine was not listening within {timeout_s:.0f}s")
        time.sleep(0.02)
    return shared[0]


async def bench(args: argparse.Namespace, model: str, logs: Path) -> dict[str, object]:
    import grpc

    from protos.llmserve.text.v1 import text_pb2_grpc as pb_grpc
    from scripts.demo import free_port

    counts_path = logs / "engine-counts"
    counts_path.touch()
    shared = shared_counters(counts_path, 3)
    engine_args = dict(model=model, step_s=args.step_ms / 1e3, counts_path=str(counts_path))
    engine = tokenizer = task = None
    counts = Counts()
    try:
        engine = subprocess.Popen([sys.executable, "-c", ENGINE, json.dumps(engine_args)], cwd=ROOT)
        engine_port = await asyncio.to_thread(wait_listening, engine, shared, 60)
        port = free_port()
        with open(logs / "tokenizer.log", "wb") as log:
            tokenizer = subprocess.Popen(
                [sys.executable, "-m", "tokenizer_service.server", "--model", model, "--host", "127.0.0.1",
                 "--port", str(port), "--engines", f"127.0.0.1:{engine_port}", "--metrics-port", "0",
                 "--grace-s", "1", "--stream-interval", str(args.stream_interval)], cwd=ROOT, stdout=log,
                stderr=subprocess.STDOUT)
        await wait_serving(port, tokenizer, logs / "tokenizer.log", 120)
        async with grpc.aio.insecure_channel(f"127.0.0.1:{port}",
                                             options=[("grpc.max_receive_message_length", 64 << 20)]) as channel:
            task = asyncio.create_task(drive(pb_grpc.TextGenerationStub(channel), args, counts))

            def snapshot() -> dict[str, float]:
                return dict(t=time.monotonic(), tokens=counts.tokens, messages=counts.messages,
                            finished=counts.finished, tokenizer_cpu=process_cpu(tokenizer.pid),
                            engine_cpu=process_cpu(engine.pid), client_cpu=time.process_time(),
                            steps=shared[1], sent=shared[2])

            await asyncio.sleep(args.warmup)
            if task.done():
                task.result()  # the client failed: say why
                raise RuntimeError("the client stopped")
            snaps = [snapshot()]
            for _ in range(args.rounds):
                await asyncio.sleep(args.seconds / args.rounds)
                snaps.append(snapshot())
            if task.done():
                task.result()
            task.cancel()
            await asyncio.gather(task, return_exceptions=True)
    finally:
        if task is not None:
            task.cancel()
        if tokenizer is not None:
            if tokenizer.poll() is None:
                tokenizer.send_signal(signal.SIGTERM)
            try:
                await asyncio.to_thread(tokenizer.wait, 15)
            except subprocess.TimeoutExpired:
                tokenizer.kill()
                tokenizer.wait()
        if engine is not None:
            engine.terminate()
            try:
                await asyncio.to_thread(engine.wait, 10)
            except subprocess.TimeoutExpired:
                engine.kill()
                engine.wait()
    rounds = []
    for a, b in zip(snaps, snaps[1:], strict=False):
        dt, tokens = b["t"] - a["t"], b["tokens"] - a["tokens"]
        tokenizer_cpu = b["tokenizer_cpu"] - a["tokenizer_cpu"]
        rounds.append(dict(
            seconds=dt, tokens=tokens, tokens_per_s=tokens / dt, messages_per_s=(b["messages"] - a["messages"]) / dt,
            finished_per_s=(b["finished"] - a["finished"]) / dt, sent_tokens_per_s=(b["sent"] - a["sent"]) / dt,
            engine_steps_per_s=(b["steps"] - a["steps"]) / dt, tokenizer_us_per_token=tokenizer_cpu / max(tokens, 1) * 1e6,
            tokenizer_cores=tokenizer_cpu / dt, engine_cores=(b["engine_cpu"] - a["engine_cpu"]) / dt,
            client_cores=(b["client_cpu"] - a["client_cpu"]) / dt,
        ))
    return {
        "config": dict(model=model, requests=args.requests, mode=args.mode, step_ms=args.step_ms,
                       max_tokens=args.max_tokens, logprobs=args.logprobs, stop=args.stop, seconds=args.seconds,
                       rounds=args.rounds, warmup_s=args.warmup, stream_interval=args.stream_interval),
        "offered_tokens_per_s": args.requests * 1e3 / args.step_ms,
        "median": {k: statistics.median(r[k] for r in rounds) for k in rounds[0]},
        "rounds": rounds,
        # Over the whole run: the client read no more tokens than the engine sent.
        "totals": dict(engine_steps=shared[1], engine_tokens=shared[2], client_tokens=counts.tokens,
                       client_messages=counts.messages, client_finished=counts.finished),
        "load_average": os.getloadavg()[0],
    }


ROWS = (  # (label, key, format, scale)
    ("tokens/s relayed", "tokens_per_s", "{:.0f}", 1),
    ("tokens/s sent by engine", "sent_tokens_per_s", "{:.0f}", 1),
    ("messages/s", "messages_per_s", "{:.0f}", 1),
    ("requests finished/s", "finished_per_s", "{:.1f}", 1),
    ("tokenizer CPU/token (us)", "tokenizer_us_per_token", "{:.1f}", 1),
    ("tokenizer (cores)", "tokenizer_cores", "{:.3f}", 1),
    ("engine steps/s", "engine_steps_per_s", "{:.1f}", 1),
    ("stand-in engine (cores)", "engine_cores", "{:.3f}", 1),
    ("client (cores)", "client_cores", "{:.3f}", 1),
)


def print_table(report: dict) -> None:
    c = report["config"]
    calls = "on one GenerateMulti call" if c["mode"] == "multi" else "in as many Generate calls"
    extras = "".join((f", logprobs {c['logprobs']}" if c["logprobs"] else "", ", stop strings" if c["stop"] else ""))
    print(f"{report['command']}\n{c['requests']} requests {calls} ({c['max_tokens']} tokens each{extras}), a step "
          f"every {c['step_ms']:g} ms (offered {report['offered_tokens_per_s']:.0f} tokens/s); {c['rounds']} windows "
          f"of {c['seconds'] / c['rounds']:.1f} s after a {c['warmup_s']:g} s warm-up; load average "
          f"{report['load_average']:.2f}")
    print_rounds(report, ROWS)


def main(argv: list[str] | None = None) -> dict[str, object]:
    argv = sys.argv[1:] if argv is None else argv
    p = argparse.ArgumentParser(prog=PROG, description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="a model directory with tokenizer.json (default: the demo model)")
    p.add_argument("--requests", type=int, default=256, help="requests live at any time")
    p.add_argument("--mode", choices=("generate", "multi"), default="generate",
                   help="generate: one Generate call a request; multi: one GenerateMulti call carries them all")
    p.add_argument("--step-ms", type=float, default=5.0, help="the stand-in engine's step period")
    p.add_argument("--max-tokens", type=int, default=400, help="tokens of each request")
    p.add_argument("--logprobs", type=int, default=0, help="top-K alternatives with every token (0: none)")
    p.add_argument("--stop", action="store_true", help="two stop strings on every request (never matched)")
    p.add_argument("--stream-interval", type=int, default=1,
                   help="the service's --stream-interval: tokens a message after the first (default 1)")
    p.add_argument("--seconds", type=float, default=6.0, help="measured time, after the warm-up")
    p.add_argument("--rounds", type=int, default=3, help="windows the measured time is cut into")
    p.add_argument("--warmup", type=float, default=2.0, help="seconds of load before measuring")
    p.add_argument("--json", type=Path, help="write the report here")
    args = p.parse_args(argv)
    if min(args.requests, args.rounds, args.max_tokens) < 1 or args.seconds <= 0 or args.step_ms <= 0:
        p.error("--requests, --rounds, --max-tokens, --seconds and --step-ms must be positive")
    if args.model is None:
        from scripts.demo import DEMO_DIR
        from scripts.demo_model import build_demo_model

        model = str(build_demo_model(DEMO_DIR))
    else:
        model = str(Path(args.model).resolve())
    with tempfile.TemporaryDirectory(prefix="text-relay-bench-") as logs:
        report = {"command": shlex.join([*PROG.split(), *argv]), **asyncio.run(bench(args, model, Path(logs)))}
    print_table(report)
    if args.json is not None:
        args.json.write_text(json.dumps(report, indent=2) + "\n")
    return report


if __name__ == "__main__":
    run_cli(main, "the tokenizer service and the stand-in engine")
