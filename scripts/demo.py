"""The embedded demo: `python -m scripts.demo` (or `--model DIR` for a real Hugging Face model).

Builds the tiny demo checkpoint when absent (offline, deterministic), starts the engine service and the
tokenizer service as subprocesses on free loopback ports, waits for both to report SERVING, streams a chat
completion through the client library to the terminal, and stops both services with SIGTERM.
"""

from __future__ import annotations

import argparse
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import grpc
from grpc_health.v1 import health_pb2, health_pb2_grpc

from clients.requests import sampling_params
from clients.text_client import TextClient
from protos.llmserve.text.v1 import text_pb2

ROOT = Path(__file__).resolve().parent.parent
DEMO_DIR = ROOT / ".demo_model"


class DemoFailed(RuntimeError):
    """The demo cannot go on; the message says why (and where the logs are)."""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_serving(target: str, proc: subprocess.Popen, log: Path, timeout_s: float,
                 timeout_flag: str = "--startup-timeout") -> None:
    """Poll grpc.health.v1 until SERVING; fail early (DemoFailed, with the end of its log) if the process died.
    timeout_flag: what sets timeout_s, for the message."""
    deadline = time.monotonic() + timeout_s
    with grpc.insecure_channel(target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise DemoFailed(f"the service on {target} exited with {proc.returncode} during start-up; the end "
                                 f"of its log ({log}):\n{log.read_text()[-4000:]}")
            try:
                if stub.Check(health_pb2.HealthCheckRequest(), timeout=1).status == health_pb2.HealthCheckResponse.SERVING:
                    return
            except grpc.RpcError:
                pass
            time.sleep(0.1)
    raise DemoFailed(f"the service on {target} was not SERVING within {timeout_s:.0f}s ({timeout_flag}); the "
                     f"end of its log ({log}):\n{log.read_text()[-4000:]}")


def stop(proc: subprocess.Popen, timeout_s: float = 30.0) -> int:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(timeout_s)
    except subprocess.TimeoutExpired:
        proc.kill()
        return proc.wait()


def main(argv: list[str] | None = None) -> int:
    """Run the demo; its exit status (1 with one message on a failure, 130 on Ctrl-C)."""
    try:
        return run(argv)
    except DemoFailed as exc:
        print(f"[demo] {exc}", file=sys.stderr)
    except grpc.RpcError as exc:
        print(f"[demo] the completion failed: {exc.code().name}: {exc.details()}", file=sys.stderr)
    except ValueError as exc:  # a value the client refuses to send (it names it)
        print(f"[demo] the request was refused: {exc}", file=sys.stderr)
    except KeyboardInterrupt:
        print("\n[demo] interrupted; both services stopped", file=sys.stderr)
        return 130
    return 1


def run(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m scripts.demo", description=__doc__.splitlines()[0])
    parser.add_argument("--model", default=None, help="a Hugging Face model directory (default: the demo model)")
    parser.add_argument("--message", default="Write a short poem about the sea.", help="the user's chat message")
    parser.add_argument("--max-tokens", type=int, default=48)
    parser.add_argument("--startup-timeout", type=float, default=300.0)
    args = parser.parse_args(argv)
    # Checked before anything starts: the client refused such a value only once both services were up, and it
    # ended the demo in a traceback.
    if args.max_tokens < 1:
        parser.error(f"--max-tokens must be at least 1, got {args.max_tokens}")
    try:
        sampling_params(max_tokens=args.max_tokens)
    except ValueError as exc:
        parser.error(f"--max-tokens: {exc}")

    engine_flags: list[str] = []
    if args.model is None:
        from scripts.demo_model import build_demo_model

        print(f"[demo] demo model: {DEMO_DIR} (built if absent)", file=sys.stderr)
        model = str(build_demo_model(DEMO_DIR))
        # A tiny model on CPU: float32, eager, and a small KV pool so start-up is quick.
        engine_flags = ["--device", "cpu", "--dtype", "float32", "--enforce-eager", "true",
                        "--num-kvcache-blocks", "256", "--max-num-seqs", "16"]
    else:
        model = args.model
    engine_port, text_port = free_port(), free_port()
    # Free ports for /metrics too, so the demo never collides with services already running here.
    engine_metrics, text_metrics = free_port(), free_port()
    logs = Path(tempfile.mkdtemp(prefix="llmserve-demo-"))
    procs: list[subprocess.Popen] = []
    try:
        for name, cmd in (
            ("engine", ["engine_service", "--model", model, "--host", "127.0.0.1", "--port",
                        str(engine_port), "--metrics-port", str(engine_metrics), *engine_flags]),
            ("tokenizer", ["tokenizer_service", "--model", model, "--host", "127.0.0.1", "--port",
                           str(text_port), "--engines", f"127.0.0.1:{engine_port}", "--metrics-port",
                           str(text_metrics)]),
        ):
            with open(logs / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen([sys.executable, "-m", *cmd], cwd=ROOT, stdout=log,
                                              stderr=subprocess.STDOUT))
            print(f"[demo] started the {name} service (pid {procs[-1].pid}, log {logs / (name + '.log')})",
                  file=sys.stderr)
        wait_serving(f"127.0.0.1:{engine_port}", procs[0], logs / "engine.log", args.startup_timeout)
        wait_serving(f"127.0.0.1:{text_port}", procs[1], logs / "tokenizer.log", args.startup_timeout)
        print(f"[demo] both services SERVING (metrics: http://127.0.0.1:{engine_metrics}/metrics, "
              f"http://127.0.0.1:{text_metrics}/metrics); user: {args.message}\n", file=sys.stderr)
        with TextClient(f"127.0.0.1:{text_port}", timeout=120) as client:
            last = None
            if client.model_info().has_chat_template:
                stream = client.chat([{"role": "user", "content": args.message}], max_tokens=args.max_tokens)
            else:  # a base model: the message as a plain prompt
                print("[demo] the model has no chat template: sending the message as a plain prompt",
                      file=sys.stderr)
                stream = client.generate(args.message, max_tokens=args.max_tokens)
            for chunk in stream:
                sys.stdout.write(chunk.text)
                sys.stdout.flush()
                last = chunk
        print()
        if last is not None:
            reason = text_pb2.FinishReason.Name(last.finish_reason)
            print(f"\n[demo] finish_reason={reason} prompt_tokens={last.usage.prompt_tokens} "
                  f"completion_tokens={last.usage.completion_tokens}", file=sys.stderr)
    finally:
        codes = [stop(p) for p in reversed(procs)]  # the front door first, then the engine
    if any(codes):
        print(f"[demo] a service exited uncleanly: {codes}; logs in {logs}", file=sys.stderr)
        return 1
    shutil.rmtree(logs, ignore_errors=True)  # kept only when something went wrong
    print("[demo] both services stopped cleanly", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
