"""The `mergevq` Typer app: registers the commands and turns user errors into one line and exit code 1."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .commands import benchmark as benchmark_cmd
from .commands import demo as demo_cmd
from .commands import evaluate as evaluate_cmd
from .commands import export as export_cmd
from .commands import generate as generate_cmd
from .commands import info as info_cmd
from .commands import probe as probe_cmd
from .commands import reconstruct as reconstruct_cmd
from .commands import tokenize as tokenize_cmd
from .commands import train_ar as train_ar_cmd
from .commands import train_tokenizer as train_tokenizer_cmd
from .commands import tune_recovery as tune_recovery_cmd
from .commands import weights as weights_cmd

app = typer.Typer(
    name="mergevq",
    help="MergeVQ: token-merging visual tokenizer (ToMe + LFQ + source recovery) and its AR generators.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode="rich",
)
_state = {"debug": False}


@app.callback()
def _root(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks on errors.")] = False,
) -> None:
    _state["debug"] = debug


app.command("train-tokenizer", epilog=train_tokenizer_cmd.EXAMPLES)(train_tokenizer_cmd.train_tokenizer)
app.command("train-ar", epilog=train_ar_cmd.EXAMPLES)(train_ar_cmd.train_ar)
app.command("reconstruct", epilog=reconstruct_cmd.EXAMPLES)(reconstruct_cmd.reconstruct)
app.command("tokenize", epilog=tokenize_cmd.EXAMPLES)(tokenize_cmd.tokenize)
app.command("tune-recovery", epilog=tune_recovery_cmd.EXAMPLES)(tune_recovery_cmd.tune_recovery)
app.command("generate", epilog=generate_cmd.EXAMPLES)(generate_cmd.generate)
app.command("probe", epilog=probe_cmd.EXAMPLES)(probe_cmd.probe)
app.command("evaluate", epilog=evaluate_cmd.EXAMPLES)(evaluate_cmd.evaluate)
app.add_typer(benchmark_cmd.app, name="benchmark")
app.command("info", epilog=info_cmd.EXAMPLES)(info_cmd.info)
app.command("demo", epilog=demo_cmd.EXAMPLES)(demo_cmd.demo)
app.command("weights", epilog=weights_cmd.EXAMPLES)(weights_cmd.weights)
app.command("export", epilog=export_cmd.EXAMPLES)(export_cmd.export)


def _given(names: list[str], argv: list[str]) -> tuple[str, str] | None:
    """The option name as typed and its value, from the command line (the last occurrence wins, as in click)."""
    found = None
    for i, a in enumerate(argv):
        name, eq, value = a.partition("=")
        if name in names:
            found = (name, value) if eq else (name, argv[i + 1]) if i + 1 < len(argv) else None
    return found


def _bad_value(e: Exception) -> str | None:
    """`--batch 0: must be >= 1` for a value outside an option's declared range or refused by its callback (the
    style of the checks made after parsing); None for other usage errors."""
    param = getattr(e, "param", None)
    opts = list(getattr(param, "opts", None) or []) + list(getattr(param, "secondary_opts", None) or [])
    given = _given(opts, sys.argv[1:]) if opts and getattr(param, "param_type_name", "") == "option" else None
    if given is None:
        return None
    name, value = given
    lo, hi = getattr(param, "min", None), getattr(param, "max", None)
    message = str(getattr(e, "message", "") or "")
    if message.startswith(f"{value}: ") or message.startswith(f"{value!r}: "):  # a callback's own reason
        reason = message.split(": ", 1)[1]
    elif message.startswith("Input should be greater") or message.startswith("Input should be less"):
        reason = (f"must be in [{lo}, {hi}]" if lo is not None and hi is not None
                  else f"must be >= {lo}" if lo is not None else f"must be <= {hi}")
    elif message.startswith("Input should be a valid"):
        reason = message.replace("Input should be", "expected", 1)
    else:
        return None
    return f"{name} {value}: {reason}"


def main() -> None:
    from mergevq_core.errors import MergeVQError

    from . import console

    from typer._click.exceptions import ClickException  # typer >= 0.29 bundles its own click

    _state["debug"] = "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # `--help`, `--version` and the like exit through here
            sys.exit(code)
    except ClickException as e:  # a bad option or argument: one line that names it, exit code 1
        if type(e).__name__ == "NoArgsIsHelpError":  # `mergevq` alone, or a group without its command
            e.show()
            sys.exit(e.exit_code)
        if _state["debug"]:
            raise
        ctx = getattr(e, "ctx", None)
        message = _bad_value(e) or e.format_message().removeprefix("Invalid value: ")  # the latter: our own checks
        console.error(message + (f" (see `{ctx.command_path} --help`)" if ctx else ""))
        sys.exit(1)
    except MergeVQError as e:
        if _state["debug"]:
            raise
        console.error(str(e))
        sys.exit(getattr(e, "exit_code", 1))  # TrainingInterrupted: 75 (EX_TEMPFAIL), a clean stop to resume
    except KeyboardInterrupt:
        console.error("interrupted")
        sys.exit(130)
    except Exception as e:  # an unexpected failure still gets one line; --debug shows where it came from
        if _state["debug"]:
            raise
        if not console.is_main_process():  # under torchrun only rank 0 talks, but an unexpected failure on
            import os                      # another rank is often the root cause of rank 0's: say it, plainly

            sys.stderr.write(f"rank {os.environ.get('RANK')}: {type(e).__name__}: {e}\n")
        console.error(f"{type(e).__name__}: {e}", hint="run again with --debug for the traceback")
        sys.exit(1)


if __name__ == "__main__":
    main()
