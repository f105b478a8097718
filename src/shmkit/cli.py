"""The `shmkit` command: ls, inspect, rm, gc, demo, bench (tools layer, the top of the stack).

Thin on purpose: it parses arguments, calls `registry`, `demo` or `bench`, and prints. Tables
for people are drawn with rich; `--json` prints the stable documents of docs/cli.md.

Exit codes: 0 success; 1 an expected failure (missing segment, permission, bad value), told
in one line on stderr without a traceback; 2 a usage error (from argparse).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import sys

from . import __version__, registry
from .errors import ShmkitError, format_size

EXIT_OK = 0
EXIT_ERROR = 1
EXIT_USAGE = 2


# -- argument parsing --------------------------------------------------------------------------

def _key(text: str) -> int:
    try:
        return registry.parse_key(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None


def _shmid(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"shmid must be a decimal number, not {text!r}") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"shmid must not be negative, not {value}")
    return value


def build_parser() -> argparse.ArgumentParser:
    """The argument parser of the `shmkit` command."""
    parser = argparse.ArgumentParser(
        prog="shmkit", description="Inspect and clean shared memory; run the demo and benchmarks.")
    parser.add_argument("--version", action="version", version=f"shmkit {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    p = sub.add_parser("ls", help="list every shared memory segment (POSIX and System V)",
                       description="List every POSIX segment in /dev/shm and every System V "
                                   "segment, with kind, owner, creator and mapping processes.")
    p.add_argument("--json", action="store_true", help="print the stable JSON document")
    _add_filters(p)
    p.set_defaults(run=_cmd_ls, parser=p)

    p = sub.add_parser("inspect", help="show one segment: header, mappings per process, state",
                       description="Show a segment's header, every process that maps it (address "
                                   "range, permissions, resident pages) and its live state.")
    p.add_argument("name", nargs="?", metavar="NAME", help="segment name")
    _add_target(p, many=False)
    p.add_argument("--json", action="store_true", help="print the stable JSON document")
    p.set_defaults(run=_cmd_inspect, parser=p)

    p = sub.add_parser("rm", help="remove segments by name (any segment, shmkit's or not)",
                       description="Remove segments by name, System V key or shmid. Processes "
                                   "that map them keep their memory until they close it.")
    p.add_argument("names", nargs="*", metavar="NAME", help="segment names")
    _add_target(p, many=True)
    p.set_defaults(run=_cmd_rm, parser=p)

    p = sub.add_parser("gc", help="remove orphaned shmkit segments",
                       description="Remove shmkit segments whose creator is dead and that no "
                                   "process maps. Foreign segments are never touched: remove "
                                   "them by name with `shmkit rm`.")
    p.add_argument("--dry-run", action="store_true", help="only list what would be removed")
    p.add_argument("--json", action="store_true", help="print the stable JSON document")
    _add_filters(p)
    p.set_defaults(run=_cmd_gc, parser=p)

    p = sub.add_parser("demo", help="run the demo (what `make demo` runs)")
    from . import demo
    p.add_argument("which", nargs="?", choices=sorted(demo.DEMOS), metavar="WHICH",
                   help=f"which demo: {', '.join(sorted(demo.DEMOS))} (default: {demo.DEFAULT})")
    p.set_defaults(run=_cmd_demo, parser=p)

    p = sub.add_parser("bench", help="run the quick benchmark and print a table of ratios")
    p.add_argument("--plot", metavar="FILE.png", help="also draw the results into this image")
    p.set_defaults(run=_cmd_bench, parser=p)
    return parser


def _add_target(p: argparse.ArgumentParser, *, many: bool) -> None:
    p.add_argument("--backend", choices=("posix", "sysv"),
                   help="backend of NAME (default: look on both)")
    action = "append" if many else "store"
    p.add_argument("--key", type=_key, action=action, metavar="KEY",
                   help="System V key, decimal or 0x-hex as `shmkit ls` shows it")
    p.add_argument("--shmid", type=_shmid, action=action, metavar="ID", help="System V shmid")


def _add_filters(p: argparse.ArgumentParser) -> None:
    p.add_argument("--prefix", metavar="PREFIX",
                   help="only POSIX segments whose name starts with PREFIX")
    p.add_argument("--name", action="append", metavar="NAME", dest="names",
                   help="only the segment(s) of this name, on either backend (repeatable)")


# -- output helpers ----------------------------------------------------------------------------

def _console():
    from rich.console import Console

    width = height = None
    if not sys.stdout.isatty():
        # Pipes and files have no width: keep rows whole for grep and less. COLUMNS is not
        # consulted (readline exports it into children's environments, even under pipes);
        # both width and height must be set, or rich uses 80 columns under TERM=dumb.
        width, height = 250, 25
    return Console(width=width, height=height, highlight=False, soft_wrap=False)


def _text(value) -> "object":
    from rich.text import Text

    return Text("-" if value is None else str(value))


def _print_json(doc) -> None:
    # default=str: live state comes from each kind's module and may hold any value.
    sys.stdout.write(json.dumps(doc, indent=2, default=str) + "\n")


def _age(seconds: float | None) -> str:
    if seconds is None:
        return "-"
    for limit, unit, div in ((60, "s", 1), (3600, "m", 60), (86400, "h", 3600)):
        if seconds < limit:
            return f"{int(seconds // div)}{unit}"
    return f"{int(seconds // 86400)}d"


def _creator(info: registry.SegmentInfo) -> str:
    if info.creator_pid is None:
        return "-"
    return f"{info.creator_pid}" + ("" if info.creator_alive else " (dead)")


def _mapped_by(info: registry.SegmentInfo, limit: int = 4) -> str:
    pids = list(info.mapped_by)
    text = ", ".join(map(str, pids[:limit])) if pids else "-"
    if len(pids) > limit:
        text += f" +{len(pids) - limit}"
    if info.attach_count is not None and info.attach_count != len(pids):
        text += f" (nattch {info.attach_count})"
    return text


def _note(info: registry.SegmentInfo) -> str:
    notes = []
    if info.orphan:
        notes.append("orphan")
    if info.state == "initialising":
        notes.append("initialising")
    if info.pending_removal:
        notes.append("removed, still attached")
    if info.kind == registry.KIND_CORRUPT:
        notes.append("damaged header (`shmkit inspect` says why)")
    elif info.kind == registry.KIND_UNREADABLE and info.detail:
        notes.append(info.detail)
    return "; ".join(notes)


def _segment_table(infos, title: str | None = None, extra=None):
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE_HEAD, title=title, title_justify="left", pad_edge=False,
                  show_edge=False)
    for column, justify in (("NAME / KEY", "left"), ("BACKEND", "left"), ("KIND", "left"),
                            ("SIZE", "right"), ("MODE", "left"), ("OWNER", "left"),
                            ("CREATOR", "right"), ("MAPPED BY", "left"), ("AGE", "right")):
        table.add_column(column, justify=justify, no_wrap=column != "NAME / KEY")
    table.add_column(extra[0] if extra else "NOTE")
    for item in infos:
        info = item.info if extra else item
        table.add_row(*map(_text, (
            info.label, info.backend, info.kind, format_size(info.size), f"{info.mode:04o}",
            info.owner, _creator(info), _mapped_by(info), _age(info.age_seconds()),
            extra[1](item) if extra else _note(info))))
    return table


# -- commands ----------------------------------------------------------------------------------

def _cmd_ls(args) -> int:
    infos = registry.list_segments(prefix=args.prefix, names=args.names)
    if args.json:
        _print_json({"schema": registry.SCHEMA_VERSION,
                     "segments": [info.as_dict() for info in infos]})
        return EXIT_OK
    console = _console()
    if not infos:
        console.print("no shared memory segments" + (" match" if args.prefix or args.names else ""))
        return EXIT_OK
    console.print(_segment_table(infos))
    count = sum(info.orphan for info in infos)
    summary = f"{len(infos)} segment{'s' if len(infos) != 1 else ''}"
    if count:
        summary += f"; {count} orphan{'s' if count != 1 else ''} (`shmkit gc` removes them)"
    console.print(_text(summary))
    return EXIT_OK


def _cmd_inspect(args) -> int:
    if args.name is None and args.key is None and args.shmid is None:
        raise _UsageError("inspect needs a NAME, --key or --shmid")
    found = registry.inspect(args.name, backend=args.backend, key=args.key, shmid=args.shmid)
    if args.json:
        doc = found.as_dict()
        doc["schema"] = registry.SCHEMA_VERSION
        _print_json(doc)
        return EXIT_OK
    _print_inspection(found)
    return EXIT_OK


def _fields_table(rows):
    from rich import box
    from rich.table import Table

    table = Table(box=box.SIMPLE, show_header=False, pad_edge=False, show_edge=False)
    table.add_column(style="bold")
    table.add_column()
    for key, value in rows:
        table.add_row(_text(key), _text(value))
    return table


def _print_inspection(found: registry.Inspection) -> None:
    from rich import box
    from rich.table import Table

    info = found.info
    console = _console()
    console.print(_text(f"segment {info.label} ({info.backend})"), style="bold")
    rows = [("kind", info.kind + (f" ({info.state})" if info.state else "")),
            ("size", f"{format_size(info.size)} ({info.size} bytes)"),
            ("mode", f"{info.mode:04o}"),
            ("owner", f"{info.owner} (uid {info.uid}, gid {info.gid})")]
    if info.backend == "sysv":
        rows += [("key", registry.format_key(info.key)), ("shmid", info.shmid),
                 ("attach count", info.attach_count)]
    if info.creator_pid is not None:
        rows.append(("creator", f"pid {info.creator_pid} ("
                                f"{'alive' if info.creator_alive else 'dead'})"))
    if info.created is not None:
        try:
            when = datetime.datetime.fromtimestamp(info.created).isoformat(
                sep=" ", timespec="seconds")
        except (OverflowError, ValueError, OSError):  # a header may claim any time at all
            when = f"{info.created:.0f} s after the epoch"
        rows.append(("created", f"{when} ({_age(info.age_seconds())} ago)"))
    if info.orphan:
        rows.append(("orphan", "yes: its creator is dead and no process maps it (`shmkit gc`)"))
    if info.pending_removal:
        rows.append(("removed", "yes: memory is freed when the last process detaches"))
    if info.detail:
        rows.append(("problem", info.detail))
    console.print(_fields_table(rows))

    if info.header is not None:
        console.print(_text("header (first 128 bytes)"), style="bold")
        console.print(_fields_table(info.header.as_dict().items()))

    if found.mappings:
        count = len(info.mapped_by)
        console.print(_text(f"mapped by {count} process{'es' if count != 1 else ''} "
                            f"(the same memory at each process's own address)"), style="bold")
        table = Table(box=box.SIMPLE_HEAD, pad_edge=False, show_edge=False)
        for column in ("PID", "COMMAND", "ADDRESS RANGE", "SIZE", "PERMS", "RESIDENT"):
            table.add_column(column, no_wrap=True,
                             justify="right" if column in ("PID", "SIZE", "RESIDENT") else "left")
        page = os.sysconf("SC_PAGE_SIZE")
        for m in found.mappings:
            resident = "-" if m.resident_bytes is None else (
                f"{format_size(m.resident_bytes)} ({m.resident_bytes // page} of "
                f"{m.size // page} pages)")
            table.add_row(*map(_text, (m.pid, found.commands.get(m.pid),
                                       f"0x{m.start:x}-0x{m.end:x}", format_size(m.size),
                                       m.perms, resident)))
        console.print(table)
    else:
        console.print(_text("mapped by no process we can see"), style="bold")
    if info.attach_count and info.attach_count > len(found.mappings):
        console.print(_text(f"({info.attach_count - len(found.mappings)} attachment(s) in "
                            f"processes whose /proc/PID/maps we may not read)"))

    if found.state is not None:
        console.print(_text(f"live state ({info.kind})"), style="bold")
        console.print(_fields_table((k, _plain(v)) for k, v in found.state.items()))
    elif found.state_error is not None:
        console.print(_text(f"live state: unavailable ({found.state_error})"))


def _plain(value) -> str:
    if isinstance(value, (dict, list, tuple)):
        return json.dumps(value, default=str)
    return str(value)


def _cmd_rm(args) -> int:
    targets = [dict(name=n) for n in args.names]
    targets += [dict(key=k) for k in args.key or ()]
    targets += [dict(shmid=i) for i in args.shmid or ()]
    if not targets:
        raise _UsageError("rm needs at least one NAME, --key or --shmid")
    status = EXIT_OK
    for target in targets:
        try:
            info = registry.remove(backend=args.backend, **target)
        except (ShmkitError, OSError, ValueError) as exc:
            _error(exc)
            status = EXIT_ERROR
            continue
        what = "" if info.kind in (registry.KIND_FOREIGN, registry.KIND_UNREADABLE) else \
            f" ({info.kind})"
        line = f"removed {info.label}{what} from {info.backend}"
        if info.mapped_by or info.attach_count:
            line += (f"; still mapped by {len(info.mapped_by) or info.attach_count} process(es), "
                     f"which keep the memory until they close it")
        print(line)
    return status


def _cmd_gc(args) -> int:
    results = registry.collect_garbage(dry_run=args.dry_run, prefix=args.prefix, names=args.names)
    failed = [r for r in results if r.result == "failed"]
    if args.json:
        _print_json({"schema": registry.SCHEMA_VERSION, "dry_run": args.dry_run,
                     "orphans": [r.as_dict() for r in results]})
    else:
        console = _console()
        if not results:
            console.print("no orphaned shmkit segments")
        else:
            words = {"would_remove": "would remove", "removed": "removed",
                     "skipped": "skipped", "failed": "FAILED"}
            console.print(_segment_table(
                results, extra=("RESULT", lambda r: words[r.result] +
                                (f": {r.detail}" if r.detail else ""))))
            removed = sum(r.result == "removed" for r in results)
            if args.dry_run:
                console.print(_text(f"{len(results)} orphan(s) would be removed; "
                                    f"run `shmkit gc` without --dry-run to remove them"))
            else:
                console.print(_text(f"removed {removed} orphan(s)"))
    for r in failed:
        sys.stderr.write(f"shmkit: error: cannot remove {r.info.label} ({r.info.backend}): "
                         f"{_one_line(r.detail or '')}\n")
    return EXIT_ERROR if failed else EXIT_OK


def _cmd_demo(args) -> int:
    from . import demo

    return demo.main(args.which)


def _cmd_bench(args) -> int:
    from . import bench
    try:
        rows = bench.run_quick(plot=args.plot)
    except ImportError as exc:
        raise _ExpectedError(f"the benchmark needs a package that is not installed: {exc}; "
                             f"install the extras with `pip install -e '.[bench]'`") from exc
    print(bench.format_table(rows))
    if args.plot:
        print(f"plot written to {args.plot}")
    return EXIT_OK


# -- errors and entry point --------------------------------------------------------------------

class _UsageError(Exception):
    """A combination of arguments argparse cannot check by itself."""


class _ExpectedError(Exception):
    """A failure to report in one line, like a ShmkitError."""


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _message(exc: BaseException) -> str:
    if isinstance(exc, OSError) and exc.strerror:
        if isinstance(exc, ShmkitError) or not exc.filename:
            return _one_line(exc.strerror)
        return _one_line(f"{exc.strerror}: {exc.filename}")
    return _one_line(str(exc)) or type(exc).__name__


def _error(exc: BaseException) -> None:
    sys.stderr.write(f"shmkit: error: {_message(exc)}\n")


def main(argv: list[str] | None = None) -> int:
    """Run the `shmkit` command with `argv` (default: sys.argv[1:]) and return its exit code."""
    parser = build_parser()
    args = parser.parse_args(argv)
    try:
        status = args.run(args)
        sys.stdout.flush()
        return status
    except _UsageError as exc:
        args.parser.print_usage(sys.stderr)
        sys.stderr.write(f"shmkit: error: {exc}\n")
        return EXIT_USAGE
    except (ShmkitError, OSError, ValueError, _ExpectedError) as exc:
        if isinstance(exc, BrokenPipeError):
            return _broken_pipe()
        _error(exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        sys.stderr.write("shmkit: interrupted\n")
        return 130


def _broken_pipe() -> int:
    # The reader of our output went away (`shmkit ls | head`): stop quietly, and keep Python
    # from complaining again while it flushes stdout at exit.
    devnull = os.open(os.devnull, os.O_WRONLY)
    os.dup2(devnull, sys.stdout.fileno())
    return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
