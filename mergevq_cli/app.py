"""The `mergevq` Typer app: registers the commands and turns user errors into one line and exit code 1."""

from __future__ import annotations

import sys
from typing import Annotated

import typer

from .commands import benchmark as benchmark_cmd
from .commands import evaluate as evaluate_cmd
from .commands import generate as generate_cmd
from .commands import info as info_cmd
from .commands import probe as probe_cmd
from .commands import reconstruct as reconstruct_cmd
from .commands import tokenize as tokenize_cmd
from .commands import train_ar as train_ar_cmd
from .commands import train_tokenizer as train_tokenizer_cmd
from .commands import tune_recovery as tune_recovery_cmd

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


def main() -> None:
    from mergevq_core.errors import MergeVQError

    from . import console

    from typer._click.exceptions import ClickException  # typer >= 0.29 bundles its own click

    _state["debug"] = "--debug" in sys.argv[1:]
    try:
        code = app(standalone_mode=False)
        if isinstance(code, int) and code:  # `--help`, `--version` and the like exit through here
            sys.exit(code)
    except ClickException as e:  # a bad option or argument: one line that names it, exit code 2 (click's)
        if type(e).__name__ == "NoArgsIsHelpError":  # `mergevq` alone, or a group without its command
            e.show()
            sys.exit(e.exit_code)
        if _state["debug"]:
            raise
        ctx = getattr(e, "ctx", None)
        console.error(e.format_message() + (f" (see `{ctx.command_path} --help`)" if ctx is not None else ""))
        sys.exit(e.exit_code)
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
