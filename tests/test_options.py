"""Every numeric option is checked where it is parsed, and every command's --help example, run with corrupted
inputs, ends in one line that names the problem and a non-zero exit, never a traceback."""

from __future__ import annotations

import re
import shlex
import sys
import typing

import pytest
import typer

from mergevq_cli import app as app_module
from mergevq_cli.commands import (benchmark, demo, evaluate, export, generate, info, probe, reconstruct, tokenize,
                                  train_ar, train_tokenizer, tune_recovery, weights)
from mergevq_cli.options import finite, positive

MODULES = (benchmark, demo, evaluate, export, generate, info, probe, reconstruct, tokenize, train_ar, train_tokenizer,
           tune_recovery, weights)


def run_main(monkeypatch, capsys, argv: list[str]) -> tuple[int, list[str]]:
    """`mergevq argv` in this process: its exit code and its non-empty stderr lines."""
    monkeypatch.setattr(sys, "argv", ["mergevq", *argv])
    with pytest.raises(SystemExit) as exc:
        app_module.main()
        raise SystemExit(0)
    err = capsys.readouterr().err
    code = exc.value.code if isinstance(exc.value.code, int) else 1
    return code, [ln for ln in err.splitlines() if ln.strip()]


def _numeric_options() -> list[tuple[list[str], typing.Any, type]]:
    cmd = typer.main.get_command(app_module.app)
    found = []

    def walk(c, path):
        if hasattr(c, "commands"):
            for name, sub in c.commands.items():
                walk(sub, [*path, name])
            return
        for p in c.params:
            ann = p.type_descriptor.annotation
            args = [a for a in typing.get_args(ann) if a is not type(None)]
            base = args[0] if typing.get_origin(ann) is typing.Union and len(args) == 1 else ann
            if base in (int, float):
                found.append((path, p, base))

    walk(cmd, [])
    return found


NUMERIC = _numeric_options()


def test_the_sweep_sees_the_numeric_options():
    names = {(" ".join(path), p.opts[0]) for path, p, _ in NUMERIC}
    assert {("reconstruct", "--batch"), ("generate", "--shard-size"), ("probe", "--lr"), ("benchmark ar", "--vocab"),
            ("train-tokenizer", "--max-steps"), ("tune-recovery", "--replace")} <= names


@pytest.mark.parametrize("path,param,kind", NUMERIC, ids=[f"{' '.join(a)} {p.opts[0]}" for a, p, _ in NUMERIC])
def test_every_numeric_option_has_a_range(path, param, kind):
    if kind is int:
        assert param.min is not None, f"{' '.join(path)} {param.opts[0]}: declare typer.Option(min=...)"
    else:  # a range alone lets nan through
        check = getattr(param.callback, "__wrapped__", param.callback)  # typer wraps callbacks
        assert check in (finite, positive), f"{' '.join(path)} {param.opts[0]}: callback=finite or positive"


@pytest.mark.parametrize("path,param,kind", NUMERIC, ids=[f"{' '.join(a)} {p.opts[0]}" for a, p, _ in NUMERIC])
def test_an_out_of_range_value_is_one_line_naming_the_option(monkeypatch, capsys, tmp_path, path, param, kind):
    monkeypatch.chdir(tmp_path)
    bad = ["nan"] if kind is float else []
    if param.min is not None:
        bad.append(str(param.min - 1))
    if param.max is not None:
        bad.append(str(param.max + 1))
    if getattr(param.callback, "__wrapped__", param.callback) is positive:
        bad.append("0")
    for value in bad:  # the bad option first: click checks values in the order they were given
        code, lines = run_main(monkeypatch, capsys, [*path, param.opts[0], value])
        assert code != 0 and len(lines) == 1, (value, lines)
        assert param.opts[0] in lines[0] and "Traceback" not in lines[0], lines


