"""Command line client for people and tests.

    python -m services.inference.cli [--target HOST:PORT] generate "Once upon a time" --max-new-tokens 32
    python -m services.inference.cli continue SESSION_ID " and then?"
    python -m services.inference.cli generate "Tell me a story" --request-id story-1 --top-logprobs 5
    python -m services.inference.cli abort story-1          # from any connection of the same tenant
    python -m services.inference.cli sessions [--delete SESSION_ID | --show SESSION_ID]
    python -m services.inference.cli info
    python -m services.inference.cli export SESSION_ID session.razor      # "-" = stdout
    python -m services.inference.cli import session.razor                 # "-" = stdin; prints the new session
    python -m services.inference.cli fork SESSION_ID                      # prints the copy

Generated text streams to stdout; a summary line (session, finish reason, usage) goes to
stderr, or with ``--json`` one JSON object goes to stdout instead. Errors print the gRPC
status and message and exit with 1.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict
from pathlib import Path

import grpc
from google.protobuf.json_format import MessageToDict

from .auth import channel_credentials, server_name_options
from .client import RazorClient, Reply, collect


def _add_sampling(p: argparse.ArgumentParser) -> None:
    p.add_argument("--max-new-tokens", type=int)
    p.add_argument("--temperature", type=float)
    p.add_argument("--top-p", type=float)
    p.add_argument("--top-k", type=int)
    p.add_argument("--seed", type=int)
    p.add_argument("--stop", action="append", default=[], help="stop string (repeatable)")
    p.add_argument("--logprobs", action="store_true")
    p.add_argument("--top-logprobs", type=int, default=0, metavar="K",
                   help="the K most likely tokens at each generated position (0..20)")
    p.add_argument("--request-id", default="", help="name the turn, for abort (default: the server assigns one)")
    p.add_argument("--chat", action="store_true", help="send the text as one user chat message")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of streaming text")


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m services.inference.cli", description=__doc__.split("\n")[0])
    p.add_argument("--target", default=os.environ.get("RAZOR_TARGET", "127.0.0.1:50051"))
    p.add_argument("--token", default=os.environ.get("RAZOR_AUTH_TOKEN", ""), help="bearer token")
    p.add_argument("--timeout", type=float, default=None, help="deadline in seconds")
    p.add_argument("--tls", action="store_true", help="connect with TLS, trusting the system's CA roots")
    p.add_argument("--ca-cert", default="", metavar="PEM",
                   help="connect with TLS, trusting this CA (or the service's self-signed certificate)")
    p.add_argument("--server-name", default="", metavar="NAME",
                   help="with TLS: the name the service's certificate is issued for, where --target is an address")
    sub = p.add_subparsers(dest="command", required=True)
    gen = sub.add_parser("generate", help="start a session")
    gen.add_argument("prompt")
    gen.add_argument("--no-session", action="store_true", help="do not keep the session")
    _add_sampling(gen)
    cont = sub.add_parser("continue", help="add a turn to a session")
    cont.add_argument("session_id")
    cont.add_argument("text")
    _add_sampling(cont)
    ses = sub.add_parser("sessions", help="list sessions, or show / delete one")
    ses.add_argument("--show", metavar="SESSION_ID")
    ses.add_argument("--delete", metavar="SESSION_ID")
    sub.add_parser("info", help="model, device, head map and memory")
    abort = sub.add_parser("abort", help="stop a running turn by its request id")
    abort.add_argument("request_id")
    update = sub.add_parser("update", help="set a session's TTL or pin it resident")
    update.add_argument("session_id")
    update.add_argument("--ttl", type=int, metavar="SECONDS", help="expire this long after its last use")
    update.add_argument("--pin", action=argparse.BooleanOptionalAction, help="keep it resident (--no-pin: not)")
    sub.add_parser("load", help="this replica's turns, sessions and KV bytes")
    _add_transfer(sub)
    return p


def _add_transfer(sub) -> None:
    exp = sub.add_parser("export", help="write a session's export to a file")
    exp.add_argument("session_id")
    exp.add_argument("file", help='where to write it ("-" = stdout)')
    imp = sub.add_parser("import", help="import an export as a new session")
    imp.add_argument("file", help='the export ("-" = stdin)')
    fork = sub.add_parser("fork", help="copy a session under a new id")
    fork.add_argument("session_id")


def _export(client: RazorClient, sid: str, file: str) -> None:
    """Stream the export to ``file`` (through a .part file, renamed once whole) or to stdout."""
    if file == "-":
        for piece in client.stream_export(sid):
            sys.stdout.buffer.write(piece)
        sys.stdout.buffer.flush()
        return
    partial, size = Path(file + ".part"), 0
    try:
        with partial.open("wb") as out:
            for piece in client.stream_export(sid):
                size += out.write(piece)
        partial.replace(file)
    finally:
        partial.unlink(missing_ok=True)
    print(json.dumps({"session_id": sid, "file": file, "bytes": size}))


def _import(client: RazorClient, file: str) -> None:
    data = sys.stdin.buffer.read() if file == "-" else Path(file).read_bytes()
    print(json.dumps(MessageToDict(client.import_session(data))))


def _turn_kwargs(args) -> dict:
    return dict(max_new_tokens=args.max_new_tokens, temperature=args.temperature, top_p=args.top_p,
                top_k=args.top_k, seed=args.seed, stop_strings=args.stop, logprobs=args.logprobs,
                top_logprobs=args.top_logprobs, request_id=args.request_id, timeout_s=args.timeout)


def _input(args, text: str) -> dict:
    return {"messages": [{"role": "user", "content": text}]} if args.chat else {}


def _run_turn(stream, as_json: bool) -> None:
    if as_json:
        print(json.dumps(asdict(collect(stream))))
        return
    def echo(messages):
        for msg in messages:
            if msg.HasField("chunk"):
                sys.stdout.write(msg.chunk.text)
                sys.stdout.flush()
            yield msg

    reply: Reply = collect(echo(stream))
    print()
    print(f"[session {reply.session_id or '-'} | request {reply.request_id} | finish {reply.finish_reason} | "
          f"prompt {reply.prompt_tokens} generated {reply.generated_tokens} cached {reply.cached_tokens}]",
          file=sys.stderr)


def _client(args) -> RazorClient:
    if not (args.tls or args.ca_cert):
        if args.server_name:
            raise ValueError("--server-name names a TLS certificate: add --tls or --ca-cert")
        return RazorClient(args.target, token=args.token, timeout_s=args.timeout)
    return RazorClient(args.target, token=args.token, timeout_s=args.timeout,
                       credentials=channel_credentials(args.ca_cert), options=server_name_options(args.server_name))


def run(args) -> None:
    with _client(args) as client:
        if args.command == "generate":
            kwargs = _input(args, args.prompt) or {"prompt": args.prompt}
            _run_turn(client.stream_generate(**kwargs, keep_session=not args.no_session, **_turn_kwargs(args)),
                      args.json)
        elif args.command == "continue":
            kwargs = _input(args, args.text) or {"text": args.text}
            _run_turn(client.stream_continue(args.session_id, **kwargs, **_turn_kwargs(args)), args.json)
        elif args.command == "sessions":
            if args.delete:
                print(json.dumps({"deleted": client.delete_session(args.delete)}))
            elif args.show:
                print(json.dumps(MessageToDict(client.get_session(args.show))))
            else:
                for session in client.list_sessions():
                    print(json.dumps(MessageToDict(session)))
        elif args.command == "update":
            print(json.dumps(MessageToDict(client.update_session(args.session_id, ttl_s=args.ttl, pinned=args.pin))))
        elif args.command == "load":
            print(json.dumps(MessageToDict(client.get_load())))
        elif args.command == "abort":
            print(json.dumps({"found": client.abort(args.request_id)}))
        elif args.command == "export":
            _export(client, args.session_id, args.file)
        elif args.command == "import":
            _import(client, args.file)
        elif args.command == "fork":
            print(json.dumps(MessageToDict(client.fork_session(args.session_id))))
        else:
            print(json.dumps(MessageToDict(client.server_info()), indent=2))


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    try:
        run(args)
    except grpc.RpcError as exc:
        print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
        return 1
    except (OSError, ValueError) as exc:   # export/import files, TLS files and flags
        print(f"error: {exc}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
