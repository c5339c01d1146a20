"""`llm-client`: stream a completion or a chat reply from the tokenizer service to the terminal.

    llm-client --target localhost:50052 "Once upon a time"
    llm-client --chat "What is the capital of France?" --max-tokens 64
    llm-client --tls-ca ca.crt --tls-cert client.crt --tls-key client.key "Hello"   # mutual TLS
"""

from __future__ import annotations

import argparse
import json
import os
import sys

import grpc

from clients.channel import is_port
from clients.requests import OptionsNotHonoured
from clients.text_client import TextClient
from clients.tls import ClientTls, add_tls_arguments, tls_from_arguments
from clients.tool_calls import FORMATS, parse_tool_calls
from protos.llmserve.text.v1 import text_pb2


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="llm-client", description=__doc__.splitlines()[0])
    parser.add_argument("text", help="the prompt, or with --chat the user's message")
    parser.add_argument("--target", default="localhost:50052",
                        help="the tokenizer service's host:port, or a gRPC URI such as unix:/path (default "
                             "localhost:50052)")
    parser.add_argument("--chat", action="store_true", help="send text as a user chat message")
    parser.add_argument("--system", default=None, help="a system message (with --chat)")
    parser.add_argument("--reply-prefix", default=None, metavar="TEXT",
                        help="with --chat: the start of the assistant's reply, which the model continues "
                             "(continue_final_message); the text printed is what follows it")
    parser.add_argument("--thinking", choices=("on", "off"), default=None,
                        help="with --chat: the chat template's thinking switch (Qwen3's); default: the template's")
    parser.add_argument("--tools", default=None, metavar="FILE",
                        help="with --chat: a JSON file holding a list of tools the model may call (OpenAI's shape); "
                             "the calls it makes are printed as JSON on stderr")
    parser.add_argument("--template-kwargs", default=None, metavar="JSON",
                        help="with --chat: further chat-template variables, a JSON object, e.g. "
                             "'{\"date_string\": \"26 Jul 2024\"}'")
    parser.add_argument("--tool-format", choices=FORMATS, default="auto",
                        help="with --tools: how the model writes its tool calls: hermes (Qwen), llama3_json (Llama "
                             "3.1+), mistral "
                             "(keeps special tokens in the text: its [TOOL_CALLS] is one), or auto (whichever the "
                             "text holds)")
    parser.add_argument("--thinking-open", action="store_true",
                        help="with --tools: the chat template opens the thinking in the prompt (Qwen3-Thinking-2507), "
                             "so a reply with no </think> is all thinking and holds no calls")
    parser.add_argument("--keep-special-tokens", action="store_true",
                        help="keep special tokens in the text (skip_special_tokens false), e.g. Mistral's "
                             "[TOOL_CALLS]")
    # Sampling options left out take the model's generation_config.json values, then the engine's defaults
    # (docs/SERVICES.md): max_tokens 16, temperature 1, no top-p/top-k/min-p filter.
    parser.add_argument("--max-tokens", type=int, default=None,
                        help="the most tokens to generate (default: the engine's, 16)")
    parser.add_argument("--temperature", type=float, default=None,
                        help="0 for greedy (default: the model's generation_config.json, else 1)")
    parser.add_argument("--top-p", type=float, default=None,
                        help="sample from the smallest set of tokens whose probability reaches this, in (0, 1] "
                             "(default: the model's, else 1: off)")
    parser.add_argument("--top-k", type=int, default=None,
                        help="sample from the K most likely tokens, -1 for all (default: the model's, else -1)")
    parser.add_argument("--seed", type=int, default=None, help="a seed for a reproducible draw")
    parser.add_argument("--repetition-penalty", type=float, default=None,
                        help="above 1 discourages tokens already in the prompt or output (transformers' rule)")
    parser.add_argument("--presence-penalty", type=float, default=None, help="-2 to 2: per token the output holds")
    parser.add_argument("--frequency-penalty", type=float, default=None, help="-2 to 2: per occurrence in the output")
    parser.add_argument("--stop", action="append", default=[], help="a stop string (repeatable)")
    parser.add_argument("--logit-bias", action="append", default=[], metavar="ID=BIAS",
                        help="add BIAS (-100 to 100) to token ID's logit before sampling (repeatable)")
    parser.add_argument("--json", action="store_true",
                        help="JSON mode: the output is one JSON object (response_format json_object)")
    parser.add_argument("--json-schema", default=None, metavar="FILE",
                        help="the output is one JSON object that the JSON Schema in FILE describes (response_format "
                             "json_schema)")
    parser.add_argument("--n", type=int, default=None, metavar="N",
                        help="completions of the prompt (1-16; with --seed, completion i uses seed + i), each printed "
                             "whole once all have ended")
    parser.add_argument("--priority", type=int, default=None,
                        help="scheduling priority: lower values are served first (default 0)")
    parser.add_argument("--timeout", type=float, default=None, help="the request's deadline in seconds")
    parser.add_argument("--usage", action="store_true", help="print the finish reason and token usage")
    parser.add_argument("--logprobs", type=int, default=None, metavar="N",
                        help="print each token's log-probability and the N (0-20) most likely alternatives' to "
                             "stderr, after the text")
    parser.add_argument("--prompt-logprobs", type=int, default=None, metavar="N",
                        help="print each prompt token's log-probability (after the first) and the N (0-20) most "
                             "likely alternatives' there to stderr, before the generated tokens'")
    add_tls_arguments(parser)
    return parser