@pytest.mark.parametrize("argv,needle", [
    (["generate", "--top-p", "1.5"], "--top-p"),
    (["generate", "--cfg", "nan"], "--cfg"),
    (["generate", "--temperature", "-1"], "--temperature"),
    (["generate", "--top-k", "-2"], "--top-k"),
    (["benchmark", "kv-cache", "--batch", "1,0"], "--batch"),
    (["benchmark", "kv-cache", "--redundancy", "0,1"], "--redundancy"),
    (["reconstruct", "--tokens", "9,-4"], "--tokens"),
    (["benchmark", "lfq", "--chunk", "0"], "--chunk"),
    (["generate", "--class", "3", "--class", "-1"], "--class"),
    (["probe", "shapes", "--tokens", "-5"], "--tokens"),
    (["probe", "shapes", "--tokens", "half"], "--tokens"),
    (["nosuch"], "No such command"),
    (["reconstruct", "--batch", "x"], "--batch"),
])
def test_list_and_sampling_values_are_checked(monkeypatch, capsys, tmp_path, argv, needle):
    monkeypatch.chdir(tmp_path)
    code, lines = run_main(monkeypatch, capsys, argv)
    assert code != 0 and len(lines) == 1 and needle in lines[0], lines


# ----------------------------------------------------------------------------- the --help examples, corrupted


def _examples() -> list[list[str]]:
    out = []
    for m in MODULES:
        text = re.sub(r"\\\n\s*", " ", m.EXAMPLES)
        for line in text.splitlines():
            line = line.split(" # ")[0].strip()
            line = re.sub(r"^torchrun .*? -m mergevq_cli ", "mergevq ", line)
            if line.startswith("mergevq "):
                out.append(shlex.split(line)[1:])
    return out


PATHLIKE = re.compile(r"(/|\.(yaml|png|npz|pth|json)$)")


def _corrupt(argv: list[str], tmp) -> list[list[str]]:
    """Variants of one example: each path replaced by a file of garbage with the same suffix, and the first
    numeric value replaced by -5. An example with nothing to corrupt gives none."""
    variants = []
    junk = []
    for i, a in enumerate(argv):
        if PATHLIKE.search(a) and not a.startswith("-") and "=" not in a:
            f = tmp / f"junk{i}{'.' + a.rsplit('.', 1)[1] if '.' in a.rsplit('/', 1)[-1] else ''}"
            f.write_bytes(b"\x00not what it claims\xff" * 4)
            junk.append((i, str(f)))
    if junk:
        v = list(argv)
        for i, f in junk:
            v[i] = f
        variants.append(v)
    for i, a in enumerate(argv[1:], 1):
        if argv[i - 1].startswith("-") and re.fullmatch(r"[0-9][0-9.,]*", a):
            variants.append([*argv[:i], "-5", *argv[i + 1:]])
            break
    return variants


EXAMPLES = _examples()


def test_the_examples_are_found():
    cmds = {a[0] for a in EXAMPLES}
    assert cmds >= {"train-tokenizer", "train-ar", "reconstruct", "tokenize", "generate", "probe", "evaluate", "info",
                    "benchmark", "tune-recovery", "demo", "weights", "export"}


@pytest.mark.parametrize("argv", EXAMPLES, ids=[" ".join(a)[:60] for a in EXAMPLES])
def test_help_examples_with_corrupted_inputs_fail_in_one_line(monkeypatch, capsys, tmp_path, argv):
    monkeypatch.chdir(tmp_path)  # no runs/ here: only the shipped weights to fall back to
    variants = _corrupt(argv, tmp_path)
    if not variants:
        pytest.skip("nothing to corrupt in this example")
    for v in variants:
        code, lines = run_main(monkeypatch, capsys, v)
        lines = [ln for ln in lines if not ln.startswith(("warning:", "note:"))]
        assert code != 0 and len(lines) == 1 and lines[0].startswith("error:"), (v, lines)
        assert "Traceback" not in lines[0]
