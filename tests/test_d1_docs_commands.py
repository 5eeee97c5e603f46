"""The commands and example files that README.md and docs/*.md name still exist.

A user copies ``p2pfl ...`` lines from the docs. When a flag is renamed, a config key
moves or an example file goes away, the docs go stale without any other test noticing.
This test reads every ``p2pfl`` command in the docs (fenced and indented code blocks,
and inline code spans) and checks it against the real command line, without running
anything long:

- the subcommand exists and every flag it uses is one of that subcommand's options;
- a command from a code block parses completely (values of the right type, no extra
  arguments), as the CLI's own parser would take it;
- its ``--set key=value`` overrides are keys of the file it names (scenario, sweep or
  node config), validated as ``p2pfl`` would before it starts;
- every ``examples/...`` file the docs name exists, and each ``.toml`` among them loads
  as the configuration it is (scenario, sweep or node config).

The checker itself is tested on made-up mistakes, so that it cannot pass by finding
nothing.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest
import typer.main

from p2pfl.cli import app
from p2pfl.config import ConfigError, read_toml
from p2pfl.nodecli import load_node_config
from sim.scenario import load_scenario, scenario_from_dict
from sim.sweep import load_sweep, plan_cells

ROOT = Path(__file__).resolve().parents[1]
DOC_FILES = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]

# words that may stand before the command itself on a doc line
_PREFIXES = {"sudo", "nice", "timeout", "env", "exec"}
_SEPARATORS = {"&&", "||", ";", "|"}
_ENV_ASSIGNMENT = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*=")
_INLINE = re.compile(r"`(p2pfl\s[^`]+)`")
_EXAMPLE_PATH = re.compile(r"examples/[\w./*{},-]*\w")


@dataclass(frozen=True)
class DocCommand:
    """One ``p2pfl`` invocation found in a doc: where, its arguments, and whether it is a
    whole command line (a code block) or a fragment (an inline span such as
    ``p2pfl sweep --seeds``, checked for its flags only)."""

    where: str
    argv: tuple[str, ...]
    whole: bool


def _code_lines(text: str) -> Iterator[tuple[int, str]]:
    """Lines of fenced blocks and of 4-space indented blocks, continuation lines joined."""
    in_fence = False
    pending = ""
    start = 0
    for number, line in enumerate(text.splitlines(), 1):
        if line.lstrip().startswith("```"):
            in_fence = not in_fence
            continue
        if not (in_fence or line.startswith("    ")):
            continue
        stripped = line.strip()
        if not pending:
            start = number
        if stripped.endswith("\\"):
            pending += stripped[:-1] + " "
            continue
        yield start, pending + stripped
        pending = ""


def _tokens(line: str) -> list[str]:
    """A doc line as shell words: placeholders like ``<its peer id>`` become one word."""
    line = re.sub(r"<[^<>]*>", "X", line)
    if line.startswith("$ "):
        line = line[2:]
    try:
        return shlex.split(line, comments=True)
    except ValueError:  # prose in an indented block (an unmatched quote): no command
        return []


def _invocations(words: list[str]) -> Iterator[list[str]]:
    """The ``p2pfl`` invocations in a list of shell words (``a && p2pfl ...; ...``)."""
    segment: list[str] = []
    for word in [*words, ";"]:
        if word not in _SEPARATORS:
            segment.append(word)
            continue
        i = 0
        while i < len(segment) and (_ENV_ASSIGNMENT.match(segment[i]) or segment[i] in _PREFIXES):
            i += 2 if segment[i] == "nice" and i + 1 < len(segment) and segment[i + 1] == "-n" else 1
            while i < len(segment) and re.fullmatch(r"-?\d+(\.\d+)?", segment[i]):  # nice / timeout values
                i += 1
        if i < len(segment) and segment[i] == "p2pfl":
            yield segment[i + 1:]
        segment = []


def doc_commands(text: str, name: str) -> list[DocCommand]:
    """Every ``p2pfl`` command of one doc's text."""
    found: list[DocCommand] = []
    for number, line in _code_lines(text):
        for argv in _invocations(_tokens(line)):  # "..." stands for more options: left out
            found.append(DocCommand(f"{name}:{number}", tuple(a for a in argv if a != "..."), True))
    for match in _INLINE.finditer(text):  # a span may run over a line break
        number = text.count("\n", 0, match.start()) + 1
        for argv in _invocations(_tokens(" ".join(match.group(1).split()))):
            found.append(DocCommand(f"{name}:{number}", tuple(a for a in argv if a != "..."), False))
    return found


class NoSuchCommand(ValueError):
    """A doc names a subcommand the CLI does not have."""


