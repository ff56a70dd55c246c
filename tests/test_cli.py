"""The command helper (`minihiggs.cli`): dataclass fields -> flags, --help defaults shown once, and the exit rule
(a UserError is one `<prog>: error:` line and code 2, Ctrl-C is 130, a bug keeps its traceback)."""

from __future__ import annotations

import argparse
import subprocess
import sys
from dataclasses import dataclass, field

import pytest

from helpers import REPO
from minihiggs.cli import build_parser, flag, parse_flags, run
from minihiggs.errors import GenerateError, UserError


@dataclass
class Demo:
    src: str = flag(None, "input directory", "data", required=True)
    base_ckpt: str | None = flag(None, "base checkpoint", "data", aliases=("--base",))
    workers: int | None = flag(None, "worker processes (default: 2 on CUDA, 0 on CPU)", "runtime")
    steps: int = flag(10, "optimizer steps", "runtime")
    frames: int = flag(500, "decoding steps (default: 20 s of audio)", "runtime")
    lr: float = flag(2e-4, "learning rate", "runtime")
    targets: list[str] | None = flag(None, "module names", "runtime")
    strict: bool = flag(False, "fail on any skipped entry")
    compile: bool | None = flag(None, "torch.compile", action=argparse.BooleanOptionalAction)
    mode: str = flag("fast", "how", choices=("fast", "slow"))
    internal: int = field(default=7)  # no flag metadata: not a command-line flag


def test_fields_become_typed_flags_with_aliases():
    args = parse_flags(Demo, ["--src", "d", "--base", "ckpt", "--workers", "3", "--lr", "0.5", "--targets", "q", "v",
                              "--strict", "--no-compile", "--mode", "slow"])
    assert args == Demo(src="d", base_ckpt="ckpt", workers=3, steps=10, lr=0.5, targets=["q", "v"], strict=True,
                        compile=False, mode="slow")
    assert isinstance(args.workers, int) and isinstance(args.lr, float)
    assert parse_flags(Demo, ["--src", "d", "--base_ckpt", "x"]).base_ckpt == "x"  # the field's own name too
    assert parse_flags(Demo, ["--src", "d"]) == Demo(src="d")  # defaults are the dataclass defaults
    assert "--internal" not in build_parser(Demo).format_help()


@pytest.mark.parametrize("argv", [["--steps", "1"], ["--src", "d", "--steps", "x"], ["--src", "d", "--mode", "no"]])
def test_malformed_flags_exit_through_argparse_with_code_2(argv, capsys):
    with pytest.raises(SystemExit) as e:
        parse_flags(Demo, argv, prog="demo")
    assert e.value.code == 2 and "demo: error:" in capsys.readouterr().err


def test_help_states_each_default_once_and_only_where_it_informs():
    ap = build_parser(Demo, prog="demo")
    text = ap.format_help()
    fmt = ap._get_formatter()
    shown = {a.dest: fmt._expand_help(a) for a in ap._actions if a.help}
    assert shown["workers"] == "worker processes (default: 2 on CUDA, 0 on CPU)"  # not a second "(default: None)"
    assert shown["frames"] == "decoding steps (default: 20 s of audio)"  # not a second "(default: 500)"
    assert shown["steps"] == "optimizer steps (default: 10)"
    assert shown["lr"] == "learning rate (default: 0.0002)"
    assert shown["mode"] == "how (default: fast)"
    for name in ("src", "base_ckpt", "targets", "strict", "compile"):  # required / None / False: nothing to add
        assert "default" not in shown[name], shown[name]
    assert " ".join(text.split()).count("(default:") == 5  # (the help text is wrapped at the terminal width)
    body = text.split("\n\n", 1)[1]  # after the usage lines
    assert body.index("data:") < body.index("--src") < body.index("runtime:") < body.index("--workers")


def test_run_turns_a_user_error_into_one_line_and_code_2(capsys):
    def command(argv):
        raise GenerateError("first problem\n  second problem\n")

    assert run("demo", command, []) == 2
    assert capsys.readouterr().err == "demo: error: first problem; second problem\n"


def test_run_passes_the_command_result_and_argv(capsys):
    seen = []
    assert run("demo", lambda argv: seen.append(argv), ["--x"]) == 0 and seen == [["--x"]]
    assert run("demo", lambda argv: 3, None) == 3
    assert capsys.readouterr().err == ""


def test_run_keeps_bugs_and_answers_ctrl_c_with_130(capsys):
    def bug(argv):
        raise KeyError("not a user error")

    with pytest.raises(KeyError):
        run("demo", bug, [])

    def interrupted(argv):
        raise KeyboardInterrupt

    assert run("demo", interrupted, []) == 130
    assert capsys.readouterr().err == "demo: interrupted\n"


def test_an_unsupported_annotation_is_named():
    @dataclass
    class Bad:
        pairs: dict = flag(None, "no flag type for a dict")

    with pytest.raises(TypeError, match="--pairs"):
        build_parser(Bad)


def test_a_real_command_follows_the_rule():
    """`python -m minihiggs.generate` ends through `run`: a user error is one line and exit code 2."""
    r = subprocess.run([sys.executable, "-m", "minihiggs.generate", "--text", "Hi."], cwd=REPO, capture_output=True,
                       text=True)
    assert r.returncode == 2 and r.stderr == "generate: error: --text needs --out FILE.wav\n", r.stderr
    assert issubclass(GenerateError, UserError)
