"""`baton` command line: argument parsing only; each command lives in its own module.

Command modules are imported inside their branch so `baton --help` does not pay for torch.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

DEFAULT_CONFIG = Path(__file__).resolve().parent.parent / "configs" / "minilm.toml"
GENERATE_CONFIG = DEFAULT_CONFIG.with_name("gpt2.toml")


def _keys(p: argparse.ArgumentParser) -> None:
    """Flags for a broker whose client endpoint requires keys (`endpoints.client_keys`)."""
    p.add_argument("--key", default=None, metavar="FILE", help="our secret key (NAME.key_secret)")
    p.add_argument(
        "--server-key", default=None, metavar="FILE", help="the broker's public key (NAME.key)"
    )


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="baton", description="Baton: a job queue for embeddings.")
    sub = p.add_subparsers(dest="command", required=True, metavar="COMMAND")

    up = sub.add_parser("up", help="start a broker, controller and worker fleet")
    up.add_argument("-c", "--config", required=True, help="TOML config file")
    up.add_argument("--set", action="append", metavar="KEY=VALUE", help="override a config key")

    s = sub.add_parser("submit", help="embed every job of a JSONL file")
    s.add_argument("--endpoint", required=True, help="the broker's client endpoint")
    s.add_argument("--input", required=True, help="JSONL of {id, task, text}; - for stdin")
    s.add_argument("--output", required=True, help="JSONL of results; - for stdout")
    s.add_argument("--window", type=int, default=512, help="jobs outstanding at once")
    s.add_argument("--timeout", type=float, default=60.0, help="seconds without any progress")
    _keys(s)

    bt = sub.add_parser("batch", help="run an OpenAI batch file (resumable by custom_id)")
    bt.add_argument("--endpoint", required=True, help="the broker's client endpoint")
    bt.add_argument("--input", required=True, help="JSONL of {custom_id, method, url, body}")
    bt.add_argument("--output", required=True, help="OpenAI batch output lines (appended)")
    bt.add_argument("--errors", default=None, help="failed lines here (default: --output)")
    bt.add_argument("--window", type=int, default=256, help="lines in flight at once")
    bt.add_argument("--timeout", type=float, default=60.0, help="seconds without any progress")
    bt.add_argument(
        "--model-dir", default=None, help="the model's directory: its chat template, for chat lines"
    )
    _keys(bt)

    st = sub.add_parser("status", help="show the fleet's workers and job counts")
    st.add_argument("--endpoint", required=True)
    st.add_argument("--json", action="store_true", help="print the status as one JSON object")
    st.add_argument("--timeout", type=float, default=5.0)
    _keys(st)

    c = sub.add_parser("cancel", help="cancel queued or running jobs")
    c.add_argument("--endpoint", required=True)
    c.add_argument("--timeout", type=float, default=10.0)
    _keys(c)
    c.add_argument("ids", nargs="+", metavar="ID")

    k = sub.add_parser("keys", help="make a CURVE key pair for a broker or a client")
    k.add_argument("dir", metavar="DIR", help="where to write NAME.key and NAME.key_secret")
    k.add_argument("--name", default="baton", help="file name stem (default: baton)")

    d = sub.add_parser(
        "demo", help="start a fleet and embed (or generate from) a stdlib-docstring workload"
    )
    d.add_argument(
        "--task",
        choices=("embed", "generate"),
        default="embed",
        help="generate: on configs/gpt2.toml, whose model (random weights, so its text is "
        "noise) is made first when missing; prints output tokens/s, TTFT, TPOT and a sample",
    )
    d.add_argument(
        "-c",
        "--config",
        default=None,
        help=f"TOML config (default {DEFAULT_CONFIG.name}; {GENERATE_CONFIG.name} for generate)",
    )
    d.add_argument(
        "--set",
        action="append",
        metavar="KEY=VALUE",
        help="override a config key; generate with model.path=DIR runs on the model already in "
        "DIR (a real Hugging Face GPT-2 or Llama, or a smaller random one made by "
        "baton.random_gpt2.ensure, e.g. for a quick check)",
    )
    d.add_argument(
        "--num",
        type=int,
        default=None,
        help="number of paragraphs (default 8000), or of prompts for generate (default 128, "
        "64 new tokens each)",
    )

    b = sub.add_parser("bench", help="load-test a running fleet; vllm bench serve's figures")
    b.add_argument("--endpoint", required=True, help="the broker's client endpoint")
    b.add_argument(
        "--workload", default="paragraphs", help="paragraphs, docstrings, or a submit-style JSONL"
    )
    b.add_argument("--num", type=int, default=1000, help="jobs measured (a file is cycled)")
    b.add_argument(
        "--task",
        default="embed",
        help="task of a built-in workload's jobs; generate: streamed, with TTFT, TPOT and ITL",
    )
    g = b.add_argument_group(
        "generation (--task generate on a built-in workload: prompts from its stdlib text)"
    )
    g.add_argument(
        "--input-len",
        default="32:256",
        metavar="N|MIN:MAX",
        help="prompt tokens: fixed, or uniform in MIN..MAX (default 32:256); about that many "
        "without --tokenizer",
    )
    g.add_argument(
        "--output-len",
        default="16:256",
        metavar="N|MIN:MAX",
        help="new tokens per job: fixed, or uniform in MIN..MAX (default 16:256); exact "
        "(max_new_tokens with ignore_eos)",
    )
    g.add_argument(
        "--prefix-len",
        type=int,
        default=0,
        metavar="N",
        help="every prompt starts with the same N tokens, before its own --input-len",
    )
    g.add_argument(
        "--tokenizer",
        default=None,
        metavar="DIR",
        help="the model's directory (or its tokenizer.json): prompts become token ids of "
        "exactly those lengths instead of texts",
    )
    loop = b.add_mutually_exclusive_group()
    loop.add_argument(
        "--rate", type=float, default=float("inf"), help="open loop: jobs/s (inf = all at once)"
    )
    loop.add_argument("--concurrency", type=int, default=None, help="closed loop: jobs in flight")
    b.add_argument(
        "--burstiness", type=float, default=1.0, help="Gamma shape of the gaps; 1 = Poisson"
    )
    b.add_argument("--warmup", type=int, default=32, help="jobs run first and not counted")
    b.add_argument("--seed", type=int, default=0, help="seed of the arrival gaps and lengths")
    b.add_argument(
        "--goodput",
        action="append",
        metavar="KEY:MS",
        help="latency bound, e.g. e2el:500; generate also ttft, tpot, itl (a job's worst gap)",
    )
    b.add_argument("--timeout", type=float, default=120.0, help="seconds without any progress")
    b.add_argument("--json", default=None, metavar="OUT", help="write the figures here")
    j = sub.add_parser("journal", help="check a journal, or recover what is intact in one")
    jsub = j.add_subparsers(dest="action", required=True, metavar="ACTION")
    jc = jsub.add_parser("check", help="the checks `baton up` makes; exit 1 if damaged")
    jc.add_argument("path", metavar="PATH")
    jr = jsub.add_parser(
        "recover", help="move a damaged journal aside and keep every job proven intact"
    )
    jr.add_argument("path", metavar="PATH")
    return p


def main(argv: list[str] | None = None) -> int:
    p = parser()
    args = p.parse_args(argv)
    if (getattr(args, "key", None) is None) != (getattr(args, "server_key", None) is None):
        p.error("--key and --server-key go together")
    if args.command == "up":
        from baton.up import up

        return up(args.config, args.set or [])
    if args.command == "submit":
        from baton.commands import Keys, submit

        keys = Keys(args.key, args.server_key)
        return submit(args.endpoint, args.input, args.output, args.window, args.timeout, keys)
    if args.command == "batch":
        from baton.batch import batch
        from baton.commands import Keys

        keys = Keys(args.key, args.server_key)
        return batch(
            args.endpoint,
            args.input,
            args.output,
            args.errors,
            args.window,
            args.timeout,
            keys,
            args.model_dir,
        )
    if args.command == "status":
        from baton.commands import Keys, status

        return status(args.endpoint, args.json, args.timeout, Keys(args.key, args.server_key))
    if args.command == "cancel":
        from baton.commands import Keys, cancel

        return cancel(args.endpoint, args.ids, args.timeout, Keys(args.key, args.server_key))
    if args.command == "keys":
        from baton.commands import make_keys

        return make_keys(args.dir, args.name)
    if args.command == "demo":
        if args.task == "generate":
            from baton.demo import demo_generate

            return demo_generate(args.config, args.set or [], args.num)
        from baton.demo import demo

        return demo(args.config or str(DEFAULT_CONFIG), args.set or [], args.num)
    if args.command == "bench":
        from baton.bench import bench

        return bench(args)
    if args.command == "journal":
        from broker.journal_repair import check_command, recover_command

        return (check_command if args.action == "check" else recover_command)(args.path)
    raise AssertionError(args.command)  # argparse only admits the commands above


if __name__ == "__main__":
    sys.exit(main())