# click's objects are used by duck typing: typer vendors its own copy of click in newer
# releases (typer._click), the real one in older ones
def _resolve(argv: tuple[str, ...]) -> tuple[Any, list[str], str]:
    """The click command an argv names (through ``data fetch``), its own arguments and name."""
    command: Any = typer.main.get_command(app)
    args = list(argv)
    name = "p2pfl"
    while isinstance(getattr(command, "commands", None), dict) and args and not args[0].startswith("-"):
        sub = command.commands.get(args[0])
        if sub is None:
            raise NoSuchCommand(f"{name} has no subcommand {args[0]!r}")
        name = f"{name} {args.pop(0)}"
        command = sub
    return command, args, name


def _flags(command: Any) -> set[str]:
    """Every option name of a click command, ``--help`` included."""
    return {"--help"} | {
        flag
        for param in command.params
        if param.param_type_name == "option"
        for flag in [*param.opts, *param.secondary_opts]
    }


def _option_values(command: Any, args: list[str]) -> dict[str, list[str]]:
    """Each option's values in ``args`` (by its long name), and the positional arguments."""
    by_flag = {
        flag: param
        for param in command.params
        if param.param_type_name == "option"
        for flag in [*param.opts, *param.secondary_opts]
    }
    values: dict[str, list[str]] = {"": []}
    i = 0
    while i < len(args):
        flag, _, inline = args[i].partition("=")
        param = by_flag.get(flag) if args[i].startswith("-") else None
        if param is None:
            values[""].append(args[i])
            i += 1
            continue
        key = max(param.opts, key=len)
        if param.is_flag or param.count:
            values.setdefault(key, []).append("true")
            i += 1
        elif inline:
            values.setdefault(key, []).append(inline)
            i += 1
        else:
            values.setdefault(key, []).extend(args[i + 1:i + 2])
            i += 2
    return values


def _load_config(path: Path, overrides: list[str], kind: str, flags: dict[str, Any] | None = None) -> None:
    """Load ``path`` as ``kind`` (scenario, sweep, node) with ``overrides``, as the CLI would."""
    if kind == "sweep":
        sweep, base = load_sweep(path, overrides)
        scenario_from_dict(base)
        assert plan_cells(sweep, base), f"{path}: a sweep without cells"
    elif kind == "node":
        load_node_config(path, overrides, flags)
    else:
        load_scenario(path, overrides)


def _kind_of(path: Path) -> str:
    """Which command reads an example file: a sweep (base + attacks/defences), a node
    config (examples/node/, examples/modest/node.toml) or a scenario."""
    raw = read_toml(path, "config", ConfigError)
    if "base" in raw and ("attacks" in raw or "defences" in raw):
        return "sweep"
    if path.parent.name == "node" or path.name == "node.toml":  # examples/node/, examples/modest/node.toml
        return "node"
    return "scenario"


def check_command(command: DocCommand) -> list[str]:
    """What is wrong with one doc command (empty when the CLI takes it)."""
    try:
        click_command, args, name = _resolve(command.argv)
    except NoSuchCommand as error:
        return [f"{command.where}: p2pfl {' '.join(command.argv)}: {error}"]
    known = _flags(click_command)
    problems = [
        f"{command.where}: {name}: no option {word.partition('=')[0]!r} (it has {sorted(known)})"
        for word in args
        if word.startswith("-") and not re.fullmatch(r"-\d.*", word) and word.partition("=")[0] not in known
    ]
    if problems or not command.whole:
        return problems
    try:
        click_command.make_context(name, list(args))
    except Exception as error:  # click's UsageError, BadParameter, ...
        if not hasattr(error, "format_message"):
            raise
        return [f"{command.where}: {name} {' '.join(args)}: {error.format_message()}"]
    values = _option_values(click_command, args)
    overrides = values.get("--set", [])
    if name == "p2pfl node":
        target = values.get("--config", [None])[0]
        kind = "node"
    elif name in ("p2pfl sim", "p2pfl sweep"):
        target = values[""][0] if values[""] else None
        kind = "sweep" if name == "p2pfl sweep" else "scenario"
    else:
        return []
    if target is None or not (ROOT / target).is_file() or not target.startswith("examples/"):
        return []  # a run folder or a file the user makes: nothing in the repository to load
    flags: dict[str, Any] | None = {"attack.name": values["--attack"][0]} if "--attack" in values else None
    try:
        _load_config(ROOT / target, overrides, kind, flags)
    except ConfigError as error:
        return [f"{command.where}: {name} {target} {' '.join(overrides)}: {error}"]
    return []


def example_paths(text: str) -> set[str]:
    """The ``examples/...`` paths a doc names (``bristle_*.toml`` and ``{a,b}`` kept as written)."""
    return {match.rstrip(".,") for match in _EXAMPLE_PATH.findall(text)}


def _expand(pattern: str) -> list[Path]:
    """``examples/a_{x,y}.toml`` and ``examples/papers/bristle_*.toml`` to the files they mean."""
    braces = re.search(r"\{([^{}]*)\}", pattern)
    if braces:
        return [
            path
            for choice in braces.group(1).split(",")
            for path in _expand(pattern[: braces.start()] + choice + pattern[braces.end():])
        ]
    return sorted(ROOT.glob(pattern)) if "*" in pattern else [ROOT / pattern]


