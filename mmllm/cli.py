"""The `mmllm` command line: parses options into a typed config and calls `run(config)` of a step module.

Commands are generated from the config dataclasses in `config.py`, so every flag is a config field of the
same name. Heavy libraries are imported only inside the step modules, so `mmllm --help` stays fast.
"""

from __future__ import annotations

import dataclasses
import inspect
import os
import sys
from pathlib import Path
from typing import Annotated, Any, Optional
from collections.abc import Callable

import click
import typer
import typer.core
from rich.markup import escape
from rich.text import Text

from mmllm import __version__, config as C
from mmllm.api import run_step
from mmllm.console import err, set_quiet
from mmllm.errors import RecordError, UserError



class PanelGroup(typer.core.TyperGroup):
    """A command group's help drawn like a command's (`print_help`): flags without type names, then its commands."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        print_help(self, ctx)


app = typer.Typer(help="Fine-tune pretrained language models together with image and audio inputs.",
                  no_args_is_help=True, pretty_exceptions_show_locals=False, add_completion=False, cls=PanelGroup)
eval_app = typer.Typer(help="Metrics: of a checkpoint (model) or standalone (bleu, wer, fid, accuracy).",
                       no_args_is_help=True, cls=PanelGroup)
models_app = typer.Typer(help="Embedded pretrained models: list and pull.", no_args_is_help=True, cls=PanelGroup)
app.add_typer(eval_app, name="eval")
app.add_typer(models_app, name="models")

STATE = {"debug": False}


def _version(value: bool) -> None:
    if value:
        print(f"mmllm {__version__}")
        raise typer.Exit()


@app.callback()
def main_options(
    debug: Annotated[bool, typer.Option("--debug", help="Show full tracebacks.")] = False,
    quiet: Annotated[bool, typer.Option("--quiet", "-q", help="Silence progress and logs on stderr.")] = False,
    version: Annotated[Optional[bool], typer.Option("--version", callback=_version, is_eager=True,
                                                    help="Print the version and exit.")] = None,
) -> None:
    STATE["debug"] = debug
    set_quiet(quiet)


QUIET_OPTION = typer.Option("--quiet", "-q", help="Silence progress and logs on stderr.")
KINDS = {"str": str, "int": int, "float": float, "bool": bool, "list": list}
METAVARS = {str: "TEXT", int: "INT", float: "FLOAT", list: "TEXT"}


def _help(f: dataclasses.Field, kind: type) -> str:
    """A field's help line with its choices and default, e.g. 'How ... [choices: a, b] [default: a]'."""
    meta, default = f.metadata, f.default if f.default is not dataclasses.MISSING else None
    text = meta["help"]
    if meta.get("choices"):
        text += f" [choices: {', '.join(meta['choices'])}]"
    if kind is bool:
        text += "" if default is None else f" [default: {'on' if default else 'off'}]"  # None: the help says
    elif default not in (None, []):
        text += f" [default: {default}]"
    return text


def _param(f: dataclasses.Field) -> inspect.Parameter:
    """A typer parameter for one config field (default None: 'not given', so --config can supply it)."""
    meta = f.metadata
    kind = KINDS[f.type] if isinstance(f.type, str) else f.type
    # numbers arrive as text and are converted by config.build: a bad value is one line naming the flag
    annotation: Any = Optional[list[str]] if kind is list else Optional[str] if kind in (int, float) else Optional[kind]
    panel = meta.get("panel") or None
    if meta["argument"]:
        info = typer.Argument(help=_help(f, kind), show_default=False, metavar=f.name.upper(),
                              rich_help_panel=panel)
    elif kind is bool:
        name = f.name.replace("_", "-")
        info = typer.Option(f"--{name}/--no-{name}", help=_help(f, kind), show_default=False, rich_help_panel=panel)
    else:
        info = typer.Option(C.flag(f.name), help=_help(f, kind), show_default=False, metavar=METAVARS[kind],
                            rich_help_panel=panel)
    return inspect.Parameter(f.name, inspect.Parameter.KEYWORD_ONLY, default=None,
                             annotation=Annotated[annotation, info])


# ---------------------------------------------------------------- help: panels readable at 80 columns

PANELS = ("Arguments", "Data", "Model", "Generation", "Training", "Early stopping", "Metric", "Output", "Runtime",
          "Options")