def _read_json_schema(parser: argparse.ArgumentParser, path: str | None) -> str | None:
    """--json-schema FILE's text, checked to be a JSON object (the engine checks the rest); a usage error else."""
    if path is None:
        return None
    try:
        with open(path, encoding="utf-8") as f:
            text = f.read()
        schema = json.loads(text)
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        parser.error(f"--json-schema {path}: {exc}")
    if not isinstance(schema, dict):
        parser.error(f"--json-schema {path} must hold a JSON object (a schema), not a {type(schema).__name__}")
    return text


def _bias(item: str) -> tuple[int, float]:
    token, _, bias = item.partition("=")
    return int(token), float(bias)


def connect_hint(exc: grpc.RpcError, tls: ClientTls | None) -> str:
    """What to check when no connection was made (a plaintext/TLS mismatch looks like any refusal), or when
    the server there is not the tokenizer service."""
    if exc.code() == grpc.StatusCode.UNIMPLEMENTED:
        return ("\n(the server at --target does not serve the text API, llmserve.text.v1.TextGeneration: is it an "
                "engine service? Point --target at the tokenizer service, port 50052 by default)")
    details = exc.details() or ""
    # This channel's own failure to connect, as grpc words it; not the service's UNAVAILABLE quoting its failed dial
    # to an engine ("no engine is connected ... failed to connect ..."), which these hints about --target misread.
    if exc.code() != grpc.StatusCode.UNAVAILABLE or not details.startswith("failed to connect"):
        return ""
    if tls is not None and ("Hostname Verification" in details or "No match found for server name" in details):
        return (f"\n(the service's certificate does not name {tls.server_name or 'the host in --target'}: give "
                "--tls-server-name a name it holds, or reissue it; docs/SECURITY.md)")
    if tls is None:
        return ("\n(is the service up? If it serves TLS, give --tls-ca, and --tls-cert/--tls-key for mutual TLS; "
                "docs/SECURITY.md)")
    return ("\n(is the service up? Check that it serves TLS, that --tls-ca signed its certificate, and, if it "
            "asks for one, that --tls-cert/--tls-key are from its client CA; docs/SECURITY.md)")