def check_example(pattern: str, where: str) -> list[str]:
    """What is wrong with one named example path: missing, or a TOML that does not load."""
    # made by a command the docs give (examples/custom/make_npz.py writes it)
    if pattern == "examples/custom/digits.npz":
        maker = ROOT / "examples/custom/make_npz.py"
        return [] if maker.is_file() else [f"{where}: {pattern}: nothing writes it"]
    paths = _expand(pattern)
    problems = [f"{where}: {pattern}: no such file or folder" for path in paths if not path.exists()]
    if not paths:
        problems.append(f"{where}: {pattern}: matches no file")
    for path in paths:
        if path.suffix == ".toml" and path.is_file():
            try:
                _load_config(path, [], _kind_of(path))
            except ConfigError as error:
                problems.append(f"{where}: {pattern}: {error}")
    return problems


def _all_doc_commands() -> list[DocCommand]:
    return [
        command
        for doc in DOC_FILES
        for command in doc_commands(doc.read_text(encoding="utf-8"), str(doc.relative_to(ROOT)))
    ]


@pytest.fixture(autouse=True)
def _at_root(monkeypatch: pytest.MonkeyPatch) -> None:
    # factory paths (examples/custom/model.py:small_cnn) are relative to the working directory
    monkeypatch.chdir(ROOT)


def test_the_docs_name_many_commands() -> None:
    """The extraction finds the docs' commands (a broken extractor would check nothing)."""
    commands = _all_doc_commands()
    subcommands = {c.argv[0] for c in commands if c.argv}
    assert {"sim", "sweep", "node", "topo", "data", "report", "compare", "relay"} <= subcommands
    assert sum(c.whole for c in commands) >= 40


def test_every_doc_command_is_accepted_by_the_cli() -> None:
    problems = [problem for command in _all_doc_commands() for problem in check_command(command)]
    assert not problems, "\n".join(problems)


def test_every_example_the_docs_name_exists_and_loads() -> None:
    problems: list[str] = []
    named = 0
    for doc in DOC_FILES:
        for pattern in sorted(example_paths(doc.read_text(encoding="utf-8"))):
            named += 1
            problems += check_example(pattern, str(doc.relative_to(ROOT)))
    assert named >= 30
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("p2pfl sim examples/dpsgd_digits_ring.toml --made-up-flag 3", "no option '--made-up-flag'"),
        ("p2pfl sim examples/dpsgd_digits_ring.toml --set protocol.fanoutt=3", "protocol.fanoutt"),
        ("p2pfl sim examples/dpsgd_digits_ring.toml --jobs zero", "--jobs"),
        ("p2pfl sim examples/dpsgd_digits_ring.toml extra-argument", "extra-argument"),
        (
            "OMP_NUM_THREADS=1 nice -n 10 p2pfl sweep examples/resilience/sweep.toml --set rounds.x=1",
            "rounds",
        ),
        ("p2pfl data fetch mnist --data-dirr /tmp", "no option '--data-dirr'"),
        ("p2pfl simulate examples/dpsgd_digits_ring.toml", "no subcommand 'simulate'"),
        ("p2pfl node -c examples/node/node.toml --peer-index 1 --set network.no_such_key=1", "no_such_key"),
        ("p2pfl node -c examples/node/node.toml --attack label_flip --set attack.isolatte=true", "isolatte"),
    ],
)
def test_the_checker_reports_a_made_up_flag_or_key(line: str, expected: str) -> None:
    commands = doc_commands(f"```bash\n{line}\n```\n", "made-up.md")
    assert len(commands) == 1
    problems = check_command(commands[0])
    assert problems and expected in problems[0], problems


def test_the_checker_reports_a_made_up_flag_in_an_inline_span() -> None:
    commands = doc_commands("run `p2pfl sweep --seedz` to ...\n", "made-up.md")
    assert [p for c in commands for p in check_command(c)] == [
        f"made-up.md:1: p2pfl sweep: no option '--seedz' (it has {sorted(_known('sweep'))})"
    ]


def _known(sub: str) -> set[str]:
    return _flags(_resolve((sub,))[0])


def test_the_checker_reports_a_missing_example() -> None:
    assert check_example("examples/no_such_scenario.toml", "made-up.md") == [
        "made-up.md: examples/no_such_scenario.toml: no such file or folder"
    ]
    assert check_example("examples/disaster/ba_{digits,nope}_lose_holders.toml", "made-up.md") == [
        "made-up.md: examples/disaster/ba_{digits,nope}_lose_holders.toml: no such file or folder"
    ]
    assert check_example("examples/papers/nope_*.toml", "made-up.md") == [
        "made-up.md: examples/papers/nope_*.toml: matches no file"
    ]