class PanelCommand(typer.core.TyperCommand):
    """Help in titled panels; each flag on its own line (never cut), help text wrapped beside it."""

    def format_help(self, ctx: Any, formatter: Any) -> None:
        print_help(self, ctx)


def _flags(param: Any) -> Text:
    """The flag cell: '--name METAVAR' (or 'NAME' for an argument); a boolean's --no-name on a second line."""
    if param.param_type_name == "argument":
        return Text((param.metavar or param.name.upper()) + ("..." if param.nargs != 1 else ""), style="bold cyan")
    cell = Text(", ".join(param.opts), style="bold cyan")
    if not getattr(param, "is_flag", False):
        cell.append(" " + (param.metavar or "VALUE"), style="yellow")
    for negative in param.secondary_opts:
        cell.append("\n" + negative, style="bold magenta")
    return cell


def print_help(command: Any, ctx: Any) -> None:
    """The help of a command: usage, description, then one panel per group of options."""
    from rich.console import Console
    from rich.padding import Padding
    from rich.panel import Panel
    from rich.table import Table

    console = Console(width=ctx.terminal_width, highlight=False)  # None: the terminal's width ($COLUMNS)
    console.print(f"\n {command.get_usage(ctx)}\n", style="bold")
    if command.help:
        console.print(Padding(Text(" ".join(command.help.split())), (0, 1, 1, 1)))
    groups: dict[str, list] = {}
    for p in command.get_params(ctx):
        if not getattr(p, "hidden", False):
            panel = "Arguments" if p.param_type_name == "argument" else getattr(p, "rich_help_panel", None)
            groups.setdefault(panel or "Options", []).append(p)
    flag_width = max(len(line) for ps in groups.values() for p in ps for line in _flags(p).plain.split("\n"))
    for name in sorted(groups, key=lambda n: PANELS.index(n) if n in PANELS else len(PANELS)):
        table = Table.grid(padding=(0, 2), expand=True)
        table.add_column(no_wrap=True, min_width=flag_width)  # flags are never wrapped or cut
        table.add_column(ratio=1)
        for p in groups[name]:
            flag_cell, help_cell = _flags(p), Text(p.help or "")
            help_cell.highlight_regex(r"\[(default|choices): [^\]]*\]", "dim")
            table.add_row(flag_cell, help_cell)
        console.print(Panel(table, title=name, title_align="left", border_style="dim"))
    if hasattr(command, "list_commands"):  # a group: its commands, each with the first sentence of its help
        table = Table.grid(padding=(0, 2), expand=True)
        table.add_column(no_wrap=True, style="bold cyan")
        table.add_column(ratio=1)
        for name in command.list_commands(ctx):
            sub = command.get_command(ctx, name)
            if sub is not None and not sub.hidden:
                table.add_row(name, Text(sub.get_short_help_str(limit=300)))
        console.print(Panel(table, title="Commands", title_align="left", border_style="dim"))


def command(group: typer.Typer, name: str, cls: type, target: str) -> None:
    """Register `name` on `group`: options from `cls`, body = target "module:function"(config)."""

    def body(ctx: typer.Context, config: Optional[Path] = None, quiet: bool = False, debug: bool = False,
             **kwargs: Any) -> None:
        if quiet:
            set_quiet(True)
        if debug:
            STATE["debug"] = True

        def call() -> Any:
            file_values = C.read_config_file(config) if config else {}
            given = {k: v for k, v in kwargs.items()
                     if ctx.get_parameter_source(k) not in (click.core.ParameterSource.DEFAULT, None)
                     and v is not None}
            cfg = C.build(cls, file_values, given, source=config)
            return run_step(target, cfg)  # the same call as the Python API's (mmllm.api)

        code = guarded(call)
        if code:
            raise typer.Exit(code)

    params = [inspect.Parameter("ctx", inspect.Parameter.POSITIONAL_OR_KEYWORD, annotation=typer.Context)]
    params += [_param(f) for f in dataclasses.fields(cls)]
    params.append(inspect.Parameter(
        "config", inspect.Parameter.KEYWORD_ONLY, default=None,
        annotation=Annotated[Optional[Path], typer.Option("--config", metavar="FILE", help="YAML/JSON file of these "
                                                                            "options; flags override it.")]))
    params.append(inspect.Parameter("quiet", inspect.Parameter.KEYWORD_ONLY, default=False,
                                    annotation=Annotated[bool, QUIET_OPTION]))
    params.append(inspect.Parameter("debug", inspect.Parameter.KEYWORD_ONLY, default=False, annotation=Annotated[
        bool, typer.Option("--debug", help="Show full tracebacks.")]))
    body.__signature__ = inspect.Signature(params)  # type: ignore[attr-defined]
    body.__doc__ = cls.__doc__
    group.command(name, help=cls.__doc__, cls=PanelCommand)(body)