def _print_results(args, several, stream, texts, tools, prompt_logprobs, logprobs, last) -> bool:
    """Print what comes after the stream: the completions of --n, tool calls, logprobs and usage. False where the
    reply's tool calls could not be read (the rest is printed all the same)."""
    calls_read = True
    if several:
        for index in sorted(texts):
            end = stream.ends.get(index)
            reason = text_pb2.FinishReason.Name(end.finish_reason).removeprefix("FINISH_REASON_") if end else "?"
            print(f"--- completion {index} (finish={reason}) ---")
            print("".join(texts[index]))
    else:
        print()
    if tools is not None:
        try:
            # The reply is --reply-prefix and what followed it: a call the prefix began is the model's too.
            reply = (args.reply_prefix or "") + "".join(texts.get(0, ()))
            for call in parse_tool_calls(reply, args.tool_format, args.thinking_open)[1]:
                print(f"[tool call] {json.dumps(call, ensure_ascii=False)}", file=sys.stderr)
        except ValueError as exc:
            print(f"[tool call] {exc}", file=sys.stderr)
            calls_read = False
    if args.prompt_logprobs is not None:
        print(f"[prompt: {len(prompt_logprobs)} tokens after the first]", file=sys.stderr)
    for lp in prompt_logprobs + logprobs:  # one line a token: the token, its logprob, then the alternatives'
        alternatives = "  ".join(f"{t.token!r} {t.logprob:.4f}" for t in lp.top)
        print(f"{lp.token!r}\t{lp.logprob:.4f}\t{alternatives}", file=sys.stderr)
    if args.usage and last is not None:
        for index, end in sorted(stream.ends.items()):
            u = end.usage
            finish = text_pb2.FinishReason.Name(end.finish_reason).removeprefix("FINISH_REASON_")
            print(f"[{f'completion {index}: ' if several else ''}finish={finish} prompt_tokens={u.prompt_tokens} "
                  f"completion_tokens={u.completion_tokens} cached_tokens={u.cached_tokens}]", file=sys.stderr)
    return calls_read


def main(argv: list[str] | None = None) -> int:
    """Entry point of `llm-client`; returns the exit status. Text stdout's encoding lacks (a cp1252 console, say)
    is written as "?" rather than ending the reply in a UnicodeEncodeError; the stream is restored on return."""
    strict = [out for out in (sys.stdout, sys.stderr) if getattr(out, "errors", None) == "strict"
              and hasattr(out, "reconfigure")]
    for out in strict:
        out.reconfigure(errors="replace")
    try:
        return _main(argv)
    finally:
        for out in strict:
            try:
                out.reconfigure(errors="strict")
            except (OSError, ValueError):  # closed, or its fd replaced after a broken pipe
                pass


# Target URI schemes gRPC resolves, whose rest need not be HOST:PORT (unix:relative.sock, unix-abstract:name).
GRPC_SCHEMES = frozenset(("unix", "unix-abstract", "dns", "ipv4", "ipv6", "vsock", "xds"))


