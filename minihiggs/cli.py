"""The one command helper of `prep.py`, `train.py`, `python -m minihiggs.generate` and `python -m minihiggs.export`:
flags declared once as dataclass fields, and one rule for how a command ends.

Declare the settings as a dataclass whose fields carry their flag in `flag(...)`:

    @dataclass
    class ExportArgs:
        adapter: str = flag(None, "adapter directory or Hub repo id", required=True)
        out: str = flag(None, "output checkpoint directory", required=True)
        base_ckpt: str | None = flag(None, "base checkpoint (default: the adapter's recorded base)",
                                     aliases=("--base",))
        max_shard_size: str = flag("5GB", "largest shard, e.g. 5GB, 500MB")
        overwrite: bool = flag(False, "replace an existing non-empty --out directory")

    def export(argv: list[str] | None) -> None:
        args = parse_flags(ExportArgs, argv, prog="python -m minihiggs.export", description="...")
        ...                                  # raise a UserError for bad input; return None or an exit code

    def main(argv: list[str] | None = None) -> int:
        return run("export", export, argv)

    if __name__ == "__main__":
        sys.exit(main())

Flags (`build_parser`): one `--<field name>` (or `option=`) per field declared with `flag` (other fields are not
flags and keep their defaults), plus `aliases` (old names kept working); a field without a default is a required
flag. The type comes from the annotation: `int`, `float`,
`str` (each may be `| None`), `list[...]` (nargs "+"), and `bool` (a store_true switch, or what `action=` says,
e.g. `argparse.BooleanOptionalAction`). Any other keyword goes to `add_argument` as is (choices, metavar, nargs,
required, type). `group=` puts the flag under a heading in `--help`, in the order groups first appear.
`--help` shows a default once: "(default: X)" is added unless the default is None/False or the help text
already says what the default is (it mentions "default").

Endings (`run`): the command's function returns None (exit 0) or an exit code. A `UserError` (bad input a
person can fix) becomes one `<prog>: error: <message>` line on stderr (a message of several lines is joined with
"; ") and exit code 2, the code argparse uses for a malformed flag; a Ctrl-C (`KeyboardInterrupt`) becomes
`<prog>: interrupted` and exit code 130; anything else is a bug and keeps its traceback. A command with endings
of its own (train.py's signal-stop, which saves a checkpoint and exits 0) handles them inside its function and
returns the code.

Field metadata is `{"help", "group", "aliases", **add_argument keywords}`, so `TrainConfig`'s fields (declared
with `help`, `group` and argparse keywords) are read by `build_parser(TrainConfig, prog="train.py")` as they are.
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
import types
import typing
from typing import Any, Callable

from .errors import UserError

USER_ERROR_EXIT = 2  # as argparse exits on a malformed flag: one code for "your input is wrong"
INTERRUPTED_EXIT = 130  # 128 + SIGINT, what shells report for a Ctrl-C


def flag(default: Any = dataclasses.MISSING, help: str = "", group: str | None = None, aliases: tuple[str, ...] = (),
         option: str | None = None, **argparse_kw):
    """A dataclass field that is also a command-line flag `--<name>` (see the module docstring). No default: a
    required flag. `option` replaces the flag's name (e.g. `--no_progress` for a `progress` field with
    action="store_false")."""
    meta = {"help": help, "group": group, "aliases": tuple(aliases), "option": option, **argparse_kw}
    if default is dataclasses.MISSING:
        return dataclasses.field(metadata=meta)
    if isinstance(default, (list, dict, set)):
        return dataclasses.field(default_factory=lambda: type(default)(default), metadata=meta)
    return dataclasses.field(default=default, metadata=meta)


class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Descriptions keep their line breaks; a flag's help gets "(default: X)" once, and only where it informs."""

    def _get_help_string(self, action: argparse.Action) -> str:
        help = action.help or ""
        default = action.default
        if ("%(default)" in help or "default" in help.lower() or action.required or default is None
                or default is False or default is argparse.SUPPRESS or not action.option_strings
                or action.nargs == 0):  # a switch (store_true/false): its help says what giving it does
            return help
        return help + " (default: %(default)s)"


def build_parser(cls: type, prog: str | None = None, description: str = "") -> argparse.ArgumentParser:
    """An argparse parser with one flag per `flag(...)` field of the dataclass `cls`, grouped as declared."""
    ap = argparse.ArgumentParser(prog=prog, description=description, formatter_class=HelpFormatter)
    hints = typing.get_type_hints(cls)
    groups: dict[str, argparse._ArgumentGroup] = {}
    for f in dataclasses.fields(cls):
        if "help" not in f.metadata:
            continue
        kw = dict(f.metadata)
        group_name, aliases = kw.pop("group", None), kw.pop("aliases", ())
        option = kw.pop("option", None) or f"--{f.name}"
        target = ap if group_name is None else groups.setdefault(group_name, ap.add_argument_group(group_name))
        if _is_required(f):
            kw.setdefault("required", True)
        else:
            kw.setdefault("default", _default_of(f))
        _add_type(kw, hints[f.name], f.name)
        target.add_argument(option, *aliases, dest=f.name, **kw)
    return ap


def parse_flags(cls: type, argv: list[str] | None = None, prog: str | None = None, description: str = ""):
    """Flags -> an instance of the dataclass `cls`. A malformed flag exits through argparse (usage + code 2)."""
    ns = build_parser(cls, prog, description).parse_args(argv)
    return cls(**vars(ns))


def run(prog: str, command: Callable[[list[str] | None], int | None], argv: list[str] | None = None) -> int:
    """Call `command(argv)` and turn how it ends into an exit code (the rule in the module docstring)."""
    try:
        code = command(argv)
    except UserError as e:
        print(f"{prog}: error: {one_line(e)}", file=sys.stderr)
        return USER_ERROR_EXIT
    except KeyboardInterrupt:
        print(f"{prog}: interrupted", file=sys.stderr)
        return INTERRUPTED_EXIT
    return 0 if code is None else int(code)


def one_line(e: BaseException) -> str:
    """An error message on one line: its non-blank lines joined with "; "."""
    return "; ".join(p.strip() for p in str(e).splitlines() if p.strip())


# ---- annotations -> argparse -------------------------------------------------------------------------------
def _is_required(f: dataclasses.Field) -> bool:
    return f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING


def _default_of(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _add_type(kw: dict, annotation: Any, name: str) -> None:
    """Fill `type` / `action` / `nargs` of `add_argument` from a field's annotation, unless given explicitly."""
    if "action" in kw or "type" in kw:
        return
    base = _strip_optional(annotation)
    if base is bool:
        kw["action"] = "store_true"
        return
    if typing.get_origin(base) is list:
        kw.setdefault("nargs", "+")
        (base,) = typing.get_args(base) or (str,)
    if base not in (int, float, str):
        raise TypeError(f"flag --{name}: annotation {annotation!r} has no command-line type (pass type=...)")
    kw["type"] = base


def _strip_optional(annotation: Any) -> Any:
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(annotation) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return annotation