def guarded(call: Callable[[], Any]) -> int:
    """Run `call`; a UserError (or a few plain user mistakes) becomes one line on stderr and exit 2."""
    try:
        result = call()
        return result if isinstance(result, int) else 0
    except UserError as e:
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {escape(str(e))}", markup=True, highlight=False, soft_wrap=True)
        return e.exit_code
    except RecordError as e:  # a record the command cannot answer (eval stops on it): its id and why
        if STATE["debug"]:
            raise
        where = f"record {e.record_id}: " if e.record_id is not None else ""
        err.print(f"[red]error:[/red] {escape(where + e.reason)}", markup=True, highlight=False, soft_wrap=True)
        return 2
    except KeyboardInterrupt:
        err.print("interrupted")
        return 130
    except BrokenPipeError:
        return 0
    except Exception as e:  # noqa: BLE001 - a bug, not a user mistake: still one line unless --debug
        if STATE["debug"]:
            raise
        err.print(f"[red]error:[/red] {type(e).__name__}: {escape(str(e))} (run with --debug for the traceback)",
                  markup=True, highlight=False, soft_wrap=True)
        return 1


def load_plugins(names: str) -> None:
    """Import the comma-separated modules of MMLLM_PLUGINS (each registers its modalities / tasks), before the
    commands are built from the configs, so their flags exist; a module that cannot be imported is one line."""
    import importlib

    for name in [n.strip() for n in names.split(",") if n.strip()]:
        try:
            importlib.import_module(name)
        except Exception as e:  # noqa: BLE001 - a user's module: any failure is this one line
            reason = f"{type(e).__name__}: {str(e).splitlines()[0][:160]}" if str(e) else type(e).__name__
            print(f"error: MMLLM_PLUGINS: cannot import {name!r} ({reason})", file=sys.stderr)
            sys.exit(2)


if os.environ.get("MMLLM_PLUGINS"):
    load_plugins(os.environ["MMLLM_PLUGINS"])
command(app, "prepare", C.PrepareConfig, "mmllm.preparation:run")
command(app, "finetune", C.FinetuneConfig, "mmllm.finetuning:run")
command(app, "predict", C.PredictConfig, "mmllm.predict:run")
command(app, "serve", C.ServeConfig, "mmllm.serve:run")
command(eval_app, "model", C.EvalModelConfig, "mmllm.evaluation:run_model")
command(eval_app, "bleu", C.BleuConfig, "mmllm.scoring:run_bleu")
command(eval_app, "wer", C.WerConfig, "mmllm.scoring:run_wer")
command(eval_app, "fid", C.FidConfig, "mmllm.scoring:run_fid")
command(eval_app, "accuracy", C.AccuracyConfig, "mmllm.scoring:run_accuracy")


@models_app.command("list", cls=PanelCommand)
def models_list(quiet: Annotated[bool, QUIET_OPTION] = False) -> None:
    """Each built-in alias with role, parameters, size, license, source and whether it is ready (JSON on stdout)."""
    from mmllm import hub

    if quiet:
        set_quiet(True)

    code = guarded(hub.list_models)
    if code:
        raise typer.Exit(code)


@models_app.command("pull", cls=PanelCommand)
def models_pull(
    names: Annotated[Optional[list[str]], typer.Argument(help="Aliases to pull.", metavar="NAME")] = None,
    all_: Annotated[bool, typer.Option("--all", help="Pull every built-in model.")] = False,
    force: Annotated[bool, typer.Option("--force", help="Re-download and convert even when ready.")] = False,
    quiet: Annotated[bool, QUIET_OPTION] = False,
) -> None:
    """Install and convert built-in models into the cache ($MMLLM_HOME, default ~/.cache/mmllm)."""
    from mmllm import hub

    if quiet:
        set_quiet(True)

    code = guarded(lambda: hub.pull(names or [], all_=all_, force=force))
    if code:
        raise typer.Exit(code)


def main() -> None:
    try:
        app(standalone_mode=True)
    except SystemExit as e:
        # click's own usage errors exit 2 already; keep its code.
        sys.exit(e.code)


if __name__ == "__main__":
    main()
