"""One style for every command's usage line and argument list: arguments in capitals
(`ekx compare [OPTIONS] RUN...`, `ekx evaluate [OPTIONS] RUN`), optional ones in brackets,
never typer's `{run}` braces nor a Python type such as `<list[Path]>` - a user types a path,
not a list."""

from __future__ import annotations

from typer import _click as click  # typer's own copy of click, which its commands derive from
from typer.core import TyperCommand


def argument_name(param: click.Parameter) -> str:
    name = (param.metavar or param.name or "").upper()
    return f"{name}..." if param.nargs != 1 else name


class Command(TyperCommand):
    """typer's command with the argument style above (options keep typer's own rendering)."""

    def collect_usage_pieces(self, ctx: click.Context) -> list[str]:
        pieces = [self.options_metavar] if self.options_metavar else []
        for p in self.get_params(ctx):
            if p.param_type_name == "argument":
                pieces.append(argument_name(p) if p.required else f"[{argument_name(p)}]")
        return pieces

    def format_options(self, ctx: click.Context, formatter: click.HelpFormatter) -> None:
        args, opts = [], []
        for p in self.get_params(ctx):
            record = p.get_help_record(ctx)
            if record is None:
                continue
            if p.param_type_name == "argument":
                args.append((argument_name(p), record[1]))
            else:
                opts.append(record)
        for title, rows in (("Arguments", args), ("Options", opts)):
            if rows:
                with formatter.section(title):
                    formatter.write_dl(rows)