def _main(argv: list[str] | None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if args.timeout is not None and not args.timeout > 0:
        parser.error(f"--timeout must be a positive number of seconds, got {args.timeout}")
    scheme = args.target.partition(":")[0].lower()
    if ("/" not in args.target and scheme not in GRPC_SCHEMES  # gRPC URIs (unix:/..., unix-abstract:name) pass
            and not is_port(args.target.rpartition(":")[2])):
        parser.error(f"--target must be HOST:PORT with a port in 1..65535, e.g. localhost:50052; got {args.target!r}")
    try:
        logit_bias = dict(_bias(item) for item in args.logit_bias)
    except ValueError:
        parser.error(f"--logit-bias takes ID=BIAS, e.g. 42=-100; got {args.logit_bias}")
    if len(logit_bias) < len(args.logit_bias):
        parser.error(f"--logit-bias names a token id twice: {args.logit_bias}")
    sampling = dict(max_tokens=args.max_tokens, temperature=args.temperature, top_p=args.top_p, top_k=args.top_k,
                    seed=args.seed, logprobs=args.logprobs, prompt_logprobs=args.prompt_logprobs,
                    repetition_penalty=args.repetition_penalty, presence_penalty=args.presence_penalty,
                    frequency_penalty=args.frequency_penalty, logit_bias=logit_bias or None,
                    response_format="json_schema" if args.json_schema else "json_object" if args.json else None,
                    json_schema=_read_json_schema(parser, args.json_schema), priority=args.priority,
                    skip_special_tokens=False if args.keep_special_tokens or args.tool_format == "mistral" else None)
    several = args.n is not None and args.n > 1
    if several and (args.tools or args.logprobs is not None):
        parser.error("--tools and --logprobs apply to one completion; leave out --n, or set it to 1")
    if (args.thinking is not None or args.tools or args.system is not None or args.template_kwargs
            or args.reply_prefix is not None) and not args.chat:
        print("llm-client: --system, --reply-prefix, --thinking, --tools and --template-kwargs apply to --chat only",
              file=sys.stderr)
        return 2
    if args.thinking_open and not args.tools:
        parser.error("--thinking-open applies to --tools (how the reply's tool calls are read)")
    if args.tool_format in ("hermes", "llama3_json") and not args.tools:
        parser.error(f"--tool-format {args.tool_format} applies to --tools (mistral alone keeps special tokens)")
    if args.reply_prefix == "":
        parser.error("--reply-prefix must not be empty: it is the start of the reply the model continues")
    tools = None
    if args.tools:
        try:
            with open(args.tools, encoding="utf-8") as f:
                tools = json.load(f)
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
            print(f"llm-client: --tools {args.tools}: {exc}", file=sys.stderr)
            return 2
        if not isinstance(tools, list):
            print(f"llm-client: --tools {args.tools} must hold a JSON list of tools, not a {type(tools).__name__}",
                  file=sys.stderr)
            return 2
    try:
        tls = tls_from_arguments(args)
    except ValueError as exc:
        print(f"llm-client: TLS: {exc}", file=sys.stderr)
        return 2
    with TextClient(args.target, timeout=args.timeout, tls=tls) as client:
        try:
            if args.chat:
                messages = ([{"role": "system", "content": args.system}] if args.system else [])
                messages.append({"role": "user", "content": args.text})
                if args.reply_prefix is not None:
                    messages.append({"role": "assistant", "content": args.reply_prefix})
                thinking = None if args.thinking is None else args.thinking == "on"
                stream = client.chat(messages, stop=args.stop, enable_thinking=thinking, tools=tools, n=args.n,
                                     template_kwargs=args.template_kwargs,
                                     continue_final_message=args.reply_prefix is not None, **sampling)
            else:
                stream = client.generate(args.text, stop=args.stop, n=args.n, **sampling)
        except ValueError as exc:  # a value the protocol cannot carry, e.g. --seed past 2**64
            print(f"llm-client: {exc}", file=sys.stderr)
            return 2
        last = None
        logprobs, prompt_logprobs = [], []
        texts: dict[int, list[str]] = {}  # each completion's text, by index
        try:
            for chunk in stream:
                texts.setdefault(chunk.index, []).append(chunk.text)
                if not several:  # several completions interleave: each is printed whole at the end
                    sys.stdout.write(chunk.text)
                    sys.stdout.flush()
                prompt_logprobs.extend(chunk.prompt_logprobs)
                logprobs.extend(chunk.logprobs)
                last = chunk
        except KeyboardInterrupt:
            stream.cancel()
            return 130
        except BrokenPipeError:  # the reader went away (`llm-client ... | head`): stop quietly, as `cat` does
            stream.cancel()
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # so exit's flush cannot fail again
            return 141
        except grpc.RpcError as exc:
            print(f"\nllm-client: {exc.code().name}: {exc.details()}{connect_hint(exc, tls)}", file=sys.stderr)
            return 1
        except OptionsNotHonoured as exc:  # an older service would ignore an option asked for
            print(f"\nllm-client: {exc}", file=sys.stderr)
            return 1
    try:
        calls_read = _print_results(args, several, stream, texts, tools, prompt_logprobs, logprobs, last)
    except BrokenPipeError:  # `llm-client --n 4 ... | head`: as during streaming, stop quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141
    return 0 if calls_read else 1  # a script reading the calls must not take a malformed one for "no calls"


if __name__ == "__main__":
    sys.exit(main())
